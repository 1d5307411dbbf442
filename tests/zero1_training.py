"""Run by test_zero1.py in a subprocess with 6 fake CPU devices (XLA_FLAGS must be set before
JAX starts). Trains the same steps on 1 device with the plain optimizer and on a data 3 x
tensor 2 mesh with ZeRO-1; prints one JSON line to assert on."""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import conftest  # noqa: E402,F401  (same JAX settings and compilation cache as the tests)

from flamingo_jax.training.trainer import Trainer  # noqa: E402

from helpers import train_config  # noqa: E402


def main(corpus_dir: str, workdir: str) -> None:
    assert jax.device_count() == 6, jax.devices()
    config = train_config(corpus_dir, datasets=("image_text",), steps=3)
    config.data.datasets[0]["batch_size"] = 6  # the data axis of 3 divides it
    one = Trainer(config, f"{workdir}/one", devices=jax.devices()[:1])
    reference = one.run()
    reference_params = jax.tree.map(np.asarray, one.last_state.params)
    one.close()

    config.mesh.update(data=3, fsdp=1, tensor=2)
    config.optimizer_sharding = "zero1"
    zero1 = Trainer(config, f"{workdir}/zero1")
    result = zero1.run()
    params = jax.tree.map(np.asarray, zero1.last_state.params)
    moments = [x for x in jax.tree.leaves(zero1.last_state.opt_state) if getattr(x, "ndim", 0) >= 1]
    split = [x for x in moments if "data" in str(x.sharding.spec)]
    shapes = {tuple(x.shape) for x in moments}
    param_shapes = {tuple(x.shape) for x in jax.tree.leaves(zero1.last_state.params)}
    zero1.close()
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, reference_params)
    print(json.dumps({
        "reference": {str(k): v for k, v in reference.losses.items()},
        "zero1": {str(k): v for k, v in result.losses.items()},
        "max_param_diff": max(jax.tree.leaves(diffs)),
        "moments": len(moments), "moments_split_over_data": len(split),
        "padded_moment_shapes": len(shapes - param_shapes),
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
