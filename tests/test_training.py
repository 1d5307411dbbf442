"""Training: the loss falls, frozen weights stay put, accumulation is exact,
bad setups fail before compiling, and preemption + resume is exact."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flamingo_jax.core import backbones
from flamingo_jax.core.backbones import BackboneError
from flamingo_jax.core.config import RunConfig, TrainConfig
from flamingo_jax.core.parts import ModelParts
from flamingo_jax.core.sharding import ShardingError
from flamingo_jax.data.mixture import Mixture
from flamingo_jax.models.config import ConfigError, FlamingoConfig
from flamingo_jax.training.loss import nll_sum, unembedded_nll_sum
from flamingo_jax.training.objectives import ContrastiveObjective, FlamingoObjective, LanguageModelObjective
from flamingo_jax.training.optimizer import WeightDecayExemptError, leaf_name, make_optimizer, weight_decay_mask
from flamingo_jax.training.state import new_train_state
from flamingo_jax.training.step import make_train_step
from flamingo_jax.training.trainer import Trainer

from helpers import count_lowerings, load_config, no_compiles, preempt_after, train_config


def fixed_batches(config, num_batches=2):
    """The model parts, its initial weights and a few fixed batches for `config`."""
    parts = ModelParts.flamingo(FlamingoConfig.from_dict(config.model))
    params, frozen = jax.jit(parts.init, static_argnums=0)(0)
    mixture = Mixture.from_config(config.data, seed=0)
    batches = [next(mixture) for _ in range(num_batches)]
    mixture.close()
    return config, parts, params, frozen, batches


@pytest.fixture(scope="module")
def setup(synthetic_corpus):
    return fixed_batches(train_config(synthetic_corpus))


@pytest.fixture(scope="module")
def tiny_setup(synthetic_corpus):
    """configs/tiny.py's own model (NFNet, 4-layer LM) on image-text batches."""
    return fixed_batches(train_config(synthetic_corpus, datasets=("image_text",), shrink_model=False))


def run_steps(config, parts, params, frozen, batches, num_steps, datasets, weights, microbatches=1):
    optimizer = make_optimizer(config.train)
    objective = FlamingoObjective.for_model(parts.cfg)
    step = jax.jit(make_train_step(objective, parts, optimizer, weights, datasets, microbatches))
    state = new_train_state(params, optimizer, 0)
    losses = []
    for i in range(num_steps):
        state, metrics = step(state, frozen, batches[i % len(batches)])
        losses.append(float(metrics["loss"]))
    return state, losses


def test_loss_falls_and_only_trainable_weights_move(tiny_setup):
    config, parts, params, frozen, batches = tiny_setup
    assert config.model.vision.encoder == "nfnet" and config.model.decoder.num_layers == 4
    frozen_before = jax.tree.map(np.array, frozen)
    state, losses = run_steps(config, parts, params, frozen, batches, 30, ("image_text",), {"image_text": 1.0})
    # Two alternating batches: compare like with like (first pair vs last pair), in nats.
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.5, losses
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.params, params)
    assert moved["xattn"]["attention_gate"] and moved["xattn"]["ffw_gate"]
    assert moved["new_token_embedding"]
    assert all(jax.tree.leaves(moved["resampler"]))
    # Optimizer state exists for trainable weights only.
    mu = state.opt_state[1][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(params)


def test_accumulated_update_equals_update_of_the_weighted_sum(setup):
    config, parts, params, frozen, batches = setup
    weights = {"image_text": 0.2, "interleaved": 1.0}
    datasets = ("image_text", "interleaved")
    state, _ = run_steps(config, parts, params, frozen, batches, 1, datasets, weights)

    def weighted_sum(p):
        total = 0.0
        for name in datasets:
            b = batches[0][name]
            logits = parts.merge(p, frozen)(b["tokens"], b["media"], b["media_index"])
            total += weights[name] * nll_sum(logits, b["targets"], b["loss_mask"]) / b["loss_mask"].sum()
        return total

    grads = jax.jit(jax.grad(weighted_sum))(params)
    optimizer = make_optimizer(config.train)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    expected = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(state.params, expected, rtol=1e-5, atol=1e-6)

    # Splitting each dataset's batch into micro-batches changes nothing either.
    micro, _ = run_steps(config, parts, params, frozen, batches, 1, datasets, weights, microbatches=2)
    chex.assert_trees_all_close(micro.params, state.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_the_loss_from_hidden_states_equals_the_loss_of_the_concatenated_logits(dtype, tolerance):
    """Value and gradients (hidden states and every vocabulary block) of the fused NLL equal
    nll_sum's over the concatenated logits; targets fall in both blocks, some masked out."""
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (2, 5, 8)).astype(dtype)
    blocks = (jax.random.normal(keys[1], (8, 11)).astype(dtype), jax.random.normal(keys[2], (8, 3)).astype(dtype))
    targets = jax.random.randint(keys[3], (2, 5), 0, 14).at[0, :3].set(jnp.asarray([11, 13, 0]))
    mask = np.ones((2, 5), np.float32)
    mask[1, 2:] = 0

    def reference(h, ws):
        logits = jnp.concatenate([jnp.dot(h, w, preferred_element_type=jnp.float32) for w in ws], axis=-1)
        return nll_sum(logits, targets, mask)

    fused = lambda h, ws: unembedded_nll_sum(h, ws, targets, mask)
    (value, grads), (expected_value, expected_grads) = (
        jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden, blocks) for f in (fused, reference))
    np.testing.assert_allclose(value, expected_value, rtol=tolerance)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=tolerance, atol=tolerance)
    # The masked-out positions contribute nothing: their hidden states get no gradient.
    assert not np.any(np.asarray(grads[0][1, 2:], np.float32))


@pytest.fixture(scope="module")
def tiny_trainable():
    """configs/tiny.py's trainable tree, abstract (nothing compiled), and its leaves' '/'-paths."""
    params = ModelParts.flamingo(FlamingoConfig.from_dict(load_config("tiny").model)).abstract()[0]
    return params, [leaf_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def exempt_leaves(params, exempt) -> set[str]:
    mask = weight_decay_mask(params, exempt)
    return {leaf_name(path) for path, decayed in jax.tree_util.tree_leaves_with_path(mask) if not decayed}


def test_no_weight_decay_on_the_resampler(tiny_trainable):
    params, names = tiny_trainable
    resampler = {name for name in names if name.startswith("resampler/")}
    assert len(resampler) >= 10 and "resampler/latents" in resampler
    assert exempt_leaves(params, TrainConfig().weight_decay_exempt) == resampler  # the default: the paper's


def test_weight_decay_exempt_takes_path_patterns(tiny_trainable):
    params, names = tiny_trainable
    gates = {"xattn/attention_gate", "xattn/ffw_gate"}
    norms = {name for name in names if name.rsplit("/", 1)[0].endswith("_norm")}
    assert {"xattn/attention_norm/scale", "resampler/final_norm/bias", "resampler/layers/media_norm/scale"} <= norms
    assert exempt_leaves(params, ("*gate*", "*norm*")) == gates | norms
    # a prefix names a subtree, cut only at '/': 'xattn/ffw' is not 'xattn/ffw_gate' nor 'xattn/ffw_norm'
    assert exempt_leaves(params, ("xattn/ffw",)) == {"xattn/ffw/wi/kernel", "xattn/ffw/wo/kernel"}
    assert exempt_leaves(params, ("resampler", "*gate*")) == gates | {n for n in names if n.startswith("resampler/")}
    assert exempt_leaves(params, ()) == set()


def test_pretraining_objectives_read_the_default_exemption_as_exempting_nothing():
    model = FlamingoConfig.from_dict(load_config("tiny").model)
    assert FlamingoObjective(RunConfig(model=model)).weight_decay_exempt() == ("resampler",)
    for objective in (LanguageModelObjective, ContrastiveObjective):
        assert objective(RunConfig(model=model)).weight_decay_exempt() == ()
        chosen = RunConfig(model=model, train=TrainConfig(weight_decay_exempt=("*norm*",)))
        assert objective(chosen).weight_decay_exempt() == ("*norm*",)  # the user's entries, checked by the trainer


def test_a_weight_decay_exempt_typo_fails_before_compiling(tiny_trainable, synthetic_corpus, tmp_path):
    params, _ = tiny_trainable
    with pytest.raises(WeightDecayExemptError, match=r"'resmpler' matches no trainable weight.*'new_token_embedding', "
                       r"'resampler', 'xattn'"):
        weight_decay_mask(params, ("resmpler",))
    config = train_config(synthetic_corpus)
    config.train.weight_decay_exempt = ("*gates*",)
    with no_compiles(), pytest.raises(WeightDecayExemptError, match="'\\*gates\\*' matches no trainable weight"):
        Trainer(config, str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="weight_decay_exempt"):
        TrainConfig(weight_decay_exempt=("",)).validate()


def test_non_finite_loss_skips_the_update(setup):
    config, parts, params, frozen, batches = setup
    bad = jax.tree.map(lambda x: x, batches[0])
    bad["image_text"] = dict(bad["image_text"], media=np.full_like(bad["image_text"]["media"], np.nan))
    state, losses = run_steps(config, parts, params, frozen, [bad], 1, ("image_text",), {"image_text": 1.0})
    assert not np.isfinite(losses[0])
    jax.tree.map(np.testing.assert_array_equal, state.params, params)


# ------------------------------------------------------------------ errors before compile


def test_the_compile_counter_sees_compiles():
    """`no_compiles` below would pass vacuously if the lowering event never fired."""
    assert count_lowerings(lambda: jax.jit(lambda x: x * 3 + 1)(np.arange(5.0))) == 1


def test_mesh_that_does_not_divide_the_devices_fails_early(synthetic_corpus, tmp_path):
    config = train_config(synthetic_corpus)
    config.mesh.update(data=3, fsdp=1, tensor=1)
    with no_compiles(), pytest.raises(ShardingError, match=r"mesh.*multiply to 3.*1 devices"):
        Trainer(config, str(tmp_path))


def test_batch_not_divisible_by_microbatches_fails_early(synthetic_corpus, tmp_path):
    config = train_config(synthetic_corpus)
    config.train.microbatches = 3
    with no_compiles(), pytest.raises(ShardingError, match=r"batch size 4 is not divisible.*microbatches=3"):
        Trainer(config, str(tmp_path))


def test_missing_backbone_checkpoint_fails_early(synthetic_corpus, tmp_path):
    config = train_config(synthetic_corpus)
    config.backbones.decoder = str(tmp_path / "no-such-checkpoint")
    with no_compiles(), pytest.raises(BackboneError, match=r"backbones.decoder.*no such checkpoint directory"):
        Trainer(config, str(tmp_path))


def test_tokenizer_vocab_must_match_the_model(synthetic_corpus, tmp_path):
    config = train_config(synthetic_corpus)
    config.model.decoder.vocab_size = 600
    with no_compiles(), pytest.raises(ValueError, match=r"model.decoder.vocab_size.*600"):
        Trainer(config, str(tmp_path))


# ------------------------------------------------------------------ checkpoints


def final_params(trainer):
    return jax.tree.map(np.asarray, trainer.last_state.params)


def test_sigterm_then_resume_equals_an_uninterrupted_run(synthetic_corpus, tmp_path):
    config = train_config(synthetic_corpus, steps=10)
    straight = Trainer(config, str(tmp_path / "straight"))
    uninterrupted = straight.run()
    straight.close()

    first = Trainer(config, str(tmp_path / "resumed"))
    stopped = first.run(after_step=preempt_after(5))
    first.close()
    assert stopped.preempted and stopped.step == 5
    second = Trainer(config, str(tmp_path / "resumed"))
    resumed = second.run()
    second.close()
    # The same run in the same process: the resumed trainer ran the first one's jitted step.
    first_group = straight.step_group(0)
    assert second._step_program(first_group) is straight._step_program(first_group)
    assert second._init_state is straight._init_state
    assert resumed.step == 10 and sorted(resumed.losses) == list(range(6, 11))
    for step in range(1, 11):
        losses = stopped.losses if step <= 5 else resumed.losses
        np.testing.assert_allclose(losses[step], uninterrupted.losses[step], rtol=1e-6)
    chex.assert_trees_all_close(final_params(second), final_params(straight), rtol=1e-6, atol=1e-7)


def test_backbones_restore_from_checkpoints(synthetic_corpus, tmp_path):
    """Frozen weights come from the named checkpoints, not from the random init."""
    config = train_config(synthetic_corpus, steps=1)
    parts = ModelParts.flamingo(FlamingoConfig.from_dict(config.model))
    _, frozen = jax.jit(parts.init, static_argnums=0)(7)  # another seed: differs from the run's init
    backbones.save(str(tmp_path / "vision"), frozen["vision_encoder"])
    backbones.save(str(tmp_path / "decoder"), frozen["decoder"])
    config.backbones.update(vision=str(tmp_path / "vision"), decoder=str(tmp_path / "decoder"))
    trainer = Trainer(config, str(tmp_path / "run"))
    _, restored, _ = trainer.initial_state()
    trainer.close()
    jax.tree.map(np.testing.assert_array_equal, restored, frozen)
