"""Multi-host training, simulated: 2 processes with 4 fake CPU devices each,
joined by jax.distributed (a coordinator on localhost, Gloo collectives),
against 1 process with 8 devices on the same mesh and the same global batch;
that process also runs mesh_checks.py (meshes and ZeRO-1 against 1 device, the
vision encoder's split over 'tensor'). All in
subprocesses (device counts and jax.distributed must be set before JAX
starts), started once for the module; the script is multiprocess_training.py."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from xla_flags import with_devices

SCRIPT = pathlib.Path(__file__).with_name("multiprocess_training.py")
TIMEOUT_S = 900
# These processes compile far more than they run (the workers cannot use the persistent cache, see
# the script): they compile as fast as the rest of the suite.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_all(commands: dict[str, tuple[list[str], int]], tmp_path) -> dict[str, dict]:
    """Starts every command (name -> (argv, CPU device count)) at once; the JSON each prints last.
    If one fails or time runs out, the others are stopped and every process's stderr is shown."""
    procs, logs = {}, {}
    for name, (argv, devices) in commands.items():
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=with_devices(devices))
        logs[name] = (open(tmp_path / f"{name}.out", "w+"), open(tmp_path / f"{name}.err", "w+"))
        procs[name] = subprocess.Popen([sys.executable, str(SCRIPT), *argv], env=env, stdout=logs[name][0],
                                       stderr=logs[name][1], text=True)
    deadline = time.time() + TIMEOUT_S
    failure = None
    while failure is None and any(p.poll() is None for p in procs.values()):
        failed = [name for name, p in procs.items() if p.returncode not in (None, 0)]
        if failed:
            failure = f"{failed} exited with {[procs[n].returncode for n in failed]}"
        elif time.time() > deadline:
            failure = f"timed out after {TIMEOUT_S} s"
        else:
            time.sleep(0.5)
    if failure is None:
        failed = [name for name, p in procs.items() if p.returncode != 0]
        failure = f"{failed} exited with {[procs[n].returncode for n in failed]}" if failed else None
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    outputs = {}
    for name, (out, err) in logs.items():
        out.seek(0), err.seek(0)
        outputs[name] = (out.read(), err.read())
        out.close(), err.close()
    if failure is not None:
        report = "\n".join(f"----- {name} stderr (last 4000 characters):\n{err[-4000:]}"
                           for name, (_, err) in outputs.items())
        raise AssertionError(f"{failure}\n{report}")
    return {name: json.loads(out.strip().splitlines()[-1]) for name, (out, _) in outputs.items()}


@pytest.fixture(scope="module")
def runs(synthetic_corpus, tmp_path_factory):
    """The two workers and the 8-device reference, run together once: (their JSON, the base folder)."""
    base = tmp_path_factory.mktemp("multiprocess")
    two, one, eight = base / "two_processes", base / "one_process", base / "eight_devices"
    port = _free_port()
    results = _run_all({
        **{f"worker{i}": (["worker", str(i), str(port), synthetic_corpus, str(two)], 4) for i in range(2)},
        "reference": (["reference", synthetic_corpus, str(one), str(two), str(eight)], 8),
    }, base)
    return results, base


def test_two_processes_match_one_process_on_the_same_mesh_and_share_a_checkpoint(runs):
    results, base = runs
    two = base / "two_processes"
    workers = [results["worker0"], results["worker1"]]
    reference = results["reference"]
    assert [w["process_index"] for w in workers] == [0, 1]

    # Both processes see the same (global) losses, and they are the 1-process run's.
    assert sorted(reference["losses"]) == ["1", "2"]
    for w in workers:
        assert sorted(w["losses"]) == ["1", "2"]
        np.testing.assert_allclose([w["losses"][s] for s in "12"], [reference["losses"][s] for s in "12"],
                                   rtol=1e-5)
    assert workers[0]["losses"] == workers[1]["losses"]
    # ... on the same examples: each process read its own shard, as far as the reference read it.
    for i, w in enumerate(workers):
        states = w["data_state"]["datasets"]["image_text"], reference["data_states"][i]["datasets"]["image_text"]
        assert states[0] == states[1] and states[0]["process_index"] == i and states[0]["batches"] == 2
    # The weights really were split between the processes (so both wrote parts of the checkpoint).
    assert all(w["params_split_across_processes"] for w in workers)
    # A mesh that would put one slice of the batch on both processes is refused before any compile.
    for w in workers:
        assert w["refused_mesh"] is not None and "span devices of several processes" in w["refused_mesh"]

    # Only process 0 wrote the metrics.
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert [r["loss"] for r in records] == [workers[0]["losses"][s] for s in "12"]

    # Resuming on 2 processes: the weights come back and each process gets its own data position.
    for w in workers:
        assert w["restored_step"] == 2 and w["restored_equal"]
        assert w["resumed_data_state"] == w["data_state"]
    # The checkpoint holds every process's data position, and restores in 1 process.
    saved = reference["restored_meta_data"]
    assert [s["datasets"]["image_text"]["process_index"] for s in saved] == [0, 1]
    assert saved == [w["data_state"] for w in workers]
    assert reference["restored_step"] == 2
    assert reference["restored_max_abs_diff"] < 1e-5


def test_eight_device_mesh_matches_one_device_and_restores_a_one_device_checkpoint(runs):
    result = runs[0]["reference"]["mesh"]["training"]
    one, eight = result["one_device"], result["eight_devices"]
    assert sorted(one) == sorted(eight) == [str(s) for s in range(1, 6)]
    np.testing.assert_allclose([eight[s] for s in sorted(eight)], [one[s] for s in sorted(one)], rtol=1e-5)
    assert result["eight_max_param_diff"] < 1e-5
    # The weights really were split over the mesh (not all replicated).
    assert any("tensor" in spec or "fsdp" in spec for spec in result["param_specs"]), result["param_specs"]
    # A checkpoint written on 1 device restores onto 8 and training continues.
    assert result["restored_equal"] and result["restored_devices"] == 8
    assert sorted(result["continued"]) == ["6", "7"] and result["resumed_with_the_eight_device_program"]
    assert all(np.isfinite(v) for v in result["continued"].values())


def test_zero1_over_a_data_axis_of_3_updates_as_the_unsharded_optimizer(runs):
    result = runs[0]["reference"]["mesh"]["training"]
    one, zero1 = result["one_device"], result["zero1"]
    assert zero1["devices"] == 6 and sorted(zero1["losses"]) == sorted(one)
    np.testing.assert_allclose([zero1["losses"][s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=1e-5)
    assert zero1["max_param_diff"] < 1e-5
    # Every moment of more than one element is split over 'data'; some only after padding (3 divides
    # none of their power-of-two dimensions).
    assert zero1["moments_split_over_data"] == zero1["moments"] > 0
    assert zero1["padded_moment_shapes"] > 0


def test_vision_batch_rule_halves_each_chips_encoder_work_and_keeps_the_features(runs):
    """The frozen vision encoder's work shared over 'tensor' (the 'vision_batch' rule,
    `models.flamingo.encode_frames`) on data 2 x tensor 2."""
    result = runs[0]["reference"]["mesh"]["vision_split"]
    assert result["feature_shape"][0] == 6  # 3 frames per data shard, their rows split over 'tensor'
    assert result["max_feature_diff"] <= 1e-5 * result["feature_scale"]
    executed = result["executed_per_chip"]
    # The executed FLOPs need the TPU compiler, which the test extra installs (jax[tpu]).
    assert executed, "libtpu is not installed: pip install -e '.[test]' brings it"
    # Twice the frames, split over the 2 tensor ranks: each chip does the work of the replicated
    # encoder's half batch (unsplit it would do twice that).
    assert executed["split"] == pytest.approx(executed["replicated"], rel=0.02)
    # The split costs one gather of the features (over 'tensor'); the replicated encoder moves nothing.
    assert set(result["collectives"]["split"]) == {"all-gather"} and not result["collectives"]["replicated"]
