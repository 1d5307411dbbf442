"""Process-level JAX settings shared by the command-line entry points."""

from __future__ import annotations

import os

import jax

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "flamingo_jax", "xla")


def enable_compilation_cache(directory: str | None = None) -> str:
    """Persistent XLA compilation cache: a rerun (e.g. resuming after preemption)
    reuses compiled programs instead of compiling the train step again.
    `FLAMINGO_COMPILATION_CACHE=''` turns it off. Programs that compile in under a second are not
    kept unless JAX's own `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` says otherwise."""
    directory = os.environ.get("FLAMINGO_COMPILATION_CACHE", directory or DEFAULT_CACHE_DIR)
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory


class _QuietLibraries:
    """Drops other libraries' INFO lines (orbax logs every save step by step) so
    the progress line stays readable; their warnings and errors still show."""

    NOISY = ("orbax", "tensorflow")

    def filter(self, record):
        return record.levelno > 20 or not any(name in record.pathname for name in self.NOISY)


def quiet_library_logs() -> None:
    from absl import logging

    logging.get_absl_handler().addFilter(_QuietLibraries())


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc `malloc_trim`); False where there is none.

    XLA:CPU compiles in the C heap and frees it when done, but glibc keeps freed pages resident,
    and large buffers (weights) come from fresh mappings rather than from those pages: without a
    trim, a process that compiles and then allocates holds both (REF-CPU generation: about 200 MiB
    after compiling its programs)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # no C library, or not glibc's
        return False
    return True
