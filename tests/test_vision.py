"""Frozen vision encoders: NFNet-F (paper's) and a CLIP-style ViT."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.config import NFNET_VARIANTS, NFNetConfig, ViTConfig
from flamingo_jax.models.nfnet import NFNet, NFStage, WSConv2D
from flamingo_jax.models.vit import ViT

TINY = NFNET_VARIANTS["tiny"]
SMALL_VIT = ViTConfig(width=32, num_layers=2, num_heads=4, patch_size=8)


@pytest.fixture(scope="module")
def nfnet():
    return NFNet(NFNetConfig(variant="tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def nfnet_run(nfnet):
    """(features before the final conv, output tokens) for white-noise 64 px images."""
    images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    return nnx.jit(lambda m, x: (m.features(x), m(x)))(nfnet, images)


@pytest.fixture(scope="module")
def vit():
    return ViT(SMALL_VIT, 32, rngs=nnx.Rngs(0))


def forward(model, images):
    return nnx.jit(lambda m, x: m(x))(model, images)


def abstract_forward(abstract_model, image_shape):
    """Output shape of a model built by `nnx.eval_shape` (nothing allocated)."""
    graphdef, state = nnx.split(abstract_model)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          jax.ShapeDtypeStruct(image_shape, jnp.float32)).shape


def count_ops(abstract_model, image_shape):
    """Ops in the lowered forward of an abstract model (nothing allocated or compiled)."""
    graphdef, state = nnx.split(abstract_model)
    fn = lambda s, x: nnx.merge(graphdef, s)(x)
    text = jax.jit(fn).lower(state, jax.ShapeDtypeStruct(image_shape, jnp.float32)).as_text()
    return sum(1 for line in text.splitlines() if " = " in line)


def assert_frozen_and_named(model):
    assert not jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    flat = nnx.to_flat_state(nnx.state(model))
    assert flat
    for path, var in flat:
        assert isinstance(var, layers.Frozen), path
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.get_value().ndim, (path, axes)


# ------------------------------------------------------------------ NFNet


def test_nfnet_tiny_output_shape_and_finite(nfnet, nfnet_run):
    features, out = nfnet_run
    assert nfnet.out_dim == 2 * TINY.widths[-1]
    assert features.shape == (4, 2, 2, TINY.widths[-1])
    assert out.shape == (4, (64 // 32) ** 2, nfnet.out_dim)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_nfnet_without_final_conv_returns_last_stage_width():
    model = nnx.eval_shape(lambda: NFNet(NFNetConfig(variant="tiny", final_conv=False), rngs=nnx.Rngs(0)))
    assert model.out_dim == TINY.widths[-1]
    assert abstract_forward(model, (1, 96, 64, 3)) == (1, 3 * 2, TINY.widths[-1])


def nfnet_param_count(variant):
    model = nnx.eval_shape(lambda: NFNet(NFNetConfig(variant=variant), rngs=nnx.Rngs(0)))
    return layers.count_params(nnx.state(model))


def test_nfnet_f6_param_count_matches_the_paper():
    # Published F6: 438.4M including the 3072 x 1000 classifier (and its bias).
    assert abs(nfnet_param_count("F6") - 435e6) / 435e6 < 0.02


def test_nfnet_f0_param_count_matches_the_paper():
    published_without_classifier = 71.5e6 - (3072 * 1000 + 1000)
    assert abs(nfnet_param_count("F0") - published_without_classifier) / published_without_classifier < 0.02


def test_f_variant_depths():
    for multiplier, name in enumerate(["F0", "F1", "F2", "F3", "F4", "F5", "F6", "F7"], start=1):
        spec = NFNET_VARIANTS[name]
        assert spec.widths == (256, 512, 1536, 1536)
        assert spec.depths == tuple(multiplier * d for d in (1, 2, 6, 3))
    assert NFNET_VARIANTS["F6"].depths == (7, 14, 42, 21)


def test_ws_conv_kernel_is_standardised_per_output_channel():
    conv = WSConv2D(12, 6, 3, groups=3, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    # Arbitrary weights with a per-channel offset and scale: standardisation removes both.
    raw = jax.random.normal(jax.random.key(1), conv.kernel.shape) * jnp.arange(1.0, 7.0) + jnp.arange(6.0)
    conv.kernel.set_value(raw)
    w = conv.standardized_kernel()
    fan_in = 3 * 3 * 12 // 3
    np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(w.var(axis=(0, 1, 2)) * fan_in, 1.0, rtol=1e-4)
    # The learned gain scales each output channel.
    conv.gain.set_value(jnp.arange(1.0, 7.0))
    np.testing.assert_allclose(conv.standardized_kernel(), w * jnp.arange(1.0, 7.0), rtol=1e-5, atol=1e-6)


def test_ws_conv_1x1_runs_as_a_matmul_and_equals_the_convolution():
    """1x1 stride-1 convs are matmuls over channels (the TPU compiler pads a conv's width to its
    tile, a matmul nothing); the result is the convolution's."""
    conv = WSConv2D(12, 6, 1, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    conv.bias.set_value(jnp.arange(6.0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 7, 12))
    reference = jax.lax.conv_general_dilated(x, conv.standardized_kernel(), (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")) + jnp.arange(6.0)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(conv)(x))
    np.testing.assert_allclose(conv(x), reference, rtol=1e-5, atol=1e-5)


def test_beta_follows_the_expected_variance_schedule():
    alpha = TINY.alpha
    spec = dataclasses.replace(TINY, depths=(2, 3, 1, 4))
    expected = [
        (1.0, 1 / math.sqrt(1 + alpha**2)),
        (1 / math.sqrt(1 + 2 * alpha**2), 1 / math.sqrt(1 + alpha**2), 1 / math.sqrt(1 + 2 * alpha**2)),
        (1 / math.sqrt(1 + 3 * alpha**2),),  # variance reset at every transition block
        (1 / math.sqrt(1 + alpha**2),) + tuple(1 / math.sqrt(1 + k * alpha**2) for k in (1, 2, 3)),
    ]
    for got, want in zip(spec.stage_betas(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_signal_propagation_beta_normalises_each_residual_input():
    """With skip gains at 1 (at init they are 0 and every block is the identity),
    the residual stream's std grows by alpha^2 per block in variance, and
    beta * std(block input) stays ~1: a wrong alpha or beta breaks this."""
    depth = 6
    spec = dataclasses.replace(TINY, widths=(16, 16), depths=(1, depth), strides=(1, 1))
    betas = spec.stage_betas()[1]
    stage = NFStage(8, 16, depth=depth, stride=1, betas=betas, spec=spec, dtype=jnp.float32,
                    param_dtype=jnp.float32, rngs=nnx.Rngs(2))
    for path, var in nnx.to_flat_state(nnx.state(stage)):
        if path[-1] == "skip_gain":
            var.set_value(jnp.ones_like(var.get_value()))

    def block_input_stds(stage, x):
        stds = [x.std()]
        x = stage.transition(x, stage.betas[0])
        graphdef, state = nnx.split(stage.blocks)
        for k in range(depth - 1):
            stds.append(x.std())
            x = nnx.merge(graphdef, jax.tree.map(lambda a: a[k], state))(x, stage.betas[k + 1])
        return jnp.stack(stds)

    x = jax.random.normal(jax.random.key(3), (8, 16, 16, 8)) / betas[0]
    stds = nnx.jit(block_input_stds)(stage, x)
    np.testing.assert_allclose(stds * jnp.asarray(betas), 1.0, rtol=0.1)


def test_beta_scales_the_block_input(nfnet):
    """At init (skip gain 0) a transition block is its 1x1 shortcut conv of
    beta * act(x), with a zero bias: linear in beta."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, TINY.widths[0]))
    half, one = nnx.jit(lambda b, x: (b(x, 0.5), b(x, 1.0)))(nfnet.stages[1].transition, x)
    assert half.shape == (2, 4, 4, TINY.widths[1])
    np.testing.assert_allclose(half, 0.5 * one, rtol=1e-5, atol=1e-6)


def test_signal_propagation_output_scale(nfnet_run):
    """The randomly initialised network neither explodes nor collapses. Each
    stride-2 transition averages away 3/4 of the variance of a spatially white
    input, so the tiny net at 64 px ends near 0.1 by design (not 1)."""
    features, out = nfnet_run
    assert 0.03 < float(features.std()) < 3.0
    assert 0.03 < float(out.std()) < 3.0


def test_nfnet_depth_does_not_grow_the_program():
    def ops(depth):
        # Stage 3 scans 2 blocks, a length that stage 2's stack (1 or 4) never has: stacks
        # of equal shape share lowered helper functions, which would skew the count.
        spec = dataclasses.replace(TINY, depths=(1, depth, 3, 1))
        model = nnx.eval_shape(lambda: NFNet(NFNetConfig(variant="tiny"), spec=spec, rngs=nnx.Rngs(0)))
        return count_ops(model, (1, 32, 32, 3))

    assert ops(2) == ops(5)


def test_nfnet_variables_are_frozen_and_named(nfnet):
    assert_frozen_and_named(nfnet)


# ------------------------------------------------------------------ ViT


def test_vit_output_shape(vit):
    out = forward(vit, jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))
    assert vit.out_dim == SMALL_VIT.width
    assert out.shape == (2, (32 // 8) ** 2, SMALL_VIT.width)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_vit_patch_embedding_equals_clip_strided_conv(vit):
    """The flattened-patch Dense is CLIP's conv1 (kernel = stride = patch, no bias)."""
    images = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
    dense = vit.patch_embed(vit.patchify(images))  # [1, 16, W]
    conv = jax.lax.conv_general_dilated(images, vit.patch_embed.kernel[...], (8, 8), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [1, 4, 4, W]
    np.testing.assert_allclose(dense, conv.reshape(1, 16, -1), atol=1e-5, rtol=1e-5)


def test_vit_variables_are_frozen_and_named(vit):
    assert_frozen_and_named(vit)


def test_vit_depth_does_not_grow_the_program():
    def ops(num_layers):
        cfg = dataclasses.replace(SMALL_VIT, num_layers=num_layers)
        return count_ops(nnx.eval_shape(lambda: ViT(cfg, 32, rngs=nnx.Rngs(0))), (1, 32, 32, 3))

    assert ops(2) == ops(5)


def test_vit_quick_gelu_and_no_class_token():
    cfg = dataclasses.replace(SMALL_VIT, activation="quick_gelu", include_class_token=False)
    model = nnx.eval_shape(lambda: ViT(cfg, 32, rngs=nnx.Rngs(0)))
    assert model.positional_embedding.shape == (16, SMALL_VIT.width)
    assert abstract_forward(model, (2, 32, 32, 3)) == (2, 16, SMALL_VIT.width)
