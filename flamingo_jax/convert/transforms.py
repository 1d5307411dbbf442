"""Layout changes from source tensors to ours, as small named functions.

Each function (or the function a factory returns) uses array methods only
(`.T`, `.transpose`, `.reshape`, slicing), so the same code runs on numpy
arrays during conversion and on abstract arrays under `jax.eval_shape`, where
`mapping.plan` checks every shape before a byte is read.
"""

from __future__ import annotations

from typing import Any, Callable

Array = Any  # a numpy array, or a jax tracer while shapes are checked
Transform = Callable[[Array], Array]


def as_is(x: Array) -> Array:
    """Same layout (LayerNorm scales and biases, embeddings, biases)."""
    return x


def torch_linear(w: Array) -> Array:
    """torch Linear weight [out, in] -> our Dense kernel [in, out]."""
    return w.T


def torch_conv(w: Array) -> Array:
    """torch Conv2d weight [out, in/groups, kh, kw] -> our HWIO kernel [kh, kw, in/groups, out]."""
    return w.transpose(2, 3, 1, 0)


def torch_pointwise_conv_as_linear(w: Array) -> Array:
    """A 1x1 torch Conv2d used as a Linear (squeeze-excite): [out, in, 1, 1] -> kernel [in, out]."""
    return w.reshape(w.shape[0], w.shape[1]).T


def per_channel(w: Array) -> Array:
    """A per-output-channel tensor stored broadcastable, e.g. timm's gain [out, 1, 1, 1] -> [out]."""
    return w.reshape(w.shape[0])


def split_fused(part: int, parts: int = 3) -> Transform:
    """Rows `part` of `parts` equal blocks along axis 0: a fused QKV projection
    ([3W, W] weight or [3W] bias, query rows first) -> one of q, k, v."""

    def take(x: Array) -> Array:
        size = x.shape[0] // parts
        return x[part * size:(part + 1) * size]

    take.__name__ = f"split_fused_{part}_of_{parts}"
    return take


def heads_out(num_heads: int) -> Transform:
    """torch Linear [H*Dh, W] -> our per-head kernel [W, H, Dh]; a bias [H*Dh] -> [H, Dh]."""

    def reshape(x: Array) -> Array:
        if x.ndim == 1:
            return x.reshape(num_heads, x.shape[0] // num_heads)
        return x.T.reshape(x.shape[1], num_heads, x.shape[0] // num_heads)

    reshape.__name__ = f"heads_out_{num_heads}"
    return reshape


def heads_interleaved(part: int, num_heads: int, parts: int = 3) -> Transform:
    """A fused QKV projection laid out per head (GPT-NeoX's query_key_value: rows [H, 3, Dh]) ->
    our per-head kernel [W, H, Dh] of `part` (0 query, 1 key, 2 value); a bias [3W] -> [H, Dh]."""

    def take(x: Array) -> Array:
        head_dim = x.shape[0] // (num_heads * parts)
        if x.ndim == 1:
            return x.reshape(num_heads, parts, head_dim)[:, part]
        per_head = x.reshape(num_heads, parts, head_dim, x.shape[1])[:, part]  # [H, Dh, W]
        return per_head.transpose(2, 0, 1)

    take.__name__ = f"heads_interleaved_{part}_of_{parts}_{num_heads}"
    return take


def heads_in(num_heads: int) -> Transform:
    """torch Linear [W, H*Dh] (attention output projection) -> our kernel [H, Dh, W]."""

    def reshape(w: Array) -> Array:
        return w.T.reshape(num_heads, w.shape[1] // num_heads, w.shape[0])

    reshape.__name__ = f"heads_in_{num_heads}"
    return reshape


def compose(*functions: Transform) -> Transform:
    """`compose(f, g)(x) = g(f(x))`: the functions in the order they apply."""

    def composed(x: Array) -> Array:
        for function in functions:
            x = function(x)
        return x

    composed.__name__ = "_then_".join(getattr(f, "__name__", "f") for f in functions)
    return composed
