"""Run by test_training_multiprocess.py in subprocesses (the device count and
`jax.distributed` must be set up before JAX starts, so this cannot run inside
pytest's process). Each prints one JSON line, last on stdout, to assert on
(Gloo prints its connection lines to stdout too).

  worker PROCESS_ID PORT CORPUS WORKDIR
      one of 2 processes with 4 CPU devices each (XLA_FLAGS), joined by
      jax.distributed through a coordinator on localhost:PORT. Both train the
      same 2 steps on one 8-device mesh, each feeding its own data shard, and
      save the final checkpoint together; then both restore it, each setting
      its own saved data position into fresh pipelines (as a resume does).
  reference CORPUS WORKDIR TWO_PROCESS_WORKDIR EIGHT_DEVICE_WORKDIR
      1 process with 8 CPU devices, the same mesh and the same global batch:
      each step, process 0's local batch then process 1's, read by pipelines
      built exactly as the workers build theirs. While the workers finish, it
      runs the checks of mesh_checks.py (meshes against one device, ZeRO-1,
      a 1-device checkpoint resumed on 8, the vision encoder's split). Then it
      waits for the workers' checkpoint and restores it here, on 1 process.
"""

import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import conftest  # noqa: E402  (same JAX settings and compilation cache as the tests)

import mesh_checks  # noqa: E402
from helpers import train_config  # noqa: E402

NUM_PROCESSES = 2
STEPS = 2
BATCH_PER_PROCESS = 2
_STARTED = time.time()


def log(message: str) -> None:
    """Progress on stderr (the test shows it when a process fails or hangs)."""
    print(f"[{time.time() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def config_for(corpus_dir: str):
    """The tiny test config: image-text pairs only, 2 examples per process and step.

    The mesh is (data 1, fsdp 4, tensor 2) over the 8 devices in order, so with 2
    processes the fsdp axis crosses the process boundary: the batch *and* the
    fsdp-sharded weights are split between the processes (with data=2 each
    process would hold a whole replica of the weights and write the checkpoint alone)."""
    config = train_config(corpus_dir, datasets=("image_text",), steps=STEPS)
    config.data.datasets[0]["batch_size"] = BATCH_PER_PROCESS
    config.mesh.update(data=1, fsdp=4, tensor=2)
    config.synthetic.out_dir = corpus_dir  # present: the workers only pass prepare_synthetic_data's barrier
    return config


def trained_marker(workdir: str, process_id: int) -> str:
    return os.path.join(workdir, f"trained-{process_id}")


def local_shards(tree) -> list[list[np.ndarray]]:
    """This process's shards of every leaf (a non-fully-addressable array cannot be fetched whole)."""
    return [[np.asarray(shard.data) for shard in leaf.addressable_shards] for leaf in jax.tree.leaves(tree)]


def worker(process_id: int, port: int, corpus_dir: str, workdir: str) -> dict:
    # No persistent compilation cache here. On CPU its keys differ between processes (the topology
    # fingerprint hashed into them differs) and only process 0 writes entries, so process 0 would
    # load a program while process 1 spends a minute compiling it, and the program's first
    # cross-process collective would fail: Gloo's set-up waits only 30 s for the peer process.
    # Both compiling every program keeps them in step.
    jax.config.update("jax_enable_compilation_cache", False)
    jax.distributed.initialize(f"localhost:{port}", num_processes=NUM_PROCESSES, process_id=process_id,
                               initialization_timeout=120)
    from flamingo_jax.core import sharding
    from flamingo_jax.core.checkpoint import abstract_with_shardings, this_process_state
    from flamingo_jax.data.mixture import Mixture
    from flamingo_jax.training.trainer import Trainer

    conftest.freeze_imported_objects()
    assert (jax.process_index(), jax.process_count()) == (process_id, NUM_PROCESSES)
    assert (jax.local_device_count(), jax.device_count()) == (4, 8), jax.devices()
    log(f"process {process_id} of {NUM_PROCESSES} joined")
    # A mesh whose batch slices would span both processes (tensor=8: a replicated batch) is refused.
    try:
        sharding.check_batch_sizes({"image_text": 8}, sharding.make_mesh({"tensor": 8}), 1)
        refused_mesh = None
    except sharding.ShardingError as error:
        refused_mesh = str(error)
    log("building the trainer")
    config = config_for(corpus_dir)
    trainer = Trainer(config, workdir)
    log("training")
    result = trainer.run()
    log(f"trained: {result.losses}")
    params = trainer.last_state.params
    split = any(not leaf.is_fully_addressable for leaf in jax.tree.leaves(params))
    params = local_shards(params)
    data_state = trainer.mixture.get_state()

    # What resuming reads back (Trainer.initial_state without re-initialising the random frozen
    # weights, a compile that would slow this test down): the train state both processes wrote, and
    # *this* process's data position, set into fresh pipelines (at the start of their streams).
    state, meta = trainer.checkpointer.restore(abstract_with_shardings(trainer.abstract_state,
                                                                       trainer.state_shardings))
    restored_step = int(state.step)
    restored_equal = all(np.array_equal(a, b) for leaf_a, leaf_b in zip(local_shards(state.params), params)
                         for a, b in zip(leaf_a, leaf_b))
    fresh = Mixture.from_config(config.data, seed=config.seed)
    fresh.set_state(this_process_state(meta["data"]))
    resumed_data_state = fresh.get_state()
    fresh.close()
    log("restored")
    trainer.close()
    open(trained_marker(workdir, process_id), "w").close()
    return {
        "process_index": jax.process_index(), "losses": result.losses, "params_split_across_processes": split,
        "data_state": data_state, "resumed_data_state": resumed_data_state, "restored_step": restored_step,
        "restored_equal": restored_equal, "refused_mesh": refused_mesh,
    }


class _Concatenated:
    """One dataset's global batch in a single process: the per-process pipelines' batches, in process order
    (process 0's devices hold the first rows of the batch on this mesh, as jax.devices() is in process order)."""

    def __init__(self, pipelines):
        self.pipelines = list(pipelines)

    def __next__(self):
        batches = [next(p) for p in self.pipelines]
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    def get_state(self):
        return [p.get_state() for p in self.pipelines]

    def skip_counts(self):
        counts = [p.skip_counts() for p in self.pipelines]
        return {reason: sum(c[reason] for c in counts) for reason in counts[0]}

    def close(self):
        for p in self.pipelines:
            p.close()


def reference(corpus_dir: str, workdir: str, two_process_workdir: str, eight_device_workdir: str) -> dict:
    from flamingo_jax.core.checkpoint import Checkpointer, abstract_with_shardings
    from flamingo_jax.data.mixture import Mixture
    from flamingo_jax.training.trainer import Trainer

    conftest.freeze_imported_objects()
    assert (jax.process_count(), jax.device_count()) == (1, 8), jax.devices()
    per_process = config_for(corpus_dir)
    config = config_for(corpus_dir)
    config.data.datasets[0]["batch_size"] = NUM_PROCESSES * BATCH_PER_PROCESS  # the global batch, in one process
    trainer = Trainer(config, workdir)
    # The workers' data, exactly: each process's pipeline (its files, its seed) at the per-process batch size.
    hosts = [Mixture.from_config(per_process.data, seed=per_process.seed, process_index=i,
                                 process_count=NUM_PROCESSES) for i in range(NUM_PROCESSES)]
    weights, tokenizer, specs = trainer.mixture.weights, trainer.mixture.tokenizer, trainer.mixture.specs
    trainer.mixture.close()
    trainer.mixture = Mixture({name: _Concatenated(h.pipelines[name] for h in hosts) for name in trainer.datasets},
                              weights, tokenizer=tokenizer, specs=specs)
    log("training")
    result = trainer.run()
    log(f"trained: {result.losses}")
    params = jax.tree.map(np.asarray, trainer.last_state.params)
    data_states = [h.get_state() for h in hosts]
    mesh = {"training": mesh_checks.mesh_training(corpus_dir, eight_device_workdir)}
    log("ran the mesh training checks")
    mesh["vision_split"] = mesh_checks.vision_split()
    log("ran the vision encoder split check")

    # The checkpoint the 2 processes wrote, restored here, in 1 process, on the same mesh.
    deadline = time.time() + 600
    while not all(os.path.exists(trained_marker(two_process_workdir, i)) for i in range(NUM_PROCESSES)):
        if time.time() > deadline:
            raise TimeoutError("the 2-process run did not finish its checkpoint within 600 s")
        time.sleep(0.5)
    two = Checkpointer(os.path.join(two_process_workdir, "checkpoints"))
    restored, meta = two.restore(abstract_with_shardings(trainer.abstract_state, trainer.state_shardings))
    two.close()
    log("restored the 2-process checkpoint")
    max_diff = max(float(np.max(np.abs(np.asarray(a) - b)))
                   for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params)))
    trainer.close()
    return {
        "losses": result.losses, "data_states": data_states, "restored_step": int(restored.step),
        "restored_max_abs_diff": max_diff, "restored_meta_data": meta["data"], "mesh": mesh,
    }


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        out = worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        out = reference(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    print(json.dumps(out), flush=True)
