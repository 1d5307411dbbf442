"""The frozen vision encoder's work shared over 'tensor' (the 'vision_batch' rule,
`models.flamingo.encode_frames`): 4 fake CPU devices, data 2 x tensor 2, in a subprocess."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from xla_flags import with_devices


def test_vision_batch_rule_halves_each_chips_encoder_work_and_keeps_the_features():
    script = pathlib.Path(__file__).with_name("vision_encoder_split.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=with_devices(4))
    done = subprocess.run([sys.executable, str(script)], check=False, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["feature_shape"][0] == 6  # the padding frame is cut off again
    assert result["max_feature_diff"] <= 1e-5 * result["feature_scale"]
    executed = result["executed_per_chip"]
    if not executed:
        pytest.skip("libtpu is not installed (pip install 'flamingo_jax[tpu]'): the features are checked, "
                    "the executed FLOPs need the TPU compiler")
    # Twice the frames, split over the 2 tensor ranks: each chip does the work of the replicated
    # encoder's half batch (unsplit it would do twice that).
    assert executed["split"] == pytest.approx(executed["replicated"], rel=0.02)
    # The split costs one gather of the features (over 'tensor'); the replicated encoder moves nothing.
    assert set(result["collectives"]["split"]) == {"all-gather"} and not result["collectives"]["replicated"]
