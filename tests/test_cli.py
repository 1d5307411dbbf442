"""Every command-line entry point answers `--help` with its usage, and a mistake with one line.

Each case is a fresh process (absl parses a process's flags once) that runs the module as
`python -m` does, forked from one that has imported the libraries already (`cli_zygote.py`,
conftest's `run_cli`). Only the last one reaches a model: evaluate's `--blind` on the session's
trained run.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from flamingo_jax.cli import TPU_DEVICE_FILES

from helpers import ROOT

# (module, extra arguments, a phrase of its usage text)
CLIS = [
    ("flamingo_jax.train", [], "python -m flamingo_jax.train --config="),
    ("flamingo_jax.evaluate", [], "python -m flamingo_jax.evaluate --workdir="),
    ("flamingo_jax.generate", [], "python -m flamingo_jax.generate --workdir="),
    ("flamingo_jax.params", [], "python -m flamingo_jax.params --config="),
    ("flamingo_jax.aot", [], "python -m flamingo_jax.aot --config="),
    ("flamingo_jax.data.prepare", [], "python -m flamingo_jax.data.prepare interleaved"),
    ("flamingo_jax.data.prepare", ["interleaved"], "python -m flamingo_jax.data.prepare interleaved"),
    ("flamingo_jax.data.prepare", ["image_text"], "python -m flamingo_jax.data.prepare image_text"),
    ("flamingo_jax.data.prepare", ["video_text"], "python -m flamingo_jax.data.prepare video_text"),
    ("flamingo_jax.data.synthetic", [], "python -m flamingo_jax.data.synthetic"),
    ("flamingo_jax.data.tokenizer", [], "python -m flamingo_jax.data.tokenizer train"),
    ("flamingo_jax.convert", ["vision"], "python -m flamingo_jax.convert"),
]


@pytest.mark.parametrize("module, args", [
    ("platform", []),  # prints, exit 0
    ("json.tool", ["/no/such/file.json"]),  # an argparse error, exit 2
    ("flamingo_jax.no_such_module", []),  # an uncaught exception: traceback, exit 1
])
def test_the_zygote_runs_a_module_as_python_m_does(run_cli, module, args):
    forked = run_cli(module, *args)
    real = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120)
    assert (forked.returncode, forked.stdout) == (real.returncode, real.stdout)
    assert forked.stderr.strip().splitlines()[-1:] == real.stderr.strip().splitlines()[-1:]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the zygote's threads from Linux's /proc")
def test_the_zygote_is_one_thread_so_forking_it_is_safe(run_cli):
    """Its imports (JAX, Flax, optax, orbax, TensorFlow) start no thread: a fork copies only the
    calling thread, and a lock another thread held would stay locked in every child."""
    run_cli("platform")  # the zygote has imported everything and served a child
    assert os.listdir(f"/proc/{run_cli.pid}/task") == [str(run_cli.pid)]


@pytest.mark.parametrize("module, extra, usage", CLIS, ids=[" ".join([m.split(".", 1)[1], *e]) for m, e, _ in CLIS])
def test_help_prints_the_usage(run_cli, module, extra, usage):
    result = run_cli(module, *extra, "--help")
    assert usage in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.returncode in (0, 1)  # absl exits 1 after --help


@pytest.mark.parametrize("module, extra, usage", CLIS, ids=[" ".join([m.split(".", 1)[1], *e]) for m, e, _ in CLIS])
def test_an_unknown_flag_is_one_line_and_the_usage(run_cli, module, extra, usage):
    result = run_cli(module, *extra, "--no_such_flag=1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    first, *rest = result.stderr.strip().splitlines()
    assert first.startswith("error: ") and "no_such_flag" in first
    assert usage in "\n".join(rest)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/tiny.py", "--config.train.learnig_rate=1"], 'Did you mean "learning_rate"'),
    (["--config=configs/tiny.py", "--config.train.steps=-5"], "`train.steps`: -5 must be >= 1"),
    (["--config=configs/no_such_config.py"], "No such file or directory: 'configs/no_such_config.py'"),
])
def test_a_config_mistake_is_one_line_before_anything_runs(run_cli, args, message, tmp_path):
    result = run_cli("flamingo_jax.train", *args, f"--workdir={tmp_path / 'run'}")
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "run").exists()  # nothing written


# A user's mistakes, per CLI: one `error:` line naming the input and the fix (at most three lines
# of output in all), a non-zero exit, no traceback. Each fails before any model is built.
MISTAKES = [
    ("flamingo_jax.train", ["--config=configs/tiny.py", "--workdir=README.md"], "README.md is a file"),
    ("flamingo_jax.evaluate", ["--workdir=/no/such/run"], "has no checkpoints/ directory"),
    ("flamingo_jax.evaluate", ["--workdir=/no/such/run", "--tasks=,"], "names no task"),
    ("flamingo_jax.evaluate", ["--workdir=/no/such/run", "--batch_size=0"], "--batch_size=0 must be >= 1"),
    ("flamingo_jax.evaluate", ["--workdir=/no/such/run", "--tasks=cocoo"], "unknown evaluation task 'cocoo'"),
    # --prompts reaches the tasks before any checkpoint is read: the synthetic tasks have no OpenFlamingo prompts.
    ("flamingo_jax.evaluate", ["--workdir=/no/such/run", "--prompts=openflamingo"],
     "OpenFlamingo has no prompts for task 'synthetic_captioning'"),
    ("flamingo_jax.evaluate", ["--workdir=/no/such/run", "--vqa_normalization=sometimes"], "vqa_normalization"),
    ("flamingo_jax.generate", ["--workdir=/no/such/run"], "has no checkpoints/ directory"),
    ("flamingo_jax.recipe", ["--config=configs/none.py", "--workdir=/tmp/x"], "configs/none.py: no such file"),
    ("flamingo_jax.recipe", ["--config=configs/tiny.py", "--shots=4,x"], "--shots takes comma-separated integers"),
    ("flamingo_jax.recipe", ["--config=configs/tiny.py", "--blind_shots=-1"], "--blind_shots needs non-negative"),
    ("flamingo_jax.generate", ["--workdir=/no/such/run", "--max_new_tokens=0"], "max_new_tokens must be >= 1"),
    ("flamingo_jax.generate", ["--workdir=/no/such/run", "--method=sample", "--temperature=0"],
     "temperature must be > 0"),
    ("flamingo_jax.params", ["--config=configs/none.py"], "No such file or directory: 'configs/none.py'"),
    ("flamingo_jax.params", ["--config=configs/tiny.py", "--config.model.decoder.num_kv_heads=3"],
     "model.decoder.num_heads"),
    ("flamingo_jax.params", ["--config=configs/tiny.py", "--json=/no/such/dir/counts.json"], "folder does not exist"),
    ("flamingo_jax.data.synthetic", [], "--out_dir"),
    ("flamingo_jax.data.synthetic", ["--out_dir=/tmp/x", "--num_examples=0"], "num_examples=0"),
    ("flamingo_jax.data.synthetic", ["--out_dir=/tmp/x", "--image_size=4"], "image_size=4"),
    ("flamingo_jax.data.tokenizer", ["train", "--out=/tmp/spm"], "--input"),
    ("flamingo_jax.data.tokenizer", ["train", "--input=/no/such.txt", "--out=/tmp/spm"], "/no/such.txt"),
    ("flamingo_jax.data.tokenizer", ["train", "--input=/dev/null", "--out=/tmp/spm"], "holds no text"),
    ("flamingo_jax.data.prepare", ["interleaved", "--input=/no/such/*.jsonl", "--output_dir=/tmp/x"],
     "/no/such/*.jsonl"),
    ("flamingo_jax.data.prepare", ["interleaved", "--input=README.md", "--output_dir=/tmp/x", "--num_shards=0"],
     "num_shards"),
    ("flamingo_jax.data.prepare", ["audio", "--input=README.md", "--output_dir=/tmp/x"], "interleaved|image_text"),
]


@pytest.mark.parametrize("module, args, message", MISTAKES,
                         ids=[f"{m.split('.', 1)[1]}: {' '.join(a)}" for m, a, _ in MISTAKES])
def test_a_mistake_is_one_clear_line(run_cli, module, args, message):
    result = run_cli(module, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("I", "W"))]
    assert message in result.stderr, result.stderr[-2000:]
    assert len(lines) <= 3 or lines[0].startswith("error: "), lines


TPU_NOISE = ("TPU", "libtpu", "INVALID_ARGUMENT")
# Programs that start a JAX backend through each entry-point wrapper: JAX imported before `run`
# (its config is told) and only inside `guard`'s main (the environment variable is read).
BACKEND_STARTERS = {
    "run": "import jax; from flamingo_jax import cli; cli.run(lambda argv: print(jax.devices()[0].platform))",
    "guard": "import sys; from flamingo_jax import cli; "
             "sys.exit(cli.guard(lambda: print(__import__('jax').devices()[0].platform)))",
}


@pytest.mark.skipif(any(glob.glob(pattern) for pattern in TPU_DEVICE_FILES),
                    reason="this host has TPU device files: JAX is meant to find its TPU")
@pytest.mark.parametrize("wrapper", sorted(BACKEND_STARTERS))
def test_a_cli_without_jax_platforms_does_not_probe_an_absent_tpu(wrapper):
    """libtpu is installed (the test extra); without a TPU and without JAX_PLATFORMS, a command
    that starts JAX must neither print libtpu's initialisation trace nor fail."""
    env = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-c", BACKEND_STARTERS[wrapper]], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] in ("cpu", "gpu")
    assert not [word for word in TPU_NOISE if word in result.stderr], result.stderr[-2000:]


def test_evaluate_blind_tags_its_results(run_cli, trained_run, synthetic_corpus, tmp_path):
    """`--blind` tags the task names in the file names (so the control is written beside the
    normal results, never over them) and says so in the meta."""
    result = run_cli("flamingo_jax.evaluate", f"--workdir={trained_run / 'run'}", f"--data_dir={synthetic_corpus}",
                     "--blind", "--tasks=synthetic_vqa", "--shots=0", "--num_queries=2", f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    assert path.name.startswith("step_2.synthetic_vqa-blind.shots-0.queries-2."), path.name
    assert path.with_suffix(".md").is_file()
    results = json.loads(path.read_text())
    assert results["meta"]["blind"] is True and results["results"]["synthetic_vqa"]["0"]["num_queries"] == 2
