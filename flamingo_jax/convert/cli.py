"""The converter's command line: one subcommand per component.

    python -m flamingo_jax.convert vision --from=<file or dir> --format={hf_clip,open_clip,timm_nfnet} --out=<dir>
    python -m flamingo_jax.convert decoder --from=<HF model dir or weights> --out=<dir> [--tokenizer=tokenizer.json]
    python -m flamingo_jax.convert openflamingo --checkpoint=checkpoint.pt --lm=<HF dir> --vision=<open_clip weights>
        --tokenizer=<dir with tokenizer.json> --arch={of-3b,of-4b,of-9b,of-9b-v1} --out=<workdir>
    python -m flamingo_jax.convert to-openflamingo --workdir=<workdir> --out=checkpoint.pt
    python -m flamingo_jax.convert vision --help

Each subcommand has its own absl flags (one entry of SUBCOMMANDS each). Errors a user can cause print one message naming
the problem and its fix, exit with status 1 (`flamingo_jax.cli`), and leave no
output behind.
"""

from __future__ import annotations

import json
from typing import Callable

from absl import flags

from flamingo_jax import cli
from flamingo_jax.convert.errors import ConversionError

USAGE = """usage: python -m flamingo_jax.convert <subcommand> [flags]

subcommands:
  decoder  a Hugging Face causal LM (LLaMA / Mistral, GPT-NeoX, MPT) -> an orbax backbone checkpoint for
           config.backbones.decoder
  vision   a vision encoder checkpoint (timm dm_nfnet_*, open_clip ViT, HF CLIP) -> an orbax backbone
           checkpoint for config.backbones.vision
  openflamingo     an OpenFlamingo checkpoint.pt with its HF decoder, open_clip tower and tokenizer -> a
                   Flamingo workdir (Engine.from_workdir, evaluate, train resume / fine-tune)
  to-openflamingo  a Flamingo workdir -> OpenFlamingo's state dict (load_state_dict(..., strict=False))

`python -m flamingo_jax.convert <subcommand> --help` lists its flags."""


def _vision_flags(fv: flags.FlagValues) -> None:
    from flamingo_jax.convert import vision, writer

    flags.DEFINE_string("from", None, "The source: a weights file (.safetensors, .bin, .pt, .pth), a shard index "
                        "(*.index.json), or a directory holding one (and its config.json).", flag_values=fv)
    flags.DEFINE_enum("format", None, sorted(vision.FAMILIES), "The source's family.", flag_values=fv)
    flags.DEFINE_string("out", None, "The orbax backbone checkpoint to write (a directory; refused if it exists).",
                        flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists (only once the new one is complete).",
                      flag_values=fv)
    flags.DEFINE_enum("dtype", "source", list(vision.DTYPES), "Dtype of the written weights ('source' keeps each "
                      "tensor's; restoring casts to config.model.frozen_param_dtype either way).", flag_values=fv)
    flags.DEFINE_integer("num_heads", None, "ViT attention heads, when the source does not record them.",
                         flag_values=fv)
    flags.DEFINE_enum("activation", None, ["quick_gelu", "gelu_exact", "gelu"], "ViT MLP activation, when the "
                      "source does not record it (quick_gelu: OpenAI CLIP; gelu_exact: torch's nn.GELU).",
                      flag_values=fv)
    flags.DEFINE_bool("norm_output", None, "ViT: apply ln_post to the patch tokens (default: as the source "
                      "family returns them: open_clip yes, HF CLIP's last_hidden_state no).", flag_values=fv)
    flags.DEFINE_integer("image_size", None, "NFNet: the image size to configure (its weights fit any multiple of "
                         "32); ViT: checked against the positional embedding.", flag_values=fv)
    flags.DEFINE_integer("buffer_mb", writer.DEFAULT_BUFFER_BYTES >> 20, "Weights gathered per orbax write, in "
                         "MiB. Peak memory is about 2x max(this, the largest stacked weight): the group and "
                         "orbax's buffer while it writes (3x with --compress).", flag_values=fv)
    flags.DEFINE_bool("compress", False, "zstd-compress the written chunks: about 8% smaller files, for one more "
                      "buffer of the group while writing and slower writes.", flag_values=fv)


def _run_vision(fv: flags.FlagValues) -> int:
    from flamingo_jax.convert import vision
    from flamingo_jax.convert.families import Options

    missing = [f"--{name}" for name in ("from", "format", "out") if fv[name].value is None]
    if missing:
        raise ConversionError(f"vision: {', '.join(missing)} required; see --help.")
    options = Options(num_heads=fv.num_heads, activation=fv.activation, norm_output=fv.norm_output,
                      image_size=fv.image_size)
    record = vision.convert_vision(fv["from"].value, fv.format, fv.out, options=options, dtype=fv.dtype,
                                   overwrite=fv.overwrite, buffer_bytes=max(fv.buffer_mb, 0) << 20,
                                   compress=fv.compress)
    print(vision.summary(record))
    print(json.dumps({"out": record["out"], "overrides": record["overrides"]}))
    return 0


def _decoder_flags(fv: flags.FlagValues) -> None:
    from flamingo_jax.convert import vision, writer

    flags.DEFINE_string("from", None, "The source: a Hugging Face model directory (config.json and its weights), a "
                        "weights file (.safetensors, .bin) or a shard index (*.index.json) with config.json beside "
                        "it.", flag_values=fv)
    flags.DEFINE_string("out", None, "The orbax backbone checkpoint to write (a directory; refused if it exists).",
                        flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "The checkpoint's tokenizer (tokenizer.json or a SentencePiece .model): "
                        "checked against the embedding table before anything is written, and named in the printed "
                        "flags.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists (only once the new one is complete).",
                      flag_values=fv)
    flags.DEFINE_enum("dtype", "source", list(vision.DTYPES), "Dtype of the written weights ('source' keeps each "
                      "tensor's; restoring casts to config.model.frozen_param_dtype either way).", flag_values=fv)
    flags.DEFINE_integer("buffer_mb", writer.DEFAULT_BUFFER_BYTES >> 20, "Weights gathered per orbax write, in "
                         "MiB. Peak memory is about 2x max(this, the largest stacked weight).", flag_values=fv)
    flags.DEFINE_bool("compress", False, "zstd-compress the written chunks.", flag_values=fv)


def _run_decoder(fv: flags.FlagValues) -> int:
    from flamingo_jax.convert import decoder

    missing = [f"--{name}" for name in ("from", "out") if fv[name].value is None]
    if missing:
        raise ConversionError(f"decoder: {', '.join(missing)} required; see --help.")
    record = decoder.convert_decoder(fv["from"].value, fv.out, tokenizer=fv.tokenizer, dtype=fv.dtype,
                                     overwrite=fv.overwrite, buffer_bytes=max(fv.buffer_mb, 0) << 20,
                                     compress=fv.compress)
    print(decoder.summary(record))
    print(json.dumps({"out": record["out"], "overrides": record["overrides"]}))
    return 0


def _openflamingo_flags(fv: flags.FlagValues) -> None:
    from flamingo_jax.convert import openflamingo_workdir

    flags.DEFINE_string("checkpoint", None, "OpenFlamingo's checkpoint.pt (its state dict, or its training script's "
                        "{'model_state_dict': ...}); read with torch.load(weights_only=True).", flag_values=fv)
    flags.DEFINE_string("lm", None, "The Hugging Face decoder directory it was built on (config.json and weights).",
                        flag_values=fv)
    flags.DEFINE_string("vision", None, "Its vision tower: open_clip weights (a file or a directory; "
                        "open_clip_config.json beside them records heads and activation) or a Hugging Face CLIP "
                        "directory.", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "The directory holding its tokenizer.json (or the file).", flag_values=fv)
    flags.DEFINE_enum("arch", None, sorted(openflamingo_workdir.ARCHS), "Which OpenFlamingo release: of-3b (MPT-1B, "
                      "xattn every layer), of-4b (RedPajama-3B, every 2nd), of-9b (MPT-7B, every 4th), of-9b-v1 "
                      "(LLaMA-7B, every 4th).", flag_values=fv)
    flags.DEFINE_string("out", None, "The workdir to write (refused if it exists).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists (only once the new one is complete).",
                      flag_values=fv)
    flags.DEFINE_integer("vision_num_heads", None, "ViT heads, when open_clip_config.json does not record them "
                         "(default: width / 64, as ViT-L/14).", flag_values=fv)
    flags.DEFINE_enum("vision_activation", None, ["quick_gelu", "gelu_exact"], "ViT MLP activation, when "
                      "open_clip_config.json does not record it (default: quick_gelu, OpenAI's ViT-L/14 weights "
                      "that OpenFlamingo uses).", flag_values=fv)
    flags.DEFINE_enum("precision", "config", ["config", "float32"], "float32: activations and frozen weights in "
                      "fp32, as OpenFlamingo runs by default (exact parity); config: the --arch config's (bf16).",
                      flag_values=fv)


def _run_openflamingo(fv: flags.FlagValues) -> int:
    from flamingo_jax.convert import openflamingo_workdir
    from flamingo_jax.convert.families import Options

    missing = [f"--{name}" for name in ("checkpoint", "lm", "vision", "tokenizer", "arch", "out")
               if fv[name].value is None]
    if missing:
        raise ConversionError(f"openflamingo: {', '.join(missing)} required; see --help.")
    record = openflamingo_workdir.convert_openflamingo(
        fv.checkpoint, fv.lm, fv.vision, fv.tokenizer, fv.arch, fv.out, overwrite=fv.overwrite,
        vision_options=Options(num_heads=fv.vision_num_heads, activation=fv.vision_activation), precision=fv.precision)
    print(openflamingo_workdir.summary(record))
    print(json.dumps({"out": record["out"]}))
    return 0


def _to_openflamingo_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "The Flamingo workdir (a training run's, or `convert openflamingo`'s).",
                        flag_values=fv)
    flags.DEFINE_integer("step", None, "The checkpoint step to export (default: the latest).", flag_values=fv)
    flags.DEFINE_string("out", None, "The checkpoint.pt to write (refused if it exists).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", flag_values=fv)


def _run_to_openflamingo(fv: flags.FlagValues) -> int:
    from flamingo_jax.convert import openflamingo_workdir

    missing = [f"--{name}" for name in ("workdir", "out") if fv[name].value is None]
    if missing:
        raise ConversionError(f"to-openflamingo: {', '.join(missing)} required; see --help.")
    record = openflamingo_workdir.export_openflamingo(fv.workdir, fv.out, step=fv.step, overwrite=fv.overwrite)
    print(f"exported step {record['step']} of {record['workdir']} ({record['lm_family']} LM, {record['tensors']} "
          f"tensors) -> {record['out']}; load it with model.load_state_dict(torch.load(path), strict=False)")
    print(json.dumps(record))
    return 0


SUBCOMMANDS: dict[str, tuple[Callable[[flags.FlagValues], None], Callable[[flags.FlagValues], int]]] = {
    "decoder": (_decoder_flags, _run_decoder),
    "openflamingo": (_openflamingo_flags, _run_openflamingo),
    "to-openflamingo": (_to_openflamingo_flags, _run_to_openflamingo),
    "vision": (_vision_flags, _run_vision),
}


def main(argv: list[str]) -> int:
    """Runs `argv` ([program, subcommand, flags...]); returns the exit status."""
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if len(argv) >= 2 else 2
    if argv[1] not in SUBCOMMANDS:
        cli.fail(f"unknown subcommand {argv[1]!r}", USAGE, cli.USAGE_EXIT)
    name = argv[1]
    define, run = SUBCOMMANDS[name]
    fv = flags.FlagValues()
    define(fv)
    rest = cli.parse(fv, [f"{argv[0]} {name}"] + list(argv[2:]), USAGE.replace("<subcommand>", name, 1))
    if len(rest) > 1:
        cli.fail(f"unexpected arguments {rest[1:]}; flags take the form --name=value.", USAGE, cli.USAGE_EXIT)
    return run(fv)
