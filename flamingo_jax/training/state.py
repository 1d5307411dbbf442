"""Train state and the model's split into trainable and frozen weights.

The train state holds only what training changes: trainable parameters (fp32 by
the paper's policy), their optimizer state, the step and an RNG key. Frozen
backbone weights (bf16) live beside it, are never differentiated, and are not
written into Flamingo checkpoints: checkpoints refer to the backbone
checkpoints instead (see `backbones.py`).

Both are plain nested dicts of arrays ("pure dicts") so optax and orbax see
ordinary pytrees; `ModelParts.merge` turns them back into a `Flamingo` module
inside jitted functions.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.flamingo import Flamingo


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # trainable weights, pure dict
    opt_state: Any
    rng: jax.Array


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


def new_train_state(params: Any, optimizer, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))
