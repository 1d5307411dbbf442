"""Prints a config's parameter counts per component (no weights are allocated).

    python -m flamingo_jax.params --config=configs/80b.py [--json=out.json]
"""

import json
import os

from absl import flags
from ml_collections import config_flags

from flamingo_jax import cli
from flamingo_jax.errors import UserError
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.summary import param_counts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/80b.py.", lock_config=True)
_JSON = flags.DEFINE_string("json", None, "Also write the counts to this JSON file.")


def main(argv):
    del argv
    config = _CONFIG.value
    if _JSON.value and not os.path.isdir(os.path.dirname(os.path.abspath(_JSON.value))):
        raise UserError(f"--json={_JSON.value}: its folder does not exist; create it or write the JSON elsewhere.")
    counts = param_counts(FlamingoConfig.from_dict(config.model))
    print(f"{config.name}: parameters per component")
    for name, value in counts.items():
        print(f"  {name:22s} {value:>16,d}  ({value / 1e9:.3f}B)")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"config": config.name, **counts}, f, indent=2)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main)
