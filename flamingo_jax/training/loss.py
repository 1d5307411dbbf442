"""The paper's objective: per dataset, mean next-token NLL over text tokens.

A dataset's loss is a mean over *all* its text tokens in the step, also when the
batch is split into micro-batches: each micro-batch contributes its NLL *sum*
divided by the whole batch's token count, so accumulating micro-batches gives
exactly the full-batch loss and gradient.

Training computes the NLL straight from the final hidden states and the output
embedding (`unembedded_nll_sum`): Flamingo's vocabulary is the frozen LM's plus
its new tokens, two blocks of output weights, and concatenating their logits,
then slicing the gradient apart again, moved the largest arrays of the step
(batch x length x vocabulary) several times over.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from flamingo_jax.models.partitioning import constrain

Array = jax.Array
LOGIT_AXES = ("batch", "length", "vocab")


def token_nll(logits: Array, targets: Array) -> Array:
    """[B, T, V] logits, [B, T] ids -> [B, T] negative log-likelihoods (fp32)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def nll_sum(logits: Array, targets: Array, loss_mask: Array) -> Array:
    """Sum of the NLL over the positions `loss_mask` selects (text and <EOC>)."""
    return jnp.sum(token_nll(logits, targets) * loss_mask.astype(jnp.float32))


def unembedded_nll_sum(hidden: Array, blocks: Sequence[Array], targets: Array, loss_mask: Array) -> Array:
    """`nll_sum` of the logits `concatenate([hidden @ w for w in blocks], -1)`, never built.

    hidden [B, T, D]; blocks: output weights [D, V_i], in vocabulary order (the frozen
    vocabulary, then the new tokens); targets [B, T] ids over all blocks. The forward keeps
    one exp(logits) per block for the backward, which writes the logits' gradient over it."""
    return _fused_nll(hidden, tuple(blocks), targets, loss_mask.astype(jnp.float32))


def _block_logits(hidden: Array, w: Array) -> Array:
    return constrain(jnp.dot(hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32), LOGIT_AXES)


def _local_targets(targets: Array, blocks: tuple[Array, ...]):
    """Per block: (targets as ids within it, clipped; whether the target is in it)."""
    start = 0
    for w in blocks:
        size = w.shape[-1]
        yield jnp.clip(targets - start, 0, size - 1), (targets >= start) & (targets < start + size)
        start += size


@jax.custom_vjp
def _fused_nll(hidden, blocks, targets, mask):
    return _fused_nll_value(hidden, blocks, targets, mask)[0]


def _fused_nll_value(hidden, blocks, targets, mask):
    logits = [_block_logits(hidden, w) for w in blocks]
    peak = jnp.max(jnp.stack([jnp.max(lg, axis=-1) for lg in logits]), axis=0)
    exps = [jnp.exp(lg - peak[..., None]) for lg in logits]
    total = sum(jnp.sum(e, axis=-1) for e in exps)  # [B, T]: the softmax's denominator over all blocks
    target_logit = sum(jnp.where(inside, jnp.take_along_axis(lg, local[..., None], axis=-1)[..., 0], 0.0)
                       for lg, (local, inside) in zip(logits, _local_targets(targets, blocks)))
    nll = peak + jnp.log(total) - target_logit
    return jnp.sum(nll * mask), exps, total


def _fused_nll_forward(hidden, blocks, targets, mask):
    # symbolic_zeros: inputs come as CustomVJPPrimal, so a frozen block (not perturbed) gets no
    # weight gradient at all rather than one computed and thrown away.
    values = lambda tree: jax.tree.map(lambda p: p.value, tree, is_leaf=lambda p: hasattr(p, "perturbed"))
    h, ws, t, m = values((hidden, blocks, targets, mask))
    loss, exps, total = _fused_nll_value(h, ws, t, m)
    weight_inputs = tuple(h if block.perturbed else None for block in blocks)
    return loss, (h, ws, t, m, exps, total, weight_inputs)


def _fused_nll_backward(residuals, cotangent):
    hidden, blocks, targets, mask, exps, total, weight_inputs = residuals
    weight = cotangent * mask  # [B, T]: d loss / d nll
    d_hidden = jnp.zeros(hidden.shape, jnp.float32)
    d_blocks = []
    for w, e, h, (local, inside) in zip(blocks, exps, weight_inputs, _local_targets(targets, blocks)):
        one_hot = (jnp.arange(w.shape[-1]) == local[..., None]) & inside[..., None]
        d_logits = constrain(e * (weight / total)[..., None] - one_hot * weight[..., None], LOGIT_AXES)
        d_logits = d_logits.astype(hidden.dtype)
        d_hidden = d_hidden + jnp.einsum("btv,dv->btd", d_logits, w.astype(hidden.dtype),
                                         preferred_element_type=jnp.float32)
        d_blocks.append(None if h is None else jnp.einsum(
            "btd,btv->dv", h, d_logits, preferred_element_type=jnp.float32).astype(w.dtype))
    return d_hidden.astype(hidden.dtype), tuple(d_blocks), None, None


_fused_nll.defvjp(_fused_nll_forward, _fused_nll_backward, symbolic_zeros=True)
