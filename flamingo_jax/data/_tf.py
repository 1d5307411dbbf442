"""Lazy, CPU-only TensorFlow for the input pipeline.

TensorFlow is only our data library (tf.data, TFRecord, image decoding). It is
imported on first use, not when `flamingo_jax.data` is imported, so tokenizer
and config code stays light; and it is told once, before it creates any
device, that it may not see GPUs, so it can never claim memory on the
accelerator that JAX trains on (the CPU wheel has no TPU support at all).
"""

from __future__ import annotations

import os
from typing import Any, Callable

_TF: Any = None


def tf() -> Any:
    """The `tensorflow` module, hidden from every accelerator."""
    global _TF
    if _TF is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # keep TF's C++ INFO lines out of training logs
        import tensorflow

        try:
            tensorflow.config.set_visible_devices([], "GPU")
        except RuntimeError as error:  # devices already initialised by someone else
            if tensorflow.config.list_logical_devices("GPU"):
                raise RuntimeError(
                    "TensorFlow initialised a GPU before flamingo_jax.data could hide it; the input "
                    "pipeline must not hold accelerator memory. Import flamingo_jax.data (or call "
                    "tf.config.set_visible_devices([], 'GPU')) before any other TensorFlow use."
                ) from error
        _TF = tensorflow
    return _TF


def as_written(fn: Callable) -> Callable:
    """`fn` for a tf.data transformation, traced as written rather than rewritten by AutoGraph.

    Our graph functions branch with `tf.cond`/`tf.where`, never with Python control flow on
    tensors, so AutoGraph's source-to-source rewrite buys nothing and costs about 1.6 s of every
    process's first pipeline (it re-parses each function it meets). A Python `if` on a tensor
    in such a function fails when the pipeline is built, naming the line."""
    return tf().autograph.experimental.do_not_convert(fn)
