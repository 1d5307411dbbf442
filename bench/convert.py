"""Converting a 1B-parameter LLaMA: wall time and peak memory against the checkpoint's size.

Writes a random checkpoint of Llama-3.2-1B's shapes (1.24B parameters, bf16: 2.5 GB;
16 layers of 2048, GQA 32/8 heads, SwiGLU 8192, vocab 128,256, tied) as Hugging Face
safetensors shards, one shard at a time (so the generator never holds the model),
with its config.json. Then runs `python -m flamingo_jax.convert decoder` on it in a
child process and samples the child's memory every 10 ms: its anonymous resident
memory (its own arrays and orbax's buffers) and its peak RSS (which also counts
pages of the memory-mapped source the kernel kept resident).

    python bench/convert.py --json=bench/results/convert.json
    python bench/convert.py --layers=4   # a quicker, smaller run of the same shapes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import ml_dtypes
import numpy as np

from common import ROOT, emit, machine

# Llama-3.2-1B's config.json (the fields that shape the weights and the rotary embedding).
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
              intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
              head_dim=64, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
              rope_theta=500000.0, tie_word_embeddings=True, torch_dtype="bfloat16",
              rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192))
LAYERS_PER_SHARD = 4


def layer_shapes(c: dict, i: int) -> dict[str, tuple[int, ...]]:
    d, f, dh = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * dh, c["num_key_value_heads"] * dh
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}


def write_checkpoint(directory: str, c: dict) -> dict:
    """Shards of random bf16 tensors plus model.safetensors.index.json and config.json; returns sizes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    groups = [{"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]),
               "model.norm.weight": (c["hidden_size"],)}]
    for start in range(0, c["num_hidden_layers"], LAYERS_PER_SHARD):
        group = {}
        for i in range(start, min(start + LAYERS_PER_SHARD, c["num_hidden_layers"])):
            group.update(layer_shapes(c, i))
        groups.append(group)
    weight_map, total, largest, params = {}, 0, 0, 0
    for index, group in enumerate(groups):
        name = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {key: (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
                   for key, shape in group.items()}
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        for key, array in tensors.items():
            weight_map[key] = name
            total += array.nbytes
            largest = max(largest, array.nbytes)
            params += array.size
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(c, f)
    return {"parameters": params, "bytes": total, "largest_tensor_bytes": largest, "shards": len(groups)}


def status(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return 0


def convert(source: str, out: str, buffer_mb: int) -> dict:
    """Runs the converter CLI in a child; its wall time, peak RSS and sampled peak anonymous memory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "flamingo_jax.convert", "decoder", f"--from={source}", f"--out={out}",
               f"--buffer_mb={buffer_mb}"]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status(child.pid, "RssAnon"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = child.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"conversion failed ({child.returncode}):\n{stderr[-4000:]}")
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return {"seconds": seconds, "peak_rss": peak_rss, "peak_anon": peak_anon[0], "command": " ".join(command[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    parser.add_argument("--buffer_mb", type=int, default=64)
    parser.add_argument("--workdir", default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = {**CONFIG, "num_hidden_layers": args.layers}
    work = tempfile.mkdtemp(prefix="convert_bench_", dir=args.workdir)
    mib = 1 << 20
    try:
        source = os.path.join(work, "llama")
        os.makedirs(source)
        started = time.perf_counter()
        sizes = write_checkpoint(source, config)
        write_seconds = time.perf_counter() - started
        out = os.path.join(work, "converted")
        measured = convert(source, out, args.buffer_mb)
        written = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # The largest weight the writer holds: a stacked one ([layers, ...] of one tensor per layer) or the embedding.
    largest_stacked = max(sizes["largest_tensor_bytes"],
                          2 * args.layers * config["intermediate_size"] * config["hidden_size"])
    emit({"benchmark": "convert", "machine": machine(),
          "source": f"random Llama-3.2-1B-shaped checkpoint, {args.layers} layers, bf16 safetensors, "
                    f"{sizes['shards']} shards",
          "parameters": sizes["parameters"], "checkpoint_mib": round(sizes["bytes"] / mib, 1),
          "largest_tensor_mib": round(sizes["largest_tensor_bytes"] / mib, 1),
          "largest_stacked_weight_mib": round(largest_stacked / mib, 1),
          "written_mib": round(written / mib, 1), "buffer_mb": args.buffer_mb,
          "seconds": round(measured["seconds"], 1), "source_write_seconds": round(write_seconds, 1),
          "peak_rss_mib": round(measured["peak_rss"] / mib, 1),
          "peak_anon_mib": round(measured["peak_anon"] / mib, 1),
          "peak_rss_over_checkpoint": round(measured["peak_rss"] / sizes["bytes"], 3),
          "peak_anon_over_checkpoint": round(measured["peak_anon"] / sizes["bytes"], 3),
          "command": f"python {measured['command']}"}, args.json)


if __name__ == "__main__":
    main()
