"""ZeRO-1 (optimizer state split over the data axis) for a data axis that divides no weight's
dimensions: 6 fake CPU devices, data 3 x tensor 2, in a subprocess."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from xla_flags import with_devices


def test_zero1_over_a_data_axis_of_3_updates_as_the_unsharded_optimizer(synthetic_corpus, tmp_path):
    script = pathlib.Path(__file__).with_name("zero1_training.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=with_devices(6))
    done = subprocess.run([sys.executable, str(script), synthetic_corpus, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    reference, zero1 = result["reference"], result["zero1"]
    assert sorted(zero1) == sorted(reference) == ["1", "2", "3"]
    np.testing.assert_allclose([zero1[s] for s in "123"], [reference[s] for s in "123"], rtol=1e-5)
    assert result["max_param_diff"] < 1e-5
    # Every moment of more than one element is split over 'data'; some only after padding (3 divides
    # none of their power-of-two dimensions).
    assert result["moments_split_over_data"] == result["moments"] > 0
    assert result["padded_moment_shapes"] > 0
