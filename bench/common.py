"""What every benchmark shares: the machine record, statistics, the peer runner, JSON out."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
from typing import Sequence

from flamingo_jax import cli

# As in every CLI, JAX leaves its TPU backend out where there is no TPU: libtpu (the test extra
# installs it for AOT compilation) otherwise initialises in every benchmark, printing an error
# trace and holding about 100 MiB resident (REF-CPU generation peaked at 1014 MiB with it, 912
# without). Before any benchmark imports JAX.
cli.skip_absent_tpu()

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The peer's benchmark script beside the checkout (../shared), or where OPENFLAMINGO_BENCH says (a worktree).
PEER_SCRIPT = pathlib.Path(os.environ.get(
    "OPENFLAMINGO_BENCH", ROOT.parent / "shared" / "peers" / "openflamingo" / "bench_openflamingo.py"))


def load_config(name: str, *args):
    """`configs/<name>.py`'s get_config(*args) (e.g. a stage of configs/tiny.py)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def machine() -> dict:
    """The host, and how busy it was: shared machines make absolute figures noisy."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    return info


def summary(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_peer(peer_python: str, flags: list[str], json_path: str | None, default_name: str) -> dict:
    """Runs OpenFlamingo's benchmark script with `flags` in its own process; returns its JSON.
    Run it before our measurement: a child process inherits its parent's peak-RSS mark."""
    out = pathlib.Path(json_path or default_name).with_suffix(".peer.json").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([peer_python, str(PEER_SCRIPT), *flags, "--json", str(out)], check=True, cwd=PEER_SCRIPT.parent)
    return json.loads(out.read_text())


def emit(result: dict, json_path: str | None) -> None:
    """Prints the result and writes it to `json_path` if given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        pathlib.Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(json_path).write_text(text)
