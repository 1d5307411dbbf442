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

A query row whose keys are all masked gets an arbitrary (finite) output:
callers that can produce such rows zero them explicitly (xattn does).
"""

from __future__ import annotations

import chex
import jax

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
