"""The suite's own machinery (conftest.py): the long-first order keeps every test exactly once and
each long module together; session artefacts are built once; every program compiles unoptimised;
the imported libraries' objects are out of the garbage collector's sight."""

import gc
import os
import types

import pytest
import xla_flags
from conftest import MODULE_SECONDS, TOGETHER, long_modules_first, once_per_session


def fake_items(counts: dict[str, int]) -> list:
    return [types.SimpleNamespace(nodeid=f"{module}::test_{i}") for module, n in counts.items() for i in range(n)]


def module_of(item) -> str:
    return item.nodeid.split("::")[0]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_long_modules_first_is_a_permutation_that_keeps_long_modules_together(workers):
    longest = sorted(MODULE_SECONDS, key=MODULE_SECONDS.get, reverse=True)[:3]
    counts = {"tests/test_a.py": 5, longest[2]: 4, "tests/test_b.py": 7, longest[0]: 3, longest[1]: 2,
              "tests/test_c.py": 6}
    items = fake_items(counts)
    ordered = long_modules_first(items, workers)
    assert sorted(i.nodeid for i in ordered) == sorted(i.nodeid for i in items)  # nothing lost or doubled
    runs = [module_of(ordered[0])] + [module_of(b) for a, b in zip(ordered, ordered[1:])
                                      if module_of(a) != module_of(b)]
    assert all(runs.count(m) == 1 for m in longest)  # each long module in one contiguous run
    assert len(set(runs)) == len(counts) and len(runs) <= len(counts) + workers - 1  # short ones split at shares
    if workers == 1:
        assert runs[:3] == longest  # the longest module starts first
    else:
        # worksteal gives worker i the i-th contiguous share: the two longest start different workers' shares
        first_share = {module_of(i) for i in ordered[:len(ordered) // workers]}
        assert longest[0] in first_share and longest[1] not in first_share


@pytest.mark.parametrize("workers", [1, 2])
def test_a_together_group_runs_on_one_worker_in_its_order(workers):
    first, second = TOGETHER[0]
    longest = [m for m in sorted(MODULE_SECONDS, key=MODULE_SECONDS.get, reverse=True) if m not in TOGETHER[0]][:2]
    items = fake_items({second: 3, longest[0]: 4, "tests/test_a.py": 9, first: 2, longest[1]: 5})
    ordered = [module_of(i) for i in long_modules_first(items, workers)]
    start = ordered.index(first)
    assert ordered[start:start + 5] == [first] * 2 + [second] * 3  # contiguous, in the group's order
    share = len(ordered) // workers  # worksteal's contiguous share per worker
    assert start // share == (start + 4) // share  # within one worker's share


def test_a_session_artefact_is_built_once_and_a_failed_build_is_retried(tmp_path):
    built = []

    def build(out):
        built.append(out)
        (out / "data").write_text("x")

    first = once_per_session(tmp_path, "thing", build)
    assert once_per_session(tmp_path, "thing", build) == first and len(built) == 1
    assert (first / "data").read_text() == "x"

    def broken(out):
        (out / "partial").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        once_per_session(tmp_path, "other", broken)
    again = once_per_session(tmp_path, "other", build)  # no .done: rebuilt from an empty folder
    assert len(built) == 2 and not (again / "partial").exists()


def test_every_program_compiles_unoptimised():
    """The session and every subprocess test compile with all of xla_flags' options."""
    fast = set(xla_flags.FAST.split())
    assert "--xla_backend_optimization_level=0" in fast and "--xla_cpu_use_fusion_emitters=false" in fast
    assert len(fast) == len(xla_flags.FAST_OPTIONS)
    assert fast <= set(os.environ["XLA_FLAGS"].split())
    subprocess_flags = set(xla_flags.with_devices(6).split())
    assert fast <= subprocess_flags and "--xla_force_host_platform_device_count=6" in subprocess_flags


def test_the_libraries_objects_are_frozen_after_collection():
    """`freeze_imported_objects` ran (pytest_collection_finish): the collector does not walk them."""
    assert gc.get_freeze_count() > 100_000


@pytest.mark.parametrize("threshold, expected", [(None, 1.0), ("0.1", 0.1)])
def test_a_cli_keeps_programs_from_the_threshold_jax_is_given(monkeypatch, tmp_path, threshold, expected):
    """`runtime.enable_compilation_cache` keeps programs of a second and more, unless JAX's own
    variable says otherwise (the suite's subprocesses set it: their short compiles are cached too)."""
    import jax

    from flamingo_jax import runtime

    saved = {name: getattr(jax.config, name) for name in
             ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
    monkeypatch.setenv("FLAMINGO_COMPILATION_CACHE", str(tmp_path))
    if threshold is None:
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    else:
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", threshold)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)  # what JAX read from the variable
    try:
        assert runtime.enable_compilation_cache() == str(tmp_path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == expected
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
