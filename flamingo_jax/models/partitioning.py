"""Logical axis names -> mesh axes.

Weights and the main activations are annotated with logical names ('embed',
'mlp', 'heads', 'batch', ...). A rules table, one per config, says which mesh
axis ('data', 'fsdp', 'tensor') each name is split over; names without a rule
are replicated. The same model code then runs unsharded on one CPU, on 8 fake
CPU devices, or on a TPU pod with Megatron-style tensor parallelism.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Mapping[str, str | tuple[str, ...] | None]

# Data + FSDP + tensor parallelism; a config overrides entries (e.g. the 80B
# replicates 'embed' on 'fsdp' and shards optimizer state instead).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "media_embed": "fsdp",
    "vision_embed": None,
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "new_vocab": None,
    "kv": None,
    "layers": None,
    "length": None,
    "latents": None,
    "frames": None,
    "media": None,
    # Vision encoders: NFNet convs ([kh, kw, in, out] kernels, squeeze-excite) are replicated
    # unless a config splits e.g. 'conv_out'; ViT weights share the LM's names.
    "conv_h": None,
    "conv_w": None,
    "conv_in": None,
    "conv_out": None,
    "se_hidden": None,
    # The frozen encoder's images, beyond 'batch': 'tensor' shares its forward among the tensor
    # ranks (each encodes 1/tensor of its data shard's images, the features are gathered after).
    "vision_batch": None,
    "vit_positions": None,
    "joint_embed": None,  # the contrastive image-text embedding space
}


def _mesh_axes(rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes.

    A mesh axis is used at most once per array (first logical axis wins), mesh
    axes of size 1 are dropped, and when `shape` is given a dimension that the
    mesh axes do not divide is replicated rather than failing to compile."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        mesh_axes = tuple(a for a in _mesh_axes(rules.get(name) if name else None)
                          if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        if shape is not None and mesh_axes and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("activation_rules", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def split_ways(axes: Sequence[str | None]) -> tuple[int, ...]:
    """Into how many shards the active rules cut each of these logical axes of one array, as
    `logical_to_spec` assigns mesh axes (each at most once); all 1 outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return (1,) * len(axes)
    mesh, rules = active
    used: set[str] = set()
    ways = []
    for name in axes:
        mesh_axes = [a for a in _mesh_axes(rules.get(name) if name else None) if a in mesh.shape and a not in used]
        used.update(mesh_axes)
        ways.append(math.prod(mesh.shape[a] for a in mesh_axes))
    return tuple(ways)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names; a no-op outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def last_mesh_axis_size(name: str) -> int:
    """The size of the last mesh axis that the active rules map logical axis `name` to (1 when
    none, or outside `activation_sharding`): the axis `constrain_subdivided` can subdivide."""
    active = _ACTIVE.get()
    if active is None:
        return 1
    mesh, rules = active
    mesh_axes = [a for a in _mesh_axes(rules.get(name)) if a in mesh.shape]
    return mesh.shape[mesh_axes[-1]] if mesh_axes else 1


def constrain_subdivided(x: jax.Array, axes: Sequence[str | None], name: str, minor_dim: int,
                         minor_ways: int) -> jax.Array:
    """`constrain(x, axes)`, except that the last mesh axis of logical axis `name` is viewed as
    (its size / minor_ways, minor_ways): `name`'s dimension is split over the first factor and
    `minor_dim` over the second. One mesh axis then splits two dimensions of an array (frames
    and their rows, say) where neither dimension alone divides by its size.

    The view is the same devices in the same order (a reshape of the mesh's device array), so
    it places every shard on the device that a split over the whole axis would; jit accepts it
    beside the mesh's own shardings. Shapes must divide (no fallback to replication)."""
    active = _ACTIVE.get()
    if active is None or minor_ways == 1:
        return constrain(x, axes)
    mesh, rules = active
    dim = list(axes).index(name)
    mesh_axes = [a for a in _mesh_axes(rules.get(name)) if a in mesh.shape]
    if not mesh_axes or mesh.shape[mesh_axes[-1]] % minor_ways:
        raise ValueError(f"constrain_subdivided: {name!r} maps to {mesh_axes} of {dict(mesh.shape)}, whose last "
                         f"axis is not divisible by {minor_ways}")
    last = mesh_axes[-1]
    major, minor = f"{last}_major", f"{last}_minor"
    names = []
    for a in mesh.axis_names:
        names += [major, minor] if a == last else [a]
    shape = [n for a in mesh.axis_names for n in ((mesh.shape[a] // minor_ways, minor_ways) if a == last
                                                   else (mesh.shape[a],))]
    view = jax.sharding.Mesh(np.asarray(mesh.devices).reshape(shape), tuple(names))
    spec = list(logical_to_spec(axes, rules, mesh))
    spec += [None] * (x.ndim - len(spec))
    entry = spec[dim] if isinstance(spec[dim], tuple) else (spec[dim],)
    if last not in entry:
        raise ValueError(f"constrain_subdivided: {name!r} does not use mesh axis {last!r} here (spec {spec})")
    entry = tuple(major if a == last else a for a in entry)
    sizes = dict(view.shape)
    if spec[minor_dim] is not None or any(
            x.shape[d] % math.prod(sizes[a] for a in e) for d, e in ((dim, entry), (minor_dim, (minor,)))):
        raise ValueError(f"constrain_subdivided: dimensions {dim} and {minor_dim} of {x.shape} do not split over "
                         f"{entry} and {minor} of {sizes}")
    spec[dim] = entry[0] if len(entry) == 1 else entry
    spec[minor_dim] = minor
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(view, jax.sharding.PartitionSpec(*spec)))
