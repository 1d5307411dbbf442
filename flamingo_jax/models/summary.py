"""Parameter counts per component, from abstract shapes: nothing is allocated,
so the 80B model is counted on a laptop."""

from __future__ import annotations

from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.flamingo import Flamingo


def abstract_model(cfg: FlamingoConfig) -> Flamingo:
    """The model with `jax.ShapeDtypeStruct` leaves instead of arrays."""
    return nnx.eval_shape(lambda: Flamingo(cfg, rngs=nnx.Rngs(0)))


def param_counts(cfg: FlamingoConfig) -> dict[str, int]:
    """Scalars per component (paper Table 5's columns) plus trainable/frozen totals."""
    model = abstract_model(cfg)
    count = lambda module: layers.count_params(nnx.state(module))
    counts = {
        "frozen_lm": count(model.decoder),
        "frozen_vision": count(model.vision_encoder),
        "trainable_xattn": count(model.xattn),
        "trainable_resampler": count(model.resampler),
        "trainable_new_tokens": layers.count_params(
            [model.new_token_embedding, model.new_token_unembedding]),
    }
    counts["total"] = layers.count_params(nnx.state(model))
    trained_lm = 0 if cfg.freeze_lm else counts["frozen_lm"]  # the column keeps the paper's name
    counts["trainable"] = layers.count_params(nnx.state(model, nnx.Param)) + trained_lm
    counts["frozen"] = layers.count_params(nnx.state(model, layers.Frozen)) - trained_lm
    assert counts["trainable"] + counts["frozen"] == counts["total"]
    return counts
