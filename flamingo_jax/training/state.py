"""The train state: only what training changes.

Trainable parameters (fp32 by the paper's policy), their optimizer state, the
step and an RNG key. Frozen backbone weights live beside it (`core.parts`),
are never differentiated, and are not written into Flamingo checkpoints:
checkpoints refer to the backbone checkpoints instead (`core.backbones`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # trainable weights, pure dict
    opt_state: Any
    rng: jax.Array
    lr_scale: jax.Array  # float32 []: multiplies every update (lowered by loss-spike rollbacks)


def new_train_state(params: Any, optimizer, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)), lr_scale=jnp.ones((), jnp.float32))
