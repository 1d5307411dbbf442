"""Generation benchmark on the REF-CPU config, beside the OpenFlamingo peer.

    python bench/generate.py --json=bench/results/generate.json \
        [--peer_python=/path/to/openflamingo-venv/bin/python]

The peer's generation setting: batch 1, a 4-shot prompt with 5 images (four
`<image> 24 tokens <EOC>` shots, then `<image>` and 3 tokens: 108 tokens), xattn
gates at 1.0, greedy decoding of 20 new tokens with a KV cache, fp32.

Measured like the peer: `total` = prefill (vision encoder, Resampler, prompt)
plus 20 tokens; `prefill` = the same program run for 1 token; ms per decoded
token = (total(20) - total(1)) / 19, the median over repetitions. Beam search
(beam 3), the paper's evaluation decoding, is reported beside it. The peer
runs first, in its own process (a child inherits its parent's peak-RSS mark).
"""

from __future__ import annotations

import argparse
import resource
import time

import common
from common import load_config, summary

NAME = "generate.json"


def gen_prompt(cfg, shots: int, shot_text: int, query_text: int, seed: int):
    """The peer's prompt layout; random text ids, a stand-in id for the <image> marker."""
    import numpy as np

    rng = np.random.default_rng(seed)
    marker, ids, media_index = cfg.decoder.vocab_size - 1, [], []
    for shot in range(shots + 1):
        text = shot_text if shot < shots else query_text
        ids += [marker] + rng.integers(0, cfg.decoder.vocab_size - 1, text).tolist()
        media_index += [shot] * (text + 1)
        if shot < shots:
            ids.append(cfg.eoc_id)
            media_index.append(shot)
    tokens = np.asarray([ids], np.int32)
    size = cfg.vision.image_size
    media = rng.standard_normal((1, shots + 1, 1, size, size, 3)).astype(np.float32)
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
    return tokens, media, np.asarray([media_index], np.int32), positions, np.ones(tokens.shape, bool)


def run_ours(args) -> dict:
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flamingo_jax.core.parts import ModelParts
    from flamingo_jax.inference import decoding
    from flamingo_jax.models.config import FlamingoConfig

    cfg = FlamingoConfig.from_dict(load_config("ref_cpu").model)
    parts = ModelParts.flamingo(cfg)
    params, frozen = jax.jit(parts.init, static_argnums=0)(args.seed)
    model = parts.merge(params, frozen)
    model.xattn.attention_gate.set_value(jnp.full_like(model.xattn.attention_gate.get_value(), args.gate))
    model.xattn.ffw_gate.set_value(jnp.full_like(model.xattn.ffw_gate.get_value(), args.gate))
    graphdef, state = nnx.split(model)
    del params, frozen
    prompt = jax.device_put(gen_prompt(cfg, args.shots, args.shot_text, args.query_text, args.seed))
    prompt_len = prompt[0].shape[1]
    stop = (-1,)  # never stop early: every run decodes exactly the requested tokens, as the peer's

    def program(new_tokens: int, beams: int):
        def run(state, tokens, media, media_index, positions, valid):
            m = nnx.merge(graphdef, state)
            context = decoding.prefill(m, tokens, media, media_index, positions, valid, prompt_len + new_tokens)
            if beams > 1:
                return decoding.beam_search(m, context, num_beams=beams, max_new_tokens=new_tokens,
                                            stop_ids=stop, pad_id=0)
            return decoding.decode(m, context, jax.random.key(0), max_new_tokens=new_tokens, stop_ids=stop,
                                   pad_id=0, choose=decoding.greedy_chooser())

        started = time.perf_counter()
        compiled = jax.jit(run).lower(state, *prompt).compile()
        return compiled, time.perf_counter() - started

    def timed(compiled):
        t = time.perf_counter()
        out = compiled(state, *prompt)
        out.tokens.block_until_ready()
        return time.perf_counter() - t, out

    result = {"config": "ref_cpu", "prompt_len": prompt_len, "images": args.shots + 1, "gen_batch": 1,
              "new_tokens": args.new, "xattn_gate_value": args.gate, "dtype": "float32"}
    for name, beams in (("greedy", 1), ("beam3", 3)):
        full, compile_full = program(args.new, beams)
        one, compile_one = program(1, beams)
        timed(full), timed(one)  # warm-up
        totals, firsts, decodes = [], [], []
        for _ in range(args.reps):
            t_full, out = timed(full)
            t_one, _ = timed(one)
            totals.append(t_full)
            firsts.append(t_one)
            decodes.append((t_full - t_one) / (args.new - 1) * 1e3)
        result[name] = {
            "total_s": summary(totals), "vision_plus_prefill_plus_1tok_s": summary(firsts),
            "decode_per_token_ms": summary(decodes), "compile_s": compile_full + compile_one,
            "generated_ids_row0": np.asarray(out.tokens[0]).tolist(),
        }
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["versions"] = {"jax": jax.__version__, "flax": flax.__version__}
    return result


def run_peer(args) -> dict:
    flags = ["--mode", "gen", "--gen-shots", str(args.shots),
               "--gen-shot-text", str(args.shot_text), "--gen-query-text", str(args.query_text),
               "--gen-new", str(args.new), "--gen-reps", str(args.reps), "--gen-gate", str(args.gate),
               "--threads", str(args.peer_threads)]
    return common.run_peer(args.peer_python, flags, args.json, NAME)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--shot_text", type=int, default=24)
    parser.add_argument("--query_text", type=int, default=3)
    parser.add_argument("--new", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gate", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer_python", default=None, help="python of a venv made by the peer's install.sh")
    parser.add_argument("--peer_threads", type=int, default=2, help="torch threads for the peer (match the cores "
                        "this process may use, e.g. under taskset)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.new < 2:
        parser.error("--new must be at least 2 (per-token time is total(new) - total(1)).")

    result = {
        "benchmark": "generate",
        "machine": common.machine(),
    }
    peer = run_peer(args) if args.peer_python else None
    result["flamingo_jax"] = run_ours(args)
    if peer is not None:
        result["openflamingo"] = peer
        gen = peer.get("gen", peer)
        theirs = gen.get("decode_per_token_ms", {}).get("median")
        if theirs:
            ours = result["flamingo_jax"]["greedy"]["decode_per_token_ms"]["median"]
            result["decode_speedup_vs_openflamingo"] = theirs / ours
            result["prefill_speedup_vs_openflamingo"] = (
                gen["vision_plus_prefill_plus_1tok_s"]["median"]
                / result["flamingo_jax"]["greedy"]["vision_plus_prefill_plus_1tok_s"]["median"])
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
