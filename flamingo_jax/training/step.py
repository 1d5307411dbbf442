"""The jitted train step: gradients accumulated over every dataset (weighted by
λ) and over micro-batches, one optimizer update, non-finite updates skipped."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from flamingo_jax.core.parts import ModelParts
from flamingo_jax.training.objectives import Objective
from flamingo_jax.training.state import TrainState

Batch = Mapping[str, jax.Array]


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
    """[B, ...] -> [num_microbatches, B / num_microbatches, ...] for every field."""
    return jax.tree.map(lambda x: x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:]), batch)


def dataset_loss_and_grads(objective: Objective, parts: ModelParts, params: Any, frozen: Any, batch: Batch,
                           num_microbatches: int) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
    """A dataset's mean loss, its gradient and its metrics, accumulated over micro-batches.

    Each micro-batch contributes its loss *sum* and what it sums over; both are added up and
    divided once at the end, so the result is exactly the full batch's mean and gradient. The
    metrics leave the scan stacked (their shapes are unknown before the model is traced, and
    tracing it once more only to learn them cost a quarter of the step's trace)."""

    def microbatch_loss(p, mb):
        terms = objective.batch_loss(parts.merge(p, frozen), mb)
        return terms.total, (terms.count, terms.metrics)

    def accumulate(carry, mb):
        (total, (count, metrics)), grads = jax.value_and_grad(microbatch_loss, has_aux=True)(params, mb)
        return jax.tree.map(jnp.add, carry, (total, count, grads)), metrics

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (total, count, grads), metrics = jax.lax.scan(accumulate, zeros, split_microbatches(batch, num_microbatches))
    count = jnp.maximum(count, 1.0)
    return (total / count, jax.tree.map(lambda g: g / count, grads),
            jax.tree.map(lambda m: jnp.sum(m, axis=0) / count, metrics))


def make_train_step(objective: Objective, parts: ModelParts, optimizer: optax.GradientTransformation,
                    weights: Mapping[str, float], datasets: Sequence[str], num_microbatches: int = 1):
    """A step over `datasets` (all of them, or one under round-robin):
    minimises sum_m λ_m L_m with one update."""
    datasets = tuple(datasets)

    def train_step(state: TrainState, frozen: Any, batches: Mapping[str, Batch]) -> tuple[TrainState, dict]:
        metrics = {}
        total_loss = jnp.zeros((), jnp.float32)
        total_grads = jax.tree.map(jnp.zeros_like, state.params)
        for name in datasets:
            loss, grads, batch_metrics = dataset_loss_and_grads(objective, parts, state.params, frozen,
                                                                batches[name], num_microbatches)
            total_loss = total_loss + weights[name] * loss
            total_grads = jax.tree.map(lambda t, g: t + weights[name] * g, total_grads, grads)
            metrics[f"loss/{name}"] = loss
            metrics.update({f"{key}/{name}": value for key, value in batch_metrics.items()})
        grad_norm = optax.tree.norm(total_grads)
        finite = jnp.isfinite(total_loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(total_grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)  # = a scaled learning rate
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient leaves parameters and optimizer state untouched.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state),
                               rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]),
                               lr_scale=state.lr_scale)
        metrics.update(loss=total_loss, grad_norm=grad_norm, finite=finite, **objective.weight_metrics(state.params))
        return new_state, metrics

    return train_step
