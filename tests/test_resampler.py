"""Perceiver Resampler: output shape, temporal embeddings, per-item independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flamingo_jax.models.config import ResamplerConfig
from flamingo_jax.models.resampler import PerceiverResampler, interpolate_frames

CFG = ResamplerConfig(num_layers=2, dim=16, num_heads=2, head_dim=8, num_latents=5)


def make(media_dim=24, frames=4):
    return PerceiverResampler(CFG, media_dim=media_dim, num_frames=frames, dtype=jnp.float32,
                              param_dtype=jnp.float32, rngs=nnx.Rngs(0))


@nnx.jit
def resample(resampler, features):
    return resampler(features)


def test_any_number_of_features_gives_num_latents_tokens_per_item():
    resampler = make()
    for frames, patches in [(1, 9), (4, 3), (7, 2)]:
        out = resample(resampler, jax.random.normal(jax.random.key(0), (2, 3, frames, patches, 24)))
        assert out.shape == (2, 3, 5, 16)


def test_media_items_are_resampled_independently():
    resampler = make()
    features = jax.random.normal(jax.random.key(1), (1, 3, 2, 4, 24))
    base = resample(resampler, features)
    changed = resample(resampler, features.at[:, 1].add(1.0))
    np.testing.assert_array_equal(base[:, [0, 2]], changed[:, [0, 2]])
    assert float(jnp.abs(base[:, 1] - changed[:, 1]).max()) > 1e-4


def test_frame_order_matters_through_temporal_embeddings():
    resampler = make()
    features = jax.random.normal(jax.random.key(2), (1, 1, 2, 4, 24))
    swapped = features[:, :, ::-1]
    assert float(jnp.abs(resample(resampler, features) - resample(resampler, swapped)).max()) > 1e-5


def test_temporal_embeddings_interpolate_beyond_training_frames():
    table = jnp.arange(8, dtype=jnp.float32)[:, None] * jnp.ones((1, 3))
    np.testing.assert_array_equal(interpolate_frames(table, 5), table[:5])
    stretched = interpolate_frames(table, 30)
    assert stretched.shape == (30, 3)
    # Linear interpolation keeps the range and is monotone along time here.
    assert float(stretched.min()) >= 0.0 and float(stretched.max()) <= 7.0
    assert bool(jnp.all(jnp.diff(stretched[:, 0]) >= 0))


@pytest.mark.parametrize("frames", [9, 30])
def test_interpolated_temporal_table_is_np_interp_of_the_learned_one(frames):
    """Frame i of `frames` sits at (i + 0.5) * F / frames - 0.5 on the F learned rows (frame
    centres stretched over the same clip), clamped to the first and last rows."""
    learned = np.asarray(jax.random.normal(jax.random.key(4), (8, 5)))
    where = (np.arange(frames) + 0.5) * 8 / frames - 0.5
    expected = np.stack([np.interp(where, np.arange(8), learned[:, d]) for d in range(5)], axis=1)
    np.testing.assert_allclose(np.asarray(interpolate_frames(jnp.asarray(learned), frames)), expected,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(expected[0], learned[0])


def test_no_projection_when_widths_match():
    assert make(media_dim=16).input_projection is None
    assert make(media_dim=24).input_projection is not None
