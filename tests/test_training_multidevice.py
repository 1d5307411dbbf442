"""Sharded training on 8 fake CPU devices, in a subprocess (XLA_FLAGS must be
set before JAX starts)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from xla_flags import with_devices


def test_eight_device_mesh_matches_one_device_and_restores_a_one_device_checkpoint(synthetic_corpus, tmp_path):
    script = pathlib.Path(__file__).with_name("multidevice_training.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=with_devices(8))
    done = subprocess.run([sys.executable, str(script), synthetic_corpus, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    one, eight = result["one_device"], result["eight_devices"]
    assert sorted(one) == sorted(eight) == [str(s) for s in range(1, 6)]
    np.testing.assert_allclose([eight[s] for s in sorted(eight)], [one[s] for s in sorted(one)], rtol=1e-5)
    # The weights really were split over the mesh (not all replicated).
    assert any("tensor" in spec or "fsdp" in spec for spec in result["param_specs"]), result["param_specs"]
    # A checkpoint written on 1 device restores onto 8 and training continues.
    assert result["restored_equal"] and result["restored_devices"] == 8
    assert sorted(result["continued"]) == ["6", "7"]
    assert all(np.isfinite(v) for v in result["continued"].values())
