"""TPU slices as libtpu describes them, on any host (no TPU needed).

`parse_slice('v4-1536')` names a slice the way Cloud TPU does (v4/v5p names
count TensorCores, v5e/v6e chips); `Slice.devices()` gives its compile-only
devices from `jax.experimental.topologies`, on which the project's meshes and
shardings lay out programs for ahead-of-time compilation (`pod.aot`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Mapping

import jax

from flamingo_jax.errors import UserError

GiB = 1 << 30


class TopologyError(UserError, ValueError):
    """A slice name this module does not know."""


class LibtpuMissing(UserError, RuntimeError):
    """Describing a TPU slice needs libtpu (no TPU)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation as libtpu's topology API names it."""

    topology_prefix: str  # 'v4' in 'v4:2x2x1'
    chip: str  # key of flops.CHIPS
    hbm_bytes: int  # per chip
    cores_per_chip_in_name: int  # v4-8 counts TensorCores (4 chips); v5e-8 counts chips
    chip_config_name: str  # 'megacore': one JAX device per chip
    shapes: Mapping[int, str]  # chips -> torus shape


_CUBES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 192: "4x4x12",
          256: "4x8x8", 384: "4x8x12", 512: "8x8x8", 768: "8x8x12", 1024: "8x8x16", 1536: "8x12x16",
          2048: "8x16x16", 3072: "12x16x16", 4096: "16x16x16"}
_GRIDS = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GENERATIONS = {
    "v4": Generation("v4", "v4", 32 * GiB, 2, "megacore", _CUBES),
    "v5p": Generation("v5", "v5p", 95 * GiB, 2, "megacore", _CUBES),
    "v5e": Generation("v5e", "v5e", 16 * GiB, 1, "default", _GRIDS),
    "v6e": Generation("v6e", "v6e", 32 * GiB, 1, "default", _GRIDS),
}
CHIPS_PER_HOST = 4  # a 2x2 block of chips per TPU VM host


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # 'v4-32'
    generation: Generation
    chips: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.generation.shapes[self.chips].split("x"))

    @property
    def hosts(self) -> int:
        return max(1, self.chips // CHIPS_PER_HOST)

    def devices(self) -> list:
        """The slice's compile-only devices (one per chip)."""
        require_libtpu()
        # A compile-only topology touches no TPU, so libtpu's one-process lock is not needed:
        # without this, two such processes (pytest -n 2, two reports at once) fail.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        # Off a TPU VM, libtpu asks the (absent) metadata server for the host's accelerator and
        # workers and prints an INVALID_ARGUMENT trace; a compile-only slice uses neither, so name
        # them (values already set stay).
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", self.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        from jax.experimental import topologies

        shape = self.shape
        host_bounds = (2, 2, 1) if len(shape) == 3 else (2, 2)
        host_bounds = tuple(min(b, s) for b, s in zip(host_bounds, shape)) + (1,) * (3 - len(host_bounds))
        # Wraparound links exist along full dimensions of 16 (2D) or on slices of whole 4x4x4 cubes (3D).
        wrap = tuple(s >= 4 and self.chips >= 64 if len(shape) == 3 else s == 16 for s in shape)
        wrap += (False,) * (3 - len(wrap))
        topology = topologies.get_topology_desc(
            f"{self.generation.topology_prefix}:{'x'.join(map(str, shape))}", "tpu",
            chip_config_name=self.generation.chip_config_name, chips_per_host_bounds=host_bounds, num_slices=1,
            wrap=wrap)
        return list(topology.devices)


def parse_slice(name: str) -> Slice:
    """'v4-1536' -> 768 chips of TPU v4 (v4/v5p names count TensorCores, v5e/v6e chips)."""
    generation_name, _, count = name.partition("-")
    generation = GENERATIONS.get(generation_name)
    if generation is None or not count.isdigit():
        raise TopologyError(f"--topology={name!r}: use <generation>-<size> with generation one of "
                         f"{sorted(GENERATIONS)}, e.g. v4-32, v5p-128, v5e-256, v6e-256.")
    chips = int(count) // generation.cores_per_chip_in_name
    if chips not in generation.shapes or int(count) % generation.cores_per_chip_in_name:
        sizes = sorted(c * generation.cores_per_chip_in_name for c in generation.shapes)
        raise TopologyError(f"--topology={name!r}: no {generation_name} slice of that size here; "
                         f"known sizes are {sizes}.")
    return Slice(name, generation, chips)


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuMissing("compiling for a TPU topology needs libtpu, which is not installed: "
                           "pip install 'flamingo_jax[tpu]' (or pip install 'jax[tpu]==" f"{jax.__version__}').")
