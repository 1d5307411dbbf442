"""Building blocks shared by every model component.

Conventions that the rest of `flamingo_jax.models` relies on:

* Frozen vs trainable is a *variable type*: pretrained backbone weights are
  `Frozen`, everything Flamingo learns is `nnx.Param`. `split_trainable` splits a
  model into the two, so gradients and optimizer state only ever exist for
  `nnx.Param` leaves; `core.parts.ModelParts` takes a filter instead where a run
  trains a backbone too (`model.freeze_lm` off, a pretraining objective).
* Every variable carries `logical_axes` metadata (e.g. ``('embed', 'mlp')``);
  `flamingo_jax.core.sharding` maps those names to mesh axes with a rules
  table. We deliberately do not use Flax's `out_sharding` metadata: Flax would
  try to shard eagerly with the logical names as if they were mesh axes.
* Parameters are stored in `param_dtype` and cast to the activation `dtype`
  at use (the paper's policy: frozen bf16, trainable fp32, activations bf16).
* Layers are stacked with a leading 'layers' axis and run with `jax.lax.scan`
  (see `stack_modules` / `scan_stack`), so compile time does not grow with depth.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
Axes = tuple[str | None, ...]


class Frozen(nnx.Variable):
    """A pretrained weight that Flamingo never updates (vision encoder, LM)."""


VariableType = type[nnx.Variable]


def split_trainable(model: nnx.Module):
    """Splits a model into `(graphdef, trainable_state, frozen_state)`.

    Trainable state holds every `nnx.Param`; frozen state every `Frozen`
    variable. A model may hold no other kind of variable, so merging the three
    parts gives back the whole model.
    """
    graphdef, trainable, frozen, rest = nnx.split(model, nnx.Param, Frozen, ...)
    leftover = jax.tree_util.tree_leaves(rest)
    if leftover:
        raise ValueError(
            f"Model holds variables that are neither nnx.Param nor Frozen: {rest}. "
            "Declare every weight as one of the two."
        )
    return graphdef, trainable, frozen


def make_variable(
    variable_type: VariableType,
    initializer: Callable[..., Array],
    key: Array,
    shape: Sequence[int],
    dtype: Any,
    axes: Axes,
) -> nnx.Variable:
    """Creates a variable of `variable_type` with its logical axis names."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    return variable_type(initializer(key, tuple(shape), dtype), logical_axes=tuple(axes))


def fan_in_init(fan_in: int, scale: float = 1.0):
    """Normal initialiser with std scale/sqrt(fan_in) (LeCun). Pretrained weights
    replace the frozen ones; this init only matters for the trainable parts."""
    std = scale / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype):
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    return init


def constant_init(value: float):
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


class Dense(nnx.Module):
    """A linear map from `in_shape` (trailing axes of the input) to `out_shape`.

    `in_shape`/`out_shape` may have several axes so that attention projections
    keep their head axis: e.g. `Dense((D,), (H, Dh), axes=('embed','heads','kv'))`.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        *,
        axes: Axes,
        variable_type: VariableType,
        rngs: nnx.Rngs,
        use_bias: bool = False,
        param_dtype: Any = jnp.float32,
        dtype: Any = jnp.float32,
        kernel_init: Callable | None = None,
    ):
        self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.dtype = dtype
        kernel_init = kernel_init or fan_in_init(math.prod(self.in_shape))
        self.kernel = make_variable(
            variable_type, kernel_init, rngs.params(), self.in_shape + self.out_shape, param_dtype, axes
        )
        self.bias = (
            make_variable(
                variable_type, nnx.initializers.zeros, rngs.params(), self.out_shape, param_dtype,
                axes[len(self.in_shape):],
            )
            if use_bias
            else None
        )

    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_shape)
        y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes=n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm (mean and variance) with a learned scale and bias; computed in fp32."""

    def __init__(self, dim: int, *, axis_name: str | None, variable_type: VariableType,
                 rngs: nnx.Rngs, eps: float = 1e-5, param_dtype: Any = jnp.float32,
                 use_bias: bool = True):
        del rngs
        self.eps = eps
        self.scale = variable_type(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
        self.bias = variable_type(jnp.zeros((dim,), param_dtype), logical_axes=(axis_name,)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm as in Gopher/Chinchilla and LLaMA: no mean subtraction, no bias."""

    def __init__(self, dim: int, *, axis_name: str | None, variable_type: VariableType,
                 rngs: nnx.Rngs, eps: float = 1e-6, param_dtype: Any = jnp.float32):
        del rngs
        self.eps = eps
        self.scale = variable_type(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": jax.nn.gelu,
    "squared_relu": lambda x: jnp.square(jax.nn.relu(x)),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    # OpenAI CLIP's sigmoid approximation of GELU.
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # erf GELU, torch.nn.GELU's default (open_clip); 'gelu' above is the tanh approximation.
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
}


class FeedForward(nnx.Module):
    """Two-layer MLP, or a gated (SwiGLU-style) one when `gated=True`."""

    def __init__(self, dim: int, hidden: int, *, activation: str, gated: bool = False,
                 variable_type: VariableType, rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
                 dtype: Any = jnp.float32, use_bias: bool = False):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        kw = dict(variable_type=variable_type, rngs=rngs, param_dtype=param_dtype, dtype=dtype, use_bias=use_bias)
        self.wi = Dense(dim, hidden, axes=("embed", "mlp"), **kw)
        self.wg = Dense(dim, hidden, axes=("embed", "mlp"), **kw) if gated else None
        self.wo = Dense(hidden, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        h = ACTIVATIONS[self.activation](self.wi(x))
        if self.wg is not None:
            h = h * self.wg(x)
        return self.wo(h)


# -------------------------------------------------------------------- stacking


def stack_modules(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """Builds `num` independently initialised copies of a module, stacked on a
    leading 'layers' axis (prepended to every variable's logical axes)."""
    if num < 1:
        raise ValueError(f"cannot stack {num} layers")

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
    def create(layer_rngs):
        return make(layer_rngs)

    stacked = create(rngs)
    # Flax only extends logical axes it finds truthy, so a scalar's () would stay
    # () on a [num] array: give it its 'layers' axis here.
    for _, node in nnx.iter_graph(stacked):
        if isinstance(node, nnx.Variable) and node.get_metadata().get("logical_axes") == ():
            node.set_metadata(logical_axes=("layers",))
    return stacked


REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn: Callable, policy: str) -> Callable:
    """Wraps a scan body with the named rematerialisation policy."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


def scan_stack(
    graphdef: nnx.GraphDef,
    stacked_state: Any,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    remat_policy: str = "none",
    layer_indices: jax.Array | None = None,
):
    """Runs `body(layer, carry, x) -> (carry, y)` over stacked layers with `lax.scan`.

    `stacked_state` is the state of a stacked module (leading 'layers' axis);
    each step merges one slice back into a module, so the traced program holds
    a single layer whatever the depth.

    With `layer_indices` [n] the scan runs over those layers only, indexing the
    state inside the loop rather than scanning over it. Use it for frozen
    weights when only some layers run: a sliced or reshaped stacked weight fed
    to a scan is copied by XLA on every call (the whole frozen LM, per step),
    an indexed one is read in place. Not for weights being differentiated: the
    gradient of an indexed weight is accumulated at full size every step.
    """
    if layer_indices is None:
        def step(carry, layer_state_and_x):
            layer_state, x = layer_state_and_x
            return body(nnx.merge(graphdef, layer_state), carry, x)

        return jax.lax.scan(remat(step, remat_policy), carry, (stacked_state, xs), unroll=_UNROLL.get())

    def indexed_step(carry, index_and_x):
        index, x = index_and_x
        layer_state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), stacked_state)
        return body(nnx.merge(graphdef, layer_state), carry, x)

    return jax.lax.scan(remat(indexed_step, remat_policy), carry, (layer_indices, xs), unroll=_UNROLL.get())


_UNROLL: contextvars.ContextVar[bool | int] = contextvars.ContextVar("scan_unroll", default=1)


@contextlib.contextmanager
def unrolled_scans() -> Iterator[None]:
    """While tracing inside this context, `scan_stack` unrolls its loops: XLA's cost analysis
    counts a loop body once whatever its trip count, so only an unrolled program's count is what
    the chips execute (the AOT encoder report). Programs grow with depth: for measuring only."""
    token = _UNROLL.set(True)
    try:
        yield
    finally:
        _UNROLL.reset(token)


def count_params(state: Any) -> int:
    """Number of scalars in a (possibly abstract) state tree."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state))
