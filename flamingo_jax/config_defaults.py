"""What every config file in `configs/` starts from.

A config file is an ml_collections file with `get_config()`; it calls `base()`
(or `paper_config()`) and overrides what differs. Every section mirrors a
dataclass of `flamingo_jax.core.config.RunConfig` field for field, defaults
included, so a ConfigDict keeps the types (a wrong type on the command line
fails at load time) and `RunConfig.from_config` validates names, types and
ranges before anything is built. `config.data` is the input mixture
(`flamingo_jax.data.mixture`).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from flamingo_jax.core.config import RunConfig, TrainConfig, defaults
from flamingo_jax.models.config import FlamingoConfig


def model_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(FlamingoConfig()))


def train_defaults() -> ml_collections.ConfigDict:
    """The paper's recipe (appendix B.1.2); see `core.config.TrainConfig`."""
    return ml_collections.ConfigDict(dataclasses.asdict(TrainConfig()))


def paper_config(name: str) -> ml_collections.ConfigDict:
    """`base()` with what the paper's 3B, 9B and 80B share (Table 4): NFNet-F6 at 320 px,
    8 training frames, and the 6-layer, 1536-wide Resampler with 16 heads of 128 and 64
    latents. Each model's config then sets its xattn blocks and frozen LM."""
    config = base()
    config.name = name
    m = config.model
    m.vision.update(encoder="nfnet", image_size=320, num_frames=8)
    m.vision.nfnet.variant = "F6"
    m.resampler.update(num_layers=6, dim=1536, num_heads=16, head_dim=128, num_latents=64)
    # The frozen NFNet's weights are replicated (None; the paper leaves it unsharded), and its
    # frames are split over 'tensor' beside 'batch' ('vision_batch'), so the tensor ranks share
    # its forward instead of each repeating it (BENCHMARKS.md, AOT section); the features are
    # gathered before the Resampler. Where the tensor ranks do not divide a data shard's frames,
    # the NFNet's frames are cut into rows as well rather than padded (`encode_frames`).
    # ('fsdp', already in 'batch', turns the split off.)
    config.mesh_rules.conv_out = None
    config.mesh_rules.vision_batch = "tensor"
    # Long runs on thousands of chips: a loss spike rolls back to the last good checkpoint by
    # itself (training/spike_guard.py) instead of waiting for a person to notice.
    config.train.spike_guard.enabled = True
    return config


def openflamingo_config(name: str, *, every: int, lm_dim: int) -> ml_collections.ConfigDict:
    """`base()` with what OpenFlamingo's released models share (its factory and Flamingo class):
    open_clip ViT-L/14 (OpenAI weights: QuickGELU) at 224 px, one frame, its ln_post'd patch
    tokens; the Resampler at the ViT's width (1024, no input projection), 6 layers of 8 heads of
    64, 64 latents, GELU FFW x4, no frame or media-position table; GATED XATTN-DENSE blocks of
    8 heads of 64 with a GELU FFW of 4 x the LM width, before LM layer i when (i + 1) % every == 0;
    media association from the `<image>` ids; new rows `<|endofchunk|>`, `<image>`, `<PAD>`.
    LayerNorms are torch's (eps 1e-5, weight and bias), as ours. Each config sets its LM."""
    config = base()
    config.name = name
    m = config.model
    m.vision.update(encoder="vit", image_size=224, num_frames=1)
    m.vision.vit.update(width=1024, num_layers=24, num_heads=16, patch_size=14, mlp_ratio=4.0,
                        activation="quick_gelu", include_class_token=True, norm_eps=1e-5, norm_output=True)
    m.resampler.update(num_layers=6, dim=1024, num_heads=8, head_dim=64, num_latents=64, ffw_mult=4,
                       activation="gelu_exact", frame_embedding=False, media_positions=0)
    m.xattn.update(every=every, first_layer=every - 1, num_heads=8, head_dim=64, ffw_hidden=4 * lm_dim,
                   activation="gelu_exact", media_association="openflamingo")
    m.num_new_tokens = 3
    return config


def base() -> ml_collections.ConfigDict:
    """`RunConfig()`'s defaults as a ConfigDict (see flamingo_jax/core/config.py for each field)."""
    config = ml_collections.ConfigDict(defaults())
    assert set(config) == {f.name for f in dataclasses.fields(RunConfig)}
    return config
