"""Orbax checkpoints of a Flamingo run.

A checkpoint holds what training changes and what resuming needs: the train
state (trainable weights, optimizer state, step, RNG) and a JSON record with the
data-iterator state, the config and the backbone checkpoints it was trained
on. The frozen backbones themselves (70B weights for the 80B) are *referred to*,
never copied. Saves are asynchronous and atomic (orbax writes to a temporary
directory and renames it), the last `keep` are kept, and a restore lays the
arrays out on whatever mesh the restoring run uses.

On several hosts every process calls save and restore (orbax writes each
process's shards of the arrays), but only process 0 writes the JSON record, so
per-process values in it (each host's data-iterator position) are gathered
into a list indexed by process first: `gather_process_states` on save,
`this_process_state` on restore.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flamingo_jax.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A missing or unreadable checkpoint; the message says what to do."""


def absolute(path: str) -> str:
    """A local path made absolute; a URL (gs://...) unchanged."""
    return path if "://" in path else os.path.abspath(path)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def gather_process_states(state: Any) -> list[Any]:
    """Every process's JSON-serialisable `state`, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [state]
    encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)  # JSON has no NUL bytes: zero padding is safe
    size = int(np.max(multihost_utils.process_allgather(np.int32(encoded.size))))
    gathered = multihost_utils.process_allgather(np.pad(encoded, (0, size - encoded.size)))
    return [json.loads(row.tobytes().rstrip(b"\0")) for row in gathered]


def this_process_state(states: Any) -> Any:
    """This process's entry of `gather_process_states`' list (a bare state: a checkpoint of 1 process)."""
    states = states if isinstance(states, list) else [states]
    if len(states) != jax.process_count():
        raise CheckpointError(
            f"the checkpoint holds the data-iterator states of {len(states)} process(es) but this run has "
            f"{jax.process_count()}; a data position only means something for the host layout that produced it. "
            "Resume with the same number of hosts.")
    return states[jax.process_index()]


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 1000, async_save: bool = True):
        self.directory = absolute(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(every_steps, 1), enable_async_checkpointing=async_save,
            create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts an (asynchronous) save if the interval says so or `force`; returns whether it did."""
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}; start a new run or point --workdir "
                                  "at the directory a run wrote.")
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def restore_params(self, abstract_params: Any, step: int) -> Any:
        """Only the trainable weights of the train state at `step` (evaluation: the
        optimizer state, twice their size, is never read)."""
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                                   dtype=x.dtype), abstract_params)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True)))
        return restored.state["params"]

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}.")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
