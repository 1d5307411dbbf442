"""Writes converted weights as a backbone checkpoint: bounded memory, atomic, with its record.

The result is the directory `core/backbones.py` restores (an orbax PyTree
checkpoint of the component's pure dict), so `config.backbones.vision=<out>`
takes it as it is. Orbax's `StandardCheckpointer.save` needs the whole tree in
memory at once; orbax 0.12's partial saving (`orbax.checkpoint.experimental.v1.
partial`: each `save` adds new leaves to a staged checkpoint, `finalize` merges
them into one OCDBT database) does not. Weights are gathered until a group
holds `buffer_bytes`, and each group is saved before the next weight is read.
While it writes a group, orbax holds one more copy of it (tensorstore's write
buffer; and the compressed chunks too with `compress`), so the peak is about
twice max(buffer, the largest stacked weight), whatever the model's size
(`bench/convert_memory.py` measures it; BENCHMARKS.md has the figures).

Atomicity: everything is written under a hidden temporary sibling of the
output; only a finished, verified checkpoint is renamed into place. On any
error (or Ctrl-C) the temporary directory is removed and the output path is
as it was.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from absl import logging

from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.mapping import Keys, flatten_target

RECORD_FILE = "flamingo_conversion.json"  # beside the arrays: what was converted and the config it needs
DEFAULT_BUFFER_BYTES = 64 << 20  # small weights share an orbax save; large ones go one at a time


def check_output(out: str, overwrite: bool) -> str:
    """The absolute output path, refused if it exists (unless `overwrite`) or its parent does not."""
    out = os.path.abspath(out)
    if os.path.lexists(out) and not overwrite:
        raise ConversionError(f"--out={out} already exists; pass --overwrite to replace it, or choose a new path.")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ConversionError(f"--out={out}: its parent directory {parent} does not exist; create it first.")
    return out


def _set(tree: dict, keys: Keys, value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _saved_pytree_dir(checkpoint: str) -> str:
    """The PyTree directory inside a finalised v1 checkpoint (the one child holding `_METADATA`)."""
    found = [os.path.join(checkpoint, name) for name in sorted(os.listdir(checkpoint))
             if os.path.isfile(os.path.join(checkpoint, name, "_METADATA"))]
    if len(found) != 1:
        raise ConversionError(f"orbax wrote {found or 'no'} PyTree directories under {checkpoint}, expected one; "
                              "this orbax version lays out partial saves differently than flamingo_jax expects.")
    return found[0]


def _verify(directory: str, expected: Mapping[Any, Any]) -> None:
    """The written tree has exactly the expected leaves and shapes (read from orbax's metadata)."""
    import orbax.checkpoint as ocp
    from etils import epath

    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory)).tree  # reads _METADATA, no arrays
    written = {path: tuple(leaf.shape) for path, (_, leaf) in flatten_target(metadata).items()}
    wanted = {path: tuple(leaf.shape) for path, (_, leaf) in flatten_target(expected).items()}
    if written != wanted:
        wrong = sorted(set(written.items()) ^ set(wanted.items()))
        raise ConversionError(f"the written checkpoint differs from the encoder's weights at {wrong[:8]}; "
                              "this is a bug in flamingo_jax/convert.")


def _orbax_context(compress: bool):
    from orbax.checkpoint.experimental import v1 as ocp_v1

    context = ocp_v1.Context()
    context.array.saving.use_compression = compress
    return context


def write_backbone(out: str, weights: Iterator[tuple[Keys, np.ndarray]], expected: Mapping[Any, Any],
                   record: dict[str, Any], *, overwrite: bool = False, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                   compress: bool = False) -> str:
    """Saves `weights` (keys into the pure dict, array) as the backbone checkpoint `out`; returns its path.

    `expected` is the pure dict of abstract arrays the checkpoint must hold;
    `record` is written beside the arrays as RECORD_FILE. `compress=True` has
    orbax zstd-compress the chunks: about 8% smaller files, for one more buffer
    while writing and 2.5x the write time."""
    from orbax.checkpoint.experimental.v1 import partial

    out = check_output(out, overwrite)
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.converting-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    try:
        checkpoint = os.path.join(staging, "checkpoint")
        group: dict = {}
        group_bytes = saves = 0
        with _orbax_context(compress):
            for keys, array in weights:
                _set(group, keys, array)
                group_bytes += array.nbytes
                if group_bytes >= buffer_bytes:  # saved before the next weight is read
                    partial.save(checkpoint, group)
                    group, group_bytes, saves = {}, 0, saves + 1
            if group:
                partial.save(checkpoint, group)
                saves += 1
        if not saves:
            raise ConversionError("no weights to write; this is a bug in flamingo_jax/convert.")
        partial.finalize(checkpoint)
        pytree = _saved_pytree_dir(checkpoint)
        _verify(pytree, expected)
        with open(os.path.join(pytree, RECORD_FILE), "w") as f:
            json.dump(record, f, indent=2)
        replaced = None
        if os.path.lexists(out):  # --overwrite: the old one moves aside, and back if the rename fails
            replaced = os.path.join(staging, "replaced")
            os.rename(out, replaced)
        try:
            os.rename(pytree, out)
        except OSError as error:
            if replaced:
                os.rename(replaced, out)
            elif os.path.lexists(out):
                raise ConversionError(f"--out={out} appeared while converting (another conversion?); nothing of "
                                      "this one was kept.") from error
            raise
        logging.info("wrote %s in %d orbax save(s)", out, saves)
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_record(path: str) -> dict[str, Any]:
    """The record a conversion wrote beside a backbone checkpoint."""
    with open(os.path.join(path, RECORD_FILE)) as f:
        return json.load(f)


def summary(record: dict[str, Any], details: tuple[str, ...] = ()) -> str:
    """What a user reads after a backbone conversion: source, output, assumptions, `details`, and the
    config flags that use it (shell-quoted, also in the record file)."""
    lines = [f"converted {record['source']} ({record['format']}: {record['architecture']})",
             f"  -> {record['out']}"]
    lines += [f"  assumed: {assumption}" for assumption in record["assumptions"]]
    lines += [f"  {detail}" for detail in details]
    lines.append(f"Use it with these flags (also in {os.path.join(record['out'], RECORD_FILE)}):")
    lines.append("  " + " \\\n  ".join(shlex.quote(flag) for flag in record["overrides"]))
    return "\n".join(lines)
