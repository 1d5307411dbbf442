"""Whole training runs (the tiny shrunk model, a few steps): periodic saves with keep-N pruning,
TensorBoard output, the non-finite stop, and round-robin accumulation across a resume."""

from __future__ import annotations

import glob
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flamingo_jax.core.checkpoint import Checkpointer
from flamingo_jax.inference.loading import load_trained
from flamingo_jax.training.trainer import Trainer, TrainingStopped

from helpers import flat_arrays, read_metrics, train_config


def saved_steps(workdir) -> list[int]:
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        return sorted(checkpointer.manager.all_steps())
    finally:
        checkpointer.close()


def tensorboard_scalars(workdir) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} from the run's TensorBoard event files."""
    import tensorflow as tf

    scalars: dict[int, dict[str, float]] = {}
    files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert files, os.listdir(workdir)
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(event.step, {})[value.tag] = float(tf.make_ndarray(value.tensor))
    return scalars


def test_periodic_saves_keep_the_newest_n_and_tensorboard_has_every_metric(synthetic_corpus, tmp_path):
    config = train_config(synthetic_corpus, steps=5)
    config.checkpoint.update(every_steps=2, keep=2)
    config.train.tensorboard = True
    seen = {}
    trainer = Trainer(config, str(tmp_path))
    try:
        trainer.run(after_step=lambda step: seen.__setitem__(step, sorted(trainer.checkpointer.manager.all_steps())))
    finally:
        trainer.close()
    # Saves every 2 steps (and a first one at step 1) and at the end (5); only the newest 2 stay.
    assert all(len(steps) <= 2 for steps in seen.values()), seen
    assert seen[3] == [1, 2] and seen[5] == [2, 4]
    assert saved_steps(tmp_path) == [4, 5]
    # TensorBoard holds every scalar of metrics.jsonl, at its step, with its value.
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    board = tensorboard_scalars(tmp_path)
    assert sorted(board) == sorted(records) == [1, 2, 3, 4, 5]
    for step, record in records.items():
        expected = {k: float(v) for k, v in record.items() if k != "step"}
        assert set(board[step]) == set(expected), step
        assert {"loss", "learning_rate", "loss/image_text", "loss/interleaved", "step_time"} <= set(expected)
        for tag, value in expected.items():
            np.testing.assert_allclose(board[step][tag], value, rtol=1e-6, err_msg=tag)


def test_non_finite_steps_in_a_row_stop_the_run_after_a_save(synthetic_corpus, tmp_path):
    """From step 3 every batch has NaN pixels, so updates are skipped; with max_nonfinite_steps=2
    the run stops, saving weights as they were after step 2. A step's metrics are read while
    the next step runs, so the stop comes one step after the limit: at step 5, 3 in a row."""
    config = train_config(synthetic_corpus, steps=8)
    config.checkpoint.update(every_steps=2, keep=5)
    config.train.max_nonfinite_steps = 2
    trainer = Trainer(config, str(tmp_path))
    batches_given = []
    clean = trainer._next_batches

    def poisoned(group):
        batches = clean(group)
        batches_given.append(group)
        if len(batches_given) >= 3:
            batches = {name: dict(batch, media=batch["media"] * jnp.nan) for name, batch in batches.items()}
        return batches

    trainer._next_batches = poisoned
    try:
        with pytest.raises(TrainingStopped, match=r"3 consecutive steps had a non-finite loss.*saved step 5"):
            trainer.run()
    finally:
        trainer.close()
    assert len(batches_given) == 5  # no sixth step
    assert saved_steps(tmp_path)[-2:] == [4, 5]
    finite = [bool(r["finite"]) for r in read_metrics(tmp_path)]
    assert finite == [True, True, False, False, False]
    checkpointer = Checkpointer(os.path.join(tmp_path, "checkpoints"), async_save=False)
    assert checkpointer.read_meta(5)["nonfinite_in_row"] == 3
    checkpointer.close()
    after_2, after_5 = (flat_arrays(nnx.to_pure_dict(nnx.state(load_trained(str(tmp_path), step=s).model)))
                        for s in (2, 5))
    for path, value in after_2.items():
        np.testing.assert_array_equal(after_5[path], value, err_msg=path)


def test_round_robin_accumulation_alternates_datasets_and_resumes_exactly(synthetic_corpus, tmp_path):
    """The paper's ablation: each update uses one dataset in turn. Preempted after step 1 (an
    odd step, so the resumed run must start with the second dataset), the run continues with
    the same datasets, losses and weights as an uninterrupted one."""
    config = train_config(synthetic_corpus, steps=3)
    config.train.accumulation = "round_robin"

    def run(workdir, after_step=None):
        trainer = Trainer(config, str(workdir))
        try:
            result = trainer.run(after_step=after_step)
            return result, jax.tree.map(np.asarray, trainer.last_state.params)
        finally:
            trainer.close()

    straight, straight_params = run(tmp_path / "straight")

    def preempt_at_1(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped, _ = run(tmp_path / "resumed", preempt_at_1)
    assert stopped.preempted and stopped.step == 1
    resumed, resumed_params = run(tmp_path / "resumed")
    assert resumed.step == 3

    def datasets_per_step(workdir):
        return {r["step"]: sorted(k.split("/", 1)[1] for k in r if k.startswith("loss/")) for r in read_metrics(workdir)}

    expected = {1: ["image_text"], 2: ["interleaved"], 3: ["image_text"]}
    assert datasets_per_step(tmp_path / "straight") == expected
    assert datasets_per_step(tmp_path / "resumed") == expected
    for step in range(1, 4):
        got = stopped.losses[step] if step == 1 else resumed.losses[step]
        np.testing.assert_allclose(got, straight.losses[step], rtol=1e-6, err_msg=f"step {step}")
    chex.assert_trees_all_close(resumed_params, straight_params, rtol=1e-6, atol=1e-7)


def test_an_unfrozen_lm_starts_from_its_backbone_trains_resumes_and_reloads(synthetic_corpus, tmp_path, caplog):
    """`model.freeze_lm` off (the paper's Table 3 ablation): the LM's weights are trainable, start
    from the decoder backbone's checkpoint, change in training, and a resume or a reload gets the
    trained ones, never the backbone's again."""
    from flamingo_jax.core import backbones
    from flamingo_jax.core.parts import ModelParts
    from flamingo_jax.models.config import FlamingoConfig

    config = train_config(synthetic_corpus, steps=2)
    pretrained = jax.jit(ModelParts.flamingo(FlamingoConfig.from_dict(config.model)).init, static_argnums=0)(7)[1]
    path = str(tmp_path / "decoder")
    backbones.save(path, pretrained["decoder"])
    config.backbones.decoder = path
    config.model.freeze_lm = False
    workdir = str(tmp_path / "run")

    def state_of_a_new_trainer():
        trainer = Trainer(config, workdir)
        try:
            return trainer.initial_state()
        finally:
            trainer.close()

    with caplog.at_level("INFO"):
        state, frozen, _ = state_of_a_new_trainer()
    assert f"restored trainable decoder from {path}" in caplog.text
    assert "decoder" not in frozen and set(frozen) == {"vision_encoder"}
    chex.assert_trees_all_equal(state.params["decoder"], pretrained["decoder"])  # the backbone, not random
    trainer = Trainer(config, workdir)
    try:
        assert trainer.run().step == 2
    finally:
        trainer.close()

    resumed, _, _ = state_of_a_new_trainer()
    assert int(resumed.step) == 2
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed.params["decoder"]),
                                                        jax.tree.leaves(pretrained["decoder"]))]
    assert all(changed), "every LM weight trains (none is the backbone's after 2 steps)"
    reloaded = load_trained(workdir).model
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(reloaded.decoder)), resumed.params["decoder"])
