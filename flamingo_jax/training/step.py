"""The jitted train step: gradients accumulated over every dataset (weighted by
λ) and over micro-batches, one AdamW update, non-finite updates skipped."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from flamingo_jax.training.loss import nll_sum
from flamingo_jax.core.parts import ModelParts
from flamingo_jax.training.state import TrainState

Batch = Mapping[str, jax.Array]


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
    """[B, ...] -> [num_microbatches, B / num_microbatches, ...] for every field."""
    return jax.tree.map(lambda x: x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:]), batch)


def dataset_loss_and_grads(parts: ModelParts, params: Any, frozen: Any, batch: Batch,
                           num_microbatches: int) -> tuple[jax.Array, Any]:
    """Mean NLL over the dataset's text tokens and its gradient, accumulated over micro-batches."""
    num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def microbatch_loss(p, mb):
        logits = parts.merge(p, frozen)(mb["tokens"], mb["media"], mb["media_index"])
        return nll_sum(logits, mb["targets"], mb["loss_mask"]) / num_tokens

    def accumulate(carry, mb):
        loss, grads = jax.value_and_grad(microbatch_loss)(params, mb)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, split_microbatches(batch, num_microbatches))
    return loss, grads


def make_train_step(parts: ModelParts, optimizer: optax.GradientTransformation, weights: Mapping[str, float],
                    datasets: Sequence[str], num_microbatches: int = 1):
    """A step over `datasets` (all of them, or one under round-robin):
    minimises sum_m λ_m L_m with one update."""
    datasets = tuple(datasets)

    def train_step(state: TrainState, frozen: Any, batches: Mapping[str, Batch]) -> tuple[TrainState, dict]:
        metrics = {}
        total_loss = jnp.zeros((), jnp.float32)
        total_grads = jax.tree.map(jnp.zeros_like, state.params)
        for name in datasets:
            loss, grads = dataset_loss_and_grads(parts, state.params, frozen, batches[name], num_microbatches)
            total_loss = total_loss + weights[name] * loss
            total_grads = jax.tree.map(lambda t, g: t + weights[name] * g, total_grads, grads)
            metrics[f"loss/{name}"] = loss
        grad_norm = optax.tree.norm(total_grads)
        finite = jnp.isfinite(total_loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(total_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient leaves parameters and optimizer state untouched.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state),
                               rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]))
        xattn = state.params["xattn"]
        metrics.update({
            "loss": total_loss,
            "grad_norm": grad_norm,
            "finite": finite,
            "gates/attention": jnp.tanh(xattn["attention_gate"]),
            "gates/ffw": jnp.tanh(xattn["ffw_gate"]),
        })
        return new_state, metrics

    return train_step
