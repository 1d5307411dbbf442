"""Tiny Flamingo and its two pretraining stages: the paper's recipe in minutes on 2 CPU cores.

    python -m flamingo_jax.recipe --config=configs/tiny.py        # all three stages, then evaluation
    python -m flamingo_jax.train --config=configs/tiny.py:lm     # one stage alone

Same architecture as the paper's models (NFNet, Perceiver Resampler, GATED XATTN-DENSE, a
Chinchilla-style decoder), scaled down, fp32 throughout, trained on the project's synthetic
corpus (generated into `synthetic.out_dir` on first use). `get_config(stage)`:

  contrastive  the NFNet and a small BERT-style text encoder on image- and video-text pairs
  lm           the decoder on the corpus' text
  flamingo     Resampler and xattn blocks over both (`backbones.*`; the recipe points them at
               the two stages' exports; without them the backbones are random)
"""

import os

from flamingo_jax import config_defaults
from flamingo_jax.data import synthetic

DATA_DIR = os.environ.get("FLAMINGO_TINY_DATA", "data_cache/synthetic-tiny")
STAGES = ("contrastive", "lm", "flamingo")
LM_DRILL_STEPS = 1500  # the LM stage's steps of copying drills alone, before the corpus joins


def model(config) -> None:
    m = config.model
    m.vision.encoder = "nfnet"
    m.vision.nfnet.variant = "tiny"
    m.vision.image_size = 64
    m.vision.num_frames = 8
    m.resampler.update(num_layers=2, dim=64, num_heads=4, head_dim=16, num_latents=16)
    m.xattn.update(every=2, num_heads=4, head_dim=16)
    m.decoder.update(vocab_size=512, dim=64, num_layers=4, num_heads=4, head_dim=16, max_len=512,
                     ffw="gelu", positions="relative", tie_embeddings=True)
    m.dtype = "float32"
    m.frozen_param_dtype = "float32"
    m.trainable_param_dtype = "float32"
    # Keep matmul outputs for the backward, recompute the elementwise work: no matmul runs twice,
    # and on 2 CPU cores each stage's step is faster than keeping everything (paired runs: LM 23%,
    # Flamingo 13%, contrastive 2%), with fewer temporaries.
    m.remat_policy = "dots"


def get_config(stage: str = "flamingo"):
    if stage not in STAGES:
        raise ValueError(f"configs/tiny.py:{stage}: the stages are {STAGES}.")
    config = config_defaults.base()
    config.name = "tiny" if stage == "flamingo" else f"tiny-{stage}"
    config.objective = stage
    model(config)
    # 8,000 pairs (and 4,000 documents, 1,000 videos; 25 s to write): with 3,000 the contrastive
    # encoder stopped improving at 200 steps (held-out recall@1 23-29% for 200-400 steps); with
    # 8,000 and 400 steps it reaches 43% / 39% / 26% at seeds 0 / 1 / 2 (2026-12-07): a wide spread.
    config.synthetic.update(out_dir=DATA_DIR, num_examples=8000, num_eval=200, image_size=64, seed=0)
    config.data.update(synthetic.data_config(DATA_DIR, image_size=64, interleaved_batch=4, pair_batch=8,
                                             video_batch=2, interleaved_len=96, pair_len=24, max_images=6,
                                             num_frames=4))
    config.checkpoint.update(every_steps=100, keep=2)
    if stage == "contrastive":
        pairs = [d for d in config.data.datasets if d["kind"] in ("image_text", "video_text")]
        for d in pairs:
            d.update(batch_size=32 if d["kind"] == "image_text" else 4, weight=1.0)
        config.data.datasets = pairs
        config.contrastive.text.update(dim=64, num_layers=2, num_heads=4, head_dim=16, mlp_ratio=4, max_len=32,
                                       embed_dim=64)
        config.train.update(steps=400, learning_rate=2e-3, warmup_steps=20, schedule="linear", log_every=20)
    elif stage == "lm":
        # Copying first: the corpus is so predictable that a tiny LM trained on it alone never learns
        # to copy from its context (no induction), which few-shot prompts need. Random-token runs
        # said twice teach it (by about step 1,000-1,250 here; bench/induction.py), then the corpus joins
        # while the drills go on (alone, the corpus makes it forget copying within 250 steps).
        for d in config.data.datasets:
            d["from_step"] = LM_DRILL_STEPS
        config.data.datasets.append({"name": "copying", "kind": "repeats", "batch_size": 8, "max_len": 128,
                                     "min_repeat_len": 10, "max_repeat_len": 40, "weight": 1.0})
        config.train.update(steps=LM_DRILL_STEPS + 500, learning_rate=3e-3, warmup_steps=20, schedule="linear",
                            log_every=100)
        config.checkpoint.every_steps = 500
    else:
        for d in config.data.datasets:
            if d["kind"] == "image_text":
                # More captions per step, at the documents' weight (the paper's is 0.2): the visual path
                # learns to read the image from captions first; at 0.2 the documents' gradient drowns
                # theirs and 400 steps end with real and shuffled images giving the same loss.
                d.update(batch_size=16, weight=1.0)
        config.train.update(steps=400, learning_rate=3e-3, warmup_steps=20, log_every=20)
    return config
