"""Train-step benchmark on the REF-CPU config, beside the OpenFlamingo peer.

    python bench/train_step.py --json=bench/results/train_step.json \
        [--peer_python=/path/to/openflamingo-venv/bin/python]

Batch 4, sequence 256, 5 images per sequence (each chunk is `<image> text <EOC>`),
fp32, forward + backward + AdamW on the trainable weights, as the peer's
benchmark. Reports median/min/max step time, tokens/s, images/s, peak RSS, the
step's analytic FLOPs (`core.flops`, equal to the traced program's; XLA's cost
analysis counts each scanned layer stack once and is kept only for reference)
and the achieved FLOP/s as a fraction of an fp32 matmul peak measured in this
process. With --peer_python the peer's
benchmark runs first (never at the same time: 2 cores) and both land in
one JSON, with the tokens/s ratio.
"""

from __future__ import annotations

import argparse
import resource
import time

import common
from common import load_config, summary

NAME = "train_step.json"


def synthetic_batch(cfg, batch: int, seq: int, images: int, seed: int):
    """Tokens in `images` chunks '<image> text... <EOC>'; each chunk's tokens see its image."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = cfg.decoder.vocab_size
    tokens = rng.integers(0, vocab - 1, (batch, seq + 1)).astype(np.int32)
    chunk = seq // images
    starts = np.arange(images) * chunk
    media_index = np.minimum(np.arange(seq) // chunk, images - 1).astype(np.int32)
    tokens[:, starts] = vocab - 1  # an existing id stands in for the <image> marker
    tokens[:, np.minimum(starts[1:] - 1, seq)] = cfg.eoc_id
    size = cfg.vision.image_size
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": (tokens[:, 1:] != vocab - 1).astype(np.float32),
        "media": rng.standard_normal((batch, images, 1, size, size, 3)).astype(np.float32),
        "media_index": np.broadcast_to(media_index, (batch, seq)).copy(),
    }


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 FLOP/s of an n x n matmul on this machine, in this process."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best



def run_ours(args) -> dict:
    import flax
    import jax
    import numpy as np
    import optax

    from flamingo_jax.core import flops
    from flamingo_jax.core.parts import ModelParts
    from flamingo_jax.models.config import FlamingoConfig
    from flamingo_jax.training.objectives import FlamingoObjective
    from flamingo_jax.training.optimizer import make_optimizer
    from flamingo_jax.training.state import new_train_state
    from flamingo_jax.training.step import make_train_step

    config = load_config("ref_cpu")
    config.train.update(warmup_steps=0, learning_rate=1e-4)
    if args.remat_policy:
        config.model.remat_policy = args.remat_policy
    cfg = FlamingoConfig.from_dict(config.model)
    parts = ModelParts.flamingo(cfg)
    params, frozen = jax.jit(parts.init, static_argnums=0)(args.seed)
    optimizer = make_optimizer(config.train)
    state = new_train_state(params, optimizer, args.seed)
    batch = jax.device_put(synthetic_batch(cfg, args.batch, args.seq, args.images, args.seed))
    objective = FlamingoObjective.for_model(parts.cfg)
    step = jax.jit(make_train_step(objective, parts, optimizer, {"bench": 1.0}, ("bench",)), donate_argnums=(0,))
    started = time.perf_counter()
    compiled = step.lower(state, frozen, {"bench": batch}).compile()
    compile_s = time.perf_counter() - started
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    step_flops = objective.step_flops({"bench": flops.BatchShape.of(batch)}).model

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, frozen, {"bench": batch})
        loss = float(metrics["loss"])  # blocks until the step is done
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            losses.append(loss)
    peak = matmul_peak_flops()
    median = summary(times)["median"]
    tokens = args.batch * args.seq
    images = args.batch * args.images
    return {
        "config": "ref_cpu", "batch": args.batch, "seq": args.seq, "images_per_seq": args.images,
        "dtype": "float32", "warmup": args.warmup, "steps": args.steps, "compile_s": compile_s,
        "step_s": summary(times),
        "tokens_per_s": summary([tokens / t for t in times]),
        "images_per_s": summary([images / t for t in times]),
        "loss_first_last": [losses[0], losses[-1]],
        "step_flops": step_flops,
        "step_flops_xla_cost_analysis": float(cost.get("flops", 0.0)),
        "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
        "remat_policy": config.model.remat_policy,
        "achieved_flops_per_s": step_flops / median,
        "matmul_peak_flops_per_s": peak,
        "fraction_of_matmul_peak": step_flops / median / peak,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": {"trainable": sum(x.size for x in jax.tree.leaves(params)),
                   "frozen": sum(x.size for x in jax.tree.leaves(frozen))},
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "numpy": np.__version__},
    }


def run_peer(args) -> dict:
    flags = ["--mode", "train", "--batch", str(args.batch), "--seq",
               str(args.seq), "--images", str(args.images), "--warmup", str(args.warmup), "--steps",
               str(args.steps)]
    return common.run_peer(args.peer_python, flags, args.json, NAME)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--remat_policy", default=None, help="override configs/ref_cpu.py's model.remat_policy "
                        "(none, dots, dots_no_batch, full)")
    parser.add_argument("--peer_python", default=None, help="python of a venv made by the peer's install.sh")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    result = {
        "benchmark": "train_step",
        "machine": common.machine(),
    }
    # The peer runs first: a child process inherits its parent's peak-RSS mark on
    # Linux, so starting it after our (larger) process would misreport its memory.
    peer = run_peer(args) if args.peer_python else None
    result["flamingo_jax"] = run_ours(args)
    if peer is not None:
        result["openflamingo"] = peer
        ours = result["flamingo_jax"]["tokens_per_s"]["median"]
        theirs = peer.get("train", {}).get("tokens_per_s", {}).get("median")
        if theirs:
            result["tokens_per_s_ratio_vs_openflamingo"] = ours / theirs
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
