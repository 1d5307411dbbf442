"""Input pipeline throughput: examples/s of the interleaved and image-text pipelines.

  python bench/data_throughput.py [--data_dir=DIR] [--batches=30] [--repeats=3] [--image_size=64]

Without --data_dir it first writes a synthetic corpus to a temporary folder
(`flamingo_jax.data.synthetic`). Each repeat builds a fresh pipeline, takes
`--warmup` batches (graph tracing, buffer filling), then times `--batches`
batches. Prints one JSON object: per pipeline median/min/max examples/s over
the repeats, CPU milliseconds per example (all the process's threads; steadier
than wall time on a shared machine), plus the machine, library versions and
configuration.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as bench_common  # noqa: E402  (bench/common.py, beside this script)


def _versions() -> dict:
    import numpy
    import sentencepiece

    from flamingo_jax.data._tf import tf

    return {"tensorflow": tf().__version__, "numpy": numpy.__version__, "sentencepiece": sentencepiece.__version__}


def measure(make_pipeline, batch_size: int, batches: int, warmup: int, repeats: int) -> dict:
    """Examples per second of wall time, and CPU milliseconds (all threads of this process) per
    example: the second is the cost, and varies far less on a machine shared with other work."""
    rates, cpu_ms = [], []
    for _ in range(repeats):
        pipeline = make_pipeline()
        for _ in range(warmup):
            next(pipeline)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(pipeline)
        rates.append(batches * batch_size / (time.perf_counter() - start))
        cpu_ms.append((time.process_time() - cpu_start) * 1e3 / (batches * batch_size))
        pipeline.close()

    def summary(values, digits):
        return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
                "max": round(max(values), digits)}

    return {"examples_per_s": summary(rates, 1), "cpu_ms_per_example": summary(cpu_ms, 2), "repeats": repeats,
            "batches_timed": batches}


def run(argv: list[str]) -> dict:
    from absl import flags

    from flamingo_jax.data import images, interleaved, pairs, synthetic, tokenizer

    fv = flags.FlagValues()
    flags.DEFINE_string("data_dir", None, "Corpus from flamingo_jax.data.synthetic (default: write one).",
                        flag_values=fv)
    flags.DEFINE_integer("batches", 30, "Batches timed per repeat.", flag_values=fv)
    flags.DEFINE_integer("warmup", 3, "Batches taken before timing.", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "Repeats (fresh pipeline each).", flag_values=fv)
    flags.DEFINE_integer("image_size", 64, "Model input size S.", flag_values=fv)
    flags.DEFINE_integer("interleaved_batch", 16, "Documents per batch.", flag_values=fv)
    flags.DEFINE_integer("pair_batch", 64, "Pairs per batch.", flag_values=fv)
    flags.DEFINE_integer("max_len", 256, "Interleaved L.", flag_values=fv)
    flags.DEFINE_integer("max_images", 5, "Interleaved N.", flag_values=fv)
    flags.DEFINE_integer("pair_len", 32, "Pair L.", flag_values=fv)
    flags.DEFINE_integer("corpus_examples", 600, "Pairs in the generated corpus (documents: half).",
                         flag_values=fv)
    fv(argv)

    temporary = None
    data_dir = fv.data_dir
    if data_dir is None:
        temporary = tempfile.TemporaryDirectory()
        data_dir = temporary.name
        synthetic.generate(data_dir, num_examples=fv.corpus_examples, num_videos=4, num_eval=4,
                           image_size=fv.image_size, seed=0)
    tok = tokenizer.Tokenizer(os.path.join(data_dir, "spm.model"))
    image_config = images.ImageConfig(size=fv.image_size)
    common = dict(image_config=image_config, seed=0, process_index=0, process_count=1)
    interleaved_config = interleaved.InterleavedConfig(max_len=fv.max_len, max_images=fv.max_images)
    pair_config = pairs.PairConfig(max_len=fv.pair_len)
    results = {
        "interleaved": measure(
            lambda: interleaved.InterleavedPipeline(
                os.path.join(data_dir, "interleaved", "interleaved-*"), fv.interleaved_batch, tok,
                config=interleaved_config, shuffle_buffer=256, **common),
            fv.interleaved_batch, fv.batches, fv.warmup, fv.repeats),
        "image_text": measure(
            lambda: pairs.ImageTextPipeline(
                os.path.join(data_dir, "image_text", "image_text-*"), fv.pair_batch, tok, config=pair_config,
                shuffle_buffer=1024, **common),
            fv.pair_batch, fv.batches, fv.warmup, fv.repeats),
    }
    report = {
        "benchmark": "data_throughput",
        "results": results,
        "machine": bench_common.machine(),
        "versions": _versions(),
        "config": {"image_size": fv.image_size, "interleaved_batch": fv.interleaved_batch,
                   "pair_batch": fv.pair_batch, "max_len": fv.max_len, "max_images": fv.max_images,
                   "pair_len": fv.pair_len, "training": True, "augmentation": "flip + colour jitter",
                   "data": fv.data_dir or f"synthetic, {fv.corpus_examples} pairs, seed 0",
                   "batches": fv.batches, "warmup": fv.warmup},
    }
    if temporary is not None:
        temporary.cleanup()
    return report


def main(argv: list[str]) -> int:
    print(json.dumps(run(argv), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
