"""Compiles the real train step for a TPU slice ahead of time, on any host.

    python -m flamingo_jax.aot --config=configs/80b.py --topology=v4-32 [--json=aot.json]
    python -m flamingo_jax.aot --config=configs/80b.py --topology=v4-1536 --batch_multiplier=3
    python -m flamingo_jax.aot --config=configs/80b.py --topology=v4-3072 --batch_multiplier=3 \
        --config.train.microbatches=1 --vision_encoder

Needs libtpu (`pip install -e ".[tpu]"`), not a TPU: see flamingo_jax/pod/aot.py.
Exits 3 when the step does not fit the slice's HBM.
"""

import json
import os

# Compiling for a topology needs no local accelerator; keep JAX off any.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from flamingo_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/80b.py.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v4-8, v4-1536, v5p-128, v5e-256, v6e-256.")
_BATCH_MULTIPLIER = flags.DEFINE_integer("batch_multiplier", 1, "Scales every dataset's global batch size.")
_VISION_ENCODER = flags.DEFINE_bool("vision_encoder", False, "Compile the frozen vision encoder's share of the "
                                    "step alone, scans unrolled: its executed FLOPs against the analytic.")
_JSON = flags.DEFINE_string("json", None, "Also write the report to this JSON file.")


def main(argv):
    del argv
    from flamingo_jax.pod import aot, encoder_aot

    if _VISION_ENCODER.value:
        report = encoder_aot.compile_vision_encoder(_CONFIG.value, _TOPOLOGY.value, _BATCH_MULTIPLIER.value)
        print(encoder_aot.summary(report))
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(report, f, indent=2)
        return
    report = aot.compile_train_step(_CONFIG.value, _TOPOLOGY.value, _BATCH_MULTIPLIER.value)
    print(aot.summary(report))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=2)
    if not report["fits"]:
        raise SystemExit(3)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "topology"])
    cli.run(main)
