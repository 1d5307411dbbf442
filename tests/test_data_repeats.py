"""Copying drills (`kind='repeats'`): random runs said twice, scored on the second saying,
drawn from ordinary pieces only, resumable from a row count, and refused by Flamingo."""

import numpy as np
import pytest

from flamingo_jax.data import repeats
from flamingo_jax.data.errors import DataError
from flamingo_jax.data.mixture import DatasetSpec, Mixture
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.training.objectives import FlamingoObjective, ObjectiveError

SPECIAL = (0, 1, 2, 3, 4)


def drills(**overrides):
    settings = dict(max_len=64, min_run=3, max_run=9, bos_id=1, seed=7)
    settings.update(overrides)
    return repeats.RepeatsPipeline("copying", 4, repeats.ordinary_ids(40, SPECIAL), **settings)


def runs_of(row_tokens, row_scored):
    """Splits one row (BOS dropped) into (first saying, second saying) pairs by its scored stretches."""
    tokens, scored = row_tokens[1:], row_scored[1:]
    pairs, start = [], 0
    while start < len(tokens):
        second = start + int(np.argmax(scored[start:])) if scored[start:].any() else len(tokens)
        end = second + int(np.argmin(scored[second:])) if not scored[second:].all() else len(tokens)
        pairs.append((tokens[start:second], tokens[second:end]))
        start = end
    return pairs


def test_each_run_is_said_twice_and_only_the_second_saying_is_scored():
    pipeline = drills()
    batch = next(pipeline)
    assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (4, 64)
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    assert (batch["tokens"][:, 0] == 1).all()
    for k in range(4):
        tokens, scored = pipeline.row(k)
        assert np.array_equal(tokens[1:], batch["targets"][k]) and np.array_equal(scored[1:], batch["loss_mask"][k])
        pairs = runs_of(tokens, scored)
        for first, second in pairs[:-1]:  # the last pair may be cut by max_len
            assert 3 <= len(first) <= 9 and np.array_equal(first, second)
        first, second = pairs[-1]
        assert np.array_equal(first[:len(second)], second)
    assert not np.isin(batch["tokens"][:, 1:], SPECIAL).any() and batch["tokens"].max() < 40
    assert 0.3 < batch["loss_mask"].mean() < 0.55


def test_first_copy_loss_scores_every_token_after_bos():
    batch = next(drills(first_copy_loss=True))
    assert batch["loss_mask"].all()


def test_drills_resume_from_their_state_and_differ_by_seed_and_process():
    pipeline = drills()
    next(pipeline)
    state = pipeline.get_state()
    expected = next(pipeline)
    resumed = drills()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["tokens"], expected["tokens"])
    assert not np.array_equal(next(drills(seed=8))["tokens"], next(drills())["tokens"])
    assert not np.array_equal(next(drills(process_index=1, process_count=2))["tokens"], next(drills())["tokens"])
    with pytest.raises(DataError, match="seed=7, this run 8"):
        drills(seed=8).set_state(state)


@pytest.mark.parametrize("overrides, message", [
    (dict(min_run=5, max_run=4), r"1 <= min_repeat_len <= max_repeat_len"),
    (dict(max_len=8, min_run=5), r"max_len=8 cannot hold one run of 5"),
])
def test_impossible_drill_settings_are_refused(overrides, message):
    with pytest.raises(DataError, match=message):
        drills(**overrides)


def test_a_drill_spec_reads_no_files_and_builds_from_the_tokenizer(synthetic_corpus):
    with pytest.raises(DataError, match="reads no files"):
        DatasetSpec.from_dict(dict(name="copying", kind="repeats", batch_size=2, pattern="/data/*.tfrecord"))
    with pytest.raises(DataError, match="from_step=-1"):
        DatasetSpec.from_dict(dict(name="copying", kind="repeats", batch_size=2, from_step=-1))
    mixture = Mixture.from_config({"tokenizer": f"{synthetic_corpus}/spm.model", "datasets": [
        dict(name="copying", kind="repeats", batch_size=2, max_len=32)]})
    batch = next(mixture)["copying"]
    special = mixture.tokenizer.special_ids()
    assert mixture.tokenizer.bos_id in special and set(mixture.tokenizer.image_marker_ids) <= set(special)
    assert batch["tokens"].shape == (2, 32) and not np.isin(batch["tokens"][:, 1:], special).any()
    assert batch["tokens"].max() < mixture.tokenizer.vocab_size


def test_flamingo_training_refuses_text_only_drills():
    with pytest.raises(ObjectiveError, match=r"datasets \{'copying': 'repeats'\} are text alone"):
        FlamingoObjective.for_model(FlamingoConfig()).check({"docs": "interleaved", "copying": "repeats"})
