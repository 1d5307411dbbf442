"""Meshes and shardings for the train state, frozen weights and batches.

One mesh with axes ('data', 'fsdp', 'tensor'); the config gives their sizes
(-1 fills the rest). Weights are placed by their logical axes through the
config's rules table (models/partitioning.py); batches are split over
('data', 'fsdp') along their leading axis. Optimizer state is laid out like the
weights, or (`optimizer_sharding='zero1'`, ZeRO stage 1) additionally split over
the 'data' axis, where weights stay replicated. Everything is checked before
any compile, with errors that name the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flamingo_jax.errors import UserError
from flamingo_jax.models.partitioning import DEFAULT_RULES, MESH_AXES, logical_to_spec

OPTIMIZER_SHARDINGS = ("params", "zero1")


class ShardingError(UserError, ValueError):
    """A mesh or batch that cannot be laid out on the devices."""


def mesh_shape(requested: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves -1 (at most one) so that the axes multiply to `num_devices`."""
    unknown = sorted(set(requested) - set(MESH_AXES))
    if unknown:
        raise ShardingError(f"config field `mesh.{unknown[0]}` is not a mesh axis; the axes are {MESH_AXES}.")
    shape = {axis: int(requested.get(axis, 1)) for axis in MESH_AXES}
    fill = [axis for axis, size in shape.items() if size == -1]
    if len(fill) > 1:
        raise ShardingError(f"config `mesh`: only one axis may be -1, got {fill}; give the others explicit sizes.")
    fixed = math.prod(size for size in shape.values() if size != -1)
    if any(size == 0 or size < -1 for size in shape.values()):
        raise ShardingError(f"config `mesh` {shape}: sizes must be positive or -1.")
    if fill:
        if num_devices % fixed:
            raise ShardingError(
                f"config `mesh` {shape}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices; choose sizes whose product divides {num_devices}.")
        shape[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ShardingError(
            f"config `mesh` {shape}: the axes multiply to {fixed} but there are {num_devices} devices; "
            f"make the product {num_devices} or set one axis to -1.")
    return shape


def make_mesh(requested: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(requested, len(devices))
    return Mesh(np.asarray(devices).reshape([shape[a] for a in MESH_AXES]), MESH_AXES)


def rules_from_config(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """DEFAULT_RULES with the config's overrides (`mesh_rules`), lists turned to tuples."""
    rules = dict(DEFAULT_RULES)
    for name, rule in dict(overrides or {}).items():
        rules[name] = tuple(rule) if isinstance(rule, (list, tuple)) else rule
    return rules


def tree_shardings(abstract: Any, axes: Any, mesh: Mesh, rules: Mapping[str, Any]) -> Any:
    """NamedSharding per leaf of a pure dict, from its logical axes."""
    return jax.tree.map(
        lambda leaf, names: NamedSharding(mesh, logical_to_spec(names, rules, mesh, leaf.shape)),
        abstract, axes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x))


def weight_shardings(parts, mesh: Mesh, rules: Mapping[str, Any]) -> tuple[Any, Any]:
    """(trainable, frozen) NamedShardings of a `ModelParts`' weights."""
    (trainable, frozen), (trainable_axes, frozen_axes) = parts.abstract(), parts.logical_axes()
    return tree_shardings(trainable, trainable_axes, mesh, rules), tree_shardings(frozen, frozen_axes, mesh, rules)


def zero1_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with 'data' added to the dimension it splits best (the largest
    per-shard size among those it divides); unchanged when none divides."""
    data = mesh.shape["data"]
    entries = [(() if e is None else (e,) if isinstance(e, str) else tuple(e)) for e in spec]
    entries += [()] * (len(shape) - len(entries))
    if data == 1 or any("data" in e for e in entries):
        return spec
    per_shard = [shape[i] // math.prod(mesh.shape[a] for a in e) for i, e in enumerate(entries)]
    candidates = [i for i in range(len(shape)) if per_shard[i] % data == 0]
    if not candidates:
        return spec
    best = max(candidates, key=lambda i: per_shard[i])
    entries[best] = entries[best] + ("data",)
    return PartitionSpec(*[e[0] if len(e) == 1 else (e or None) for e in entries])


@dataclasses.dataclass(frozen=True)
class Padding:
    """Pad dimension `dim` to `size` (a leaf of a padding tree: not a pytree node)."""

    dim: int
    size: int


NO_PADDING = Padding(-1, 0)


def zero1_padding(abstract_params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Per trainable weight, how ZeRO-1 pads its optimizer state: (dimension, padded size), or None.

    ZeRO-1 splits each weight's optimizer state over the 'data' axis along a dimension that the
    data size divides (`zero1_spec`). Where none does (power-of-two shapes over a data axis of
    48, as the paper's 80B on 1,536 chips has), the state is padded along the dimension with the
    most elements per shard up to the next multiple of that shard count: padding entries are
    zero, get zero gradients and zero updates, and are cut off before the update reaches the
    weight, so the update equals the unpadded one."""
    data = mesh.shape["data"]

    def padding(leaf, param_sharding):
        if data == 1 or leaf.ndim == 0 or zero1_spec(param_sharding.spec, leaf.shape, mesh) != param_sharding.spec:
            return NO_PADDING  # nothing to split, or a dimension already divides
        entries = [(() if e is None else (e,) if isinstance(e, str) else tuple(e)) for e in param_sharding.spec]
        entries += [()] * (leaf.ndim - len(entries))
        if any("data" in e for e in entries):
            return NO_PADDING
        shards = [math.prod(mesh.shape[a] for a in e) for e in entries]
        dim = max(range(leaf.ndim), key=lambda i: leaf.shape[i] // shards[i])
        multiple = shards[dim] * data
        return Padding(dim, -(-leaf.shape[dim] // multiple) * multiple)

    return jax.tree.map(padding, abstract_params, param_shardings)


def pad_optimizer_state(optimizer, padding: Any):
    """`optimizer` working on weights padded as `zero1_padding` says (its state has the padded
    shapes, which the data axis divides); the updates it returns have the weights' shapes."""
    import optax

    structure = jax.tree.structure(padding)

    def pad(tree):
        if jax.tree.structure(tree) != structure:  # optax's stand-in for the params (tree_map_params)
            return tree

        def one(x, how):
            if how.dim < 0:
                return x
            widths = [(0, 0)] * x.ndim
            widths[how.dim] = (0, how.size - x.shape[how.dim])
            return jax.numpy.pad(x, widths)
        return jax.tree.map(one, tree, padding)

    def unpad(tree, like):
        return jax.tree.map(lambda x, ref: x if x.shape == ref.shape else jax.lax.slice(x, (0,) * x.ndim, ref.shape),
                            tree, like)

    def init(params):
        return optimizer.init(pad(params))

    def update(updates, state, params=None):
        padded, state = optimizer.update(pad(updates), state, None if params is None else pad(params))
        return unpad(padded, updates), state

    return optax.GradientTransformation(init, update)


def optimizer_for(optimizer, abstract_params: Any, param_shardings: Any, mesh: Mesh, optimizer_sharding: str):
    """The optimizer as the layout needs it: under 'zero1', working on padded state where the
    data axis divides no dimension of a weight (`zero1_padding`)."""
    if optimizer_sharding != "zero1" or mesh.shape["data"] == 1:
        return optimizer
    padding = zero1_padding(abstract_params, param_shardings, mesh)
    if all(p == NO_PADDING for p in jax.tree.leaves(padding)):
        return optimizer
    return pad_optimizer_state(optimizer, padding)


def state_shardings(abstract_state: Any, param_shardings: Any, optimizer, mesh: Mesh,
                    optimizer_sharding: str = "params") -> Any:
    """Shardings of a `TrainState`: step and RNG replicated, params as given,
    optimizer state like the params or ('zero1') also split over 'data'."""
    if optimizer_sharding not in OPTIMIZER_SHARDINGS:
        raise ShardingError(f"config field `optimizer_sharding`: {optimizer_sharding!r} is unknown; use one of "
                            f"{OPTIMIZER_SHARDINGS} ('zero1' splits optimizer state over the 'data' axis).")
    import optax

    replicated = NamedSharding(mesh, PartitionSpec())

    def like_param(leaf, param_sharding):
        if optimizer_sharding == "params" or leaf.ndim == 0:
            return param_sharding
        return NamedSharding(mesh, zero1_spec(param_sharding.spec, leaf.shape, mesh))

    opt_state = optax.tree_map_params(optimizer, like_param, abstract_state.opt_state, param_shardings,
                                      transform_non_params=lambda _: replicated)
    return abstract_state.replace(step=replicated, params=param_shardings, opt_state=opt_state, rng=replicated,
                                  lr_scale=replicated)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def check_process_batches(mesh: Mesh) -> None:
    """Every process reads its own data, so each must hold its own rows of the batch: no slice of
    it may sit on devices of two processes (as with a 'tensor' axis wider than a process's devices,
    where the processes would silently feed different data into one replicated slice)."""
    if jax.process_count() == 1:
        return
    rows = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    owners: dict[int, set[int]] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((rows,)).items():
        owners.setdefault(index[0].start or 0, set()).add(device.process_index)
    if any(len(processes) > 1 for processes in owners.values()):
        raise ShardingError(
            f"config `mesh` {dict(mesh.shape)}: on {jax.process_count()} processes, slices of the batch would "
            "span devices of several processes, but every process reads its own share of the data; make "
            f"mesh.tensor divide the {jax.local_device_count()} devices of a process so that the data axes "
            "(data x fsdp) split the batch between processes.")


def check_batch_sizes(batch_sizes: Mapping[str, int], mesh: Mesh, num_microbatches: int) -> None:
    """Global batch sizes must split over the data axes and into micro-batches (and,
    on several processes, between the processes: `check_process_batches`)."""
    check_process_batches(mesh)
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    for name, size in batch_sizes.items():
        if size % (shards * num_microbatches):
            raise ShardingError(
                f"dataset {name!r}: global batch size {size} is not divisible by the data axes "
                f"(data x fsdp = {shards}) times train.microbatches={num_microbatches}; use a batch size "
                f"that is a multiple of {shards * num_microbatches}.")


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This host's slice of a batch -> global arrays sharded over the data axes."""
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local.items()}
