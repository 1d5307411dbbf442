"""Test-wide settings and shared fixtures.

* fp32 matmuls on CPU, so equivalence tests can be exact.
* Fast XLA:CPU compiles for every program (`xla_flags.py`; compiles are most of the suite's time).
* The 'rbg' PRNG: XLA:CPU compiles threefry-based initialisers several times
  slower, and model construction dominates the suite's time otherwise.
* A persistent compilation cache for the session: tests that build the same
  train step (a fresh closure each time) reuse one compiled program.
* Objects alive after collection are frozen (`freeze_imported_objects`): the garbage collector
  stops walking the imported libraries' 0.7 M objects, which slowed every trace.
* The long modules run first, spread over the xdist workers (`long_modules_first`),
  so no worker starts a three-minute test near the end.
* The synthetic corpus, one tiny trained run and one run of the Colab notebook (the whole
  recipe) are made once per session, shared by every xdist worker through a file lock.
"""

import contextlib
import fcntl
import gc
import json
import os
import pathlib
import pickle
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every program of the session (and of the subprocesses, which inherit the flags) compiles fast
# and alike (xla_flags.py says why).
from xla_flags import FAST as _FAST_XLA  # noqa: E402

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_XLA}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_default_prng_impl", "rbg")
_CACHE = os.environ.setdefault(  # shared by xdist workers and the multi-device subprocesses
    "FLAMINGO_TEST_COMPILATION_CACHE", str(pathlib.Path(__file__).parent.parent / ".pytest_cache" / "xla"))
# ... and by every CLI a test runs in a subprocess (`runtime.enable_compilation_cache`), not the user's own.
os.environ["FLAMINGO_COMPILATION_CACHE"] = _CACHE
jax.config.update("jax_compilation_cache_dir", _CACHE)
# Kept from a tenth of a second up (fast compiles make most programs short); the CLIs the tests
# run in subprocesses read the same threshold (`runtime.enable_compilation_cache`).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


# Seconds per test module on 2 cores (from a full run's --durations); only the order of the run
# depends on them, so stale figures cost time, never correctness.
MODULE_SECONDS = {  # a cold run's seconds (2026-12-03)
    "tests/test_recipe.py": 80, "tests/test_training_multiprocess.py": 85, "tests/test_tfds.py": 69,
    "tests/test_inference_engine.py": 65, "tests/test_training.py": 64, "tests/test_backbone_checks.py": 55,
    "tests/test_reliability.py": 47, "tests/test_inference_decoding.py": 46, "tests/test_training_runs.py": 45,
    "tests/test_openflamingo_convert.py": 41, "tests/test_pretraining.py": 39, "tests/test_openflamingo_modules.py": 37,
    "tests/test_flamingo.py": 32, "tests/test_flops.py": 32, "tests/test_training_recipe.py": 30,
    "tests/test_launch.py": 6,  # short, but always after test_recipe (TOGETHER)
}
LONG_MODULE_S = 25
# Modules that run on one worker, in this order: both read the session's notebook run
# (`notebook_recipe_run`), which the first of them builds.
TOGETHER = (("tests/test_recipe.py", "tests/test_launch.py"),)


def long_modules_first(items: list, workers: int) -> list:
    """The long modules first, dealt to the worker with the least so far; then the rest in
    collection order, so that xdist's worksteal scheduler, which gives worker i the i-th of
    `workers` equal contiguous slices, starts every worker on its own long modules. A long
    module stays together (its module-scoped fixtures are built once), and so does each
    `TOGETHER` group; the short ones fill the shares to equal counts and may straddle two (one
    more fixture build beats uneven shares)."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    units = {m: [m] for m in modules if MODULE_SECONDS.get(m, 0) >= LONG_MODULE_S}
    for group in TOGETHER:
        present = [m for m in group if m in modules]
        for m in present:
            units.pop(m, None)
        if present:
            units[present[0]] = present
    seconds = {unit: sum(MODULE_SECONDS.get(m, 0) for m in members) for unit, members in units.items()}
    chunks: list[list] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for unit in sorted(units, key=seconds.get, reverse=True):
        i = loads.index(min(loads))
        for module in units[unit]:
            chunks[i].extend(modules[module])
        loads[i] += seconds[unit]
    placed = {m for members in units.values() for m in members}
    rest = [item for module, group in modules.items() if module not in placed for item in group]
    remaining, ordered = len(items), []
    for i, chunk in enumerate(chunks):
        size = remaining // (workers - i)  # worksteal's first share for this worker
        take = max(size - len(chunk), 0) if i < workers - 1 else len(rest)
        chunk.extend(rest[:take])
        del rest[:take]
        remaining -= len(chunk)
        ordered.extend(chunk)
    return ordered


def pytest_collection_modifyitems(config, items):
    items[:] = long_modules_first(items, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def pytest_collection_finish(session):
    freeze_imported_objects()


def freeze_imported_objects() -> None:
    """Moves everything alive now (the libraries collection imported: JAX, TensorFlow, torch,
    about 0.7 M objects) out of the garbage collector's sight. A full collection no longer walks
    them, and tracing allocates enough to trigger one every few programs: a train step's trace
    and lowering took 1.26-1.74 s with them, 1.25-1.39 s without."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    """An exclusive lock on `path` (a file), across the xdist workers of one session."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> pathlib.Path:
    """A folder shared by every xdist worker of this session (its own folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_per_session(session_dir: pathlib.Path, name: str, build) -> pathlib.Path:
    """session_dir/name, made by `build(path)` by the first worker to get here; the others wait for it."""
    out = session_dir / name
    with _locked(session_dir / f"{name}.lock"):
        if not (out / ".done").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            (out / ".done").touch()
    return out


@pytest.fixture(scope="session")
def synthetic_corpus(session_dir):
    """A small synthetic corpus (all formats + tokenizer), generated once per session (all workers)."""
    from flamingo_jax.data import synthetic

    def build(out):
        synthetic.generate(str(out), num_examples=64, num_documents=32, num_videos=8, num_eval=16, image_size=32,
                           vocab_size=512, num_shards=2, seed=0)

    return str(once_per_session(session_dir, "synthetic", build))


@pytest.fixture(scope="session")
def trained_run(synthetic_corpus, session_dir):
    """One tiny training run (2 steps, image-text + interleaved, as if on a TPU v4 so MFU is logged)
    shared by the evaluate CLI, reload and MFU tests: its workdir, plus what the trainer held at
    the end (trained_params.pkl: {path: array}, trained_logits.npy: `helpers.trained_logits`,
    the batch specs in run_info.json)."""
    from helpers import flat_arrays, train_config, trained_logits

    def build(out):
        from unittest import mock

        import numpy as np

        from flamingo_jax.training import trainer as trainer_module

        config = train_config(synthetic_corpus, steps=2)
        config.model.decoder.max_len = 512  # room for the evaluate test's 4-shot prompts
        with mock.patch.object(trainer_module.flops, "detect_chip", lambda: "v4"):
            trainer = trainer_module.Trainer(config, str(out / "run"))
            try:
                trainer.run()
            finally:
                trainer.close()
        with open(out / "trained_params.pkl", "wb") as f:
            pickle.dump(flat_arrays(trainer.last_state.params), f)
        frozen = jax.jit(lambda: trainer.parts.init(trainer.run_config.seed)[1])()
        np.save(out / "trained_logits.npy", trained_logits(trainer.parts.merge(trainer.last_state.params, frozen)))
        specs = {name: {"batch_size": spec.batch_size, "max_len": spec.max_len, "max_images": spec.max_images,
                        "kind": spec.kind} for name, spec in trainer.mixture.specs.items()}
        (out / "run_info.json").write_text(json.dumps({"specs": specs, "config": config.to_dict()}))

    return once_per_session(session_dir, "trained_run", build)


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli(module, *args, timeout=120)`: `python -m <module> <args>` in the checkout with
    JAX_PLATFORMS=cpu, as a CompletedProcess; forked from `cli_zygote.py`, which has imported the
    libraries once for the session's commands (test_cli.py checks it behaves as `python -m`)."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    zygote = subprocess.Popen([sys.executable, str(root / "tests" / "cli_zygote.py")], cwd=root,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def run(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        zygote.stdin.write(json.dumps({"module": module, "args": list(args), "timeout": timeout}) + "\n")
        zygote.stdin.flush()
        reply = zygote.stdout.readline()
        assert reply, f"cli_zygote.py exited ({zygote.poll()}) while running {module} {args}"
        reply = json.loads(reply)
        return subprocess.CompletedProcess([sys.executable, "-m", module, *args], reply["returncode"],
                                           reply["stdout"], reply["stderr"])

    run.pid = zygote.pid  # test_cli checks the zygote stays single-threaded (safe to fork)
    yield run
    zygote.stdin.close()
    zygote.wait(timeout=60)


NOTEBOOK_RECIPE_CONFIG = """\"\"\"The session's notebook run: test_recipe.py's stage configs at the suite's settings.\"\"\"
import sys

sys.path.insert(0, {tests!r})
import conftest  # the suite's JAX settings (precision, PRNG, compilation cache)
from test_recipe import stage_configs


def get_config(stage):
    return stage_configs({corpus!r})[stage]
"""
NOTEBOOK_TASKS = ("synthetic_captioning", "synthetic_vqa", "synthetic_classification")


@pytest.fixture(scope="session")
def notebook_recipe_run(synthetic_corpus, session_dir) -> dict:
    """launch/colab_small.ipynb executed top to bottom once per session, as a user runs it inside
    this checkout, with its parameters cell set to test_recipe.py's tiny stage configs, shots 0
    and 1, two queries per task and the blind control at 1 shot: the whole recipe from scratch
    through its CLI. test_recipe.py checks what the recipe wrote, test_launch.py the notebook.
    Returns {"workdir", "report" (recipe.json right after the run), "notebook" (executed)}."""
    import nbformat
    from nbclient import NotebookClient

    root = pathlib.Path(__file__).resolve().parent.parent

    def build(out):
        config, workdir = out / "recipe_config.py", out / "work"
        config.write_text(NOTEBOOK_RECIPE_CONFIG.format(tests=str(root / "tests"), corpus=synthetic_corpus))
        notebook = nbformat.reads((root / "launch" / "colab_small.ipynb").read_text(), as_version=4)
        [parameters] = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        parameters.source = (f"CONFIG = {str(config)!r}\nWORKDIR = {str(workdir)!r}\nSHOTS = '0,1'\nNUM_QUERIES = 2\n"
                             f"TASKS = {','.join(NOTEBOOK_TASKS)!r}\nBLIND_SHOTS = 1\nREPO_URL = 'unused'")
        python_path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PYTHONPATH", python_path)
            NotebookClient(notebook, timeout=300, kernel_name="python3",
                           resources={"metadata": {"path": str(root)}}).execute()
        nbformat.write(notebook, str(out / "executed.ipynb"))
        shutil.copy(workdir / "recipe.json", out / "report.json")

    out = once_per_session(session_dir, "notebook_recipe_run", build)

    return {"workdir": out / "work", "report": json.loads((out / "report.json").read_text()),
            "notebook": nbformat.read(str(out / "executed.ipynb"), as_version=4)}
