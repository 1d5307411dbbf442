"""The optimisation recipe and the compute settings, each against an independent reference:
the learning-rate schedule against its formula, clipping by what reaches Adam, remat policies
against no remat, and the bf16 compute path against fp32."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_inference_decoding import fast_config

from flamingo_jax.core.config import TrainConfig
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.training.optimizer import learning_rate_schedule, make_optimizer

from helpers import FAST_COMPILE, random_media, set_gates

PEAK, WARMUP, STEPS = 3e-4, 10, 50


def expected_learning_rate(step: int, schedule: str) -> float:
    """Linear warm-up from 0, then constant / linear to 0 / cosine to 0 at STEPS, written out."""
    if step < WARMUP:
        return PEAK * step / WARMUP
    t = min(step - WARMUP, STEPS - WARMUP) / (STEPS - WARMUP)
    return {"constant": PEAK, "linear": PEAK * (1 - t), "cosine": PEAK * 0.5 * (1 + math.cos(math.pi * t))}[schedule]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedule_values_at_chosen_steps(schedule):
    lr = learning_rate_schedule(TrainConfig(learning_rate=PEAK, warmup_steps=WARMUP, steps=STEPS, schedule=schedule))
    for step in (0, 1, 7, WARMUP - 1, WARMUP, WARMUP + 1, 23, (WARMUP + STEPS) // 2, STEPS - 1, STEPS, STEPS + 9):
        np.testing.assert_allclose(float(lr(step)), expected_learning_rate(step, schedule), rtol=1e-5, atol=1e-12,
                                   err_msg=f"{schedule} at step {step}")


def test_gradients_are_clipped_to_global_norm_one_before_adam():
    """Adam's first moment after one step is (1 - b1) * the gradient it was given: the gradient
    scaled to global norm 1 when its norm is above 1, the gradient itself when below."""
    config = TrainConfig(grad_clip_norm=1.0, weight_decay=0.0, learning_rate=1e-3, warmup_steps=0)
    optimizer = make_optimizer(config, exempt=())  # toy weights: no Resampler to exempt
    params = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
    rng = np.random.default_rng(0)
    direction = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    unit = optax.tree.norm(direction)
    for norm in (5.0, 0.5):
        grads = {k: jnp.asarray(g / unit * norm) for k, g in direction.items()}
        np.testing.assert_allclose(float(optax.tree.norm(grads)), norm, rtol=1e-6)
        _, state = optimizer.update(grads, optimizer.init(params), params)
        mu = state[1][0].mu
        for key in params:
            np.testing.assert_allclose(np.asarray(mu[key]), (1 - config.adam_b1) * np.asarray(grads[key]) / max(norm, 1),
                                       rtol=1e-5, atol=1e-8, err_msg=f"norm {norm}, {key}")


# ------------------------------------------------------------------ compute settings
def model_inputs(cfg):
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.decoder.vocab_size)
    media_index = jnp.asarray([[-1, -1] + [0] * 5 + [1] * 5, [0] * 6 + [1] * 6], jnp.int32)
    return tokens, random_media(jax.random.key(2), 2, 2, 1, cfg.vision.image_size), media_index


@pytest.fixture(scope="module")
def reference():
    """The fast tiny model with a 1-layer Resampler (fp32, no remat, gates open), its weights,
    and its loss gradient."""
    cfg = fast_config()
    cfg = dataclasses.replace(cfg, resampler=dataclasses.replace(cfg.resampler, num_layers=1))

    def weights():
        model = Flamingo(cfg, rngs=nnx.Rngs(0))
        set_gates(model, 0.7)
        return nnx.state(model)

    state = jax.jit(weights, compiler_options=FAST_COMPILE)()
    return cfg, state, loss_and_grad(cfg, state)


def graphdef_of(cfg):
    return nnx.graphdef(nnx.eval_shape(lambda: Flamingo(cfg, rngs=nnx.Rngs(0))))


def loss_and_grad(cfg, state):
    """Loss (a fixed random projection of the logits) and its gradient for every weight."""
    graphdef = graphdef_of(cfg)
    tokens, media, media_index = model_inputs(cfg)
    probe = jax.random.normal(jax.random.key(3), (2, 12, cfg.total_vocab))

    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens, media, media_index)
        return jnp.sum(logits.astype(jnp.float32) * probe), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(state)
    return float(value), np.asarray(logits, np.float32), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_gradients_of_no_remat(reference, policy):
    cfg, state, (value, logits, grads) = reference
    remat_cfg = dataclasses.replace(cfg, remat_policy=policy)
    graphdef = graphdef_of(remat_cfg)
    tokens, media, media_index = model_inputs(cfg)
    traced = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, media, media_index))(state))
    assert "checkpoint" in traced or "remat" in traced, f"remat_policy={policy!r} left no remat in the forward"
    remat_value, remat_logits, remat_grads = loss_and_grad(remat_cfg, state)
    np.testing.assert_allclose(remat_value, value, rtol=1e-5)
    np.testing.assert_allclose(remat_logits, logits, rtol=1e-5, atol=1e-5)
    leaves, remat_leaves = jax.tree.leaves(grads), jax.tree.leaves(remat_grads)
    assert len(leaves) == len(remat_leaves) and any(np.abs(g).max() > 0 for g in leaves)
    for g, r in zip(leaves, remat_leaves):
        np.testing.assert_allclose(r, g, rtol=1e-4, atol=1e-5 * max(np.abs(g).max(), 1e-3))


def test_bf16_compute_runs_finite_and_close_to_fp32(reference):
    """bfloat16 activations (the paper's setting): the same weights give finite logits and
    gradients within bf16's precision of the fp32 ones, and really compute in bf16 (they differ)."""
    cfg, state, (_, logits, grads) = reference
    _, bf16_logits, bf16_grads = loss_and_grad(dataclasses.replace(cfg, dtype="bfloat16"), state)
    assert np.isfinite(bf16_logits).all() and all(np.isfinite(g).all() for g in jax.tree.leaves(bf16_grads))
    assert not np.array_equal(bf16_logits, logits)
    scale = np.abs(logits).max()
    assert np.abs(bf16_logits - logits).max() <= 0.05 * scale, (np.abs(bf16_logits - logits).max(), scale)
    flat, bf16_flat = (np.concatenate([g.ravel() for g in jax.tree.leaves(t)]) for t in (grads, bf16_grads))
    cosine = flat @ bf16_flat / (np.linalg.norm(flat) * np.linalg.norm(bf16_flat))
    assert cosine > 0.99, cosine
