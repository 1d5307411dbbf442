"""When does the tiny LM learn in-context copying? Issue 12's few-shot tasks need the frozen LM to
copy a name the prompt shows (an induction head); this trains the tiny config's decoder on
copying drills (`data/repeats.py`, what the LM stage trains on: runs of random tokens, each said
twice; by default 6-15 tokens, so no fixed offset finds the copy; the loss on the second saying
only, or on both with --first_copy_loss), optionally mixed row by row with rows of the synthetic
corpus' text, and reports the second copy's NLL against the first on held-out repeats
(`--probe_len` tokens, said twice) as training goes. Induction shows as the second copy falling
far below the first (log 512 = 6.2 nats is chance). A probe longer than every training segment tests copying at offsets training never
showed, which a model that only boosts recently seen tokens fails.

    python bench/induction.py --seeds=0,1,2 --steps=3000 --json=bench/results/induction.json
    python bench/induction.py --seeds=0 --segment=10,40 --length=128 --batch=8 --probe_len=30 \
        --json=bench/results/induction_long.json
    python bench/induction.py --seeds=0 --corpus_fraction=0.5 --data_dir=data_cache/synthetic-tiny
"""

from __future__ import annotations

import argparse
import os
import time

import common

PROBES = 10


def _train(seed: int, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from flamingo_jax.core.config import RunConfig
    from flamingo_jax.data.repeats import RepeatsPipeline
    from flamingo_jax.training.objectives import make_objective

    config = common.load_config("tiny", "lm")
    run = RunConfig.from_config(config)
    parts = make_objective(run, None).parts()
    params, frozen = jax.jit(parts.init, static_argnums=0)(seed)
    vocab = run.model.decoder.vocab_size
    schedule = optax.join_schedules([optax.linear_schedule(0.0, args.lr, 20),
                                     optax.linear_schedule(args.lr, 0.0, args.steps - 20)], [20])
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
    opt_state = optimizer.init(params)

    def token_nll(params, tokens):
        model = parts.merge(params, frozen)
        hidden = model.final_hidden(tokens[:, :-1], valid=jnp.ones_like(tokens[:, :-1], bool))
        embedding = model.output_embedding()
        logits = hidden @ (embedding.T if embedding.shape[0] == vocab else embedding)
        logp = jax.nn.log_softmax(logits[..., :vocab], -1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]

    @jax.jit
    def step(params, opt_state, tokens, mask):
        loss, grads = jax.value_and_grad(lambda p: (token_nll(p, tokens) * mask).sum() / mask.sum())(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    shortest, longest = (int(v) for v in args.segment.split(","))
    drills = RepeatsPipeline("copying", 1, np.arange(10, vocab), max_len=args.length, min_run=shortest,
                             max_run=longest, bos_id=None, first_copy_loss=args.first_copy_loss, seed=seed)
    corpus = None
    if args.corpus_fraction > 0:
        from flamingo_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(os.path.join(args.data_dir, "spm.model"))
        with open(os.path.join(args.data_dir, "text.txt")) as f:
            corpus = [[i for i in tokenizer.encode(line) if i < vocab] for line in f.read().splitlines()]

    def row():
        """(tokens, scored) of length + 1: a drill row, or with --corpus_fraction a corpus row."""
        if corpus is None or rng.random() >= args.corpus_fraction:
            drill = next(drills)
            return np.concatenate([drill["tokens"][0], drill["targets"][0, -1:]]), drill["loss_mask"][0]
        ids: list[int] = []
        while len(ids) < args.length + 1:
            ids += corpus[int(rng.integers(0, len(corpus)))]
        return np.asarray(ids[:args.length + 1]), np.ones(args.length, np.float32)

    probe_rng = np.random.default_rng(10_000 + seed)
    held_out = probe_rng.integers(10, vocab, (PROBES, args.probe_len))
    probe_tokens = jnp.asarray(np.concatenate([np.ones((PROBES, 1), int), held_out, held_out], 1))
    probe = jax.jit(token_nll)
    curve, started = [], time.perf_counter()
    for i in range(args.steps):
        rows = [row() for _ in range(args.batch)]
        params, opt_state, loss = step(params, opt_state, jnp.asarray(np.stack([t for t, _ in rows])),
                                       jnp.asarray(np.stack([m for _, m in rows])))
        if (i + 1) % args.probe_every == 0 or i + 1 == args.steps:
            nll = np.asarray(probe(params, probe_tokens))
            curve.append({"step": i + 1, "train_loss": round(float(loss), 3),
                          "first_copy_nll": round(float(nll[:, :args.probe_len].mean()), 3),
                          "second_copy_nll": round(float(nll[:, args.probe_len + 1:].mean()), 3)})
            print(seed, curve[-1], flush=True)
    formed = [p["step"] for p in curve if p["second_copy_nll"] < 0.5 * p["first_copy_nll"]]
    return {"seed": seed, "curve": curve, "induction_at_step": formed[0] if formed else None,
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (the LM stage's)")
    parser.add_argument("--probe_every", type=int, default=500)
    parser.add_argument("--segment", default="6,15", help="shortest,longest random segment (tokens)")
    parser.add_argument("--length", type=int, default=64, help="tokens per training row")
    parser.add_argument("--first_copy_loss", action="store_true",
                        help="also score each run's first saying (unpredictable), as before the LM stage's drills")
    parser.add_argument("--batch", type=int, default=16, help="rows per step")
    parser.add_argument("--probe_len", type=int, default=20, help="tokens of each held-out repeat")
    parser.add_argument("--corpus_fraction", type=float, default=0.0,
                        help="share of the rows drawn from the corpus' text (needs --data_dir)")
    parser.add_argument("--data_dir", default="data_cache/synthetic-tiny")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.corpus_fraction > 0 and not os.path.exists(os.path.join(args.data_dir, "text.txt")):
        parser.error(f"--corpus_fraction needs a corpus in --data_dir ({args.data_dir}): run the main job or "
                     "python -m flamingo_jax.data.synthetic first.")
    result = {"benchmark": "induction", "machine": common.machine(), "batch": args.batch, "length": args.length,
              "segment": args.segment, "probe_len": args.probe_len, "first_copy_loss": args.first_copy_loss,
              "steps": args.steps, "lr": args.lr, "corpus_fraction": args.corpus_fraction,
              "runs": [_train(int(s), args) for s in args.seeds.split(",")]}
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
