"""Small shared builders for the tests (tiny shapes, fp32)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import ml_collections
import xla_flags
from flax import nnx

from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.flamingo import Flamingo

ROOT = pathlib.Path(__file__).resolve().parent.parent
# For tests whose every compared program is compiled with it (xla_flags.py says why).
FAST_COMPILE = xla_flags.FAST_OPTIONS


def load_config(name: str):
    """`configs/<name>.py`'s get_config()."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_model_config(**decoder_overrides) -> FlamingoConfig:
    """configs/tiny.py's model at 32 px, optionally with other decoder fields."""
    config = load_config("tiny")
    config.model.vision.image_size = 32
    config.model.decoder.update(**decoder_overrides)
    return FlamingoConfig.from_dict(config.model)


def set_gates(model: Flamingo, value: float) -> None:
    """Opens every tanh gate (they start at 0, which hides the visual path)."""
    model.xattn.attention_gate.set_value(jnp.full_like(model.xattn.attention_gate.get_value(), value))
    model.xattn.ffw_gate.set_value(jnp.full_like(model.xattn.ffw_gate.get_value(), value))


def random_media(key, batch: int, num_media: int, frames: int, size: int) -> jax.Array:
    return jax.random.normal(key, (batch, num_media, frames, size, size, 3))


def jit_forward(model: Flamingo):
    return nnx.jit(lambda m, tokens, media, media_index: m(tokens, media, media_index))


def preempt_after(stop_step: int):
    """A `Trainer.run(after_step=...)` that preempts the run after `stop_step`, as a TPU
    preemption does (SIGTERM: the trainer saves and returns)."""

    def after_step(step: int) -> None:
        if step == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)

    return after_step


def read_metrics(workdir) -> list[dict]:
    """A run's metrics.jsonl, one dict per logged step."""
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def train_config(corpus_dir: str, *, datasets=("image_text", "interleaved"), steps: int = 5,
                 shrink_model: bool = True):
    """configs/tiny.py on the session's synthetic corpus (32 px, the given datasets), fp32.

    With `shrink_model` the model is smaller still: a one-block ViT (it compiles far
    faster than NFNet; the encoder is irrelevant to training mechanics), a 1-layer
    Resampler and a 2-layer LM."""
    from flamingo_jax.data import synthetic

    config = load_config("tiny")
    config.model.vision.image_size = 32
    if shrink_model:
        config.model.vision.encoder = "vit"
        config.model.vision.vit.update(width=32, num_layers=1, num_heads=2, patch_size=8)
        config.model.resampler.num_layers = 1
        config.model.decoder.num_layers = 2
    data = synthetic.data_config(corpus_dir, image_size=32, interleaved_batch=4, pair_batch=4, video_batch=2,
                                 interleaved_len=32, pair_len=16, max_images=2, num_frames=2)
    data["datasets"] = [d for d in data["datasets"] if d["name"] in datasets]
    config.data = ml_collections.ConfigDict(data)
    config.synthetic.out_dir = ""
    config.train.update(steps=steps, learning_rate=1e-3, warmup_steps=0, log_every=1, tensorboard=False)
    config.checkpoint.update(every_steps=1000, keep=2, async_save=True)
    return config


def trained_logits(model: Flamingo):
    """The model's logits on one fixed interleaved input (the reload test compares them bit for bit)."""
    import numpy as np

    size = model.cfg.vision.image_size
    tokens = jax.random.randint(jax.random.key(7), (1, 24), 0, model.cfg.decoder.vocab_size)
    media = random_media(jax.random.key(8), 1, 2, 1, size)
    media_index = jnp.asarray([[-1] * 4 + [0] * 10 + [1] * 10], jnp.int32)
    return np.asarray(jit_forward(model)(model, tokens, media, media_index))


def flat_arrays(tree) -> dict:
    """{key path: numpy array} of a pytree (pure dicts of weights)."""
    import numpy as np

    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@contextlib.contextmanager
def no_compiles():
    """Asserts that the block lowers no program for XLA (every jit compile, cached on disk or not,
    lowers first): a config mistake must fail before any of the model is compiled."""
    lowered = []

    def on_duration(name, duration, **kwargs):
        if name == LOWERING_EVENT:
            lowered.append(name)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        yield lowered
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    assert not lowered, f"{len(lowered)} program(s) were lowered for compilation before the error"


LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


def count_lowerings(fn):
    """How many programs `fn()` lowers for compilation (a check that the event is seen at all)."""
    lowered = []

    def on_duration(name, duration, **kwargs):
        if name == LOWERING_EVENT:
            lowered.append(name)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    return len(lowered)


def run_convert(*argv: str) -> int:
    """`python -m flamingo_jax.convert <argv>` in-process, with the CLIs' one-line error handling: its exit status."""
    from flamingo_jax import cli as flamingo_cli
    from flamingo_jax.convert import cli

    try:
        return flamingo_cli.guard(lambda: cli.main(["flamingo_jax.convert", *argv]))
    except SystemExit as exit:
        return exit.code


def assert_nothing_written(out) -> None:
    """A refused conversion leaves neither `out` nor any hidden staging folder of it (`.<name>.*`) behind."""
    parent, name = os.path.split(str(out))
    assert not os.path.lexists(out)
    assert not [entry for entry in os.listdir(parent) if entry.startswith(f".{name}.")]


def training_texts(corpus: str) -> list[str]:
    """Every text of the corpus' training records (image-text captions, interleaved documents' text
    segments, video captions), decoded with the project's record reader."""
    import glob

    from flamingo_jax.data import formats, records

    texts = []
    for kind, field in (("image_text", "caption"), ("interleaved", "segment_text"), ("video_text", "caption")):
        for path in sorted(glob.glob(os.path.join(corpus, kind, "*.tfrecord"))):
            for record in records.read_records(path):
                texts += [value.decode() for value in formats.parse(record.data, kind)[field] if value]
    return texts
