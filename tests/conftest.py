"""Test-wide settings and shared fixtures.

* fp32 matmuls on CPU, so equivalence tests can be exact.
* The 'rbg' PRNG: XLA:CPU compiles threefry-based initialisers several times
  slower, and model construction dominates the suite's time otherwise.
* A persistent compilation cache for the session: tests that build the same
  train step (a fresh closure each time) reuse one compiled program.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_default_prng_impl", "rbg")
_CACHE = os.environ.setdefault(  # shared by xdist workers and the multi-device subprocesses
    "FLAMINGO_TEST_COMPILATION_CACHE", str(pathlib.Path(__file__).parent.parent / ".pytest_cache" / "xla"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory):
    """A small synthetic corpus (all formats + tokenizer), generated once per session."""
    from flamingo_jax.data import synthetic

    out_dir = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.generate(out_dir, num_examples=64, num_documents=32, num_videos=8, num_eval=16, image_size=32,
                       vocab_size=512, num_shards=2, seed=0)
    return out_dir
