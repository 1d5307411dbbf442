"""Fault drill: training killed at random moments resumes exactly; damaged data and checkpoints don't stop it.

    python bench/fault_drill.py --kills=20 --json=bench/results/fault_drill.json

Each case runs `python -m flamingo_jax.train` on configs/tiny.py (a shortened run) in its own process:

* kills: a run is SIGKILLed at random moments (a random phase: while it starts and compiles,
  inside a random step, or just after a checkpoint step while its asynchronous write runs; the
  moment is found by watching the run's metrics), restarted with the same command each time, and
  its losses step by step must equal an uninterrupted run's (the last record of each step in
  metrics.jsonl);
* damaged shards: one shard of every dataset with bytes flipped, one cut in half: the run
  finishes and its metrics count the skips;
* a damaged checkpoint: the newest checkpoint of a finished run has a file cut in half; the run
  resumes from the previous one (set aside, warned) and its losses equal the uninterrupted run's.

Prints a tally and the per-case results as JSON. The synthetic corpus is generated once into
`--data_dir` (default data_cache/synthetic-tiny, the main job's).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import ROOT, emit, machine

STEPS = 24
EVERY = 4  # checkpoint interval: kills land between, during and right after saves


def train_command(workdir: str, data_dir: str, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "flamingo_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.train.steps={steps}", f"--config.checkpoint.every_steps={EVERY}",
            "--config.checkpoint.keep=3", "--config.train.log_every=1", "--config.train.tensorboard=False"]


def environment(data_dir: str) -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", FLAMINGO_TINY_DATA=data_dir)


def run_to_end(workdir: str, data_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(workdir, data_dir), cwd=ROOT, env=environment(data_dir),
                          capture_output=True, text=True)


def losses(workdir: str) -> dict[int, float]:
    """The last record of each step: a killed run's steps after its last checkpoint are run again."""
    result = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                result[record["step"]] = record["loss"]
    return result


def records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def same_losses(a: dict[int, float], b: dict[int, float]) -> bool:
    return sorted(a) == sorted(b) and all(abs(a[s] - b[s]) <= 1e-6 * max(1.0, abs(b[s])) for s in a)


def last_logged_step(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = [json.loads(line).get("step", 0) for line in f if line.strip().endswith("}")]
    return max(steps, default=0)


def kill_moment(rng: random.Random) -> tuple[str, int]:
    """Where the next kill lands: while starting and compiling, inside the steps, or just after
    a checkpoint step (while its asynchronous write runs)."""
    phase = rng.choice(("compile", "step", "checkpoint"))
    if phase == "step":
        return phase, rng.randrange(1, STEPS)
    if phase == "checkpoint":
        return phase, rng.randrange(EVERY, STEPS, EVERY)
    return phase, 0


def killed_run(workdir: str, data_dir: str, kills: int, rng: random.Random, startup_s: float) -> list[dict]:
    """Starts, kills `kills` times at random moments (each chosen by phase, then found by
    watching the run's metrics), then lets it finish. Returns the kill log."""
    log = []
    for _ in range(kills):
        phase, target = kill_moment(rng)
        process = subprocess.Popen(train_command(workdir, data_dir), cwd=ROOT, env=environment(data_dir),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started, reached = time.time(), last_logged_step(workdir)
        delay = rng.uniform(1.0, startup_s) if phase == "compile" else None
        while process.poll() is None:
            now = last_logged_step(workdir)
            if (delay is not None and time.time() - started >= delay) or (delay is None and now >= max(target, reached + 1)):
                if phase != "compile":
                    time.sleep(rng.uniform(0.0, 0.3))  # land inside the step, or inside the checkpoint write
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        process.wait()
        killed = process.returncode == -signal.SIGKILL
        saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) \
            if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
        log.append({"phase": phase, "target_step": target, "after_s": round(time.time() - started, 2),
                    "killed": killed, "steps_logged": last_logged_step(workdir), "checkpoints": saved})
        if not killed:
            break  # it finished first
    final = run_to_end(workdir, data_dir)
    if final.returncode:
        raise RuntimeError(f"resuming {workdir} failed:\n{final.stderr[-3000:]}")
    return log


def damage_shards(corpus: str) -> list[str]:
    """Flips 48 bytes in the middle of one shard of each dataset and cuts another in half."""
    damaged = []
    for dataset in ("image_text", "interleaved", "video_text"):
        shards = sorted(glob.glob(os.path.join(corpus, dataset, "*.tfrecord")))
        flipped, cut = shards[0], shards[-1]
        with open(flipped, "r+b") as f:
            f.seek(os.path.getsize(flipped) // 2)
            chunk = f.read(48)
            f.seek(os.path.getsize(flipped) // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))
        with open(cut, "r+b") as f:
            f.truncate(os.path.getsize(cut) // 2)
        damaged += [flipped, cut]
    return damaged


def damage_latest_checkpoint(workdir: str) -> int:
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", str(steps[-1]), "**", "*"), recursive=True)
             if os.path.isfile(f)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    return steps[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs in all, spread over the runs")
    parser.add_argument("--kills_per_run", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=str(ROOT / "data_cache" / "synthetic-tiny"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scratch = tempfile.mkdtemp(prefix="fault-drill-")
    result = {"benchmark": "fault_drill", "machine": machine(), "steps": STEPS, "checkpoint_every": EVERY}

    started = time.time()
    baseline_dir = os.path.join(scratch, "baseline")
    baseline = run_to_end(baseline_dir, args.data_dir)  # also generates the corpus on first use
    if baseline.returncode:
        raise SystemExit(f"the uninterrupted run failed:\n{baseline.stderr[-3000:]}")
    reference = losses(baseline_dir)
    timed = os.path.join(scratch, "timing")
    t0 = time.time()
    run_to_end(timed, args.data_dir)  # with a warm compilation cache: what a restart costs
    run_s = time.time() - t0
    result["uninterrupted_run_s"] = round(run_s, 1)

    runs, kills_done, exact = [], 0, 0
    index = 0
    while kills_done < args.kills:
        workdir = os.path.join(scratch, f"killed-{index}")
        kills = min(args.kills_per_run, args.kills - kills_done)
        log = killed_run(workdir, args.data_dir, kills, rng, startup_s=max(2.0, run_s * 0.5))
        killed = sum(entry["killed"] for entry in log)
        ok = same_losses(losses(workdir), reference)
        runs.append({"workdir": workdir, "kills": log, "resumed_exactly": ok})
        kills_done += max(killed, 1)
        exact += killed if ok else 0
        index += 1
    result["kills"] = {"total": sum(sum(e["killed"] for e in r["kills"]) for r in runs), "resumed_exactly": exact,
                       "runs": runs}

    corpus = os.path.join(scratch, "damaged-corpus")
    shutil.copytree(args.data_dir, corpus)
    damaged = damage_shards(corpus)
    shard_dir = os.path.join(scratch, "damaged-shards")
    finished = run_to_end(shard_dir, corpus)
    skips = {k: v for r in records(shard_dir) for k, v in r.items() if k.startswith("skipped/")} \
        if os.path.exists(os.path.join(shard_dir, "metrics.jsonl")) else {}
    named = [path for path in damaged if os.path.basename(path) in finished.stderr]
    result["damaged_shards"] = {"files": damaged, "finished": finished.returncode == 0,
                                "steps": max(losses(shard_dir), default=0) if finished.returncode == 0 else None,
                                "skip_metrics": skips, "files_named_in_the_log": len(named)}

    checkpoint_dir = os.path.join(scratch, "damaged-checkpoint")
    shutil.copytree(baseline_dir, checkpoint_dir)
    with open(os.path.join(checkpoint_dir, "metrics.jsonl"), "w"):
        pass  # the resumed run's own losses only
    damaged_step = damage_latest_checkpoint(checkpoint_dir)
    command = train_command(checkpoint_dir, args.data_dir, steps=STEPS + EVERY)
    resumed = subprocess.run(command, cwd=ROOT, env=environment(args.data_dir), capture_output=True, text=True)
    resumed_losses = losses(checkpoint_dir) if resumed.returncode == 0 else {}
    overlap = {s: reference[s] for s in resumed_losses if s in reference}
    result["damaged_checkpoint"] = {
        "damaged_step": damaged_step, "finished": resumed.returncode == 0,
        "resumed_from": min(resumed_losses) - 1 if resumed_losses else None,
        "warned": f"checkpoint step {damaged_step}" in resumed.stderr,
        "set_aside": os.listdir(os.path.join(checkpoint_dir, "checkpoints.damaged"))
        if os.path.isdir(os.path.join(checkpoint_dir, "checkpoints.damaged")) else [],
        "losses_equal_uninterrupted": same_losses({s: resumed_losses[s] for s in overlap}, overlap)}
    result["seconds"] = round(time.time() - started, 1)
    tally = result["kills"]
    print(f"fault drill: {tally['resumed_exactly']}/{tally['total']} SIGKILLs resumed exactly; damaged shards: "
          f"{'finished' if result['damaged_shards']['finished'] else 'FAILED'}; damaged checkpoint: "
          f"{'resumed from the previous one' if result['damaged_checkpoint']['finished'] else 'FAILED'}",
          file=sys.stderr)
    emit(result, args.json)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
