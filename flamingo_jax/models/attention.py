"""The one attention function that every module calls.

    out = softmax(scale * q·k + bias, masked) · v

over queries [B, T, N, H] and keys/values [B, S, K, H], with grouped-query
attention when K < N (N a multiple of K). The decoder, the GATED XATTN-DENSE
blocks, the Perceiver Resampler and the ViT all come here, so a kernel choice
is one config switch (`model.attention`), never hard-wired in a module:

* 'xla': the portable implementation (`jax.nn.dot_product_attention`'s XLA
  path); exact, and the reference the others are tested against;
* 'cudnn': cuDNN's fused attention (GPU only; JAX raises a clear error where
  it cannot run, e.g. on CPU or for masks it does not support);
* 'auto': JAX picks (cuDNN where it can on GPU, else XLA).

`attention_over_parts` is the same computation (XLA only) over keys/values given in
parts, e.g. a decoding step's cache and its new keys, so that the cache is read where it
lies instead of being concatenated (a copy of it) or updated first (XLA then copies it).

A query row whose keys are all masked gets an arbitrary (finite) output:
callers that can produce such rows zero them explicitly (xattn does).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def attention(q: Array, k: Array, v: Array, *, bias: Array | None = None, mask: Array | None = None,
              scale: float | None = None, implementation: str = "xla") -> Array:
    """q [B, T, N, H], k/v [B, S, K, H]; bias broadcastable to [B, N, T, S], mask (bool) too.
    Returns [B, T, N, H] in q's dtype; keys and values are cast to it."""
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    chex.assert_equal_shape_prefix([q, k], 1)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads.")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is unknown; use one of {IMPLEMENTATIONS}.")
    return jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), bias=bias, mask=mask, scale=scale,
        implementation=None if implementation == "auto" else implementation)


def attention_over_parts(q: Array, keys: tuple[Array, ...], values: tuple[Array, ...], *,
                         bias: Array | None = None, mask: Array | None = None, scale: float) -> Array:
    """`attention(q, concat(keys), concat(values), ...)` without the concatenation: keys/values
    [B, S_i, K, H] per part; bias and mask broadcastable to [B, N, T, sum S_i]."""
    b, t, n, h = q.shape
    k = keys[0].shape[2]
    if n % k:
        raise ValueError(f"{n} query heads are not a multiple of {k} key/value heads.")
    grouped = q.reshape(b, t, k, n // k, h)
    logits = jnp.concatenate([jnp.einsum("btkgh,bskh->bkgts", grouped, part.astype(q.dtype),
                                         preferred_element_type=jnp.float32) for part in keys], axis=-1)
    logits = logits.reshape(b, n, t, -1) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype).reshape(b, k, n // k, t, -1)
    out, start = 0, 0
    for part in values:
        size = part.shape[1]
        out = out + jnp.einsum("bkgts,bskh->btkgh", probs[..., start:start + size], part.astype(q.dtype))
        start += size
    return out.reshape(b, t, n, h)
