"""The model's split into structure, trainable and frozen weights, as pure dicts.

Training, inference and pod tooling all hold a Flamingo as three things: its
graph (no arrays), the trainable weights (fp32 by the paper's policy) and the
frozen backbone weights (bf16). The weights are plain nested dicts of arrays
("pure dicts") so optax and orbax see ordinary pytrees; `ModelParts.merge`
turns them back into a `Flamingo` module inside jitted functions.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.flamingo import Flamingo


class ModelParts:
    """The model's structure (no arrays): merges pure dicts into a Flamingo and
    knows every weight's logical axes."""

    def __init__(self, cfg: FlamingoConfig):
        self.cfg = cfg
        abstract = nnx.eval_shape(lambda: Flamingo(cfg, rngs=nnx.Rngs(0)))
        self.graphdef, self._trainable, self._frozen = layers.split_trainable(abstract)

    def merge(self, params: Any, frozen: Any) -> Flamingo:
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
        model = Flamingo(self.cfg, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))
        _, trainable, frozen = layers.split_trainable(model)
        return nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
