"""Run by test_sharding_vision_encoder.py in a subprocess with 4 fake CPU devices (XLA_FLAGS must
be set before JAX starts): the tiny NFNet over a data 2 x tensor 2 mesh, its frames replicated
over 'tensor' or split by the 'vision_batch' rule. The features are computed on the CPU devices;
the executed FLOPs are compiled for a v4-8 (4 chips) where libtpu is installed: XLA:CPU's
partitioner runs grouped convolutions on the whole batch, whatever its sharding, so only the
TPU compiler's program shows the split. Prints one JSON line."""

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, os.path.dirname(__file__))
import conftest  # noqa: E402,F401  (same JAX settings and compilation cache as the tests)

from flamingo_jax.core import sharding  # noqa: E402
from flamingo_jax.core.parts import ModelParts  # noqa: E402
from flamingo_jax.models.config import FlamingoConfig  # noqa: E402
from flamingo_jax.models.flamingo import build_vision_encoder, encode_frames  # noqa: E402
from flamingo_jax.models.partitioning import activation_sharding  # noqa: E402
from flamingo_jax.pod import encoder_aot  # noqa: E402

from helpers import load_config  # noqa: E402

RULES = {"replicated": {}, "split": {"vision_batch": "tensor"}}


def config(rules, frames: int):
    c = load_config("tiny")
    c.data = ml_collections.ConfigDict(dict(image_size=64, datasets=[
        dict(name="pairs", kind="image_text", pattern="", batch_size=frames, max_len=16)]))
    c.mesh.update(data=2, fsdp=1, tensor=2)
    c.train.microbatches = 1
    c.mesh_rules.update(rules)
    return c


def main() -> None:
    assert jax.device_count() == 4, jax.devices()
    # Executed FLOPs per chip (scans unrolled). Replicated over 'tensor', 4 frames: each chip
    # encodes its data shard's 2; split, 8 frames: 4 per data shard, 2 per tensor rank again.
    reports = {name: encoder_aot.compile_vision_encoder(config(RULES[name], frames), "v4-8")
               for name, frames in (("replicated", 4), ("split", 8))} if importlib.util.find_spec("libtpu") else {}
    # Features: 6 frames (3 per data shard, padded to 4 to split over 2 tensor ranks) equal the
    # unsharded encoder's.
    cfg = FlamingoConfig.from_dict(config({}, 6).model)
    parts = ModelParts(lambda rngs: build_vision_encoder(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs))
    _, frozen = jax.jit(lambda: parts.init(0))()
    frames = jax.random.normal(jax.random.key(1), (6, 64, 64, 3))
    reference = np.asarray(jax.jit(lambda f, x: parts.merge({}, f)(x))(frozen, frames))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
    rules = sharding.rules_from_config(RULES["split"])

    def split(f, x):
        with activation_sharding(mesh, rules):
            return encode_frames(parts.merge({}, f), x)

    sharded = jax.device_put(frames, NamedSharding(mesh, PartitionSpec("data")))
    features = np.asarray(jax.jit(split)(frozen, sharded))
    print(json.dumps({
        "executed_per_chip": {n: r["flops_per_step"]["executed_per_chip"] for n, r in reports.items()},
        "collectives": {n: r["collectives_per_microbatch_per_chip"] for n, r in reports.items()},
        "max_feature_diff": float(np.abs(features - reference).max()),
        "feature_scale": float(np.abs(reference).max()), "feature_shape": list(features.shape),
    }))


if __name__ == "__main__":
    main()
