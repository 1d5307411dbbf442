"""Test-wide settings.

* fp32 matmuls on CPU, so equivalence tests can be exact.
* The 'rbg' PRNG: XLA:CPU compiles threefry-based initialisers several times
  slower, and model construction dominates the suite's time otherwise.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_default_prng_impl", "rbg")
