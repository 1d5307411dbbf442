"""Small shared builders for the tests (tiny shapes, fp32)."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.flamingo import Flamingo

ROOT = pathlib.Path(__file__).resolve().parent.parent


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
