"""Checks that need more than one fake CPU device, run by multiprocess_training.py's reference
process (8 devices; the device count is fixed when JAX starts, so they cannot run in pytest's
process) while it waits for the two workers. Each returns a JSON-serialisable dict that
test_training_multiprocess.py asserts on.

  mesh_training    one device, then a (data 2, fsdp 2, tensor 2) mesh, then ZeRO-1 on a
                   (data 3, tensor 2) mesh of 6 of the devices (a data axis that divides no
                   weight's dimensions), all on the same 12-example batches; then the
                   1-device checkpoint restored onto the 8 devices, and 2 more steps there.
  vision_split     the tiny NFNet over (data 2, tensor 2) on 4 of the devices, its frames
                   replicated over 'tensor' or split by the 'vision_batch' rule.
"""

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from helpers import load_config, preempt_after, train_config

STEPS = 5
BATCH = 12  # divisible by the data x fsdp of both meshes (4 and 3)


def mesh_training(corpus_dir: str, workdir: str) -> dict:
    """Every run is configured for STEPS + 2 steps and preempted after STEPS, so that the one that
    resumes the 1-device checkpoint on 8 devices is the 8-device run's program (reused)."""
    from flamingo_jax.training.trainer import Trainer

    config = train_config(corpus_dir, datasets=("image_text",), steps=STEPS + 2)
    config.data.datasets[0]["batch_size"] = BATCH
    one = Trainer(config, f"{workdir}/one", devices=jax.devices()[:1])
    one_device = one.run(after_step=preempt_after(STEPS))
    one_params = jax.tree.map(np.asarray, one.last_state.params)
    one.close()

    def max_diff(params):
        return max(float(np.max(np.abs(np.asarray(a) - b)))
                   for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one_params)))

    config.mesh.update(data=2, fsdp=2, tensor=2)
    eight = Trainer(config, f"{workdir}/eight")
    mesh_run = eight.run(after_step=preempt_after(STEPS))
    sharded = {str(x.sharding.spec) for x in jax.tree.leaves(eight.last_state.params)}
    eight_diff = max_diff(eight.last_state.params)
    eight.close()

    zero1_config = config.copy_and_resolve_references()
    zero1_config.mesh.update(data=3, fsdp=1, tensor=2)
    zero1_config.optimizer_sharding = "zero1"
    zero1 = Trainer(zero1_config, f"{workdir}/zero1", devices=jax.devices()[:6])
    zero1_run = zero1.run(after_step=preempt_after(STEPS))
    moments = [x for x in jax.tree.leaves(zero1.last_state.opt_state) if getattr(x, "ndim", 0) >= 1]
    split = [x for x in moments if "data" in str(x.sharding.spec)]
    shapes = {tuple(x.shape) for x in moments}
    param_shapes = {tuple(x.shape) for x in jax.tree.leaves(zero1.last_state.params)}
    zero1_diff = max_diff(zero1.last_state.params)
    zero1.close()

    moved = Trainer(config, f"{workdir}/one")
    state, _, _ = moved.initial_state()
    restored_equal = max_diff(state.params) == 0.0
    restored_devices = len(jax.tree.leaves(state.params)[0].sharding.device_set)
    del state
    continued = moved.run()
    reused = moved._step_program(moved.step_group(0)) is eight._step_program(eight.step_group(0))
    moved.close()
    return {
        "one_device": one_device.losses, "eight_devices": mesh_run.losses, "param_specs": sorted(sharded),
        "eight_max_param_diff": eight_diff, "restored_equal": restored_equal, "restored_devices": restored_devices,
        "continued": continued.losses, "resumed_with_the_eight_device_program": reused,
        "zero1": {"losses": zero1_run.losses, "devices": zero1.mesh.devices.size, "max_param_diff": zero1_diff,
                  "moments": len(moments), "moments_split_over_data": len(split),
                  "padded_moment_shapes": len(shapes - param_shapes)},
    }


VISION_RULES = {"replicated": {}, "split": {"vision_batch": "tensor"}}


def _vision_config(rules, frames: int):
    c = load_config("tiny")
    c.data = ml_collections.ConfigDict(dict(image_size=64, datasets=[
        dict(name="pairs", kind="image_text", pattern="", batch_size=frames, max_len=16)]))
    c.mesh.update(data=2, fsdp=1, tensor=2)
    c.train.microbatches = 1
    c.mesh_rules.update(rules)
    return c


def vision_split() -> dict:
    """Features on the CPU devices; executed FLOPs compiled for a v4-8 (4 chips) where libtpu is
    installed: XLA:CPU's partitioner runs grouped convolutions on the whole batch, whatever its
    sharding, so only the TPU compiler's program shows the split."""
    from flamingo_jax.core import sharding
    from flamingo_jax.core.parts import ModelParts
    from flamingo_jax.models.config import FlamingoConfig
    from flamingo_jax.models.flamingo import build_vision_encoder, encode_frames
    from flamingo_jax.models.partitioning import activation_sharding
    from flamingo_jax.pod import encoder_aot

    # Executed FLOPs per chip (scans unrolled). Replicated over 'tensor', 4 frames: each chip
    # encodes its data shard's 2; split, 8 frames: 4 per data shard, 2 per tensor rank again.
    reports = {name: encoder_aot.compile_vision_encoder(_vision_config(VISION_RULES[name], frames), "v4-8")
               for name, frames in (("replicated", 4), ("split", 8))} if importlib.util.find_spec("libtpu") else {}
    # Features: 6 frames (3 per data shard; over 2 tensor ranks each frame's rows are split, as
    # whole frames they would pad to 4) equal the unsharded encoder's.
    cfg = FlamingoConfig.from_dict(_vision_config({}, 6).model)
    parts = ModelParts(lambda rngs: build_vision_encoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs))
    _, frozen = jax.jit(lambda: parts.init(0))()
    frames = jax.random.normal(jax.random.key(1), (6, 64, 64, 3))
    reference = np.asarray(jax.jit(lambda f, x: parts.merge({}, f)(x))(frozen, frames))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
    rules = sharding.rules_from_config(VISION_RULES["split"])

    def split(f, x):
        with activation_sharding(mesh, rules):
            return encode_frames(parts.merge({}, f), x)

    sharded = jax.device_put(frames, NamedSharding(mesh, PartitionSpec("data")))
    features = np.asarray(jax.jit(split)(frozen, sharded))
    return {
        "executed_per_chip": {n: r["flops_per_step"]["executed_per_chip"] for n, r in reports.items()},
        "collectives": {n: r["collectives_per_microbatch_per_chip"] for n, r in reports.items()},
        "max_feature_diff": float(np.abs(features - reference).max()),
        "feature_scale": float(np.abs(reference).max()), "feature_shape": list(features.shape),
    }
