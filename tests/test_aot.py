"""Ahead-of-time compilation for TPU slices (python -m flamingo_jax.aot): slice names,
clear errors, ZeRO-1 layouts, and the real train step compiled for a v4-8 on this CPU host."""

import importlib.util
import os
import subprocess
import sys
import types

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from flamingo_jax.core import flops, sharding
from flamingo_jax.core.checkpoint import abstract_with_shardings
from flamingo_jax.core.parts import ModelParts
from flamingo_jax.models import layers
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.flamingo import build_vision_encoder, encode_frames
from flamingo_jax.models.partitioning import activation_sharding
from flamingo_jax.pod import aot, encoder_aot, topology
from flamingo_jax.training.objectives import ObjectiveError

from helpers import ROOT, load_config, no_compiles

requires_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                     reason="libtpu is not installed (pip install 'flamingo_jax[tpu]')")


def test_slice_names():
    v4 = topology.parse_slice("v4-1536")  # v4 names count TensorCores: two per chip
    assert (v4.chips, v4.shape, v4.hosts, v4.generation.hbm_bytes) == (768, (8, 8, 12), 192, 32 * topology.GiB)
    assert topology.parse_slice("v5p-128").chips == 64
    assert topology.parse_slice("v5e-256").shape == (16, 16)  # v5e / v6e names count chips
    assert topology.parse_slice("v6e-256").generation.chip == "v6e"
    with pytest.raises(ValueError, match="known sizes"):
        topology.parse_slice("v4-12")
    with pytest.raises(ValueError, match="generation one of"):
        topology.parse_slice("tpu-8")


def test_missing_libtpu_names_the_fix(monkeypatch):
    monkeypatch.setattr(topology.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install 'flamingo_jax\[tpu\]'"):
        topology.parse_slice("v4-8").devices()


@requires_libtpu
def test_describing_a_slice_off_a_tpu_prints_no_libtpu_trace():
    """libtpu, loaded for a compile-only slice on a host without a TPU, stays quiet."""
    code = "from flamingo_jax.pod import topology; print(len(topology.parse_slice('v4-8').devices()))"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for name in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "4", done.stderr[-2000:]
    assert "INVALID_ARGUMENT" not in done.stderr and "could not determine" not in done.stderr, done.stderr[-2000:]


def test_zero1_adds_the_data_axis_where_it_divides():
    mesh = types.SimpleNamespace(shape={"data": 4, "fsdp": 1, "tensor": 2})
    # The largest per-shard dimension that 4 divides gets 'data', beside what splits it already.
    assert sharding.zero1_spec(P(None, "tensor"), (12, 64), mesh) == P(None, ("tensor", "data"))
    assert sharding.zero1_spec(P(None, None), (64, 6), mesh) == P("data", None)
    assert sharding.zero1_spec(P(None,), (6,), mesh) == P(None,)  # nothing divides: as the weights
    single = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 2})
    assert sharding.zero1_spec(P("fsdp"), (64,), single) == P("fsdp")


def test_paper_batches_unless_the_config_lists_datasets():
    shapes, weights, source = aot.batch_shapes(load_config("80b"), hosts=4, batch_multiplier=3)
    assert {n: s.batch_size for n, s in shapes.items()} == {"m3w": 768, "align": 1536, "ltip": 1536, "vtp": 192}
    assert (shapes["m3w"].num_media, shapes["vtp"].num_frames, shapes["m3w"].image_size) == (5, 8, 320)
    assert weights == {"m3w": 1.0, "align": 0.2, "ltip": 0.2, "vtp": 0.03} and "paper" in source
    shapes, _, _ = aot.batch_shapes(micro_config(), hosts=4)  # per-host sizes, as the Trainer reads them
    assert shapes["pairs"].batch_size == 4 * 8


def micro_config():
    """configs/tiny.py cut down so the TPU compiler takes seconds: a one-block ViT, one
    Resampler layer, two LM layers (each behind an xattn block) of width 128; image-text pairs."""
    config = load_config("tiny")
    m = config.model
    m.vision.update(encoder="vit", image_size=32)
    m.vision.vit.update(width=32, num_layers=1, num_heads=2, patch_size=8)
    m.resampler.update(num_layers=1, dim=128, head_dim=32)
    m.decoder.update(num_layers=2, dim=128, head_dim=32)
    m.xattn.update(every=1, head_dim=32)
    config.data = ml_collections.ConfigDict(dict(image_size=32, datasets=[
        dict(name="pairs", kind="image_text", pattern="", batch_size=8, max_len=16)]))
    config.mesh.update(data=2, fsdp=2, tensor=1)
    config.optimizer_sharding = "zero1"
    return config


@requires_libtpu
def test_batch_that_does_not_divide_the_mesh_fails_before_compiling():
    config = micro_config()
    config.train.microbatches = 3  # 8 examples over 2 x 2 data shards, then 3 micro-batches: no
    with no_compiles(), pytest.raises(sharding.ShardingError, match="batch_multiplier"):
        aot.compile_train_step(config, "v4-8")


@requires_libtpu
def test_train_step_compiles_for_a_v4_8():
    """The Trainer's step, FSDP x data with ZeRO-1, compiled by the TPU compiler from abstract shapes."""
    report = aot.compile_train_step(micro_config(), "v4-8")
    assert report["chips"] == 4 and report["device_kind"] == "TPU v4" and report["fits"]
    memory, inputs = report["memory_per_chip"], report["arguments_per_chip_bytes"]
    assert memory["generated_code_bytes"] > 0 and memory["peak_bytes"] >= memory["argument_bytes"]
    assert memory["argument_bytes"] >= sum(inputs.values())
    assert memory["peak_bytes"] + report["headroom_bytes"] == 32 * topology.GiB
    # ZeRO-1 over 2 data shards: Adam's two moments take one params' worth per chip, not two.
    assert inputs["optimizer_state"] < 1.2 * inputs["trainable_params"]
    assert memory["alias_bytes"] > 0  # the donated train state is updated in place

    counted = report["flops"]
    assert counted["traced_total"] == pytest.approx(counted["analytic"]["total"], rel=1e-9)
    # XLA's cost analysis counts a scanned body once: its total for the 2-layer model is that of the
    # same model with one layer (plus elementwise work, < 10% at this width), well short of the real count.
    one_layer = micro_config()
    one_layer.model.decoder.num_layers = 1
    loop_once = flops.step_flops(FlamingoConfig.from_dict(one_layer.model),
                                 {"pairs": flops.BatchShape(8, 16, 1, 1, 32)}).total
    xla = counted["xla_cost_analysis_times_chips"]
    assert loop_once <= xla <= 1.1 * loop_once
    assert xla < 0.8 * counted["analytic"]["total"]


def test_contrastive_paper_config_takes_the_papers_batch_on_512_chips():
    v4_1024 = topology.parse_slice("v4-1024")
    shapes, _, _ = aot.batch_shapes(load_config("contrastive_nfnet_f6"), v4_1024.hosts)
    assert v4_1024.chips == 512 and {n: (s.batch_size, s.image_size) for n, s in shapes.items()} == {
        "align_ltip": (16_384, 288)}


@requires_libtpu
def test_contrastive_objective_checks_its_data_before_compiling():
    config = micro_config()
    config.objective = "contrastive"
    config.data.datasets.append(dict(name="docs", kind="interleaved", pattern="", batch_size=8))
    with no_compiles(), pytest.raises(ObjectiveError, match="not pairs"):
        aot.compile_train_step(config, "v4-8")


@requires_libtpu
def test_vision_encoder_report_compiles_each_frame_shape_once(monkeypatch):
    """`--vision_encoder`: datasets whose frames share a shape are one program, compiled once and
    counted per dataset; the count is that of one program over every dataset's frames (the
    step's layout, which for the 80B's F6 took 18 GiB of host memory to compile), or a little over."""
    config = load_config("tiny")
    config.data = ml_collections.ConfigDict(dict(image_size=64, datasets=[
        dict(name=name, kind="image_text", pattern="", batch_size=size, max_len=16)
        for name, size in (("a", 6), ("b", 6), ("c", 8))]))
    config.mesh.update(data=2, fsdp=1, tensor=2)
    config.train.microbatches = 1
    config.mesh_rules.vision_batch = "tensor"
    compiles = []
    compile_one = encoder_aot._compile
    monkeypatch.setattr(encoder_aot, "_compile", lambda *args: compiles.append(args[3]) or compile_one(*args))
    report = encoder_aot.compile_vision_encoder(config, "v4-8")
    assert sorted(compiles) == [6, 8] and report["batches"]["frames_per_microbatch"] == {"a": 6, "b": 6, "c": 8}
    # 'a' and 'b' (3 frames per data shard: their rows split over 'tensor') trade halo rows.
    assert report["collectives_per_microbatch_per_chip"]["collective-permute"]["ops"] > 0

    devices = topology.parse_slice("v4-8").devices()
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_from_config(config.mesh_rules)
    cfg = FlamingoConfig.from_dict(config.model)

    dtype, frozen_dtype, _ = cfg.dtypes()
    parts = ModelParts(lambda rngs: build_vision_encoder(cfg, dtype=dtype, param_dtype=frozen_dtype, rngs=rngs))
    (_, frozen), (_, axes) = parts.abstract(), parts.logical_axes()
    frozen = abstract_with_shardings(frozen, sharding.tree_shardings(frozen, axes, mesh, rules))
    media = [jax.ShapeDtypeStruct((n, 64, 64, 3), dtype, sharding=sharding.batch_sharding(mesh)) for n in (6, 6, 8)]

    def forward(frozen, *media):
        return [encode_frames(parts.merge({}, frozen), m) for m in media]

    with activation_sharding(mesh, rules), layers.unrolled_scans():
        together = jax.jit(forward).lower(frozen, *media).compile().cost_analysis()
    together = together[0] if isinstance(together, (list, tuple)) else together
    # One program computes each standardised kernel once for all its calls (XLA merges the copies);
    # one program per shape repeats that (~2% at these widths; for the 80B's F6, nothing).
    assert together["flops"] <= report["flops_per_step"]["executed_per_chip"] <= 1.03 * together["flops"]
