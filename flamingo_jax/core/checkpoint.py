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
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
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


def _all_processes(ok: bool) -> bool:
    """Whether `ok` holds on every process (each reads its own shards of a checkpoint)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).all())


def _describe(error: BaseException) -> str:
    """One line: the error's type and the first line of its message (orbax's run long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:300]}"


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 1000, async_save: bool = True):
        self.directory = absolute(directory)
        # Checkpoints that fail to restore are moved here, never deleted.
        self.set_aside_directory = self.directory.rstrip("/") + ".damaged"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(every_steps, 1), enable_async_checkpointing=async_save,
            create=True, cleanup_tmp_directories=True)  # a save cut short (SIGKILL) leaves only a tmp dir
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def existing_step(self, step: int | None = None) -> int:
        """`step` (default: the latest), checked to be saved here; an error listing the steps otherwise."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; steps there: "
                                  f"{sorted(self.manager.all_steps())}.")
        return step

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

    def restore_usable(self, abstract_state: Any, check_meta: Callable[[int, dict[str, Any]], None] | None = None
                       ) -> tuple[Any, dict[str, Any]]:
        """The newest checkpoint that restores whole; each newer one that does not is reported
        (step, what failed), set aside (`set_aside_directory`) and the next older one tried.

        `check_meta(step, meta)` runs on a checkpoint's record before its arrays are read (the
        trainer compares configs there); what it raises propagates: a mismatch is not damage.
        With no usable checkpoint left this raises, naming every one set aside: a workdir that
        held checkpoints never silently starts again from step 0."""
        damaged: list[str] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
            except Exception as error:  # noqa: BLE001 - any failure to read a checkpoint is damage
                meta, failure = None, error
            if meta is not None:
                if check_meta is not None:
                    check_meta(step, meta)
                try:
                    state, meta = self.restore(abstract_state, step)
                    failure = None
                except Exception as error:  # noqa: BLE001
                    failure = error
            if not _all_processes(failure is None):
                reason = _describe(failure) if failure is not None else "another host could not read it"
                logging.warning("checkpoint step %d in %s is damaged (%s): moving it to %s and trying the "
                                "previous one.", step, self.directory, reason, self.set_aside_directory)
                damaged.append(f"step {step} ({reason})")
                self.set_aside(step)
                continue
            if damaged:
                logging.warning("resuming from step %d; set aside: %s", step, "; ".join(damaged))
            return state, meta
        if damaged:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: every one failed to restore and was moved to "
                f"{self.set_aside_directory}: {'; '.join(damaged)}. Copy a good checkpoint back, or start a "
                "new --workdir; this run does not restart from step 0 over them.")
        raise CheckpointError(f"no checkpoint in {self.directory}; start a new run or point --workdir "
                              "at the directory a run wrote.")

    def set_aside(self, step: int) -> str:
        """Moves the checkpoint of `step` out of the manager's directory (renamed, never deleted)."""
        source = epath.Path(self.directory) / str(step)
        target = epath.Path(self.set_aside_directory) / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"flamingo_jax: checkpoint {step} set aside")
        self.manager.reload()
        return str(target)

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
