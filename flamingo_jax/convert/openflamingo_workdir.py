"""An OpenFlamingo checkpoint -> a Flamingo workdir, and back.

    checkpoint   OpenFlamingo's `checkpoint.pt` (a state dict, or its training script's
                 {'model_state_dict': ...}); read with torch.load(weights_only=True);
    lm           the Hugging Face decoder it was built on (its layers are frozen, so they
                 come from there): converted by `convert.decoder`'s family table, with
                 the vocabulary rows [0, V) of the embeddings taken from the checkpoint
                 (OpenFlamingo trains and saves the whole input embedding; V is the
                 tokenizer's size, so a padded HF table (MPT, NeoX) is cut to it);
    vision       the open_clip tower (or HF CLIP's), by `convert.vision`;
    trainable    Perceiver, xattn blocks, new-token rows by `openflamingo.convert_trainable`,
                 saved as step 0 of an orbax run checkpoint (`core.checkpoint`) holding
                 only the weights (`params_only`: the trainer gives them a fresh optimizer
                 state; evaluation reads only the weights anyway), its record holding the
                 run config with `config.backbones` naming the converted backbones.

The workdir is built under a hidden sibling and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from flamingo_jax.convert import decoder as decoder_convert
from flamingo_jax.convert import mapping, openflamingo, vision, writer
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.families import Options
from flamingo_jax.convert.sources import TensorSource, open_source

ARCHS = {"of-3b": "openflamingo_3b", "of-4b": "openflamingo_4b", "of-9b": "openflamingo_9b",
         "of-9b-v1": "openflamingo_9b_v1"}
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
TOKENIZER_FILE = "tokenizer.json"
RECORD_FILE = "openflamingo_conversion.json"
_XATTN_LIST = "lang_encoder.gated_cross_attn_layers."
CONFIG_PY = '''"""The run config of this converted OpenFlamingo workdir (config.json beside this file): the
model exactly as converted, for `python -m flamingo_jax.train --workdir=<here> --config=<here>/config.py`
with your data (--config.data.* flags, or a copy of this file that sets config.data).
The model fields and the seed must stay as they are to resume the converted checkpoint."""

import json
import os

import ml_collections


def get_config():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))
'''


class _Overlay(TensorSource):
    """`base` plus (or with replaced) tensors computed on read: name -> (shape, read)."""

    def __init__(self, base: TensorSource, extra: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]):
        super().__init__(base.path, base.config)
        self.base, self.extra = base, extra

    def names(self) -> list[str]:
        return sorted(set(self.base.names()) | set(self.extra))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.extra[name][0]) if name in self.extra else self.base.shape(name)

    def read(self, name: str) -> np.ndarray:
        return self.extra[name][1]() if name in self.extra else self.base.read(name)


def with_xattn_list(source: TensorSource, layout: openflamingo.LMLayout) -> TensorSource:
    """OpenFlamingo's training script saves each xattn block only under its FlamingoLayer
    (`<layers>.I.gated_cross_attn_layer.*`); the list entries are restored as views of them."""
    prefix = f"lang_encoder.{layout.layers}."
    extra = {}
    names = set(source.names())
    for name in names:
        if name.startswith(prefix) and ".gated_cross_attn_layer." in name:
            index, rest = name[len(prefix):].split(".gated_cross_attn_layer.", 1)
            listed = f"{_XATTN_LIST}{index}.{rest}"
            if listed not in names:
                extra[listed] = (source.shape(name), lambda name=name: source.read(name))
    return _Overlay(source, extra) if extra else source


def checkpoint_blocks(names: list[str]) -> list[int]:
    return sorted({int(n[len(_XATTN_LIST):].split(".")[0]) for n in names if n.startswith(_XATTN_LIST)})


def load_arch_config(arch: str):
    if arch not in ARCHS:
        raise ConversionError(f"--arch={arch!r} is unknown; use one of {sorted(ARCHS)}.")
    path = os.path.join(CONFIGS_DIR, f"{ARCHS[arch]}.py")
    spec = importlib.util.spec_from_file_location(f"flamingo_configs_{ARCHS[arch]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _set(config, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for parent in parents:
        config = config[parent]
    config[leaf] = list(value) if isinstance(value, tuple) else value


def _tokenizer_file(path: str) -> str:
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file) or not file.endswith(".json"):
        raise ConversionError(f"--tokenizer={path}: no {TOKENIZER_FILE} there; pass the directory of the "
                              "Hugging Face tokenizer OpenFlamingo used (or its tokenizer.json).")
    return file


def _decoder_source(hf: TensorSource, checkpoint: TensorSource, module, layout: openflamingo.LMLayout,
                    vocab: int, tied: bool) -> TensorSource:
    """The HF decoder with its embedding rows [0, V) replaced by the checkpoint's (and cut to V)."""
    extra = {}
    embedding = f"lang_encoder.{layout.input_embedding}.weight"
    dim = checkpoint.shape(embedding)[1]
    extra[module.EMBEDDING] = ((vocab, dim), lambda: checkpoint.read(embedding)[:vocab])
    if not tied and layout.output_embedding is not None:
        name = f"{layout.output_embedding}.weight"
        if f"lang_encoder.{name}" in checkpoint.names():
            extra[name] = ((vocab, dim), lambda: checkpoint.read(f"lang_encoder.{name}")[:vocab])
        else:  # frozen in OpenFlamingo (never saved): the HF model's rows
            extra[name] = ((vocab, dim), lambda: hf.read(name)[:vocab])
    return _Overlay(hf, extra)


def _checkpoint_with_output_rows(checkpoint: TensorSource, hf: TensorSource, layout: openflamingo.LMLayout,
                                 vocab: int, rows: int, assumptions: list[str]) -> TensorSource:
    """An untied LM whose output embedding the checkpoint lacks (OpenFlamingo's script drops the
    frozen lm_head): the HF rows [0, V), and the new tokens' rows as their mean."""
    name = f"lang_encoder.{layout.output_embedding}.weight"
    if name in checkpoint.names():
        return checkpoint

    def read():
        base = np.asarray(hf.read(f"{layout.output_embedding}.weight"))[:vocab].astype(np.float32)
        return np.concatenate([base, np.repeat(base.mean(0, keepdims=True), rows - vocab, 0)], 0)

    assumptions.append(f"the checkpoint has no {name} (OpenFlamingo saves only trainable weights): its rows "
                       f"[0, {vocab}) are the HF model's and the new tokens' output rows their mean")
    return _Overlay(checkpoint, {name: ((rows, checkpoint.shape(f"lang_encoder.{layout.input_embedding}.weight")[1]),
                                        read)})


def vision_source(path: str, options: Options) -> tuple[str, Options]:
    """(format, options) of the --vision weights: open_clip's tower (heads and activation from
    open_clip_config.json, else ViT-L/14's: width / 64 heads, QuickGELU for OpenAI's weights) or
    HF CLIP's; either way with OpenFlamingo's ln_post'd patch tokens."""
    from flamingo_jax.convert import open_clip_vit

    with open_source(path) as source:
        formats = [fmt for fmt in vision.guess_formats(source) if fmt in ("open_clip", "hf_clip")]
        if not formats:
            raise ConversionError(f"--vision={path} holds neither open_clip nor Hugging Face CLIP vision weights "
                                  f"(e.g. {source.names()[:3]}); OpenFlamingo's tower is open_clip's ViT.")
        fmt = formats[0]
        if fmt == "open_clip":
            heads, activation = open_clip_vit._recorded(source)
            width = source.shape(f"{open_clip_vit._prefix(source.names())}conv1.weight")[0]
            options = dataclasses.replace(options, num_heads=options.num_heads or heads or width // 64,
                                          activation=options.activation or activation or "quick_gelu")
    return fmt, dataclasses.replace(options, norm_output=True)


def convert_openflamingo(checkpoint: str, lm: str, vision_path: str, tokenizer: str, arch: str, out: str, *,
                         overwrite: bool = False, vision_options: Options | None = None,
                         precision: str = "config") -> dict[str, Any]:
    """Writes the Flamingo workdir `out` for an OpenFlamingo checkpoint; returns its record.
    `precision='float32'` runs activations and frozen weights in fp32 (OpenFlamingo's
    default); 'config' keeps the --arch config's (bf16 activations and frozen weights)."""
    import jax
    import ml_collections

    from flamingo_jax.core.checkpoint import Checkpointer
    from flamingo_jax.core.config import RunConfig
    from flamingo_jax.data.errors import DataError
    from flamingo_jax.data.tokenizer import load_tokenizer
    from flamingo_jax.models.config import ConfigError, FlamingoConfig

    config = load_arch_config(arch)
    if precision not in ("config", "float32"):
        raise ConversionError(f"--precision={precision!r} is unknown; use 'config' or 'float32'.")
    if precision == "float32":
        config.model.dtype = config.model.frozen_param_dtype = "float32"
    out = writer.check_output(out, overwrite)
    tokenizer_file = _tokenizer_file(tokenizer)
    try:
        vocab = load_tokenizer(tokenizer_file).vocab_size
    except DataError as error:
        raise ConversionError(f"--tokenizer={tokenizer}: {error}") from error
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.converting-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    assumptions: list[str] = []
    try:
        with open_source(checkpoint) as raw, open_source(lm) as hf:
            layout = openflamingo.lm_layout(raw.names())
            source = with_xattn_list(raw, layout)
            embedding = f"lang_encoder.{layout.input_embedding}.weight"
            rows = source.shape(embedding)[0]
            if rows - vocab not in (2, 3):
                raise ConversionError(
                    f"--tokenizer={tokenizer} has {vocab} tokens but the checkpoint's {embedding} has {rows} rows; "
                    "OpenFlamingo adds 2 or 3 (<|endofchunk|>, <image>, <PAD>) to its tokenizer's vocabulary. Pass "
                    "the tokenizer the checkpoint was trained with.")
            module = decoder_convert.family_of(hf)
            if module.FORMAT != layout.family:
                raise ConversionError(f"--lm={lm} is a {module.FORMAT} model but the checkpoint's language model is "
                                      f"{layout.family}; pass the decoder OpenFlamingo was built on.")
            hf_arch = decoder_convert.read_architecture(hf)
            decoder = dataclasses.replace(hf_arch.decoder, vocab_size=vocab)
            if hf_arch.decoder.vocab_size < vocab:
                raise ConversionError(f"--lm={lm} has {hf_arch.decoder.vocab_size} embedding rows, fewer than the "
                                      f"tokenizer's {vocab} tokens; they do not belong together.")
            for name, value in decoder_convert.config_fields(decoder).items():
                _set(config.model.decoder, name, value)
            config.model.xattn.ffw_hidden = 4 * decoder.dim
            config.model.num_new_tokens = rows - vocab

            backbones = os.path.join(staging, "backbones")
            os.makedirs(backbones)
            final = {"vision": os.path.join(out, "backbones", "vision"),
                     "decoder": os.path.join(out, "backbones", "decoder")}
            vision_format, vision_options = vision_source(vision_path, vision_options or Options())
            vision_record = vision.convert_vision(vision_path, vision_format, os.path.join(backbones, "vision"),
                                                  options=vision_options)
            for name, value in vision_record["model"]["vision"].items():
                _set(config.model.vision, name, value)
            config.model.resampler.dim = config.model.vision.vit.width
            if "image_size" in vision_record["model"]["vision"]:
                config.data.image_size = vision_record["model"]["vision"]["image_size"]
            assumptions += vision_record["assumptions"]
            every = config.model.xattn.every
            blocks, wanted = checkpoint_blocks(source.names()), [i for i in range(decoder.num_layers)
                                                                 if (i + 1) % every == 0]
            if blocks != wanted:
                raise ConversionError(
                    f"{checkpoint} has gated xattn blocks before LM layers {blocks} but --arch={arch} places them "
                    f"before {wanted} (every {every}); pass the --arch the checkpoint was trained with (of-3b: "
                    "every layer, of-4b: every 2nd, of-9b / of-9b-v1: every 4th).")
            try:
                cfg = FlamingoConfig.from_dict(config.model)
            except ConfigError as error:
                raise ConversionError(f"--arch={arch} with these backbones is not a model we can build: {error}") \
                    from error
            assert list(cfg.xattn_layers) == wanted

            target = decoder_convert.decoder_weights(decoder)
            lm_source = _decoder_source(hf, source, module, layout, vocab, decoder.tie_embeddings)
            steps = mapping.plan(hf_arch.table, lm_source, target, fmt=module.FORMAT)
            decoder_record = {"component": "decoder", "format": module.FORMAT, "source": os.path.abspath(hf.path),
                              "embedding_rows_from": os.path.abspath(raw.path), "out": final["decoder"],
                              "architecture": hf_arch.table.description,
                              "model": {"decoder": decoder_convert.config_fields(decoder)}}
            writer.write_backbone(os.path.join(backbones, "decoder"), mapping.produce(steps, lm_source, None),
                                  target, decoder_record)

            if not decoder.tie_embeddings:
                source = _checkpoint_with_output_rows(source, hf, layout, vocab, rows, assumptions)
            trainable = openflamingo.convert_trainable(source, cfg)

        shutil.copy(tokenizer_file, os.path.join(staging, TOKENIZER_FILE))
        config.data.tokenizer = os.path.join(out, TOKENIZER_FILE)
        config.backbones.vision, config.backbones.decoder = final["vision"], final["decoder"]
        RunConfig.from_config(config)  # the recorded config is one the trainer accepts
        params = jax.tree.map(lambda a: np.asarray(a, np.float32), trainable)
        record = {"component": "openflamingo", "checkpoint": os.path.abspath(checkpoint), "lm": os.path.abspath(lm),
                  "vision": os.path.abspath(vision_path), "tokenizer": os.path.abspath(tokenizer_file),
                  "arch": arch, "precision": precision, "out": out, "lm_family": layout.family, "vocab_size": vocab,
                  "num_new_tokens": rows - vocab, "xattn_layers": blocks, "assumptions": assumptions}
        # Only the weights: the trainer starts a fresh optimizer state on them (`params_only`).
        meta = {"params_only": True, "rollbacks": 0, "step": 0, "data": None,
                "config": json.loads(config.to_json_best_effort()), "backbones": final, "skipped_records": {},
                "nonfinite_in_row": 0, "converted_from": record}
        checkpointer = Checkpointer(os.path.join(staging, "checkpoints"), async_save=False)
        try:
            checkpointer.save(0, {"params": params}, meta, force=True)
            checkpointer.wait()
        finally:
            checkpointer.close()
        with open(os.path.join(staging, RECORD_FILE), "w") as f:
            json.dump(record, f, indent=2)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(meta["config"], f, indent=2)
        with open(os.path.join(staging, "config.py"), "w") as f:
            f.write(CONFIG_PY)
        ml_collections.ConfigDict(meta["config"])  # the record loads back as load_trained reads it
        replaced = None
        if os.path.lexists(out):  # --overwrite: the old one moves aside only now that the new one is complete
            replaced = f"{staging}.replaced"
            os.rename(out, replaced)
        os.rename(staging, out)
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def summary(record: dict[str, Any]) -> str:
    lines = [(f"converted OpenFlamingo {record['arch']} ({record['lm_family']} LM, xattn before layers "
              f"{record['xattn_layers']}) -> {record['out']}")]
    lines += [f"  note: {a}" for a in record["assumptions"]]
    lines.append(f"  evaluate: python -m flamingo_jax.evaluate --workdir={record['out']} --prompts=openflamingo "
                 "--ensemble=1 ...")
    lines.append(f"  fine-tune: python -m flamingo_jax.train --workdir={record['out']} "
                 f"--config={os.path.join(record['out'], 'config.py')} (with your data: --config.data.*)")
    return "\n".join(lines)


def export_openflamingo(workdir: str, out: str, *, step: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """The trained model in `workdir` -> OpenFlamingo's state dict at `out` (torch.save), for
    `load_state_dict(..., strict=False)` after its `create_model_and_transforms`."""
    import jax
    import ml_collections
    import torch

    from flamingo_jax.core import backbones
    from flamingo_jax.core.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings
    from flamingo_jax.core.parts import ModelParts
    from flamingo_jax.models.config import FlamingoConfig

    out = os.path.abspath(out)
    if os.path.lexists(out) and not overwrite:
        raise ConversionError(f"--out={out} already exists; pass --overwrite to replace it, or choose a new path.")
    if not os.path.isdir(os.path.dirname(out)):
        raise ConversionError(f"--out={out}: its parent directory does not exist; create it first.")
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise CheckpointError(f"--workdir={workdir} has no checkpoints/ directory; point it at a training run's or "
                              "`convert openflamingo`'s workdir.")
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        step = checkpointer.existing_step(step)
        meta = checkpointer.read_meta(step)
        config = ml_collections.ConfigDict(meta["config"])
        cfg = FlamingoConfig.from_dict(config.model)
        parts = ModelParts.flamingo(cfg)
        abstract_params, abstract_frozen = parts.abstract()
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        on_device = lambda tree: jax.tree.map(lambda _: device, tree)
        params = checkpointer.restore_params(abstract_with_shardings(abstract_params, on_device(abstract_params)),
                                             step)
    finally:
        checkpointer.close()
    decoder_path = (meta.get("backbones") or {}).get("decoder")
    if not decoder_path:
        raise ConversionError(f"{workdir}'s run used a random decoder; OpenFlamingo's embeddings hold its vocabulary "
                              "rows, so only a run on a converted decoder (config.backbones.decoder) exports.")
    family = _family_of_decoder(decoder_path)
    as_float32 = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), tree)
    decoder = backbones.restore(decoder_path, as_float32(abstract_frozen["decoder"]),
                                on_device(abstract_frozen["decoder"]))
    unembedding = None if cfg.decoder.tie_embeddings else np.asarray(decoder["unembedding"], np.float32)
    exported = openflamingo.export_trainable(jax.tree.map(lambda a: np.asarray(a, np.float32), params), cfg,
                                             openflamingo.LM_LAYOUTS[family],
                                             embedding=np.asarray(decoder["embedding"], np.float32),
                                             unembedding=unembedding)
    staging = f"{out}.exporting-{uuid.uuid4().hex[:8]}"
    try:
        torch.save({name: torch.from_numpy(value) for name, value in exported.items()}, staging)
        os.replace(staging, out)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return {"out": out, "workdir": os.path.abspath(workdir), "step": int(step), "tensors": len(exported),
            "lm_family": family}


def _family_of_decoder(path: str) -> str:
    """OpenFlamingo's LM family from the decoder backbone's record (written by the converters)."""
    try:
        family = writer.read_record(path)["format"]
    except (OSError, KeyError, ValueError):
        family = None
    if family not in openflamingo.LM_LAYOUTS:
        raise ConversionError(f"cannot tell which Hugging Face decoder family the run's decoder {path} is; "
                              f"OpenFlamingo's state dict names depend on it ({sorted(openflamingo.LM_LAYOUTS)}). "
                              "Export a run whose config.backbones.decoder was written by `convert decoder` or "
                              "`convert openflamingo`.")
    return family
