"""The paper's objective: per dataset, mean next-token NLL over text tokens.

A dataset's loss is a mean over *all* its text tokens in the step, also when the
batch is split into micro-batches: each micro-batch contributes its NLL *sum*
divided by the whole batch's token count, so accumulating micro-batches gives
exactly the full-batch loss and gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_nll(logits: Array, targets: Array) -> Array:
    """[B, T, V] logits, [B, T] ids -> [B, T] negative log-likelihoods (fp32)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def nll_sum(logits: Array, targets: Array, loss_mask: Array) -> Array:
    """Sum of the NLL over the positions `loss_mask` selects (text and <EOC>)."""
    return jnp.sum(token_nll(logits, targets) * loss_mask.astype(jnp.float32))
