"""Vision encoders in: source checkpoint -> our encoder's config, checked, written as a backbone.

    architecture   the family reads our `VisionConfig` from the source (tensor
                   shapes, its config.json, and `Options` for what neither records);
    plan           its table is checked against the source and the encoder that
                   config builds (`mapping.plan`), before anything is read;
    write          our weights stream into the orbax backbone checkpoint
                   (`writer.write_backbone`), with a record of the config beside it.

The record's `overrides` are the `--config.*` flags that make a Flamingo config
build this encoder and load it (`--config.backbones.vision=<out>`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from flamingo_jax.convert import hf_clip, mapping, open_clip_vit, timm_nfnet, writer
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.families import Architecture, Options
from flamingo_jax.convert.sources import TensorSource, open_source
from flamingo_jax.models.config import ConfigError, FlamingoConfig, NFNetConfig, VisionConfig
from flamingo_jax.models.flamingo import build_vision_encoder

FAMILIES = {module.FORMAT: module for module in (hf_clip, open_clip_vit, timm_nfnet)}
DTYPES = {"source": None, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}  # None: each tensor's own
# NFNetConfig fields that only a 'custom' variant reads.
_CUSTOM_NFNET_FIELDS = ("widths", "depths", "stem_widths", "group_width")


def family(fmt: str):
    if fmt not in FAMILIES:
        raise ConversionError(f"--format={fmt!r} is unknown; use one of {sorted(FAMILIES)}.")
    return FAMILIES[fmt]


def guess_formats(source: TensorSource) -> list[str]:
    """The formats whose signature tensors the source holds (for error hints)."""
    names = source.names()
    return [fmt for fmt, module in sorted(FAMILIES.items()) if module.looks_like(names)]


def read_architecture(source: TensorSource, fmt: str, options: Options) -> Architecture:
    module = family(fmt)
    if not module.looks_like(source.names()):
        guesses = [g for g in guess_formats(source) if g != fmt]
        hint = f" It looks like --format={guesses[0]}." if guesses else ""
        raise ConversionError(
            f"{source.path} is not a checkpoint of --format={fmt} (unknown architecture): {module.SIGNATURE}. It holds "
            f"{len(source.names())} tensors, e.g. {source.names()[:4]}.{hint}")
    return module.read_architecture(source, options)


def encoder_weights(vision: VisionConfig) -> dict[str, Any]:
    """Our encoder's weights for `vision` as a pure dict of abstract arrays (nothing allocated)."""
    try:
        cfg = FlamingoConfig(vision=vision).validate()
    except ConfigError as error:
        raise ConversionError(f"the architecture read from the source is not one our encoder can build: {error}") \
            from error
    encoder = nnx.eval_shape(lambda: build_vision_encoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                                                          rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(encoder))


def _flag_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def config_fields(arch: Architecture) -> dict[str, Any]:
    """The `config.model.vision` fields that describe this encoder (dotted path -> value)."""
    vision = arch.vision
    fields: dict[str, Any] = {"encoder": vision.encoder}
    if arch.image_size:
        fields["image_size"] = arch.image_size
    sub = vision.nfnet if vision.encoder == "nfnet" else vision.vit
    for field in dataclasses.fields(sub):
        if isinstance(sub, NFNetConfig) and sub.variant != "custom" and field.name in _CUSTOM_NFNET_FIELDS:
            continue
        fields[f"{vision.encoder}.{field.name}"] = getattr(sub, field.name)
    return fields


def config_overrides(arch: Architecture, out: str) -> list[str]:
    """Command-line flags for a Flamingo config: this encoder's fields and the backbone path."""
    flags = [f"--config.model.vision.{name}={_flag_value(value)}" for name, value in config_fields(arch).items()]
    if arch.image_size:
        flags.append(f"--config.data.image_size={arch.image_size}")
    flags.append(f"--config.backbones.vision={out}")
    return flags


def convert_vision(from_path: str, fmt: str, out: str, *, options: Options = Options(), dtype: str = "source",
                   overwrite: bool = False, buffer_bytes: int = writer.DEFAULT_BUFFER_BYTES,
                   compress: bool = False) -> dict[str, Any]:
    """Converts a vision encoder checkpoint to our backbone checkpoint `out`; returns the record written beside it."""
    module = family(fmt)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype={dtype!r} is unknown; use one of {sorted(DTYPES)}.")
    out = writer.check_output(out, overwrite)  # before reading anything
    with open_source(from_path) as source:
        arch = read_architecture(source, module.FORMAT, options)
        target = encoder_weights(arch.vision)
        steps = mapping.plan(arch.table, source, target, fmt=fmt)
        record = {
            "component": "vision",
            "format": fmt,
            "source": os.path.abspath(source.path),
            "out": out,  # where it was written (the overrides name this path)
            "architecture": arch.table.description,
            "source_tensors": len(source.names()),
            "ignored_tensors": sorted(n for n in source.names() if arch.table.is_ignored(n)),
            "dtype": dtype,
            "model": {"vision": config_fields(arch)},
            "overrides": config_overrides(arch, out),
            "preprocessing": arch.preprocessing,
            "assumptions": list(arch.assumptions),
        }
        weights = mapping.produce(steps, source, DTYPES[dtype])
        writer.write_backbone(out, weights, target, record, overwrite=overwrite, buffer_bytes=buffer_bytes,
                              compress=compress)
    return record


def summary(record: dict[str, Any]) -> str:
    """What a user reads after converting a vision encoder: the image normalisation and config flags."""
    prep = record["preprocessing"]
    return writer.summary(record, (f"images: normalise with mean {prep['mean']} and std {prep['std']} "
                                   "(config.data.image_mean / image_std)",))
