"""Compiles the real train step for a TPU slice ahead of time, on any host.

No TPU and no weights are needed: libtpu describes the slice's devices
(`pod.topology`), the project's own mesh and sharding code lays the train
state, frozen weights and batches out on them, and the Trainer's own jitted
step (`training.trainer.jit_train_step`) is lowered from abstract
`ShapeDtypeStruct`s and compiled by the TPU compiler. Reports, per chip: XLA's
memory analysis (arguments, temporaries, outputs, aliasing, code) against the
chip's HBM; and the step's FLOPs three ways: analytic (`core.flops`), traced
(the program's matmuls with loop trip counts), and XLA's cost analysis (which
counts the body of a scanned loop once, so it reads low for scanned layers).

Batches: the config's datasets (per-host batch sizes, times the slice's hosts,
as the Trainer does) or, when the config lists none (configs/3b.py, 9b.py,
80b.py), the paper's ablation mixture (`PAPER_ABLATION_MIXTURE`, global sizes).
A batch multiplier scales every global batch, e.g. to split it over more data
shards than the batch of 64 videos allows. The CLI is `python -m flamingo_jax.aot`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from flamingo_jax.core import flops, sharding
from flamingo_jax.core.checkpoint import abstract_with_shardings
from flamingo_jax.core.config import RunConfig
from flamingo_jax.data.mixture import DatasetSpec
from flamingo_jax.models.partitioning import activation_sharding
from flamingo_jax.pod.topology import GiB, parse_slice
from flamingo_jax.training.objectives import make_objective
from flamingo_jax.training.state import new_train_state
from flamingo_jax.training.trainer import jit_train_step

# ------------------------------------------------------------------ batches


# The paper's ablation mixture (appendix B.1.2): global batch sizes and λ. Text
# lengths: M3W 256 tokens with 5 images; pairs "32 or 64" tokens [which dataset
# gets which is unconfirmed: ALIGN's alt-texts 32, LTIP's longer descriptions 64];
# VTP 8 frames with 32 tokens.
PAPER_ABLATION_MIXTURE = (
    dict(name="m3w", kind="interleaved", batch_size=256, max_len=256, max_images=5, weight=1.0),
    dict(name="align", kind="image_text", batch_size=512, max_len=32, weight=0.2),
    dict(name="ltip", kind="image_text", batch_size=512, max_len=64, weight=0.2),
    dict(name="vtp", kind="video_text", batch_size=64, max_len=32, num_frames=8, weight=0.03),
)
_DEFAULT_MAX_LEN = {"interleaved": 256, "image_text": 32, "video_text": 32}


def batch_shapes(config, hosts: int, batch_multiplier: int = 1) -> tuple[dict[str, flops.BatchShape],
                                                                            dict[str, float], str]:
    """({dataset: global BatchShape}, {dataset: λ}, where the sizes came from)."""
    shapes, weights, source, _ = _batches(config, hosts, batch_multiplier)
    return shapes, weights, source


def batch_kinds(config) -> dict[str, str]:
    """{dataset: kind} of the batches `batch_shapes` describes (what `Objective.check` reads)."""
    return _batches(config, 1, 1)[3]


def _batches(config, hosts: int, batch_multiplier: int):
    datasets = [d.to_dict() if hasattr(d, "to_dict") else dict(d) for d in config.data.get("datasets") or []]
    scale, source = hosts * batch_multiplier, f"config.data.datasets (per host) x {hosts} hosts"
    if not datasets:
        datasets, scale, source = list(PAPER_ABLATION_MIXTURE), batch_multiplier, "paper ablation mixture (global)"
    if batch_multiplier != 1:
        source += f" x batch_multiplier {batch_multiplier}"
    default_size = config.data.get("image_size") or config.model.vision.image_size
    shapes, weights, kinds = {}, {}, {}
    for d in datasets:
        # A TFDS entry's batches are of the kind its field map makes (images: pairs; frames: videos).
        kind = kinds[d["name"]] = DatasetSpec.from_dict(d).record_kind if d["kind"] == "tfds" else d["kind"]
        shapes[d["name"]] = flops.BatchShape(
            batch_size=d["batch_size"] * scale, seq_len=d.get("max_len") or _DEFAULT_MAX_LEN[kind],
            num_media=d.get("max_images", 5) if kind == "interleaved" else 1,
            num_frames=d.get("num_frames", 8) if kind == "video_text" else 1,
            image_size=d.get("image_size") or default_size)
        weights[d["name"]] = float(d.get("weight", 1.0))
    return shapes, weights, source, kinds


def abstract_batch(shape: flops.BatchShape, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The fields a data pipeline yields (data/pipeline.py), as sharded ShapeDtypeStructs."""
    b, length, m, size = shape.batch_size, shape.seq_len, shape.num_media, shape.image_size
    field = lambda dims, dtype: jax.ShapeDtypeStruct(dims, dtype, sharding=batch_sharding)
    return {"tokens": field((b, length), jnp.int32), "targets": field((b, length), jnp.int32),
            "loss_mask": field((b, length), jnp.float32), "media_index": field((b, length), jnp.int32),
            "media": field((b, m, shape.num_frames, size, size, 3), jnp.float32)}


# ------------------------------------------------------------------ compile


def bytes_per_chip(tree: Any, shardings: Any) -> int:
    """Bytes of the largest shard of every leaf, summed: what one chip holds."""
    sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize,
                         tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def compile_train_step(config, topology: str, batch_multiplier: int = 1) -> dict[str, Any]:
    """Lowers and compiles the Trainer's step over all datasets (`train.accumulation='all'`, the
    paper's) of the config's objective (Flamingo, or a backbone's pretraining) for `topology`;
    returns the report (JSON-able), with `fits` False where it does not."""
    target = parse_slice(topology)
    devices = target.devices()
    run = RunConfig.from_config(config)
    model_config = run.model
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_from_config(config.get("mesh_rules"))
    microbatches = config.train.microbatches
    shapes, weights, source = batch_shapes(config, target.hosts, batch_multiplier)
    try:
        sharding.check_batch_sizes({n: s.batch_size for n, s in shapes.items()}, mesh, microbatches)
    except sharding.ShardingError as error:
        raise sharding.ShardingError(f"{error} (mesh {dict(mesh.shape)} on {topology}; batches from {source}; "
                                     "--batch_multiplier scales every batch, --config.train.microbatches "
                                     "and --config.mesh.* change the split)") from error

    objective = make_objective(run)
    objective.check(batch_kinds(config))  # e.g. contrastive pretraining on pairs only, one micro-batch
    parts = objective.parts()
    abstract_params, abstract_frozen = parts.abstract()
    param_shardings, frozen_shardings = sharding.weight_shardings(parts, mesh, rules)
    optimizer = sharding.optimizer_for(objective.optimizer(), abstract_params, param_shardings, mesh,
                                       run.optimizer_sharding)
    abstract_state = jax.eval_shape(lambda p: new_train_state(p, optimizer, config.seed), abstract_params)
    optimizer_sharding = config.get("optimizer_sharding", "params")
    state_shardings = sharding.state_shardings(abstract_state, param_shardings, optimizer, mesh, optimizer_sharding)
    batch_sharding = sharding.batch_sharding(mesh)
    group = tuple(sorted(shapes))
    step = jit_train_step(objective, parts, optimizer, weights, group, microbatches, state_shardings, frozen_shardings,
                          batch_sharding)
    batches = {name: abstract_batch(shapes[name], batch_sharding) for name in group}

    started = time.time()
    with activation_sharding(mesh, rules):
        traced = step.trace(abstract_with_shardings(abstract_state, state_shardings),
                            abstract_with_shardings(abstract_frozen, frozen_shardings), batches)
    lowered = traced.lower()
    analytic = objective.step_flops(shapes, microbatches)
    report = {
        "config": config.name,
        "objective": run.objective,
        "topology": topology,
        "chip": target.generation.chip,
        "device_kind": devices[0].device_kind,
        "chips": len(devices),
        "hosts": target.hosts,
        "mesh": dict(mesh.shape),
        "optimizer_sharding": optimizer_sharding,
        "mesh_rules": {k: v for k, v in rules.items() if v},
        "remat_policy": model_config.remat_policy,
        "microbatches": microbatches,
        "batches": {"source": source, **{n: dataclasses.asdict(s) for n, s in shapes.items()}},
        "arguments_per_chip_bytes": {  # from the shardings: what the step's inputs hold on one chip
            "frozen_weights": bytes_per_chip(abstract_frozen, frozen_shardings),
            "trainable_params": bytes_per_chip(abstract_state.params, state_shardings.params),
            "optimizer_state": bytes_per_chip(abstract_state.opt_state, state_shardings.opt_state),
            "batch": bytes_per_chip(batches, jax.tree.map(lambda _: batch_sharding, batches)),
        },
        "hbm_per_chip_bytes": target.generation.hbm_bytes,
        "flops": {
            "analytic": analytic.as_dict() if analytic is not None else None,
            "traced_total": flops.jaxpr_flops(traced.jaxpr.jaxpr),
            "note": "XLA's cost analysis counts each while-loop (scan) body once, whatever its trip count; "
                    "traced_total counts the program's matmuls with trip counts.",
        },
        "lower_seconds": time.time() - started,
        "versions": {"jax": jax.__version__, "libtpu": _libtpu_version()},
    }
    started = time.time()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        # The compiler stops where the step cannot be placed in HBM; its message says by how much.
        report.update(fits=False, compiler_error=str(error).strip(), compile_seconds=time.time() - started)
        return report
    report["compile_seconds"] = time.time() - started

    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report["memory_per_chip"] = {
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "generated_code_bytes": memory.generated_code_size_in_bytes,
        "peak_bytes": peak,  # argument + output - alias + temp + code
    }
    report.update(fits=peak <= target.generation.hbm_bytes, headroom_bytes=target.generation.hbm_bytes - peak)
    report["flops"]["xla_cost_analysis_per_chip"] = float(cost.get("flops", 0.0))
    report["flops"]["xla_cost_analysis_times_chips"] = float(cost.get("flops", 0.0)) * len(devices)
    return report


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001 (a report field, never a reason to fail)
        return "unknown"


def summary(report: Mapping[str, Any]) -> str:
    """The report's headline figures, for the console."""
    gib = lambda n: f"{n / GiB:.2f} GiB"
    args, flop = report["arguments_per_chip_bytes"], report["flops"]
    lines = [
        f"{report['config']} on {report['topology']} ({report['chips']} x {report['device_kind']}, "
        f"{report['hosts']} hosts), mesh {report['mesh']}, optimizer state {report['optimizer_sharding']}, "
        f"remat {report['remat_policy']}, {report['microbatches']} micro-batches",
        f"  batches ({report['batches']['source']}): " + ", ".join(
            f"{n} {b['batch_size']}x{b['seq_len']}" for n, b in report["batches"].items() if n != "source"),
        f"  inputs per chip: frozen weights {gib(args['frozen_weights'])}, trainable {gib(args['trainable_params'])}, "
        f"optimizer state {gib(args['optimizer_state'])}, batch {gib(args['batch'])}",
    ]
    memory = report.get("memory_per_chip")
    if memory:
        lines += [
            f"  compiled, per chip: arguments {gib(memory['argument_bytes'])}, temporaries {gib(memory['temp_bytes'])}, "
            f"outputs {gib(memory['output_bytes'])} (aliased {gib(memory['alias_bytes'])}), "
            f"code {gib(memory['generated_code_bytes'])}",
            f"  peak {gib(memory['peak_bytes'])} of {report['hbm_per_chip_bytes'] / GiB:.0f} GiB HBM: "
            + ("fits" if report["fits"] else "DOES NOT FIT") + f", headroom {gib(report['headroom_bytes'])}",
        ]
    else:
        lines.append(f"  DOES NOT FIT: {report['compiler_error'].splitlines()[0]}")
    analytic = flop["analytic"]
    line = "  FLOPs per step: " + (f"analytic {flops.human(analytic['total'])} (model {flops.human(analytic['model'])}"
                                  f" + recompute {flops.human(analytic['recompute'])}), " if analytic else "")
    line += f"traced {flops.human(flop['traced_total'])}"
    if "xla_cost_analysis_per_chip" in flop:
        line += (f"; XLA cost analysis {flops.human(flop['xla_cost_analysis_per_chip'])} per chip, "
                 f"{flops.human(flop['xla_cost_analysis_times_chips'])} on all chips (scan bodies counted once)")
    lines += [line, f"  lower {report['lower_seconds']:.1f} s, compile {report['compile_seconds']:.1f} s"]
    return "\n".join(lines)
