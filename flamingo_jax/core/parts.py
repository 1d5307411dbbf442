"""A model held as three things: its structure, the weights that train, the weights that don't.

Training, inference and pod tooling all hold a model as its graph (no arrays),
the trainable weights (fp32 by the paper's policy) and the frozen ones (bf16),
both plain nested dicts of arrays ("pure dicts") so optax and orbax see
ordinary pytrees; `ModelParts.merge` turns them back into the module inside
jitted functions. Which weights train is a variable filter: Flamingo trains
its `nnx.Param`s and keeps its `layers.Frozen` backbones fixed (with
`model.freeze_lm` off, the LM's `Frozen`-typed weights train too); the
backbones' own pretraining objectives train everything.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.flamingo import Flamingo

ALL_WEIGHTS = (nnx.Param, layers.Frozen)  # a `trainable` filter that trains every weight


class ModelParts:
    """The model's structure (no arrays): merges pure dicts into the module and knows every
    weight's logical axes. `build(rngs)` makes the module; `trainable` filters its variables."""

    def __init__(self, build: Callable[[nnx.Rngs], nnx.Module], *, trainable: Any = nnx.Param):
        self.build = build
        self.trainable = trainable
        self.graphdef, self._trainable, self._frozen = self._split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))

    @classmethod
    def flamingo(cls, cfg: FlamingoConfig, *, trainable: Any = None) -> "ModelParts":
        """Flamingo's parts: by default its `nnx.Param`s train, and with `model.freeze_lm` off
        the LM's weights too (`layers.Frozen`-typed, under 'decoder')."""
        if trainable is None:
            trainable = nnx.Param if cfg.freeze_lm else nnx.Any(nnx.Param, nnx.PathContains("decoder"))
        parts = cls(lambda rngs: Flamingo(cfg, rngs=rngs), trainable=trainable)
        parts.cfg = cfg
        return parts

    def _split(self, model: nnx.Module):
        graphdef, trainable, frozen, rest = nnx.split(model, self.trainable, layers.Frozen, ...)
        if jax.tree_util.tree_leaves(rest):
            raise ValueError(f"model holds variables that are neither trainable nor Frozen: {rest}. "
                             "Declare every weight as nnx.Param or layers.Frozen.")
        return graphdef, trainable, frozen

    def merge(self, params: Any, frozen: Any) -> nnx.Module:
        trainable_state = jax.tree.map(lambda x: x, self._trainable)  # a fresh copy to fill
        frozen_state = jax.tree.map(lambda x: x, self._frozen)
        nnx.replace_by_pure_dict(trainable_state, params)
        nnx.replace_by_pure_dict(frozen_state, frozen)
        return nnx.merge(self.graphdef, trainable_state, frozen_state)

    def abstract(self) -> tuple[Any, Any]:
        """(trainable, frozen) as pure dicts of ShapeDtypeStruct."""
        return nnx.to_pure_dict(self._trainable), nnx.to_pure_dict(self._frozen)

    def logical_axes(self) -> tuple[Any, Any]:
        """(trainable, frozen) pure dicts of each weight's logical axis names."""
        axes = lambda state: nnx.to_pure_dict(
            jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable)))
        return axes(self._trainable), axes(self._frozen)

    def init(self, seed: int) -> tuple[Any, Any]:
        """Random (trainable, frozen) weights as pure dicts. Call under jit: one
        compiled program instead of one per weight shape. The RBG generator
        compiles several times faster than threefry on XLA:CPU; statistical
        quality is irrelevant for an initialisation."""
        _, trainable, frozen = self._split(self.build(nnx.Rngs(jax.random.key(seed, impl="rbg"))))
        return nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
