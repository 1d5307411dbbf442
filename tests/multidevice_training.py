"""Run by test_training_multidevice.py in a subprocess with 8 fake CPU devices
(XLA_FLAGS must be set before JAX starts, so this cannot run inside pytest's
process). Prints one JSON line with the losses and checks to assert on."""

import json
import sys

import jax
import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__file__))
import conftest  # noqa: E402,F401  (same JAX settings and compilation cache as the tests)

from flamingo_jax.training.trainer import Trainer  # noqa: E402

from helpers import train_config  # noqa: E402


def main(corpus_dir: str, workdir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    config = train_config(corpus_dir, datasets=("image_text",), steps=5)
    one = Trainer(config, f"{workdir}/one", devices=jax.devices()[:1])
    one_device = one.run()
    one_params = jax.tree.map(np.asarray, one.last_state.params)
    one.close()

    config.mesh.update(data=2, fsdp=2, tensor=2)
    eight = Trainer(config, f"{workdir}/eight")
    eight_devices = eight.run()
    sharded = {str(x.sharding.spec) for x in jax.tree.leaves(eight.last_state.params)}
    eight.close()

    # The 1-device checkpoint, restored onto the 8-device mesh; then 2 more steps.
    config.train.steps = 7
    moved = Trainer(config, f"{workdir}/one")
    state, _, _ = moved.initial_state()
    restored_equal = all(np.array_equal(np.asarray(a), b) for a, b in
                         zip(jax.tree.leaves(state.params), jax.tree.leaves(one_params)))
    restored_devices = len(jax.tree.leaves(state.params)[0].sharding.device_set)
    del state
    continued = moved.run()
    moved.close()
    print(json.dumps({
        "one_device": one_device.losses, "eight_devices": eight_devices.losses,
        "param_specs": sorted(sharded), "restored_equal": restored_equal,
        "restored_devices": restored_devices, "continued": continued.losses,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
