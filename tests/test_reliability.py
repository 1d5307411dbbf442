"""A damaged checkpoint is set aside and the previous one used; a second trainer on a workdir is
refused; a loss spike rolls back by itself; a resume with a changed model is refused by name."""

import glob
import json
import os
import socket

import numpy as np
import pytest

from flamingo_jax.core.checkpoint import CheckpointError
from flamingo_jax.core.config import ResumeMismatch
from flamingo_jax.training.trainer import Trainer
from flamingo_jax.training.workdir_lock import LOCK_NAME, WorkdirBusy

from helpers import preempt_after, train_config


def run(config, workdir):
    trainer = Trainer(config, str(workdir))
    try:
        return trainer.run()
    finally:
        trainer.close()


def damage(checkpoint_dir):
    """Cuts the largest array file of a checkpoint in half (an interrupted copy)."""
    files = [f for f in glob.glob(os.path.join(checkpoint_dir, "**", "*"), recursive=True) if os.path.isfile(f)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    return largest


@pytest.fixture(scope="module")
def six_steps(synthetic_corpus, tmp_path_factory):
    """A 6-step run with checkpoints at steps 2, 4 and 6."""
    config = train_config(synthetic_corpus, steps=6)
    config.checkpoint.update(every_steps=2, keep=3, async_save=False)
    workdir = tmp_path_factory.mktemp("six")
    return config, workdir, run(config, workdir)


def copy_run(workdir, tmp_path):
    import shutil

    target = tmp_path / "run"
    shutil.copytree(workdir, target)
    return target


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumes_exactly(six_steps, tmp_path, caplog):
    config, workdir, first = six_steps
    workdir = copy_run(workdir, tmp_path)
    damage(workdir / "checkpoints" / "6")
    config = config.copy_and_resolve_references()
    config.train.steps = 7
    with caplog.at_level("WARNING"):
        resumed = run(config, workdir)
    assert "checkpoint step 6" in caplog.text and "damaged" in caplog.text
    assert sorted(resumed.losses) == [5, 6, 7]  # resumed from step 4
    np.testing.assert_allclose([resumed.losses[5], resumed.losses[6]], [first.losses[5], first.losses[6]], rtol=1e-6)
    aside = os.listdir(f"{workdir}/checkpoints.damaged")
    assert len(aside) == 1 and aside[0].startswith("6-")  # moved, not deleted
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [4, 6, 7]  # 6 rewritten


def test_with_every_checkpoint_damaged_the_run_stops_naming_them(six_steps, tmp_path):
    config, workdir, _ = six_steps
    workdir = copy_run(workdir, tmp_path)
    for step in (2, 4, 6):
        damage(workdir / "checkpoints" / str(step))
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*step 6.*step 4.*step 2.*does not restart"):
        run(config, workdir)
    assert not [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]  # all set aside, none rewritten
    assert len(os.listdir(workdir / "checkpoints.damaged")) == 3


def test_resuming_with_a_changed_model_names_the_fields_before_restoring(six_steps, tmp_path):
    config, workdir, _ = six_steps
    workdir = copy_run(workdir, tmp_path)
    config = config.copy_and_resolve_references()
    config.model.decoder.ffw_hidden = 96
    config.train.steps = 9  # may change
    with pytest.raises(ResumeMismatch, match=r"model.decoder.ffw_hidden: 0 -> 96.*new --workdir"):
        run(config, workdir)
    assert not os.path.exists(workdir / "checkpoints.damaged")  # a mismatch is not damage


def test_a_second_trainer_on_the_workdir_is_refused_until_the_first_ends(synthetic_corpus, tmp_path):
    config = train_config(synthetic_corpus, steps=1)
    first = Trainer(config, str(tmp_path))
    try:
        with pytest.raises(WorkdirBusy, match=rf"in use by the trainer pid {os.getpid()} on host"):
            Trainer(config, str(tmp_path))
    finally:
        first.close()
    assert not os.path.exists(tmp_path / LOCK_NAME)
    Trainer(config, str(tmp_path)).close()


def test_a_stale_lock_of_a_dead_process_is_taken_over(synthetic_corpus, tmp_path):
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started": 0}))
    Trainer(train_config(synthetic_corpus, steps=1), str(tmp_path)).close()


def test_a_loss_spike_rolls_back_skips_its_batches_and_training_finishes(synthetic_corpus, tmp_path):
    """A fixed batch is learnt for 8 steps; steps 9-10 get garbage targets (a spike); the guard
    restores step 8, halves the learning rate, skips the garbage and trains on to step 14."""
    config = train_config(synthetic_corpus, steps=14, datasets=("image_text",))
    config.checkpoint.update(every_steps=2, keep=10, async_save=False)
    config.train.learning_rate = 1e-2
    config.train.spike_guard.update(enabled=True, factor=1.2, window=4, patience=2, lr_scale=0.5)
    trainer = Trainer(config, str(tmp_path))
    fixed, calls = {}, [0]
    read = trainer._next_batches

    def batches(group):
        calls[0] += 1
        fixed.update(fixed or read(group))
        if calls[0] in (9, 10):
            garbage = np.random.default_rng(calls[0]).integers(0, 512, fixed["image_text"]["targets"].shape)
            return {name: dict(b, targets=garbage.astype(b["targets"].dtype)) for name, b in fixed.items()}
        return fixed

    trainer._next_batches = batches
    try:
        result = trainer.run()
    finally:
        trainer.close()
    assert result.step == 14 and not result.preempted
    assert max(result.losses[s] for s in range(9, 15)) < min(result.losses[s] for s in range(1, 3))  # no spike left
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rollbacks = [r for r in records if "rollback/to_step" in r]
    assert len(rollbacks) == 1 and rollbacks[0]["rollback/to_step"] == 8 and rollbacks[0]["step"] == 10
    assert rollbacks[0]["rollback/lr_scale"] == 0.5
    assert [d.split("-")[0] for d in os.listdir(tmp_path / "checkpoints.damaged")] == ["10"]  # the spiked save


def test_training_over_damaged_shards_counts_the_skips_and_resumes_exactly(synthetic_corpus, tmp_path, caplog):
    """One image-text shard with flipped bytes (a CRC error), one interleaved shard cut in half."""
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(synthetic_corpus, corpus)
    flipped = sorted(glob.glob(str(corpus / "image_text" / "*.tfrecord")))[0]
    cut = sorted(glob.glob(str(corpus / "interleaved" / "*.tfrecord")))[-1]
    with open(flipped, "r+b") as f:  # inside the first record: read by the first batch
        f.seek(100)
        chunk = f.read(48)
        f.seek(100)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with open(cut, "r+b") as f:
        f.truncate(os.path.getsize(cut) // 2)
    config = train_config(str(corpus), steps=8)  # the damaged image-text record is in the 8th batch
    with caplog.at_level("WARNING"):
        straight = run(config, tmp_path / "straight")
    assert os.path.basename(flipped) in caplog.text and os.path.basename(cut) in caplog.text
    records = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    skipped = {key for record in records for key in record if key.startswith("skipped/")}
    assert any("image_text" in key for key in skipped) and any("interleaved" in key for key in skipped), skipped

    trainer = Trainer(config, str(tmp_path / "resumed"))
    try:
        first = trainer.run(after_step=preempt_after(4))
    finally:
        trainer.close()
    resumed = run(config, tmp_path / "resumed")
    assert first.step == 4 and resumed.step == 8
    combined = {**first.losses, **resumed.losses}
    np.testing.assert_allclose([combined[s] for s in range(1, 9)], [straight.losses[s] for s in range(1, 9)],
                               rtol=1e-6)


def test_a_corpus_written_with_other_settings_is_used_as_it_is_and_named(synthetic_corpus, caplog):
    from flamingo_jax.core.config import RunConfig
    from flamingo_jax.training.trainer import prepare_synthetic_data

    before = sorted(os.listdir(synthetic_corpus))
    config = train_config(synthetic_corpus)
    config.synthetic.update(out_dir=synthetic_corpus, num_examples=64, num_eval=16, image_size=32, seed=0)
    with caplog.at_level("WARNING"):
        prepare_synthetic_data(RunConfig.from_config(config))  # the corpus' own settings: nothing to say
    assert not [r for r in caplog.records if "synthetic corpus" in r.getMessage()]
    config.synthetic.num_examples = 8000
    with caplog.at_level("WARNING"):
        prepare_synthetic_data(RunConfig.from_config(config))
    assert any("num_examples=64 (config: 8000)" in r.getMessage() and "Delete the directory" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert sorted(os.listdir(synthetic_corpus)) == before  # not regenerated over a corpus someone uses
