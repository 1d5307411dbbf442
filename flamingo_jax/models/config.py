"""Typed model configuration, validated before anything is built.

Config files (`configs/*.py`) are ml_collections ConfigDicts; `FlamingoConfig.from_dict`
turns `config.model` into these dataclasses and rejects unknown fields and impossible
values with a message that names the field and says how to fix it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names field and fix."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config field `{field}`: {message}")


def _divides(field: str, value: int, divisor_field: str, divisor: int) -> None:
    _require(
        divisor > 0 and value % divisor == 0,
        field,
        f"{value} is not divisible by `{divisor_field}`={divisor}; choose values where "
        f"{field} is a multiple of {divisor_field}.",
    )


@dataclasses.dataclass(frozen=True)
class NFNetConfig:
    """Normalizer-free ResNet (Brock et al. 2021). `variant` picks the published
    F0-F7 widths/depths, 'tiny' for tests and the CPU config, or 'custom' for the
    architecture that the fields below spell out (e.g. a converted checkpoint
    outside F0-F7; `python -m flamingo_jax.convert` prints them)."""

    variant: str = "F6"
    # Keep NFNet's final 1x1 conv (1536 -> 3072 channels for F-variants).
    # With it the encoder has NFNet-F6's published 435M parameters (no classifier).
    final_conv: bool = True
    # variant='custom' only: channels and blocks per stage, the four stem convs' widths,
    # channels per group of the grouped 3x3 convs.
    widths: tuple[int, ...] = ()
    depths: tuple[int, ...] = ()
    stem_widths: tuple[int, ...] = ()
    group_width: int = 128
    # Numerics. The defaults are DeepMind's reference code (the paper's network); timm's
    # `dm_nfnet_*` ports of the same weights use the erf GELU and add epsilon to the
    # kernel variance: activation='gelu_exact', ws_epsilon=1e-5, ws_epsilon_mode='add'.
    activation: str = "gelu"  # 'gelu' (tanh approximation) or 'gelu_exact' (erf), times NFNet's gamma
    ws_epsilon: float = 1e-4
    ws_epsilon_mode: str = "max"  # 'max': rsqrt(max(fan_in*var, eps)); 'add': rsqrt(fan_in*(var + eps))

    def __post_init__(self):
        # Configs read back from JSON (checkpoint records) hold lists; the dataclass stays hashable.
        for name in ("widths", "depths", "stem_widths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """CLIP-style ViT: pre-LN blocks, class token, returns patch tokens."""

    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    mlp_ratio: float = 4.0
    activation: str = "gelu"  # OpenAI CLIP: 'quick_gelu'; torch's nn.GELU (open_clip, HF 'gelu'): 'gelu_exact'
    include_class_token: bool = True  # returned tokens are patch tokens (class token dropped)
    norm_eps: float = 1e-5  # of every LayerNorm
    # ln_post on the returned patch tokens, as open_clip's `output_tokens` (OpenFlamingo).
    # False returns the last block's output as HF CLIP's `last_hidden_state` does (HF's
    # post_layernorm only normalises the pooled class token); the encoder then has no ln_post.
    norm_output: bool = True


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    encoder: str = "nfnet"  # 'nfnet' or 'vit'
    image_size: int = 320
    nfnet: NFNetConfig = NFNetConfig()
    vit: ViTConfig = ViTConfig()
    # Frames seen in training; the learned temporal embeddings have this many rows
    # and are linearly interpolated when a video has more frames at inference.
    num_frames: int = 8


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    num_layers: int = 6
    dim: int = 1536
    num_heads: int = 16
    head_dim: int = 128
    num_latents: int = 64
    ffw_mult: int = 4
    activation: str = "squared_relu"


@dataclasses.dataclass(frozen=True)
class XAttnConfig:
    """GATED XATTN-DENSE blocks; their width is the decoder's."""

    every: int = 1  # a block before every `every`-th LM layer, starting at the first
    num_heads: int = 16
    head_dim: int = 128
    ffw_hidden: int = 0  # 0 means 4 x decoder dim
    activation: str = "squared_relu"
    # 'previous': a text token sees the last image before it (the paper's default).
    # The data pipeline builds media_index accordingly; the model only reads it.


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Chinchilla-style (relative positions, GeLU) or LLaMA-style (rotary, SwiGLU)."""

    vocab_size: int = 32000
    dim: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 0  # 0 means num_heads (no grouped-query attention)
    head_dim: int = 128
    ffw_hidden: int = 0  # 0 means 4 x dim
    ffw: str = "gelu"  # 'gelu' (Chinchilla) or 'swiglu' (LLaMA)
    positions: str = "relative"  # 'relative' (Transformer-XL, Chinchilla) or 'rotary'
    rope_theta: float = 10000.0
    max_len: int = 2048
    tie_embeddings: bool = True
    norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
    vision: VisionConfig = VisionConfig()
    resampler: ResamplerConfig = ResamplerConfig()
    xattn: XAttnConfig = XAttnConfig()
    decoder: DecoderConfig = DecoderConfig()
    # New tokens appended after the frozen vocabulary, each with a trainable
    # embedding row (and output row): id vocab_size is <EOC>.
    num_new_tokens: int = 1
    dtype: str = "bfloat16"  # activations
    frozen_param_dtype: str = "bfloat16"
    trainable_param_dtype: str = "float32"
    remat_policy: str = "none"  # see layers.REMAT_POLICIES

    # ------------------------------------------------------------ derived values
    @property
    def eoc_id(self) -> int:
        return self.decoder.vocab_size

    @property
    def total_vocab(self) -> int:
        return self.decoder.vocab_size + self.num_new_tokens

    @property
    def num_xattn_blocks(self) -> int:
        return -(-self.decoder.num_layers // self.xattn.every)

    def dtypes(self) -> tuple[Any, Any, Any]:
        """(activation dtype, frozen param dtype, trainable param dtype)."""
        return DTYPES[self.dtype], DTYPES[self.frozen_param_dtype], DTYPES[self.trainable_param_dtype]

    # ------------------------------------------------------------ validation
    def validate(self) -> "FlamingoConfig":
        from flamingo_jax.models import layers  # local: avoids a cycle at import time

        for name in ("dtype", "frozen_param_dtype", "trainable_param_dtype"):
            _require(getattr(self, name) in DTYPES, f"model.{name}",
                     f"{getattr(self, name)!r} is not a dtype; use one of {sorted(DTYPES)}.")
        _require(self.remat_policy in layers.REMAT_POLICIES, "model.remat_policy",
                 f"{self.remat_policy!r} is unknown; use one of {sorted(layers.REMAT_POLICIES)}.")
        _require(self.num_new_tokens >= 1, "model.num_new_tokens", "must be >= 1 (<EOC> is id vocab_size).")

        v = self.vision
        _require(v.encoder in ("nfnet", "vit"), "model.vision.encoder",
                 f"unknown encoder {v.encoder!r}; use 'nfnet' or 'vit'.")
        _require(v.image_size > 0, "model.vision.image_size", "must be positive.")
        _require(v.num_frames >= 1, "model.vision.num_frames", "must be >= 1.")
        if v.encoder == "nfnet":
            from flamingo_jax.models.nfnet import NFNET_VARIANTS, nfnet_spec

            n = v.nfnet
            _require(n.variant in NFNET_VARIANTS or n.variant == "custom", "model.vision.nfnet.variant",
                     f"unknown variant {n.variant!r}; use one of {sorted(NFNET_VARIANTS)} or 'custom' "
                     "(with model.vision.nfnet.widths, depths, stem_widths and group_width).")
            _require(n.activation in ("gelu", "gelu_exact"), "model.vision.nfnet.activation",
                     f"{n.activation!r} is unknown; use 'gelu' (tanh approximation) or 'gelu_exact' (erf).")
            _require(n.ws_epsilon_mode in ("max", "add"), "model.vision.nfnet.ws_epsilon_mode",
                     f"{n.ws_epsilon_mode!r} is unknown; use 'max' (DeepMind) or 'add' (timm).")
            _require(n.ws_epsilon > 0, "model.vision.nfnet.ws_epsilon", "must be positive.")
            try:
                spec = nfnet_spec(n)
            except ValueError as error:
                raise ConfigError(f"config field `model.vision.nfnet`: {error}") from error
            _divides("model.vision.image_size", v.image_size, "NFNet total stride", spec.total_stride)
        else:
            _divides("model.vision.vit.width", v.vit.width, "model.vision.vit.num_heads", v.vit.num_heads)
            _divides("model.vision.image_size", v.image_size, "model.vision.vit.patch_size", v.vit.patch_size)
            _require(v.vit.norm_eps > 0, "model.vision.vit.norm_eps", "must be positive.")

        r = self.resampler
        for name in ("num_layers", "dim", "num_heads", "head_dim", "num_latents", "ffw_mult"):
            _require(getattr(r, name) >= 1, f"model.resampler.{name}", "must be >= 1.")
        _require(r.activation in layers.ACTIVATIONS, "model.resampler.activation",
                 f"unknown activation {r.activation!r}; use one of {sorted(layers.ACTIVATIONS)}.")

        d = self.decoder
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "head_dim", "max_len"):
            _require(getattr(d, name) >= 1, f"model.decoder.{name}", "must be >= 1.")
        _require(d.ffw in ("gelu", "swiglu"), "model.decoder.ffw", f"{d.ffw!r} is unknown; use 'gelu' or 'swiglu'.")
        _require(d.positions in ("relative", "rotary"), "model.decoder.positions",
                 f"{d.positions!r} is unknown; use 'relative' or 'rotary'.")
        _divides("model.decoder.num_heads", d.num_heads, "model.decoder.num_kv_heads", self.num_kv_heads)
        if d.positions == "rotary":
            _require(d.head_dim % 2 == 0, "model.decoder.head_dim", f"{d.head_dim} must be even for rotary positions.")

        x = self.xattn
        _require(1 <= x.every <= d.num_layers, "model.xattn.every",
                 f"{x.every} must be between 1 and model.decoder.num_layers={d.num_layers}; "
                 "a block is placed before every `every`-th LM layer starting at the first.")
        _require(x.num_heads >= 1 and x.head_dim >= 1, "model.xattn.num_heads",
                 "num_heads and head_dim must be >= 1.")
        _require(x.activation in layers.ACTIVATIONS, "model.xattn.activation",
                 f"unknown activation {x.activation!r}; use one of {sorted(layers.ACTIVATIONS)}.")
        return self

    @property
    def num_kv_heads(self) -> int:
        return self.decoder.num_kv_heads or self.decoder.num_heads

    @property
    def decoder_ffw_hidden(self) -> int:
        return self.decoder.ffw_hidden or 4 * self.decoder.dim

    @property
    def xattn_ffw_hidden(self) -> int:
        return self.xattn.ffw_hidden or 4 * self.decoder.dim

    # ------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict[str, Any] | Any) -> "FlamingoConfig":
        """Builds and validates a config from a (nested) dict or ConfigDict."""
        if hasattr(values, "to_dict"):
            values = values.to_dict()
        return _build(cls, dict(values), "model").validate()


def _build(cls, values: dict[str, Any], path: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"config field `{path}.{unknown[0]}` is not a {cls.__name__} field; "
            f"valid fields are {sorted(fields)}."
        )
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default):
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            if not isinstance(value, dict):
                raise ConfigError(f"config field `{path}.{name}` must be a group of fields, got {value!r}.")
            value = _build(type(default), value, f"{path}.{name}")
        kwargs[name] = value
    return cls(**kwargs)
