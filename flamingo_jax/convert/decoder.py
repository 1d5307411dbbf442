"""Decoders in: a Hugging Face causal LM checkpoint -> our frozen LM, checked, written as a backbone.

    architecture   config.json's `architectures` (or `model_type`) picks the family
                   (`hf_llama`, `hf_gpt_neox`, `hf_mpt`), which reads our
                   `DecoderConfig` from it and gives its table;
    tokenizer      with --tokenizer, its vocabulary must be the embedding table's rows
                   (<EOC> and <image> become the ids right after them);
    plan           the table is checked against the source and the decoder that config
                   builds (`mapping.plan`), before anything is read;
    write          our weights stream into the orbax backbone checkpoint, with a record
                   of the config beside it.

The record's `overrides` are the `--config.*` flags that make a Flamingo config
build this decoder and load it (`--config.backbones.decoder=<out>`). No code from
the checkpoint runs: weights come through `sources.py`, the architecture from
config.json's fields (never `auto_map` / trust_remote_code modules).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from flamingo_jax.convert import hf_gpt_neox, hf_llama, hf_mpt, mapping, writer
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.families import DecoderArchitecture
from flamingo_jax.convert.sources import TensorSource, open_source
from flamingo_jax.convert.vision import DTYPES, _flag_value
from flamingo_jax.models.config import ConfigError, DecoderConfig, validate_decoder
from flamingo_jax.models.decoder import Decoder

FAMILIES = {module.FORMAT: module for module in (hf_llama, hf_gpt_neox, hf_mpt)}
KNOWN = {name: module for module in FAMILIES.values() for name in module.ARCHITECTURES}


def family_of(source: TensorSource):
    """The family module for the source's config.json: its `architectures`, else its `model_type`."""
    config = source.config.get("config.json")
    if config is None:
        raise ConversionError(f"{source.path}: no config.json beside the weights; a decoder's architecture (heads, "
                              "rotary settings, norms) is read from it. Download it with the weights.")
    names = list(config.get("architectures") or []) + [config.get("model_type")]
    for name in names:
        if name in KNOWN:
            return KNOWN[name]
    if config.get("auto_map"):
        hint = " It names custom code (auto_map), which is never run here."
    else:
        hint = ""
    raise ConversionError(
        f"{source.path}: unknown architecture: config.json has architectures {config.get('architectures')} and "
        f"model_type {config.get('model_type')!r}; the decoder converter knows "
        f"{sorted(n for n in KNOWN if n[0].isupper())}.{hint}")


def read_architecture(source: TensorSource) -> DecoderArchitecture:
    module = family_of(source)
    arch = module.read_architecture(source, source.config["config.json"])
    try:
        validate_decoder(arch.decoder)
    except ConfigError as error:
        raise ConversionError(f"{source.path}: the architecture read from config.json is not one our decoder can "
                              f"build: {error}") from error
    if module.EMBEDDING in source.names():  # (a missing one is listed with the others by mapping.plan)
        rows = source.shape(module.EMBEDDING)[0]
        if rows != arch.decoder.vocab_size:
            raise ConversionError(f"{source.path}: config.json says vocab_size={arch.decoder.vocab_size} but "
                                  f"{module.EMBEDDING} has {rows} rows; the weights and config.json do not belong "
                                  "together.")
    return arch


def decoder_weights(decoder: DecoderConfig) -> dict[str, Any]:
    """Our decoder's weights for `decoder` as a pure dict of abstract arrays (nothing allocated)."""
    model = nnx.eval_shape(lambda: Decoder(decoder, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model))


def config_fields(decoder: DecoderConfig) -> dict[str, Any]:
    """Every `config.model.decoder` field of this decoder (dotted path -> value)."""
    fields = {}
    for field in dataclasses.fields(decoder):
        value = getattr(decoder, field.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                fields[f"{field.name}.{sub.name}"] = getattr(value, sub.name)
        else:
            fields[field.name] = value
    return fields


def check_tokenizer(path: str, decoder: DecoderConfig):
    """The tokenizer at `path` (tokenizer.json or SentencePiece .model), refused unless its
    vocabulary is exactly the embedding table's rows (new ids follow them)."""
    from flamingo_jax.data.errors import DataError
    from flamingo_jax.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except DataError as error:
        raise ConversionError(f"--tokenizer={path}: {error}") from error
    if tokenizer.vocab_size != decoder.vocab_size:
        raise ConversionError(
            f"--tokenizer={path} has {tokenizer.vocab_size} tokens but the decoder's embedding table has "
            f"{decoder.vocab_size} rows; Flamingo's new tokens (<EOC>, <image>) take the ids right after the "
            "embedding table, so the two must agree. Pass the tokenizer that came with this checkpoint.")
    return tokenizer


def config_overrides(decoder: DecoderConfig, out: str, tokenizer: Any = None, tokenizer_path: str = "") -> list[str]:
    flags = [f"--config.model.decoder.{name}={_flag_value(value)}" for name, value in config_fields(decoder).items()]
    if tokenizer is not None:
        flags.append(f"--config.model.num_new_tokens={tokenizer.num_new_tokens}")
        flags.append(f"--config.data.tokenizer={os.path.abspath(tokenizer_path)}")
    flags.append(f"--config.backbones.decoder={out}")
    return flags


def convert_decoder(from_path: str, out: str, *, tokenizer: str = "", dtype: str = "source",
                    overwrite: bool = False, buffer_bytes: int = writer.DEFAULT_BUFFER_BYTES,
                    compress: bool = False) -> dict[str, Any]:
    """Converts a Hugging Face causal LM checkpoint to our backbone checkpoint `out`; returns its record."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype={dtype!r} is unknown; use one of {sorted(DTYPES)}.")
    out = writer.check_output(out, overwrite)  # before reading anything
    with open_source(from_path) as source:
        module = family_of(source)
        arch = read_architecture(source)
        loaded_tokenizer = check_tokenizer(tokenizer, arch.decoder) if tokenizer else None
        target = decoder_weights(arch.decoder)
        steps = mapping.plan(arch.table, source, target, fmt=module.FORMAT)
        record = {
            "component": "decoder",
            "format": module.FORMAT,
            "source": os.path.abspath(source.path),
            "out": out,
            "architecture": arch.table.description,
            "source_tensors": len(source.names()),
            "ignored_tensors": sorted(n for n in source.names() if arch.table.is_ignored(n)),
            "dtype": dtype,
            "model": {"decoder": config_fields(arch.decoder)},
            "overrides": config_overrides(arch.decoder, out, loaded_tokenizer, tokenizer),
            "assumptions": list(arch.assumptions),
        }
        if loaded_tokenizer is not None:
            record["tokenizer"] = {"path": os.path.abspath(tokenizer), "vocab_size": loaded_tokenizer.vocab_size,
                                   "eoc_id": loaded_tokenizer.eoc_id,
                                   "image_marker_ids": list(loaded_tokenizer.image_marker_ids)}
        weights = mapping.produce(steps, source, DTYPES[dtype])
        writer.write_backbone(out, weights, target, record, overwrite=overwrite, buffer_bytes=buffer_bytes,
                              compress=compress)
    return record


def summary(record: dict[str, Any]) -> str:
    """What a user reads after converting a decoder: the config flags that use it."""
    return writer.summary(record)
