"""The composed model: identity at init, media masking, trainable partition, scan."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.xattn import GatedCrossAttentionBlock, media_attention_mask

from helpers import jit_forward, random_media, set_gates, tiny_model_config

B, T, M = 2, 12, 3


@pytest.fixture(scope="module")
def model():
    return Flamingo(tiny_model_config(), rngs=nnx.Rngs(0))


def example(cfg, key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    tokens = jax.random.randint(k1, (B, T), 0, cfg.decoder.vocab_size)
    media = random_media(k2, B, M, 1, cfg.vision.image_size)
    # Image markers at positions 2, 5 and 9: each token sees the last image before it.
    media_index = jnp.array([[-1, -1, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]] * B, jnp.int32)
    return tokens, media, media_index


def test_init_logits_equal_the_bare_decoder_whatever_the_images(model):
    tokens, media, media_index = example(model.cfg)
    bare = nnx.jit(lambda d, t: d(t))(model.decoder, tokens)
    forward = jit_forward(model)
    vocab = model.cfg.decoder.vocab_size
    for key in (1, 2):
        other_media = random_media(jax.random.key(key), B, M, 1, model.cfg.vision.image_size)
        logits = forward(model, tokens, other_media * key, media_index)
        np.testing.assert_array_equal(logits[..., :vocab], bare)


def test_ungated_xattn_is_the_tanh_gated_one_with_its_gates_fully_open(model):
    """`xattn.gating='none'` (the paper's ablation) adds the blocks' residuals unscaled: the same
    weights with every tanh gate saturated (tanh(20) is 1.0 in float32) give the same logits, and
    unlike the gated model's at initialisation they depend on the images."""
    tokens, media, media_index = example(model.cfg)
    cfg = model.cfg
    ungated = Flamingo(dataclasses.replace(cfg, xattn=dataclasses.replace(cfg.xattn, gating="none")),
                       rngs=nnx.Rngs(0))
    opened = nnx.clone(model)
    set_gates(opened, 20.0)
    forward = nnx.jit(lambda m, t, x, i: m(t, x, i))
    np.testing.assert_allclose(forward(ungated, tokens, media, media_index),
                               forward(opened, tokens, media, media_index), rtol=1e-6, atol=1e-6)
    other = forward(ungated, tokens, media * -2.0, media_index)
    assert float(jnp.abs(other - forward(ungated, tokens, media, media_index)).max()) > 1e-4


def test_changing_an_image_leaves_every_logit_before_it_unchanged(model):
    tokens, media, media_index = example(model.cfg)
    model = nnx.clone(model)
    set_gates(model, 0.7)
    forward = jit_forward(model)
    base = forward(model, tokens, media, media_index)
    changed = forward(model, tokens, media.at[:, 2].multiply(-3.0), media_index)
    first_seen = 9  # image 2's marker
    np.testing.assert_array_equal(base[:, :first_seen], changed[:, :first_seen])
    assert float(jnp.abs(base[:, first_seen:] - changed[:, first_seen:]).max()) > 1e-4


def test_xattn_token_sees_only_its_media_item():
    dim, media_dim, R = 16, 8, 4
    block = GatedCrossAttentionBlock(dim, media_dim, num_heads=2, head_dim=8, ffw_hidden=32,
                                     activation="squared_relu", dtype=jnp.float32, param_dtype=jnp.float32,
                                     rngs=nnx.Rngs(0))
    block.attention_gate.set_value(jnp.array(1.0))  # ffw gate stays 0: the output is the xattn term alone
    y = jax.random.normal(jax.random.key(0), (1, 6, dim))
    visual = jax.random.normal(jax.random.key(1), (1, 3, R, media_dim))
    media_index = jnp.array([[-1, 0, 0, 1, 2, -1]])
    run = lambda v: block(y, block.project_media(v), media_index, 3) - y
    base = run(visual)
    np.testing.assert_array_equal(base[:, [0, 5]], 0.0)  # index -1: no visual contribution
    for changed_item in range(3):
        out = run(visual.at[:, changed_item].set(2.0 * visual[:, changed_item] + 1.0))
        sees_it = media_index[0] == changed_item
        np.testing.assert_array_equal(out[:, ~sees_it], base[:, ~sees_it])
        assert float(jnp.abs(out[:, sees_it] - base[:, sees_it]).min()) > 0


def test_media_attention_mask():
    mask = media_attention_mask(jnp.array([[1, -1, 0]]), num_media=2, tokens_per_media=2)
    np.testing.assert_array_equal(mask[0], [[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])


def test_trainable_partition_is_resampler_xattn_and_new_tokens(model):
    _, trainable, frozen = layers.split_trainable(model)
    trainable_roots = {path[0] for path, _ in nnx.to_flat_state(trainable)}
    assert trainable_roots == {"resampler", "xattn", "new_token_embedding"}  # tiny ties embeddings
    frozen_roots = {path[0] for path, _ in nnx.to_flat_state(frozen)}
    assert frozen_roots == {"vision_encoder", "decoder"}
    # Gradients exist exactly for the trainable state, and reach the gates.
    tokens, media, media_index = example(model.cfg)
    graphdef = nnx.graphdef(model)

    def loss(trainable_state):
        m = nnx.merge(graphdef, trainable_state, frozen)
        return m(tokens, media, media_index)[..., -1].mean()  # the <EOC> logit

    grads = jax.jit(jax.grad(loss))(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert float(jnp.abs(grads["xattn"]["attention_gate"][...]).sum()) > 0
    assert float(jnp.abs(grads["new_token_embedding"][...]).sum()) > 0


def test_untied_decoder_adds_a_trainable_eoc_output_row():
    model = nnx.eval_shape(lambda: Flamingo(tiny_model_config(tie_embeddings=False), rngs=nnx.Rngs(0)))
    _, trainable, _ = layers.split_trainable(model)
    roots = {path[0] for path, _ in nnx.to_flat_state(trainable)}
    assert roots == {"resampler", "xattn", "new_token_embedding", "new_token_unembedding"}


def count_equations(jaxpr) -> int:
    """Equations in a jaxpr, counting those of nested jaxprs (scan bodies, remat)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += count_equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += count_equations(sub)
    return total


def count_ops(cfg):
    """Size of the traced forward program (abstract weights: nothing is allocated)."""
    model = nnx.eval_shape(lambda: Flamingo(cfg, rngs=nnx.Rngs(0)))
    tokens, media, media_index = example(cfg)
    graphdef, state = nnx.split(model)
    fn = lambda s, t, m, i: nnx.merge(graphdef, s)(t, m, i)
    return count_equations(jax.make_jaxpr(fn)(state, tokens, media, media_index).jaxpr)


def test_depth_does_not_grow_the_program():
    shallow = tiny_model_config(num_layers=2)
    deep = tiny_model_config(num_layers=8)
    assert count_ops(shallow) == count_ops(deep)


def test_xattn_cadence_80_layers_every_7_gives_12_blocks():
    cfg = tiny_model_config(num_layers=80)
    cfg = dataclasses.replace(cfg, xattn=dataclasses.replace(cfg.xattn, every=7))
    assert cfg.num_xattn_blocks == 12
    model = nnx.eval_shape(lambda: Flamingo(cfg, rngs=nnx.Rngs(0)))
    assert model.xattn.attention_gate.shape == (12,)
    graphdef, state = nnx.split(model)
    head_xattn, head_layers, tail_xattn, tail_layers = jax.eval_shape(lambda s: nnx.merge(graphdef, s)._groups(),
                                                                      state)
    assert head_xattn["attention_gate"].shape == (11,) and tail_xattn["attention_gate"].shape == ()
    assert head_layers.shape == (11, 7) and tail_layers.shape == (3,)


def test_tail_group_runs_and_conditions_on_media():
    """7 layers with a block every 3rd: groups of 3, 3 and a tail of 1; all three blocks act."""
    cfg = tiny_model_config(num_layers=7)
    cfg = dataclasses.replace(cfg, xattn=dataclasses.replace(cfg.xattn, every=3))
    model = Flamingo(cfg, rngs=nnx.Rngs(1))
    tokens, media, media_index = example(cfg)
    bare = nnx.jit(lambda d, t: d(t))(model.decoder, tokens)
    forward = jit_forward(model)
    vocab = cfg.decoder.vocab_size
    np.testing.assert_array_equal(forward(model, tokens, media, media_index)[..., :vocab], bare)
    for block in range(3):  # opening any single block's gates changes the output
        gates = jnp.zeros((3,)).at[block].set(1.0)
        model.xattn.attention_gate.set_value(gates)
        out = forward(model, tokens, media, media_index)[..., :vocab]
        assert float(jnp.abs(out - bare).max()) > 1e-5


@pytest.mark.parametrize("frames", [1, 8, 30])
def test_images_and_videos_run(model, frames):
    """Images are one-frame videos; the tiny config trains on 8 frames and runs on 30."""
    assert model.cfg.vision.num_frames == 8
    tokens, _, media_index = example(model.cfg)
    model = nnx.clone(model)
    set_gates(model, 0.5)
    media = random_media(jax.random.key(3), B, M, frames, model.cfg.vision.image_size)
    forward = jit_forward(model)
    logits = forward(model, tokens, media, media_index)
    assert logits.shape == (B, T, model.cfg.total_vocab)
    assert bool(jnp.isfinite(logits).all())
    # The last frame counts (all `frames` frames reach the model), and only after the video's marker.
    changed = forward(model, tokens, media.at[:, 1, frames - 1].multiply(-2.0), media_index)
    marker = 5  # media item 1's first token
    np.testing.assert_array_equal(changed[:, :marker], logits[:, :marker])
    assert float(jnp.abs(changed[:, marker:] - logits[:, marker:]).max()) > 1e-4
