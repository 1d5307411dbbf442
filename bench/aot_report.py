"""Per-chip memory and FLOPs of the paper's models on TPU v4 slices, compiled ahead of time.

    python bench/aot_report.py [--only=80b-v4-32,...] [--json=bench/results/aot_report.json]

Each case runs `python -m flamingo_jax.aot` in its own process (the TPU compiler's
memory is returned between cases) on this host, no TPU needed (libtpu must be
installed: pip install 'flamingo_jax[tpu]'). Results are merged into the JSON
file case by case, so a long run can be resumed with --only. Slices are named as
Cloud TPU names them: v4-1536 is 768 chips.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# name -> (config, slice, extra flags). For the 80B: the smallest v4 slices, with
# each sharding preset (16 chips is the floor: on 8, its weights, Adam state and
# one fp32 gradient alone are 35 GiB per chip), the 768-chip v4-1536, whose data axis of 48 needs a
# global batch that 48 divides (the paper's ablation mixture x3), and the paper's 1,536 chips.
CASES = {
    "80b-fsdp-v4-64": ("configs/80b.py:fsdp", "v4-64", []),
    "80b-fsdp-v4-32": ("configs/80b.py:fsdp", "v4-32", ["--config.mesh.tensor=8"]),
    "80b-v4-32": ("configs/80b.py", "v4-32", []),
    "80b-v4-64": ("configs/80b.py", "v4-64", []),
    "80b-v4-128": ("configs/80b.py", "v4-128", []),
    "3b-v4-8": ("configs/3b.py", "v4-8", []),
    "9b-v4-32": ("configs/9b.py", "v4-32", []),
    "80b-v4-1536": ("configs/80b.py", "v4-1536", ["--batch_multiplier=3", "--config.train.microbatches=4"]),
    "80b-fsdp-v4-1536": ("configs/80b.py:fsdp", "v4-1536", ["--batch_multiplier=3", "--config.train.microbatches=4"]),
    # The paper's 1,536 chips (v4-3072, data axis 96): one micro-batch, so each data shard's frames
    # (40, 16, 16, 16) split over the 16 tensor ranks without padding ('vision_batch'; the 40 as 8
    # ways by frame x 2 by row).
    "80b-v4-3072": ("configs/80b.py", "v4-3072", ["--batch_multiplier=3", "--config.train.microbatches=1"]),
    "80b-v4-3072-mb2-nfnet-replicated": ("configs/80b.py", "v4-3072", [
        "--batch_multiplier=3", "--config.train.microbatches=2", "--config.mesh_rules.vision_batch=fsdp"]),
    # The frozen NFNet-F6's share of that step alone, scans unrolled (one program per frame shape):
    # executed vs analytic FLOPs.
    "80b-vision-encoder-v4-3072": ("configs/80b.py", "v4-3072", [
        "--batch_multiplier=3", "--config.train.microbatches=1", "--vision_encoder"]),
    # The vision encoder's contrastive pretraining: NFNet-F6 at 288 px, 16,384 pairs on the paper's 512 chips.
    "contrastive-f6-v4-1024": ("configs/contrastive_nfnet_f6.py", "v4-1024", []),
    "contrastive-f6-v4-1024-noremat": ("configs/contrastive_nfnet_f6.py", "v4-1024",
                                       ["--config.model.remat_policy=none"]),
}


def run_case(config: str, topology: str, extra: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        command = [sys.executable, "-m", "flamingo_jax.aot", f"--config={config}", f"--topology={topology}",
                   f"--json={out}", *extra]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        started = time.time()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"command": " ".join(command[1:]), "error": f"timed out after {timeout:.0f} s"}
        result = json.loads(pathlib.Path(out).read_text()) if os.path.exists(out) else {}
        result.update(command="python " + " ".join(c for c in command[1:] if c != f"--json={out}"),
                      wall_seconds=time.time() - started, exit_code=done.returncode)
        if not os.path.exists(out):
            result["error"] = done.stderr[-3000:]
        print(done.stdout, flush=True)
        return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated case names: {', '.join(CASES)}")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "aot_report.json"))
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per case")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; cases are {', '.join(CASES)}")

    path = pathlib.Path(args.json)
    report = json.loads(path.read_text()) if path.exists() else {"benchmark": "aot_report", "cases": {}}
    for name in names:
        print(f"== {name}", flush=True)
        case = run_case(*CASES[name], timeout=args.timeout)
        case["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg()}
        case["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        report["cases"][name] = case
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
