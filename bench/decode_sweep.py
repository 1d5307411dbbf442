"""Greedy decode time per token on REF-CPU across cache sizes and position encodings, interleaved.

    python bench/decode_sweep.py --json=bench/results/generate_sweep.json

`bench/generate.py`'s measurement (ms per token = (total(20) - total(1)) / 19, the
prompt, gates at 1.0), but every setting is compiled first and the repetitions run
round-robin over the settings, so that a shared machine's load changes hit them all
alike: the ratios (2,048 cache slots against 256, Chinchilla's relative positions
against rotary, per-layer against scanned layers) are then from the same moments.
"""

from __future__ import annotations

import argparse
import itertools
import time

from generate import gen_prompt

import common
from common import load_config, summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_lens", default="256,2048")
    parser.add_argument("--positions", default="rotary,relative")
    parser.add_argument("--layouts", default="unrolled,scanned")
    parser.add_argument("--new", type=int, default=20)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flamingo_jax.core.parts import ModelParts
    from flamingo_jax.inference import decoding
    from flamingo_jax.models import unrolled
    from flamingo_jax.models.config import FlamingoConfig

    programs = {}
    for positions in args.positions.split(","):
        model_config = load_config("ref_cpu").model
        model_config.decoder.positions = positions
        cfg = FlamingoConfig.from_dict(model_config)
        parts = ModelParts.flamingo(cfg)
        model = parts.merge(*jax.jit(parts.init, static_argnums=0)(0))
        model.xattn.attention_gate.set_value(jnp.ones_like(model.xattn.attention_gate.get_value()))
        model.xattn.ffw_gate.set_value(jnp.ones_like(model.xattn.ffw_gate.get_value()))
        prompt = jax.device_put(gen_prompt(cfg, 4, 24, 3, 0))
        stacked = nnx.split(model)
        graphdef, state, layer_states = unrolled.split_for_decoding(model)
        for layout, cache_len in itertools.product(args.layouts.split(","), map(int, args.cache_lens.split(","))):
            if layout == "unrolled":
                weights = (state, layer_states)
                merge = lambda s, ls, graphdef=graphdef: unrolled.UnrolledFlamingo.merge(graphdef, s, ls)
                options = unrolled.COMPILER_OPTIONS
            else:
                weights = (stacked[1], None)
                merge = lambda s, ls, graphdef=stacked[0]: nnx.merge(graphdef, s)
                options = None

            def compiled(new_tokens, merge=merge, options=options, weights=weights, cache_len=cache_len,
                         prompt=prompt):
                def run(s, ls, *prompt_arrays):
                    m = merge(s, ls)
                    context = decoding.prefill(m, *prompt_arrays, cache_len)
                    return decoding.decode(m, context, jax.random.key(0), max_new_tokens=new_tokens, stop_ids=(-1,),
                                           pad_id=0, choose=decoding.greedy_chooser()).tokens

                program = jax.jit(run, compiler_options=options).lower(*weights, *prompt).compile()
                return lambda: program(*weights, *prompt).block_until_ready()

            programs[(positions, layout, cache_len)] = (compiled(args.new), compiled(1))

    def seconds(fn):
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    for full, one in programs.values():  # warm-up
        full(), one()
    decode = {key: [] for key in programs}
    for _ in range(args.reps):
        for key, (full, one) in programs.items():
            t_full, t_one = seconds(full), seconds(one)
            decode[key].append((t_full - t_one) / (args.new - 1) * 1e3)
    result = {"benchmark": "decode_sweep", "machine": common.machine(), "config": "ref_cpu", "new_tokens": args.new,
              "decode_per_token_ms": {"/".join(map(str, key)): summary(values) for key, values in decode.items()}}
    median = {key: summary(values)["median"] for key, values in decode.items()}
    lens = sorted(map(int, args.cache_lens.split(",")))
    result["ratios"] = {}
    for (positions, layout, cache_len), value in median.items():
        if cache_len != lens[0]:
            result["ratios"][f"{positions}/{layout}: {cache_len} vs {lens[0]} slots"] = value / median[
                (positions, layout, lens[0])]
        if positions != "rotary" and ("rotary", layout, cache_len) in median:
            result["ratios"][f"{positions} vs rotary, {layout}, {cache_len} slots"] = value / median[
                ("rotary", layout, cache_len)]
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
