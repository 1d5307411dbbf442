"""Generation benchmark on the REF-CPU config, beside the OpenFlamingo peer.

    python bench/generate.py --json=bench/results/generate.json \
        [--peer_python=/path/to/openflamingo-venv/bin/python] [--cache_len=2048] \
        [--positions=relative] [--layout=scanned] [--precision=bf16] [--greedy_only]

The peer's generation setting: batch 1, a 4-shot prompt with 5 images (four
`<image> 24 tokens <EOC>` shots, then `<image>` and 3 tokens: 108 tokens), xattn
gates at 1.0, greedy decoding of 20 new tokens with a KV cache, fp32.

Measured like the peer: `total` = prefill (vision encoder, Resampler, prompt)
plus 20 tokens; `prefill` = the same program run for 1 token (one compiled program
per search: its stop ids are an argument, and a call whose first token stops every
row ends after it); ms per decoded token = (total(20) - total(1)) / 19, the median
over repetitions. Beam search
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


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args) -> dict:
    """Each phase's programs are compiled from the weights' shapes before the weights exist, and
    the heap XLA compiled in is handed back to the OS (`runtime.release_free_heap`) before the
    weights are made: the order an inference server loads in, so that the peak is the weights plus
    the programs rather than the weights on top of a compiler's freed heap."""
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flamingo_jax import runtime
    from flamingo_jax.core.parts import ModelParts
    from flamingo_jax.inference import decoding
    from flamingo_jax.models import unrolled
    from flamingo_jax.models.config import FlamingoConfig

    model_config = load_config("ref_cpu").model
    model_config.decoder.positions = args.positions
    cfg = FlamingoConfig.from_dict(model_config)
    parts = ModelParts.flamingo(cfg)
    graphdefs = []

    def to_bf16(state, layer_states):
        # Frozen LM layers, xattn blocks and unembedding stored in bf16, computed in fp32: the
        # reduced-precision weights tried for decoding (see BENCHMARKS.md for why it is slower here).
        cast = lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 and a.ndim >= 2 else a
        state = jax.tree_util.tree_map_with_path(
            lambda path, a: cast(a) if "unembedding" in jax.tree_util.keystr(path) else a, state)
        return state, jax.tree.map(cast, layer_states)

    def decoding_weights(params, frozen, consume: bool):
        """(state, layer_states) as the decoding programs read them; records the graphdef."""
        model = parts.merge(params, frozen)
        model.xattn.attention_gate.set_value(jnp.full_like(model.xattn.attention_gate.get_value(), args.gate))
        model.xattn.ffw_gate.set_value(jnp.full_like(model.xattn.ffw_gate.get_value(), args.gate))
        if args.layout == "unrolled":
            graphdef, state, layer_states = unrolled.split_for_decoding(model, consume=consume)
        else:
            (graphdef, state), layer_states = nnx.split(model), None
        graphdefs.append(graphdef)
        return state, layer_states

    fp32_shapes = jax.eval_shape(lambda: decoding_weights(*parts.init(args.seed), consume=False))
    weight_shapes = jax.eval_shape(to_bf16, *fp32_shapes) if args.precision == "bf16" else fp32_shapes
    graphdef = graphdefs[0]
    if args.layout == "unrolled":
        merge = lambda state, layer_states: unrolled.UnrolledFlamingo.merge(graphdef, state, layer_states)
    else:
        merge = lambda state, layer_states: nnx.merge(graphdef, state)
    prompt = jax.device_put(gen_prompt(cfg, args.shots, args.shot_text, args.query_text, args.seed))
    prompt_len = prompt[0].shape[1]
    num_slots = max(args.cache_len or 0, prompt_len + args.new)
    vocab = cfg.decoder.vocab_size

    def never_stop(beams: int):
        # Every run decodes exactly the requested tokens, as the peer's. Greedy's stop ids are one
        # id (the first token's, to stop after it); beam search's every id (its beams differ).
        return np.full((1 if beams == 1 else vocab,), -1, np.int32)

    def program(beams: int, shapes=weight_shapes):
        def run(state, layer_states, stop_ids, tokens, media, media_index, positions, valid):
            m = merge(state, layer_states)
            context = decoding.prefill(m, tokens, media, media_index, positions, valid, num_slots)
            if beams > 1:
                return decoding.beam_search(m, context, num_beams=beams, max_new_tokens=args.new,
                                            stop_ids=stop_ids, pad_id=0)
            return decoding.decode(m, context, jax.random.key(0), max_new_tokens=args.new, stop_ids=stop_ids,
                                   pad_id=0, choose=decoding.greedy_chooser())

        started = time.perf_counter()
        options = unrolled.COMPILER_OPTIONS if args.layout == "unrolled" else None
        compiled = jax.jit(run, compiler_options=options).lower(*shapes, never_stop(beams), *prompt).compile()
        return compiled, time.perf_counter() - started

    def timed_with(compiled, weights, stop_ids):
        t = time.perf_counter()
        out = compiled(*weights, stop_ids, *prompt)
        out.tokens.block_until_ready()
        return time.perf_counter() - t, out

    searches = (("greedy", 1), ("beam3", 3))[:1 if args.greedy_only else 2]
    programs = {searches[0][0]: program(searches[0][1])}
    init = jax.jit(parts.init, static_argnums=0).lower(args.seed).compile()
    runtime.release_free_heap()
    state, layer_states = decoding_weights(*init(), consume=args.layout == "unrolled")
    del init
    if args.precision == "bf16":
        reference = (state, layer_states)
        state, layer_states = to_bf16(state, layer_states)
    runtime.release_free_heap()
    timed = lambda compiled, stop_ids: timed_with(compiled, (state, layer_states), stop_ids)

    result = {"config": "ref_cpu", "prompt_len": prompt_len, "images": args.shots + 1, "gen_batch": 1,
              "new_tokens": args.new, "xattn_gate_value": args.gate, "dtype": "float32",
              "weights": "bf16 frozen LM layers, xattn blocks, unembedding" if args.precision == "bf16" else "float32",
              "cache_slots": num_slots, "positions": args.positions, "layout": args.layout}
    for name, beams in searches:
        compiled, compile_s = programs.pop(name, None) or program(beams)
        full = never_stop(beams)
        _, out = timed(compiled, full)  # warm-up
        one = (np.asarray(out.tokens[:1, 0]) if beams == 1 else np.arange(vocab)).astype(np.int32)  # stops at once
        _, first = timed(compiled, one)
        if int(first.lengths.max()) != 1 or int(out.lengths.min()) != args.new:
            raise RuntimeError(f"{name}: the 1-token run decoded {int(first.lengths.max())} tokens and the full "
                               f"one {int(out.lengths.min())}, not 1 and {args.new}.")
        totals, firsts, decodes = [], [], []
        for _ in range(args.reps):
            t_full, out = timed(compiled, full)
            t_one, _ = timed(compiled, one)
            totals.append(t_full)
            firsts.append(t_one)
            decodes.append((t_full - t_one) / (args.new - 1) * 1e3)
        result[name] = {
            "total_s": summary(totals), "vision_plus_prefill_plus_1tok_s": summary(firsts),
            "decode_per_token_ms": summary(decodes), "compile_s": compile_s,
            "generated_ids_row0": np.asarray(out.tokens[0]).tolist(),
            "peak_rss_mib_so_far": _peak_rss_mib(),  # greedy's: the peer's setting, which runs no beam search
        }
        del compiled
    if args.precision == "bf16":
        # The prompt's next-token logits and the greedy tokens against the fp32 weights'.
        def last_logits(state, layer_states, *prompt):
            return decoding.prefill(merge(state, layer_states), *prompt, num_slots).last_logits

        ours = jax.jit(last_logits)(state, layer_states, *prompt)
        exact = jax.jit(last_logits)(*reference, *prompt)
        deviation = np.abs(np.asarray(ours) - np.asarray(exact))
        exact_tokens = timed_with(program(1, fp32_shapes)[0], reference, never_stop(1))[1].tokens[0]
        result["bf16_vs_fp32"] = {"max_abs_logit_deviation": float(deviation.max()),
                                  "mean_abs_logit_deviation": float(deviation.mean()),
                                  "logit_std": float(np.asarray(exact).std()),
                                  "greedy_tokens_agree": int((np.asarray(exact_tokens)
                                                              == np.asarray(result["greedy"]["generated_ids_row0"])).sum())}
    result["peak_rss_mib"] = _peak_rss_mib()
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
    parser.add_argument("--cache_len", type=int, default=0, help="KV cache slots (default: prompt + new tokens); "
                        "the slots after the new tokens stay free")
    parser.add_argument("--positions", choices=("rotary", "relative"), default="rotary",
                        help="the LM's positions: REF-CPU's rotary, or Chinchilla's Transformer-XL relative ones")
    parser.add_argument("--layout", choices=("unrolled", "scanned"), default="unrolled",
                        help="decoding over per-layer weights and caches (models/unrolled.py) or the scanned stacks")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the frozen weights stored in bf16 (unrolled layout only)")
    parser.add_argument("--greedy_only", action="store_true", help="skip beam search")
    parser.add_argument("--peer_python", default=None, help="python of a venv made by the peer's install.sh")
    parser.add_argument("--peer_threads", type=int, default=2, help="torch threads for the peer (match the cores "
                        "this process may use, e.g. under taskset)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.new < 2:
        parser.error("--new must be at least 2 (per-token time is total(new) - total(1)).")
    if args.precision == "bf16" and args.layout != "unrolled":
        parser.error("--precision=bf16 needs --layout=unrolled.")

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
