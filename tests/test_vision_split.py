"""How the frozen encoder's frames are shared among the tensor ranks (`models.flamingo.encode_frames`):
the split chosen for a data shard's frames, and the features of a split that cuts frames into rows
equal to the unsharded encoder's (fake CPU devices, in a subprocess: the device count is fixed when
JAX starts)."""

import json
import os
import subprocess
import sys
import types

import pytest
import xla_flags
from flax import nnx

from flamingo_jax.models.config import NFNetConfig
from flamingo_jax.models.flamingo import _frame_and_row_ways
from flamingo_jax.models.nfnet import NFNet
from flamingo_jax.models.partitioning import activation_sharding

from helpers import ROOT


@pytest.mark.parametrize("frames, expected", [
    (16, (16, 1)),  # the 80B's pairs and videos per data shard: whole frames, as before
    (40, (8, 2)),  # its M3W images: 5 frames a rank, each cut in two (not padded to 48)
    (20, (8, 2)),  # at 2 micro-batches: padded to 24 (to 32 as whole frames)
    (3, (8, 2)),
])
def test_the_split_that_pads_least_wins(frames, expected):
    """F6 at 320 px (10 output rows: a row split of 2 at most, of the 16's divisors) over 16 tensor ranks."""
    encoder = types.SimpleNamespace(row_stride=32)
    mesh = types.SimpleNamespace(shape={"data": 96, "fsdp": 1, "tensor": 16})
    with activation_sharding(mesh, {"batch": ("data", "fsdp"), "vision_batch": "tensor"}):
        assert _frame_and_row_ways(encoder, frames, 320, 16) == expected
        # Encoders that are not convolutional all through (a ViT) only ever split whole frames.
        assert _frame_and_row_ways(types.SimpleNamespace(), frames, 320, 16) == (16, 1)


def test_nfnet_declares_its_row_stride():
    model = nnx.eval_shape(lambda: NFNet(NFNetConfig(variant="tiny"), rngs=nnx.Rngs(0)))
    assert model.row_stride == 32  # the stem's 4 x the stages' 2 x 2 x 2


_ROW_SPLIT = """
import json
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from flamingo_jax.core import sharding
from flamingo_jax.models.config import NFNetConfig
from flamingo_jax.models.flamingo import _frame_and_row_ways, encode_frames
from flamingo_jax.models.nfnet import NFNet
from flamingo_jax.models.partitioning import activation_sharding

graphdef, state = nnx.split(NFNet(NFNetConfig(variant="tiny"), rngs=nnx.Rngs(0)))
frames = jax.random.normal(jax.random.key(1), (6, 64, 64, 3))
reference = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, frames))
mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
rules = sharding.rules_from_config({"vision_batch": "tensor"})
ways = []

def split(s, x):
    with activation_sharding(mesh, rules):
        encoder = nnx.merge(graphdef, s)
        ways.append(_frame_and_row_ways(encoder, 3, 64, 2))
        return encode_frames(encoder, x)

sharded = jax.device_put(frames, NamedSharding(mesh, PartitionSpec("data")))
compiled = jax.jit(split).lower(state, sharded).compile()
features = np.asarray(compiled(state, sharded))
print(json.dumps({"ways": ways[0], "shape": list(features.shape), "halo": "collective-permute" in compiled.as_text(),
                  "diff": float(np.abs(features - reference).max()), "scale": float(np.abs(reference).max())}))
"""


def test_frames_cut_into_rows_give_the_unsharded_features():
    """Data 2 x tensor 2, 3 frames per data shard: whole frames would pad to 4; instead each
    frame's 64 rows are split between the 2 tensor ranks (the convolutions exchange halo rows)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.with_devices(4))
    done = subprocess.run([sys.executable, "-c", _ROW_SPLIT], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ways"] == [1, 2] and result["shape"] == [6, 4, 128]
    assert result["halo"]  # the rows really are split: neighbours trade halo rows
    assert result["diff"] <= 1e-5 * result["scale"]
