"""The vision encoder's contrastive pretraining at the paper's scale (appendix B.1.3).

From the paper: NFNet-F6 at 288 px; a BERT-style text encoder, mean-pooled and projected,
with the image side, to a 1376-d joint space, L2-normalised; the two-term contrastive loss
with a learnable inverse temperature and label smoothing 0.1; Adam, learning rate 1e-3
decaying linearly to 0; adaptive gradient clipping 0.01 on the NFNet, global-norm clipping
at 10 on the text side; 16,384 image-text pairs per batch (ALIGN and LTIP) on 512 TPUv4 chips.

Not in the paper, chosen here [unconfirmed]: the text encoder's size (BERT-base: 12 layers,
768 wide, 12 heads of 64), its vocabulary (the decoder's 32,000-token SentencePiece one),
texts of up to 64 tokens, the step count, no warm-up, no weight decay (the paper says Adam),
the initial inverse temperature (10), and one dataset holding both sources' pairs (every
pair of the batch is a negative for every other one).

Batch sizes in `config.data.datasets` are per host: 128 per host on the paper's 512 chips
(a v4-1024 slice, 128 hosts) is the paper's 16,384. The image embeddings of the whole batch
meet the text embeddings in one [16384, 16384] similarity matrix: the compiler all-gathers
the (1376-d) embeddings over the data axis. Weights are replicated (pure data parallelism,
the NFNet-F6 and the text tower are 0.6B parameters) with ZeRO-1 optimizer state; full remat
of the NFNet's and the text tower's scanned blocks keeps one block's activations at a time.
The pairs' TFRecords: FLAMINGO_CONTRASTIVE_PAIRS (a glob), e.g. written by
`python -m flamingo_jax.data.prepare image_text`. AOT check: BENCHMARKS.md, AOT section.
"""

import os

from flamingo_jax import config_defaults

PAIRS = os.environ.get("FLAMINGO_CONTRASTIVE_PAIRS", "")
PAPER_BATCH = 16_384
PAPER_CHIPS = 512  # TPU v4
HOSTS = PAPER_CHIPS // 4  # four chips per TPU v4 host


def get_config():
    config = config_defaults.base()
    config.name = "contrastive-nfnet-f6"
    config.objective = "contrastive"
    m = config.model
    m.vision.update(encoder="nfnet", image_size=288, num_frames=1)
    m.vision.nfnet.variant = "F6"
    m.decoder.vocab_size = 32000  # the text encoder's vocabulary (model.total_vocab ids)
    m.remat_policy = "full"
    config.contrastive.update(label_smoothing=0.1, initial_inverse_temperature=10.0, vision_agc=0.01,
                              text_clip_norm=10.0)
    config.contrastive.text.update(dim=768, num_layers=12, num_heads=12, head_dim=64, mlp_ratio=4, max_len=64,
                                   embed_dim=1376)
    config.train.update(steps=500_000, learning_rate=1e-3, warmup_steps=0, schedule="linear", weight_decay=0.0,
                        microbatches=1)
    config.train.spike_guard.enabled = True
    config.data.update(image_size=288, datasets=[
        dict(name="align_ltip", kind="image_text", pattern=PAIRS, batch_size=PAPER_BATCH // HOSTS, max_len=64)])
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    config.optimizer_sharding = "zero1"
    return config
