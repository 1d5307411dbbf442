"""The backbones' pretraining objectives (contrastive vision encoder, text LM) on the Flamingo
trainer's machinery: the loss falls, SIGTERM + resume is exact, and the exported backbone is
what a Flamingo run restores through `config.backbones`."""

import logging
import os

import chex
import jax
import ml_collections
import numpy as np
import pytest

from flamingo_jax.errors import UserError
from flamingo_jax.models.config import ConfigError
from flamingo_jax.training.objectives import ObjectiveError
from flamingo_jax.training.trainer import Trainer, check_curriculum

from helpers import no_compiles, preempt_after, read_metrics, train_config

TINY_TEXT_ENCODER = dict(dim=32, num_layers=1, num_heads=2, head_dim=16, mlp_ratio=2, max_len=32, embed_dim=24)


def pretraining_config(corpus, objective, datasets, steps=8):
    config = train_config(corpus, datasets=datasets, steps=steps)
    config.objective = objective
    config.contrastive.text.update(**TINY_TEXT_ENCODER)
    config.train.update(learning_rate=3e-3, schedule="linear" if objective == "contrastive" else "constant")
    return config


def train(config, workdir, after_step=None):
    trainer = Trainer(config, str(workdir))
    try:
        result = trainer.run(after_step=after_step)
        params = jax.tree.map(np.asarray, trainer.last_state.params)
        return result, params, getattr(trainer, "exported", {})
    finally:
        trainer.close()


def check_resume_and_export(config, tmp_path, component):
    """Trains 8 steps straight; then 4, SIGTERM, resume to 8. Returns the straight run's results."""
    straight, straight_params, exported = train(config, tmp_path / "straight")
    first, _, first_exported = train(config, tmp_path / "resumed", preempt_after(4))
    assert first.preempted and first.step == 4 and first_exported == {}  # nothing exported before the end
    resumed, resumed_params, _ = train(config, tmp_path / "resumed")
    assert resumed.step == 8 and sorted(resumed.losses) == list(range(5, 9))
    for step in range(1, 9):
        losses = first.losses if step <= 4 else resumed.losses
        np.testing.assert_allclose(losses[step], straight.losses[step], rtol=1e-6)
    chex.assert_trees_all_close(resumed_params, straight_params, rtol=1e-6, atol=1e-7)
    assert set(exported) == {component} and os.path.isdir(exported[component])
    return straight, straight_params, exported[component]


def restored_by_flamingo(corpus, tmp_path, **backbones):
    config = train_config(corpus, steps=1)
    config.backbones.update(**backbones)
    trainer = Trainer(config, str(tmp_path / "flamingo"))
    try:
        _, frozen, _ = trainer.initial_state()
        return jax.tree.map(np.asarray, frozen)
    finally:
        trainer.close()


def test_language_model_pretraining_resumes_exactly_and_exports_the_decoder(synthetic_corpus, tmp_path):
    config = pretraining_config(synthetic_corpus, "lm", ("interleaved", "image_text"))
    straight, params, decoder_path = check_resume_and_export(config, tmp_path, "decoder")
    assert straight.losses[8] < straight.losses[1] - 0.5  # from ~log(512) = 6.2 nats
    frozen = restored_by_flamingo(synthetic_corpus, tmp_path, decoder=decoder_path)
    chex.assert_trees_all_equal(frozen["decoder"], params)


def test_copying_drills_come_first_and_the_corpus_joins_at_its_from_step_across_a_resume(synthetic_corpus, tmp_path):
    """The tiny LM stage's curriculum: the drills alone, then the corpus beside them from
    `from_step`; preempted at the step where the corpus joins, the resumed run is exact."""
    config = pretraining_config(synthetic_corpus, "lm", ("interleaved",))
    for dataset in config.data.datasets:
        dataset["from_step"] = 4
    config.data.datasets.append(dict(name="copying", kind="repeats", batch_size=4, max_len=32, min_repeat_len=3,
                                     max_repeat_len=8))
    check_resume_and_export(config, tmp_path, "decoder")
    for workdir in ("straight", "resumed"):
        datasets = {r["step"]: sorted(k.split("/", 1)[1] for k in r if k.startswith("loss/"))
                    for r in read_metrics(tmp_path / workdir)}
        assert datasets == {s: ["copying"] if s <= 4 else ["copying", "interleaved"] for s in range(1, 9)}


def test_a_curriculum_without_a_first_dataset_is_refused_and_one_joining_too_late_is_named(caplog):
    with pytest.raises(UserError, match=r"every dataset has from_step > 0 .*set one dataset's from_step to 0"):
        check_curriculum({"copying": 10, "docs": 20}, steps=100)
    with caplog.at_level(logging.WARNING):
        check_curriculum({"copying": 0, "docs": 100}, steps=100)
    assert "{'docs': 100}" in caplog.text and "never trains on them" in caplog.text


def test_contrastive_pretraining_resumes_exactly_and_exports_the_vision_encoder(synthetic_corpus, tmp_path):
    config = pretraining_config(synthetic_corpus, "contrastive", ("image_text", "video_text"))
    straight, params, vision_path = check_resume_and_export(config, tmp_path, "vision")
    assert straight.losses[8] < straight.losses[1]
    assert set(params) == {"vision_encoder", "image_projection", "text_encoder", "log_inverse_temperature"}
    frozen = restored_by_flamingo(synthetic_corpus, tmp_path, vision=vision_path)
    chex.assert_trees_all_equal(frozen["vision_encoder"], params["vision_encoder"])


@pytest.mark.parametrize("edit, error, message", [
    (lambda c: c.train.update(microbatches=2), ObjectiveError, r"train.microbatches.*cannot be split"),
    (lambda c: c.data.update(datasets=[d for d in c.data.datasets] + [dict(
        c.data.datasets[0], name="docs", kind="interleaved",
        pattern=c.data.datasets[0]["pattern"].replace("image_text", "interleaved"))]),
     ObjectiveError, r"pairs; datasets \{'docs': 'interleaved'\}"),
    (lambda c: c.backbones.update(vision="/somewhere"), ConfigError, r"backbones.*reads none"),
])
def test_contrastive_setups_that_cannot_work_fail_before_compiling(synthetic_corpus, tmp_path, edit, error, message):
    config = pretraining_config(synthetic_corpus, "contrastive", ("image_text",))
    config.data = ml_collections.ConfigDict(config.data.to_dict())
    edit(config)
    with no_compiles(), pytest.raises(error, match=message):
        Trainer(config, str(tmp_path))
