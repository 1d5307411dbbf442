"""Typed model configuration, validated before anything is built.

Config files (`configs/*.py`) are ml_collections ConfigDicts; `FlamingoConfig.from_dict`
turns `config.model` into these dataclasses and rejects unknown fields and impossible
values with a message that names the field and says how to fix it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import types
import typing
from typing import Any

import jax.numpy as jnp

from flamingo_jax.errors import UserError
from flamingo_jax.models import layers
from flamingo_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(UserError, ValueError):
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
class NFNetSpec:
    """Architecture of one NFNet variant."""

    widths: tuple[int, ...]  # output channels of each stage
    depths: tuple[int, ...]  # blocks per stage
    stem_widths: tuple[int, int, int, int] = (16, 32, 64, 128)  # last one is widths[0] // 2
    strides: tuple[int, ...] = (1, 2, 2, 2)  # stride of each stage's first block
    group_width: int = 128  # channels per group of the grouped 3x3 convs
    bottleneck_ratio: float = 0.5  # bottleneck width = ratio * stage width
    se_ratio: float = 0.5  # squeeze-excite hidden width = ratio * stage width
    alpha: float = 0.2  # residual branch scale: variance grows by alpha^2 per block
    final_conv_mult: int = 2  # final 1x1 conv widens the last stage by this factor
    train_resolution: int = 0  # image size used in NFNet's ImageNet training (informational)
    # Numerics (see the module docstring): GELU flavour and weight standardisation's epsilon.
    activation: str = "gelu"  # 'gelu' (tanh approximation) or 'gelu_exact' (erf)
    ws_epsilon: float = 1e-4
    ws_epsilon_mode: str = "max"  # 'max' or 'add'

    def __post_init__(self):
        if not (len(self.widths) == len(self.depths) == len(self.strides)):
            raise ValueError(f"NFNetSpec: widths {self.widths}, depths {self.depths} and strides "
                             f"{self.strides} must have one entry per stage.")
        if min(self.depths) < 1:
            raise ValueError(f"NFNetSpec: every stage needs at least one block, got depths {self.depths}.")
        if len(self.stem_widths) != 4:
            raise ValueError(f"NFNetSpec: stem_widths {self.stem_widths} must list the 4 stem convs' widths.")
        if min(self.widths) < 1 or min(self.stem_widths) < 1 or self.group_width < 1:
            raise ValueError(f"NFNetSpec: widths {self.widths}, stem_widths {self.stem_widths} and group_width "
                             f"{self.group_width} must be positive.")
        for width in self.widths:
            if int(width * self.bottleneck_ratio) < self.group_width:
                raise ValueError(f"NFNetSpec: bottleneck width {int(width * self.bottleneck_ratio)} of stage "
                                 f"width {width} is smaller than group_width={self.group_width}.")
        if self.activation not in ("gelu", "gelu_exact") or self.ws_epsilon_mode not in ("max", "add"):
            raise ValueError(f"NFNetSpec: activation {self.activation!r} must be 'gelu' or 'gelu_exact' and "
                             f"ws_epsilon_mode {self.ws_epsilon_mode!r} 'max' or 'add'.")

    @property
    def approximate_gelu(self) -> bool:
        return self.activation == "gelu"

    @property
    def total_stride(self) -> int:
        return 4 * math.prod(self.strides)  # the stem downsamples by 4

    def stage_betas(self) -> list[tuple[float, ...]]:
        """beta = 1/expected_std of each block's input, per stage.

        A block adds alpha^2 to the variance of the residual stream; a transition
        block's output is a 1x1 conv of a unit-variance input, so the expected
        variance restarts at 1 + alpha^2 after it (the reference code's rule)."""
        expected_std, betas = 1.0, []
        for depth in self.depths:
            stage = []
            for index in range(depth):
                stage.append(1.0 / expected_std)
                if index == 0:
                    expected_std = 1.0
                expected_std = math.sqrt(expected_std**2 + self.alpha**2)
            betas.append(tuple(stage))
        return betas


def _f_variant(multiplier: int, train_resolution: int) -> NFNetSpec:
    return NFNetSpec(widths=(256, 512, 1536, 1536), depths=tuple(multiplier * d for d in (1, 2, 6, 3)),
                     train_resolution=train_resolution)


NFNET_VARIANTS: dict[str, NFNetSpec] = {
    "F0": _f_variant(1, 192),
    "F1": _f_variant(2, 224),
    "F2": _f_variant(3, 256),
    "F3": _f_variant(4, 320),
    "F4": _f_variant(5, 384),
    "F5": _f_variant(6, 416),
    "F6": _f_variant(7, 448),
    "F7": _f_variant(8, 480),
    # Same structure at toy width, for tests and the CPU config (fast at 32-64 px). Stage 3
    # scans 2 blocks: a length-1 scan would not exercise per-step betas.
    "tiny": NFNetSpec(widths=(16, 32, 64, 64), depths=(1, 1, 3, 1), stem_widths=(4, 8, 8, 8), group_width=8),
}


def nfnet_spec(cfg: NFNetConfig) -> NFNetSpec:
    """The architecture a config names: a published variant, or 'custom' spelled out
    field by field; with the config's numerics either way."""
    numerics = dict(activation=cfg.activation, ws_epsilon=cfg.ws_epsilon, ws_epsilon_mode=cfg.ws_epsilon_mode)
    if cfg.variant == "custom":
        if not cfg.widths or not cfg.depths or not cfg.stem_widths:
            raise ValueError("variant 'custom' needs widths, depths and stem_widths (one width and depth per "
                             f"stage, 4 stem widths); got widths={cfg.widths}, depths={cfg.depths}, "
                             f"stem_widths={cfg.stem_widths}.")
        strides = (1,) + (2,) * (len(cfg.widths) - 1)  # the stem already downsamples by 4
        return NFNetSpec(widths=tuple(cfg.widths), depths=tuple(cfg.depths), stem_widths=tuple(cfg.stem_widths),
                         strides=strides, group_width=cfg.group_width, **numerics)
    if cfg.variant not in NFNET_VARIANTS:
        raise ValueError(f"unknown NFNet variant {cfg.variant!r}; use one of {sorted(NFNET_VARIANTS)} or 'custom'.")
    return dataclasses.replace(NFNET_VARIANTS[cfg.variant], **numerics)



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
    # Learned per-frame embedding (`vision.num_frames` rows) added to the features (the paper's
    # temporal embedding; OpenFlamingo's `frame_embs`, absent from the models its factory builds).
    frame_embedding: bool = True
    # Rows of a learned per-media-slot embedding added to each item's features (OpenFlamingo's
    # `media_time_embs`, `max_num_media`); 0: none (the paper, and OpenFlamingo's factory).
    media_positions: int = 0


XATTN_GATINGS = ("tanh", "none")
MEDIA_ASSOCIATIONS = ("flamingo", "openflamingo")


@dataclasses.dataclass(frozen=True)
class XAttnConfig:
    """GATED XATTN-DENSE blocks; their width is the decoder's.

    Placement: a block before LM layers first_layer, first_layer + every, ... The paper puts
    one before the first layer (first_layer=0); OpenFlamingo before layer i when
    (i + 1) % every == 0 (first_layer = every - 1: the first every - 1 layers run plain).
    """

    every: int = 1  # a block before every `every`-th LM layer, starting at `first_layer`
    first_layer: int = 0  # the LM layer the first block precedes; the layers before it see no media
    num_heads: int = 16
    head_dim: int = 128
    ffw_hidden: int = 0  # 0 means 4 x decoder dim
    activation: str = "squared_relu"
    # How prompts assign tokens to media (`media_index`): 'flamingo' from the marker positions
    # (the marker may be several tokens), 'openflamingo' as OpenFlamingo's `media_locations`:
    # token t sees the n-th image when t is at or after the n-th `<image>` id and before the
    # next one (the marker must be one id). The two agree for a one-id marker.
    media_association: str = "flamingo"
    # 'tanh': each block's residuals are scaled by tanh(gate), gates starting at 0 (the paper);
    # 'none': added ungated, the paper's "w/o tanh gating" ablation (Table 3).
    gating: str = "tanh"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling for contexts longer than pretraining's: 'none', 'linear'
    (positions / factor) or 'llama3' (Llama 3.1's per-frequency rescaling, with
    `low_freq_factor`, `high_freq_factor` and the pretraining context
    `original_max_len`)."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The frozen LM. The defaults are Chinchilla's (the paper): RMSNorm, Transformer-XL
    relative positions, GeLU MLP, no biases. Switches cover the open decoder families:

    * LLaMA 2/3, Mistral: positions='rotary' (+ rope_scaling), ffw='swiglu', num_kv_heads (GQA),
      tie_embeddings=False;
    * GPT-NeoX (Pythia, RedPajama-INCITE): norm='layer' with bias, rotary on `rotary_fraction`
      of each head, parallel_residual, attention_bias and ffw_bias, ffw='gelu_exact';
    * MPT: norm='layer' without bias, positions='alibi', ffw='gelu_exact', no biases.
    """

    vocab_size: int = 32000
    dim: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 0  # 0 means num_heads (no grouped-query attention)
    head_dim: int = 128
    ffw_hidden: int = 0  # 0 means 4 x dim
    ffw: str = "gelu"  # 'gelu' (tanh approximation, Chinchilla), 'gelu_exact' (erf), 'swiglu' (LLaMA)
    positions: str = "relative"  # 'relative' (Transformer-XL, Chinchilla), 'rotary' or 'alibi'
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # share of each head's dims that rotate (GPT-NeoX's rotary_pct)
    rope_scaling: RopeScaling = RopeScaling()
    alibi_max_bias: float = 8.0  # ALiBi: head slopes 2^(-max_bias * i / n), as MPT
    max_len: int = 2048
    tie_embeddings: bool = True
    norm: str = "rms"  # 'rms' (Chinchilla, LLaMA) or 'layer' (GPT-NeoX, MPT)
    norm_bias: bool = False  # LayerNorm bias (GPT-NeoX); RMSNorm has none
    norm_eps: float = 1e-6
    attention_bias: bool = False  # biases on the query/key/value/output projections
    ffw_bias: bool = False  # biases on the feed-forward projections
    parallel_residual: bool = False  # x + attn(norm(x)) + ffw(norm'(x)) (GPT-NeoX) instead of sequential


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """The BERT-style text tower of the vision encoder's contrastive pretraining (appendix B.1.3):
    mean-pooled over the text and projected to `embed_dim` (the paper's 1376) [size unconfirmed:
    BERT-base's by default]."""

    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    head_dim: int = 64
    mlp_ratio: int = 4
    max_len: int = 64
    embed_dim: int = 1376

    def validate(self, path: str = "contrastive.text") -> "TextEncoderConfig":
        for name in ("dim", "num_layers", "num_heads", "head_dim", "mlp_ratio", "max_len", "embed_dim"):
            _require(getattr(self, name) >= 1, f"{path}.{name}", "must be >= 1.")
        return self


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
    attention: str = "xla"  # the kernel every attention uses: see models/attention.py
    # The paper freezes the LM (Table 3 ablates it: unfrozen, worse). False trains its weights with
    # the Flamingo weights; they are then kept in the trainable dtype and checkpointed with them.
    freeze_lm: bool = True

    # ------------------------------------------------------------ derived values
    @property
    def eoc_id(self) -> int:
        return self.decoder.vocab_size

    @property
    def total_vocab(self) -> int:
        return self.decoder.vocab_size + self.num_new_tokens

    @property
    def num_xattn_blocks(self) -> int:
        return len(self.xattn_layers)

    @property
    def xattn_layers(self) -> tuple[int, ...]:
        """The LM layers that a GATED XATTN-DENSE block precedes, in order (block j before the j-th)."""
        return tuple(range(self.xattn.first_layer, self.decoder.num_layers, self.xattn.every))

    @property
    def xattn_layout(self) -> tuple[int, int, int, int]:
        """(lead, groups, every, tail): `lead` plain LM layers, then `groups` groups of `every`
        layers each preceded by a block, then one block before a tail of `tail` layers (if any)."""
        lead = self.xattn.first_layer
        groups, tail = divmod(self.decoder.num_layers - lead, self.xattn.every)
        return lead, groups, self.xattn.every, tail

    def dtypes(self) -> tuple[Any, Any, Any]:
        """(activation dtype, frozen param dtype, trainable param dtype)."""
        return DTYPES[self.dtype], DTYPES[self.frozen_param_dtype], DTYPES[self.trainable_param_dtype]

    # ------------------------------------------------------------ validation
    def validate(self) -> "FlamingoConfig":
        for name in ("dtype", "frozen_param_dtype", "trainable_param_dtype"):
            _require(getattr(self, name) in DTYPES, f"model.{name}",
                     f"{getattr(self, name)!r} is not a dtype; use one of {sorted(DTYPES)}.")
        _require(self.remat_policy in layers.REMAT_POLICIES, "model.remat_policy",
                 f"{self.remat_policy!r} is unknown; use one of {sorted(layers.REMAT_POLICIES)}.")
        _require(self.attention in ATTENTION_IMPLEMENTATIONS, "model.attention",
                 f"{self.attention!r} is unknown; use one of {ATTENTION_IMPLEMENTATIONS}.")
        _require(self.num_new_tokens >= 1, "model.num_new_tokens", "must be >= 1 (<EOC> is id vocab_size).")
        _require(self.freeze_lm or self.frozen_param_dtype == self.trainable_param_dtype, "model.freeze_lm",
                 f"False trains the LM, whose weights are stored in model.frozen_param_dtype="
                 f"{self.frozen_param_dtype!r}; the optimizer updates weights in model.trainable_param_dtype="
                 f"{self.trainable_param_dtype!r}. Set --config.model.frozen_param_dtype="
                 f"{self.trainable_param_dtype} to train it.")

        v = self.vision
        _require(v.encoder in ("nfnet", "vit"), "model.vision.encoder",
                 f"unknown encoder {v.encoder!r}; use 'nfnet' or 'vit'.")
        _require(v.image_size > 0, "model.vision.image_size", "must be positive.")
        _require(v.num_frames >= 1, "model.vision.num_frames", "must be >= 1.")
        if v.encoder == "nfnet":
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
        _require(r.media_positions >= 0, "model.resampler.media_positions",
                 "must be >= 0 (0: no per-media-slot embedding).")

        validate_decoder(self.decoder)
        d = self.decoder

        x = self.xattn
        _require(1 <= x.every <= d.num_layers, "model.xattn.every",
                 f"{x.every} must be between 1 and model.decoder.num_layers={d.num_layers}; "
                 "a block is placed before every `every`-th LM layer starting at `first_layer`.")
        _require(0 <= x.first_layer < d.num_layers, "model.xattn.first_layer",
                 f"{x.first_layer} must be between 0 and model.decoder.num_layers - 1 = {d.num_layers - 1}; "
                 "0 places the first block before the first LM layer (the paper), every - 1 as OpenFlamingo.")
        _require(x.media_association in MEDIA_ASSOCIATIONS, "model.xattn.media_association",
                 f"{x.media_association!r} is unknown; use one of {MEDIA_ASSOCIATIONS}.")
        _require(x.gating in XATTN_GATINGS, "model.xattn.gating", f"{x.gating!r} is unknown; use one of {XATTN_GATINGS}.")
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
        return build_config(cls, values, "model").validate()


DECODER_FFW = ("gelu", "gelu_exact", "swiglu")
DECODER_POSITIONS = ("relative", "rotary", "alibi")
DECODER_NORMS = ("rms", "layer")
ROPE_SCALINGS = ("none", "linear", "llama3")


def validate_decoder(d: DecoderConfig, path: str = "model.decoder") -> DecoderConfig:
    """Checks a decoder config on its own (the converters build decoders without a Flamingo)."""
    for name in ("vocab_size", "dim", "num_layers", "num_heads", "head_dim", "max_len"):
        _require(getattr(d, name) >= 1, f"{path}.{name}", "must be >= 1.")
    _require(d.ffw in DECODER_FFW, f"{path}.ffw", f"{d.ffw!r} is unknown; use one of {DECODER_FFW}.")
    _require(d.positions in DECODER_POSITIONS, f"{path}.positions",
             f"{d.positions!r} is unknown; use one of {DECODER_POSITIONS}.")
    _require(d.norm in DECODER_NORMS, f"{path}.norm", f"{d.norm!r} is unknown; use one of {DECODER_NORMS}.")
    _require(not (d.norm_bias and d.norm == "rms"), f"{path}.norm_bias", "RMSNorm has no bias; use norm='layer'.")
    _require(d.norm_eps > 0, f"{path}.norm_eps", "must be > 0.")
    _divides(f"{path}.num_heads", d.num_heads, f"{path}.num_kv_heads", d.num_kv_heads or d.num_heads)
    if d.positions == "rotary":
        _require(0 < d.rotary_fraction <= 1, f"{path}.rotary_fraction", f"{d.rotary_fraction} must be in (0, 1].")
        rotary_dims = int(d.head_dim * d.rotary_fraction)
        _require(rotary_dims >= 2 and rotary_dims % 2 == 0, f"{path}.rotary_fraction",
                 f"head_dim {d.head_dim} x rotary_fraction {d.rotary_fraction} = {rotary_dims} rotary dims; "
                 "it must be an even number >= 2.")
        _require(d.rope_theta > 0, f"{path}.rope_theta", "must be > 0.")
        scaling = d.rope_scaling
        _require(scaling.kind in ROPE_SCALINGS, f"{path}.rope_scaling.kind",
                 f"{scaling.kind!r} is unknown; use one of {ROPE_SCALINGS}.")
        _require(scaling.factor >= 1, f"{path}.rope_scaling.factor", f"{scaling.factor} must be >= 1.")
        if scaling.kind == "llama3":
            _require(scaling.high_freq_factor > scaling.low_freq_factor > 0, f"{path}.rope_scaling",
                     "llama3 scaling needs high_freq_factor > low_freq_factor > 0.")
            _require(scaling.original_max_len >= 1, f"{path}.rope_scaling.original_max_len", "must be >= 1.")
    elif d.positions == "alibi":
        _require(d.alibi_max_bias > 0, f"{path}.alibi_max_bias", "must be > 0.")
    return d


def build_config(cls, values: Any, path: str):
    """A frozen config dataclass from a (nested) dict or ConfigDict: unknown fields and values of
    the wrong type are errors naming the field (`path.name`); nested dataclasses recurse."""
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    if not isinstance(values, dict):
        raise ConfigError(f"config field `{path or 'config'}` must be a group of fields, got {values!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f" (did you mean `{_join(path, close[0])}`?)" if close else ""
        raise ConfigError(f"config field `{_join(path, unknown[0])}` is not a {cls.__name__} field{hint}; "
                          f"valid fields are {sorted(fields)}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        field_path = _join(path, name)
        default = fields[name].default
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_config(type(default), value, field_path)
        else:
            kwargs[name] = _checked(value, hints[name], field_path)
    return cls(**kwargs)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _checked(value: Any, annotation: Any, path: str) -> Any:
    """`value` if it has the annotated type (ints accepted for floats, lists for tuples)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _checked(value, option, path)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"config field `{path}` must be a sequence, got {value!r}.")
        item = args[0] if args else Any
        return tuple(_checked(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping) or annotation in (dict, Any):
        return dict(value) if origin is not None and hasattr(value, "items") else value
    expected = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(annotation)
    if expected is None:
        return value
    if not isinstance(value, expected) or (annotation is not bool and isinstance(value, bool)):
        raise ConfigError(f"config field `{path}` must be {annotation.__name__}, got {value!r} "
                          f"({type(value).__name__}).")
    return float(value) if annotation is float else value
