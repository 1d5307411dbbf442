"""Peak memory of `python -m flamingo_jax.convert vision` against the model's size.

Writes a random HF CLIP vision tower of a real shape (ViT-L/14 by default: 303M
parameters, 1.2 GB in fp32) as safetensors, then converts it in fresh processes,
one per write buffer size, and records each one's resident-memory peak above
its resident memory just before converting (imports excluded). For contrast,
the one-shot alternative: read every weight, then one `StandardCheckpointer.save`;
and one streaming run with `--compress`.

    python bench/convert_memory.py --json=bench/results/convert_memory.json
    python bench/convert_memory.py --size=B16   # ViT-B/16, 86M parameters: quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, emit, machine

SIZES = {  # width, layers, heads, MLP, patch, image
    "L14": (1024, 24, 16, 4096, 14, 224),
    "B16": (768, 12, 12, 3072, 16, 224),
}

WRITE_SOURCE = r"""
import json, sys
import numpy as np
from safetensors.numpy import save_file
width, layers, heads, mlp, patch, image = json.loads(sys.argv[2])
rng = np.random.default_rng(0)
p = "vision_model."
shapes = {p + "embeddings.patch_embedding.weight": (width, 3, patch, patch),
          p + "embeddings.class_embedding": (width,),
          p + "embeddings.position_embedding.weight": ((image // patch) ** 2 + 1, width)}
for norm in ("pre_layrnorm", "post_layernorm"):
    shapes.update({f"{p}{norm}.weight": (width,), f"{p}{norm}.bias": (width,)})
for i in range(layers):
    layer = f"{p}encoder.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes.update({layer + f"self_attn.{name}.weight": (width, width), layer + f"self_attn.{name}.bias": (width,)})
    for norm in ("layer_norm1", "layer_norm2"):
        shapes.update({layer + norm + ".weight": (width,), layer + norm + ".bias": (width,)})
    shapes.update({layer + "mlp.fc1.weight": (mlp, width), layer + "mlp.fc1.bias": (mlp,),
                   layer + "mlp.fc2.weight": (width, mlp), layer + "mlp.fc2.bias": (width,)})
save_file({name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()},
          sys.argv[1] + "/model.safetensors")
json.dump({"model_type": "clip_vision_model", "hidden_size": width, "num_hidden_layers": layers,
           "num_attention_heads": heads, "intermediate_size": mlp, "patch_size": patch, "image_size": image,
           "hidden_act": "quick_gelu"}, open(sys.argv[1] + "/config.json", "w"))
"""

# Runs in a fresh process: resident memory before converting, the peak after, wall time.
MEASURE = r"""
import json, os, sys, time
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np, orbax.checkpoint as ocp
from flamingo_jax.convert import mapping, vision
from flamingo_jax.convert.families import Options
from flamingo_jax.convert.sources import open_source

import threading

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

# Anonymous memory (the process's own arrays and buffers), sampled: file-backed pages of a
# memory-mapped source count in RSS too, but the kernel can drop them at any time.
peak_anon, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.005)
source_dir, out, mode, buffer_mb, compress = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
with open_source(source_dir) as source:  # warm the imports the conversion needs, read nothing
    vision.encoder_weights(vision.read_architecture(source, "hf_clip", Options()).vision)
before, anon_before, start = status("VmRSS"), status("RssAnon"), time.perf_counter()
threading.Thread(target=sample, daemon=True).start()
if mode == "streaming":
    vision.convert_vision(source_dir, "hf_clip", out, buffer_bytes=buffer_mb << 20, compress=compress)
else:  # every weight in memory, then one save
    with open_source(source_dir) as source:
        arch = vision.read_architecture(source, "hf_clip", Options())
        target = vision.encoder_weights(arch.vision)
        tree = {}
        for keys, array in mapping.produce(mapping.plan(arch.table, source, target, fmt="hf_clip"), source):
            node = tree
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = array
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(out, tree)
seconds = time.perf_counter() - start
done.set()
print(json.dumps({"rss_before": before, "peak": status("VmHWM"), "anon_before": anon_before,
                  "peak_anon": max(peak_anon[0], status("RssAnon")), "seconds": seconds}))
"""


def run_child(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, env=env)
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="L14")
    parser.add_argument("--buffers_mb", default="0,64", help="write buffer sizes to measure (MiB)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    width, layers, heads, mlp, patch, image = SIZES[args.size]
    mib = 1 << 20
    model_bytes = 4 * (layers * (4 * width * width + 2 * width * mlp + mlp + 9 * width)
                       + width * 3 * patch * patch + ((image // patch) ** 2 + 2) * width + 4 * width)
    largest_stacked = 4 * layers * width * mlp  # mlp/wi/kernel [L, W, MLP] (and wo)
    work = tempfile.mkdtemp(prefix="convert_memory_")
    try:
        started = time.perf_counter()
        run_child(WRITE_SOURCE, work, json.dumps(SIZES[args.size]))
        source_seconds = time.perf_counter() - started
        runs = []
        modes = [("streaming", int(b), False) for b in args.buffers_mb.split(",")]
        modes += [("streaming", 0, True), ("all_in_memory", 0, True)]
        for mode, buffer_mb, compress in modes:
            out = os.path.join(work, f"out_{mode}_{buffer_mb}_{compress}")
            measured = json.loads(run_child(MEASURE, work, out, mode, str(buffer_mb), str(int(compress))))
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)
            runs.append({"mode": mode, "buffer_mb": buffer_mb if mode == "streaming" else None, "compress": compress,
                         "written_mib": round(size / mib, 1),
                         "peak_anon_above_start_mib": round((measured["peak_anon"] - measured["anon_before"]) / mib, 1),
                         "peak_anon_over_model": round((measured["peak_anon"] - measured["anon_before"]) / model_bytes,
                                                       3),
                         "peak_rss_above_start_mib": round((measured["peak"] - measured["rss_before"]) / mib, 1),
                         "seconds": round(measured["seconds"], 2)})
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit({"benchmark": "convert_memory", "machine": machine(), "source": f"HF CLIP ViT-{args.size}, fp32 safetensors",
          "model_mib": round(model_bytes / mib, 1), "largest_stacked_weight_mib": round(largest_stacked / mib, 1),
          "source_write_seconds": round(source_seconds, 1), "runs": runs}, args.json)


if __name__ == "__main__":
    main()
