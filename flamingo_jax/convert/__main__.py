"""`python -m flamingo_jax.convert ...`: see cli.py."""

import os
import sys

# Converting reads and writes host memory only: leave any accelerator to the jobs that need it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from flamingo_jax import cli  # noqa: E402
from flamingo_jax.convert import cli as convert_cli  # noqa: E402

sys.exit(cli.guard(lambda: convert_cli.main(sys.argv)))
