"""What every family module provides, and the helpers their architecture readers share.

A vision family module (`timm_nfnet.py`, `open_clip_vit.py`, `hf_clip.py`) defines

    FORMAT              its --format name;
    SIGNATURE           what identifies its checkpoints, in words (error messages);
    looks_like(names)   whether a list of tensor names has that signature;
    read_architecture(source, options) -> Architecture
                        our config read from the source, and the table for it.

A decoder family module (`hf_llama.py`, `hf_gpt_neox.py`, `hf_mpt.py`) is found by
the Hugging Face `config.json` it reads, and defines

    FORMAT              its name in records and messages;
    ARCHITECTURES       the `architectures` / `model_type` values it converts;
    EMBEDDING           the embedding table's tensor name (its rows: the vocabulary);
    table(decoder, description) -> Table;
    read_architecture(source, config) -> DecoderArchitecture.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.mapping import Table
from flamingo_jax.models.config import DecoderConfig, VisionConfig, ViTConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ACTIVATIONS = ("quick_gelu", "gelu_exact", "gelu")


@dataclasses.dataclass(frozen=True)
class Options:
    """What a user tells a converter that a source may not record (None: read it from the source)."""

    num_heads: int | None = None  # ViT attention heads (a fused QKV weight does not show them)
    activation: str | None = None  # ViT MLP activation: one of ACTIVATIONS
    norm_output: bool | None = None  # ViT: ln_post on the patch tokens (default: the family's own output)
    image_size: int | None = None  # NFNet: the resolution to configure (its weights fit any)


@dataclasses.dataclass(frozen=True)
class Architecture:
    vision: VisionConfig  # our encoder's config
    table: Table
    preprocessing: dict[str, Any]  # the image normalisation the weights were trained with
    image_size: int | None  # the resolution the weights fix (ViT positions) or the user chose; None: any
    assumptions: tuple[str, ...] = ()  # values not in the source, taken from defaults or options


@dataclasses.dataclass(frozen=True)
class DecoderArchitecture:
    decoder: DecoderConfig  # our decoder's config
    table: Table
    assumptions: tuple[str, ...] = ()  # what the conversion does not carry over, in words


def hf_value(config: dict[str, Any], name: str, default: Any, path: str, kind: type = int) -> Any:
    """A config.json field (Hugging Face writes only those that differ from the class defaults),
    checked to have the expected type."""
    value = config.get(name, default)
    if value is None or (kind is float and isinstance(value, int) and not isinstance(value, bool)):
        return value if value is None else float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConversionError(f"{path}: config.json field {name}={value!r} is not a {kind.__name__}.")
    return value


def layer_indices(names: list[str], pattern: str, what: str, path: str) -> list[int]:
    """The sorted indices captured by `pattern`'s one group, checked to run 0..n-1 without gaps."""
    indices = sorted({int(match.group(1)) for name in names if (match := re.fullmatch(pattern, name))})
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        raise ConversionError(f"{path}: {what} {missing} are missing (found {indices}); the checkpoint is incomplete.")
    return indices


def choose(name: str, from_option: Any, from_source: Any, path: str, how_to: str) -> Any:
    """A value the user passed, or else the one the source records; an error naming the flag if neither."""
    if from_option is not None and from_source is not None and from_option != from_source:
        raise ConversionError(f"--{name}={from_option} contradicts {path}, which records {from_source}; drop the flag.")
    value = from_option if from_option is not None else from_source
    if value is None:
        raise ConversionError(f"{path} does not record the {name.replace('_', ' ')}; {how_to}")
    return value


def square_grid(positions: int, has_class_token: bool, path: str) -> int:
    """The side of the patch grid a positional embedding with `positions` rows covers."""
    patches = positions - (1 if has_class_token else 0)
    side = int(round(patches**0.5))
    if side * side != patches or side < 1:
        raise ConversionError(f"{path}: the positional embedding has {positions} rows, not a square grid of patches "
                              "(plus the class token); only square images are supported.")
    return side


def clip_vit(*, width: int, num_layers: int, heads: int, patch: int, grid: int, hidden: int, activation: str,
             norm_eps: float, norm_output: bool, options: Options, path: str) -> tuple[ViTConfig, int, str]:
    """Our ViT config for a CLIP tower read from its tensors, its image size, and a one-line description;
    the checks every CLIP layout needs (a known activation, --image_size agreeing with the positions)."""
    if activation not in ACTIVATIONS:
        raise ConversionError(f"--activation={activation!r} is unknown; use one of {ACTIVATIONS}.")
    image_size = grid * patch
    if options.image_size not in (None, image_size):
        raise ConversionError(f"--image_size={options.image_size} contradicts {path}: its positional embedding "
                              f"covers {grid}x{grid} patches of {patch}, i.e. {image_size} px.")
    vit = ViTConfig(width=width, num_layers=num_layers, num_heads=heads, patch_size=patch,
                    mlp_ratio=mlp_ratio(hidden, width, path), activation=activation, include_class_token=True,
                    norm_eps=norm_eps, norm_output=norm_output)
    description = (f"ViT width {width}, {num_layers} layers, {heads} heads, patch {patch}, {image_size} px, "
                   f"MLP {hidden} ({activation})")
    return vit, image_size, description


def mlp_ratio(hidden: int, width: int, path: str) -> float:
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise ConversionError(f"{path}: MLP width {hidden} is not int({width} * ratio) for any float ratio our "
                              "ViT config can hold.")
    return ratio
