"""The frozen LM: causality, relative-position invariance, grouped-query attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flamingo_jax.models.config import DecoderConfig
from flamingo_jax.models.decoder import Decoder

SMALL = DecoderConfig(vocab_size=40, dim=32, num_layers=2, num_heads=4, head_dim=8, max_len=32)
VARIANTS = {
    "chinchilla": dataclasses.replace(SMALL, positions="relative", ffw="gelu", tie_embeddings=True),
    "llama": dataclasses.replace(SMALL, positions="rotary", ffw="swiglu", tie_embeddings=False, num_kv_heads=2),
}


def forward(decoder, tokens, positions=None):
    return nnx.jit(lambda m, t, p: m(t, p))(decoder, tokens, positions)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def decoder(request):
    return Decoder(VARIANTS[request.param], rngs=nnx.Rngs(0))


def test_causal_changing_a_token_leaves_earlier_logits_unchanged(decoder):
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 40)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 40)
    a, b = forward(decoder, tokens), forward(decoder, changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert float(jnp.abs(a[:, 7:] - b[:, 7:]).max()) > 1e-3


def test_positions_are_relative(decoder):
    """Both position schemes depend only on query-key distances: shifting every
    position by a constant leaves the logits unchanged."""
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 40)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    np.testing.assert_allclose(forward(decoder, tokens, positions), forward(decoder, tokens, positions + 5),
                               atol=2e-4, rtol=2e-4)


def test_every_weight_is_frozen_and_named(decoder):
    assert not jax.tree_util.tree_leaves(nnx.state(decoder, nnx.Param))
    for path, var in nnx.to_flat_state(nnx.state(decoder)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) == var.get_value().ndim, (path, axes)


def test_grouped_query_attention_equals_mha_with_shared_kv_heads():
    gqa_cfg = dataclasses.replace(VARIANTS["llama"], num_kv_heads=2)
    mha_cfg = dataclasses.replace(VARIANTS["llama"], num_kv_heads=4)
    gqa = Decoder(gqa_cfg, rngs=nnx.Rngs(3))
    mha = Decoder(mha_cfg, rngs=nnx.Rngs(3))
    # Copy everything, duplicating each kv head for the 2 query heads that share it.
    gqa_state = nnx.state(gqa)
    mha_state = nnx.state(mha)
    targets = dict(nnx.to_flat_state(mha_state))
    for path, var in nnx.to_flat_state(gqa_state):
        value = var.get_value()
        if path[-2:] in (("key", "kernel"), ("value", "kernel")):
            value = jnp.repeat(value, 2, axis=2)  # [L, D, K, H] -> [L, D, 2K, H]
        targets[path].set_value(value)
    nnx.update(mha, mha_state)
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 40)
    np.testing.assert_allclose(forward(gqa, tokens), forward(mha, tokens), atol=1e-5, rtol=1e-5)


def test_padding_keys_are_invisible():
    decoder = Decoder(VARIANTS["chinchilla"], rngs=nnx.Rngs(4))
    tokens = jax.random.randint(jax.random.key(3), (1, 8), 0, 40)
    positions = jnp.arange(8)[None]
    valid = jnp.array([[False, False, True, True, True, True, True, True]])
    run = nnx.jit(lambda m, t, p, v: m(t, p, v))
    # Left padding: positions of the real tokens restart at 0 after the pads.
    shifted = jnp.clip(positions - 2, 0)
    padded = run(decoder, tokens, shifted, valid)
    other_pads = tokens.at[:, :2].set((tokens[:, :2] + 7) % 40)
    np.testing.assert_array_equal(padded[:, 2:], run(decoder, other_pads, shifted, valid)[:, 2:])
    unpadded = run(decoder, tokens[:, 2:], positions[:, :6], jnp.ones((1, 6), bool))
    np.testing.assert_allclose(padded[:, 2:], unpadded, atol=1e-4, rtol=1e-4)
