"""Drills (`kind='repeats'`): copying (random runs said twice, scored on the second saying) and
recall (keys bound to runs, scored where a key comes back), drawn from ordinary pieces only,
resumable from a row count, and refused by Flamingo."""

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
    (dict(max_len=8, min_run=5), r"max_len=8 cannot hold one copy drill of 5-token runs"),
    (dict(max_len=11, min_run=5, drill="recall"), r"max_len=11 cannot hold one recall drill of 5-token runs \(12"),
    (dict(max_len=17, min_run=5, drill="recall", max_frame_len=3), r"recall drill of 5-token runs \(18 tokens"),
    (dict(drill="recall", max_frame_len=-1), r"max_frame_len=-1 must be >= 0"),
    (dict(drill="lookup"), r"drill='lookup' is unknown; use one of \('copy', 'recall'\)"),
    (dict(drill="recall", max_keys=1), r"max_keys=1; .* needs 2 <= max_keys < 35"),
])
def test_impossible_drill_settings_are_refused(overrides, message):
    with pytest.raises(DataError, match=message):
        drills(**overrides)


def recall_items(row_tokens, row_scored):
    """(key, frame, value, value scored) of one recall row (BOS dropped). Keys are the tokens just
    after a scored stretch (every key of a 256-token row follows some scored value), and occur
    nowhere else; the frame is what every item's body starts with."""
    tokens, scored = row_tokens[1:], row_scored[1:]
    keys = {int(tokens[i]) for i in range(1, len(tokens)) if scored[i - 1] and not scored[i]}
    starts = [i for i, t in enumerate(tokens) if int(t) in keys]
    assert starts[0] == 0
    bodies = [(int(tokens[a]), tokens[a + 1:b], scored[a + 1:b]) for a, b in zip(starts, starts[1:] + [len(tokens)])]
    whole = [body for _, body, _ in bodies[:-1]]  # the last item may be cut by max_len
    frame_len = 0
    while all(len(b) > frame_len + 1 for b in whole) and len({int(b[frame_len]) for b in whole}) == 1:
        frame_len += 1
    frame = whole[0][:frame_len]
    return [(key, body[:frame_len], body[frame_len:], mask[frame_len:]) for key, body, mask in bodies], frame


@pytest.mark.parametrize("max_frame_len", [0, 3])
def test_recall_rows_bind_each_key_to_one_value_and_score_it_where_the_key_comes_back(max_frame_len):
    pipeline = drills(drill="recall", min_run=1, max_run=4, max_keys=5, max_len=256, max_frame_len=max_frame_len)
    batch = next(pipeline)
    assert batch["tokens"].shape == (4, 256) and (batch["tokens"][:, 0] == 1).all()
    assert not np.isin(batch["tokens"][:, 1:], SPECIAL).any()
    key_counts, frame_lens = set(), set()
    for k in range(4):
        items, frame = recall_items(*pipeline.row(k))
        frame_lens.add(len(frame))
        bound = {}
        for n, (key, item_frame, value, scored) in enumerate(items):
            last = n == len(items) - 1  # max_len may cut it
            assert np.array_equal(item_frame, frame[:len(item_frame)]) and (last or len(item_frame) == len(frame))
            assert not scored[1:].any() or scored.all()  # a value is scored whole or not at all
            assert bool(scored.any()) == (key in bound) or (last and not len(value))
            if key in bound:
                assert np.array_equal(bound[key][:len(value)] if last else bound[key], value)
            elif not last:
                assert 1 <= len(value) <= 4
                bound[key] = value
        key_counts.add(len(bound))
        assert 2 <= len(bound) <= 5
    assert len(key_counts) > 1  # rows differ in how many keys they bind
    assert max(frame_lens) <= max_frame_len and (max_frame_len == 0 or max(frame_lens) > 0)
    assert 0.2 < batch["loss_mask"].mean() < 0.8


def test_recall_state_names_its_drill():
    state = drills(drill="recall").get_state()
    assert state["drill"] == "recall"
    with pytest.raises(DataError, match="drill='recall', this run 'copy'"):
        drills().set_state(state)


def test_a_drill_spec_reads_no_files_and_builds_from_the_tokenizer(synthetic_corpus):
    with pytest.raises(DataError, match="reads no files"):
        DatasetSpec.from_dict(dict(name="copying", kind="repeats", batch_size=2, pattern="/data/*.tfrecord"))
    with pytest.raises(DataError, match="from_step=-1"):
        DatasetSpec.from_dict(dict(name="copying", kind="repeats", batch_size=2, from_step=-1))
    mixture = Mixture.from_config({"tokenizer": f"{synthetic_corpus}/spm.model", "datasets": [
        dict(name="copying", kind="repeats", batch_size=2, max_len=32),
        dict(name="recall", kind="repeats", drill="recall", batch_size=2, max_len=32, min_repeat_len=1,
             max_repeat_len=2, max_keys=3, max_frame_len=2)]})
    batches = next(mixture)
    recall = mixture.pipelines["recall"]
    assert (recall.drill, recall.max_keys, recall.max_frame_len, recall.max_run) == ("recall", 3, 2, 2)
    assert mixture.get_state()["datasets"]["recall"]["drill"] == "recall"
    np.testing.assert_array_equal(batches["recall"]["tokens"][0], recall.row(0)[0][:-1])
    batch = batches["copying"]
    special = mixture.tokenizer.special_ids()
    assert mixture.tokenizer.bos_id in special and set(mixture.tokenizer.image_marker_ids) <= set(special)
    assert batch["tokens"].shape == (2, 32) and not np.isin(batch["tokens"][:, 1:], special).any()
    assert batch["tokens"].max() < mixture.tokenizer.vocab_size


def test_flamingo_training_refuses_text_only_drills():
    with pytest.raises(ObjectiveError, match=r"datasets \{'copying': 'repeats'\} are text alone"):
        FlamingoObjective.for_model(FlamingoConfig()).check({"docs": "interleaved", "copying": "repeats"})
