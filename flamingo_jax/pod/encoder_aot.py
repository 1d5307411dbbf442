"""The frozen vision encoder's share of a train step, compiled for a TPU slice: executed FLOPs.

XLA's cost analysis counts a loop body once, so the whole step's figure says little about
the scanned NFNet; here the encoder alone is compiled with its stage scans unrolled
(`layers.unrolled_scans`), under the config's mesh and rules, over one micro-batch of each
dataset's frames laid out as in the step (split over the batch axes, then by 'vision_batch',
`models.flamingo.encode_frames`). Its cost analysis per chip, times the chips and the
micro-batches, is what the slice executes per step, set against the analytic forward FLOPs
(`core.flops`): 1.0 means no chip repeats another's work. Also reported: the bytes the
program's collectives move per chip (the gathers a layout costs).

Each distinct frame shape is one program, compiled once and counted once per dataset of that
shape: the unrolled F6 takes 5-9 GiB of host memory and 2-3 minutes per program, where the
80B's four datasets in one program took 18 GiB and 17 minutes. Separate programs may count a
little more than one: one program computes each standardised kernel once for all its calls
(~2% on the tiny NFNet; for the 80B's F6 on v4-3072, measured both ways, the counts are equal).
Counting one block per stage and multiplying by the depth is no shortcut: the TPU compiler lays
out the first few blocks of a short stage differently (20% dearer in F6's third stage), so
short programs mispredict the full one.

    python -m flamingo_jax.aot --config=configs/80b.py --topology=v4-3072 --batch_multiplier=3 \
        --config.train.microbatches=1 --vision_encoder
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import jax

from flamingo_jax.core import flops, sharding
from flamingo_jax.core.checkpoint import abstract_with_shardings
from flamingo_jax.core.config import RunConfig
from flamingo_jax.core.parts import ModelParts
from flamingo_jax.models import layers
from flamingo_jax.models.flamingo import build_vision_encoder, encode_frames
from flamingo_jax.models.partitioning import activation_sharding
from flamingo_jax.pod.aot import batch_shapes
from flamingo_jax.pod.topology import parse_slice

# An op's result shape (a tuple of arrays has spaces), its kind, and '-start' / '-done' for async ones.
_COLLECTIVE = re.compile(r"=\s*(\([^()]*\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(-start|-done)?\(")
_ARRAY = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {'ops', 'bytes'}} of a compiled module's collectives, bytes of each op's result
    (all its arrays; an async op counted at its '-done', whose result it is); loops not
    multiplied out."""
    out = collections.defaultdict(lambda: {"ops": 0, "bytes": 0})
    for shape, kind, phase in _COLLECTIVE.findall(hlo_text):
        arrays = _ARRAY.findall(shape)
        if phase == "-start" or not arrays:
            continue
        out[kind]["ops"] += 1
        out[kind]["bytes"] += sum(math.prod(int(d) for d in filter(None, dims.split(","))) * _BYTES[dtype]
                                  for dtype, dims in arrays)
    return dict(out)


def compile_vision_encoder(config, topology: str | Sequence[jax.Device], batch_multiplier: int = 1) -> dict[str, Any]:
    """Compiles the frozen encoder (scans unrolled) over one micro-batch of each dataset's frames
    for `topology` (a slice name, or devices: one host); returns executed vs analytic FLOPs per
    step and collectives."""
    if isinstance(topology, str):
        target = parse_slice(topology)
        devices, hosts = target.devices(), target.hosts
    else:
        devices, hosts, topology = list(topology), 1, f"{len(topology)} x {topology[0].device_kind}"
    run = RunConfig.from_config(config)
    cfg = run.model
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_from_config(config.get("mesh_rules"))
    microbatches = config.train.microbatches
    shapes, _, source = batch_shapes(config, hosts, batch_multiplier)
    sharding.check_batch_sizes({n: s.batch_size for n, s in shapes.items()}, mesh, microbatches)
    frames = {n: shapes[n].batch_size // microbatches * shapes[n].num_media * shapes[n].num_frames for n in shapes}
    datasets_per_shape = collections.Counter((frames[n], shapes[n].image_size) for n in sorted(shapes))

    started = time.time()
    per_chip, collectives, temp_bytes, argument_bytes = 0.0, collections.Counter(), 0, 0
    for (num_frames, image_size), datasets in datasets_per_shape.items():
        compiled = _compile(cfg, mesh, rules, num_frames, image_size)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        per_chip += datasets * float(cost.get("flops", 0.0))
        for kind, moved in collective_bytes(compiled.as_text()).items():
            collectives.update({(kind, key): datasets * value for key, value in moved.items()})
        memory = compiled.memory_analysis()
        temp_bytes = max(temp_bytes, memory.temp_size_in_bytes)
        argument_bytes = max(argument_bytes, memory.argument_size_in_bytes)
        del compiled
        jax.clear_caches()  # one program's host memory at a time
    compile_seconds = time.time() - started
    per_chip *= microbatches
    analytic = flops.step_flops(cfg, shapes).vision_encoder.forward
    moved = collections.defaultdict(dict)
    for (kind, key), value in sorted(collectives.items()):
        moved[kind][key] = value
    return {
        "config": config.name, "topology": topology, "chips": len(devices), "mesh": dict(mesh.shape),
        "mesh_rules": {k: v for k, v in rules.items() if v}, "microbatches": microbatches,
        "batches": {"source": source, "frames_per_microbatch": frames},
        "flops_per_step": {"analytic_forward": analytic, "executed_per_chip": per_chip,
                           "executed_times_chips": per_chip * len(devices),
                           "executed_over_analytic": per_chip * len(devices) / analytic},
        "collectives_per_microbatch_per_chip": dict(moved),
        # Of the largest program (one per distinct frame shape).
        "memory_per_chip": {"argument_bytes": argument_bytes, "temp_bytes": temp_bytes},
        "compile_seconds": compile_seconds,
    }


def _compile(cfg, mesh, rules, num_frames: int, image_size: int):
    """The encoder over `num_frames` frames split over the batch axes, scans unrolled."""
    dtype, frozen_dtype, _ = cfg.dtypes()
    parts = ModelParts(lambda rngs: build_vision_encoder(cfg, dtype=dtype, param_dtype=frozen_dtype, rngs=rngs))
    _, abstract_frozen = parts.abstract()
    _, frozen_axes = parts.logical_axes()
    frozen_shardings = sharding.tree_shardings(abstract_frozen, frozen_axes, mesh, rules)
    media = jax.ShapeDtypeStruct((num_frames, image_size, image_size, 3), dtype, sharding=sharding.batch_sharding(mesh))

    def forward(frozen, media):
        return encode_frames(parts.merge({}, frozen), media)

    with activation_sharding(mesh, rules), layers.unrolled_scans():
        lowered = jax.jit(forward).lower(abstract_with_shardings(abstract_frozen, frozen_shardings), media)
    return lowered.compile()


def summary(report: dict[str, Any]) -> str:
    """The report's headline figures, for the console."""
    counted = report["flops_per_step"]
    moved = ", ".join(f"{kind} {c['ops']} ops {c['bytes'] / 2**20:.1f} MiB"
                      for kind, c in report["collectives_per_microbatch_per_chip"].items()) or "none"
    head = (f"{report['config']} vision encoder on {report['topology']} ({report['chips']} chips), mesh "
            f"{report['mesh']}, rules {report['mesh_rules']}, frames per micro-batch "
            f"{report['batches']['frames_per_microbatch']} x {report['microbatches']} micro-batches")
    counts = (f"  FLOPs per step: analytic forward {flops.human(counted['analytic_forward'])}, executed "
              f"{flops.human(counted['executed_per_chip'])} per chip, {flops.human(counted['executed_times_chips'])} "
              f"on all chips: {counted['executed_over_analytic']:.3f} x analytic")
    tail = f"  collectives per micro-batch per chip: {moved}; compile {report['compile_seconds']:.1f} s"
    return "\n".join([head, counts, tail])
