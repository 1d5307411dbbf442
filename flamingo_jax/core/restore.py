"""A run's trainable weights back from its checkpoints, placed by the run's own mesh and rules.

Every reader of a finished run (the inference engine, the backbone checks) starts the same way:
the step's JSON record gives the run config, the config gives the model's parts, and the trainable
weights restore onto the shardings the run's mesh rules give them. What the reader does with the
frozen weights differs (backbone checkpoints, or none for a pretraining run), so it gets their
shardings and builds them itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from etils import epath

from flamingo_jax.core import sharding
from flamingo_jax.core.checkpoint import Checkpointer, CheckpointError, absolute, abstract_with_shardings
from flamingo_jax.core.parts import ModelParts


@dataclasses.dataclass
class RestoredRun:
    config: ml_collections.ConfigDict  # the run config the checkpoint recorded
    meta: dict[str, Any]  # the step's whole JSON record (config, backbones, data position, ...)
    parts: ModelParts
    params: Any  # the trainable weights, on their shardings
    frozen_shardings: Any  # where the frozen weights belong on the same mesh
    step: int


def restore_trainable(workdir: str, parts_of: Callable[[ml_collections.ConfigDict], ModelParts], *,
                      step: int | None = None, devices: Sequence[jax.Device] | None = None) -> RestoredRun:
    """The trainable weights of the run in `workdir` at `step` (default: the latest), with the
    model `parts_of(run config)` and the run's mesh over `devices` (default: all)."""
    directory = epath.Path(absolute(workdir)) / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"{workdir} has no checkpoints/ directory; point --workdir at the directory given to "
                              "`python -m flamingo_jax.train --workdir=...` (train it first if it is not done).")
    checkpointer = Checkpointer(str(directory), async_save=False)
    try:
        step = checkpointer.existing_step(step)
        meta = checkpointer.read_meta(step)
        config = ml_collections.ConfigDict(meta["config"])
        parts = parts_of(config)
        mesh = sharding.make_mesh(config.mesh, devices)
        rules = sharding.rules_from_config(config.get("mesh_rules"))
        abstract_params, abstract_frozen = parts.abstract()
        param_axes, frozen_axes = parts.logical_axes()
        param_shardings = sharding.tree_shardings(abstract_params, param_axes, mesh, rules)
        params = checkpointer.restore_params(abstract_with_shardings(abstract_params, param_shardings), step)
    finally:
        checkpointer.close()
    return RestoredRun(config, meta, parts, params, sharding.tree_shardings(abstract_frozen, frozen_axes, mesh, rules),
                       int(step))
