"""Shared pipeline machinery: determinism, save/restore, host sharding, counted skipping of bad
records and of damaged files."""

import gc
import glob
import json
import logging
import os
import shutil
import struct

import numpy as np
import pytest

from flamingo_jax.data import formats, images, interleaved, pairs
from flamingo_jax.data._tf import tf
from flamingo_jax.data.mixture import Mixture

from test_data_utils import check_contract, collect, make_tokenizer, red_value, rows, solid_png

IMAGE_CONFIG = images.ImageConfig(size=16)  # flips and jitter on: randomness must be reproducible too


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def docs_pattern(tmp_path_factory):
    """40 interleaved documents over 4 shards, with a corrupt image in documents 7 and 23."""
    directory = tmp_path_factory.mktemp("docs")
    with formats.InterleavedWriter(str(directory), "docs", 4) as writer:
        for i in range(40):
            bad = b"\xff\xd8 not really a jpeg" if i in (7, 23) else solid_png(i + 50)
            writer.write([f"record {i} starts", bad, f"and {i} goes on", solid_png(i + 100), "the end"])
    return str(directory / "docs-*")


def make(pattern, tok, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    config = interleaved.InterleavedConfig(max_len=24, max_images=2, p_next=0.5)
    return interleaved.InterleavedPipeline(pattern, 4, tok, config=config, image_config=IMAGE_CONFIG,
                                           shuffle_buffer=8, **kwargs)


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def nonzero(counts):
    return {reason: count for reason, count in counts.items() if count}


def take(pipeline, count):
    return [next(pipeline) for _ in range(count)]


def test_same_seed_same_batches_other_seed_other_batches(docs_pattern, tok):
    first = take(make(docs_pattern, tok, seed=11), 5)
    assert_same(first, take(make(docs_pattern, tok, seed=11), 5))
    other = take(make(docs_pattern, tok, seed=12), 5)
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))
    for batch in first:
        check_contract(batch, tok.vocab_size)


def test_a_python_step_in_flight_when_its_pipeline_is_freed_returns_a_result_of_its_types(docs_pattern, tok):
    """tf.data may still be inside a record's Python step when the pipeline is freed (a run's end):
    the step then returns a result shaped like a live one instead of raising, which made
    TensorFlow log a traceback."""
    pipeline = make(docs_pattern, tok, seed=0)
    step = pipeline._sample_step(pipeline.config.max_len)  # what the graph calls
    record = next(iter(tf().data.TFRecordDataset(sorted(glob.glob(docs_pattern))[0]))).numpy()
    seed = np.array([0, 0, 0], np.int64)
    live = step(record, seed)
    del pipeline
    gc.collect()
    orphan = step(record, seed)
    assert len(orphan) == len(live)
    for got, want in zip(orphan, live):  # the graph's output types (bytes of any length for the detail)
        got, want = np.asarray(got).dtype, np.asarray(want).dtype
        assert got == want or got.kind == want.kind == "S"
    assert [np.shape(x) for x in orphan[:4]] == [np.shape(x) for x in live[:4]]  # the token fields
    assert orphan[-2] > 0  # a skip, were it ever read


def test_restore_continues_exactly_across_epochs_with_skips(docs_pattern, tok):
    # 38 good records per epoch = 9.5 batches: 14 batches cross an epoch boundary mid-batch.
    reference = make(docs_pattern, tok, seed=3)
    batches = take(reference, 14)
    resumed_from = {}
    for k in (2, 9, 10):
        run = make(docs_pattern, tok, seed=3)
        take(run, k)
        resumed_from[k] = (json.dumps(run.get_state()), run.skip_counts())
    for k, (state, skips) in resumed_from.items():
        restored = make(docs_pattern, tok, seed=3)
        restored.set_state(json.loads(state))
        assert restored.skip_counts() == skips
        assert_same(take(restored, 14 - k), batches[k:])
        assert restored.skip_counts() == reference.skip_counts()
    assert reference.skip_counts()["corrupt_image"] >= 2  # both bad documents of epoch 0 were met and counted
    assert reference.get_state()["epoch"] == 1


def test_restore_skips_records_without_processing_them(docs_pattern, tok):
    run = make(docs_pattern, tok, seed=4, num_parallel_calls=1, prefetch=1)
    take(run, 8)
    state = run.get_state()
    assert state["position"] >= 32
    restored = make(docs_pattern, tok, seed=4, num_parallel_calls=1, prefetch=1)
    restored.set_state(state)
    processed = []
    original = restored._sample

    def counting_sample(*args):
        processed.append(1)
        return original(*args)

    restored._sample = counting_sample  # called once per record that is tokenised (and then decoded)
    next(restored)
    assert 4 <= len(processed) < 16, f"{len(processed)} records processed to resume at position {state['position']}"


def test_process_indices_read_disjoint_shards_covering_all_records(tmp_path, tok):
    with formats.ImageTextWriter(str(tmp_path), "pairs", 6) as writer:
        for i in range(30):
            writer.write(solid_png(i + 10), f"record {i}")
    pattern = str(tmp_path / "pairs-*")
    seen = {}
    for index in range(2):
        pipeline = pairs.ImageTextPipeline(pattern, 1, tok, config=pairs.PairConfig(max_len=16, p_leading_space=0),
                                           image_config=IMAGE_CONFIG, training=False, num_epochs=1,
                                           process_index=index, process_count=2)
        assert len(pipeline.files) == 3
        seen[index] = {red_value(e["media"][0], IMAGE_CONFIG) - 10 for e in rows(collect(pipeline))}
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(30))
    with pytest.raises(ValueError, match="at least 7 shards"):
        pairs.ImageTextPipeline(pattern, 1, tok, process_index=0, process_count=7)


def _example_without_image() -> bytes:
    t = tf()
    feature = {"caption": t.train.Feature(bytes_list=t.train.BytesList(value=[b"no image here"]))}
    return t.train.Example(features=t.train.Features(feature=feature)).SerializeToString()


def test_bad_records_are_skipped_counted_and_logged(tmp_path, tok, caplog):
    good_docs = {i: [f"good document {i}", solid_png(10 * i + 20), "fine"] for i in range(5)}
    with formats.InterleavedWriter(str(tmp_path), "docs", 1) as writer:
        writer.write(good_docs[0])
        writer.write_serialized(b"\x00\x01 definitely not a tf.train.Example")  # record 1: malformed
        writer.write(good_docs[1])
        writer.write(["text", b"\x89PNG\r\n\x1a\n truncated", "more"])  # record 3: corrupt image
        writer.write(["", solid_png(1), "   "])  # record 4: empty text
        writer.write(good_docs[2])
        writer.write(["only text, no image"])  # record 6: no image
        writer.write(["too many"] + [solid_png(2)] * 4)  # record 7: too many images (limit 3)
        writer.write(good_docs[3])
        writer.write(good_docs[4])
        writer.write(["ends badly", b"GIF89a"])  # record 10, last: corrupt, counted at the end of the stream
    config = interleaved.InterleavedConfig(max_len=32, max_images=2, p_next=0.0, max_images_per_doc=3)
    caplog.set_level(logging.WARNING)
    pipeline = interleaved.InterleavedPipeline(
        str(tmp_path / "docs-*"), 2, tok, config=config, image_config=IMAGE_CONFIG, training=False,
        num_epochs=1, drop_remainder=False, process_index=0, process_count=1)
    batches = collect(pipeline)
    for batch in batches:
        check_contract(batch, tok.vocab_size)
    examples = rows(batches)
    assert len(examples) == 5
    for i, example in enumerate(examples):
        assert tok.decode(example["tokens"][example["tokens"] != tok.pad_id]) == (
            f"good document {i}<EOC><image> fine<EOC>")
        assert red_value(example["media"][0], IMAGE_CONFIG) == 10 * i + 20
    assert nonzero(pipeline.skip_counts()) == {"malformed": 1, "empty_text": 1, "no_image": 1, "too_many_images": 1,
                                      "corrupt_image": 2}
    shard = str(tmp_path / "docs-00000-of-00001.tfrecord")
    messages = [r.getMessage() for r in caplog.records]
    for index, reason in ((1, "malformed"), (3, "corrupt_image"), (4, "empty_text"), (6, "no_image"),
                          (7, "too_many_images"), (10, "corrupt_image")):
        assert any(f"record {index} of {shard}: {reason}" in m for m in messages), (index, reason)

    # Pairs: the same reasons apply per pair.
    with formats.ImageTextWriter(str(tmp_path), "pairs", 1) as writer:
        writer.write(solid_png(60), "a good pair")
        writer.write(b"garbage bytes", "corrupt image")
        writer.write(solid_png(61), "  ")
        writer.write_serialized(_example_without_image())
        writer.write(solid_png(62), "another good pair")
    pair_pipeline = pairs.ImageTextPipeline(
        str(tmp_path / "pairs-*"), 4, tok, config=pairs.PairConfig(max_len=16), image_config=IMAGE_CONFIG,
        training=False, num_epochs=1, drop_remainder=False, process_index=0, process_count=1)
    pair_examples = rows(collect(pair_pipeline))
    assert [red_value(e["media"][0], IMAGE_CONFIG) for e in pair_examples] == [60, 62]
    assert nonzero(pair_pipeline.skip_counts()) == {"empty_text": 1, "no_image": 1, "corrupt_image": 1}


def test_a_stream_with_no_valid_record_raises_instead_of_hanging(tmp_path, tok):
    with formats.ImageTextWriter(str(tmp_path), "bad", 1) as writer:
        for _ in range(3):
            writer.write(b"not an image", "caption")
    pipeline = pairs.ImageTextPipeline(str(tmp_path / "bad-*"), 2, tok, image_config=IMAGE_CONFIG,
                                       process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="no valid record"):
        next(pipeline)
    assert pipeline.skip_counts()["corrupt_image"] == 3


def test_state_from_another_host_layout_is_refused(docs_pattern, tok):
    state = make(docs_pattern, tok, seed=1, process_index=0, process_count=2).get_state()
    with pytest.raises(ValueError, match="process_count=2 but this pipeline has process_count=1"):
        make(docs_pattern, tok, seed=1).set_state(state)


# ---------------------------------------------------------------- damaged files
PLAIN = images.ImageConfig(size=16, random_flip=False, color_jitter=False)


def write_pairs(directory, name, num_shards, count):
    """`count` pairs over `num_shards` shards; pair i's image has red value i + 10, and sits in shard i % num_shards."""
    with formats.ImageTextWriter(str(directory), name, num_shards) as writer:
        for i in range(count):
            writer.write(solid_png(i + 10), f"record {i}")
    return sorted(str(p) for p in directory.glob(f"{name}-*.tfrecord"))


def record_spans(path):
    """(offset, data length) of every record of an intact shard, from the framing (12-byte header, 4-byte footer)."""
    data, spans, at = open(path, "rb").read(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        spans.append((at, length))
        at += 16 + length
    return spans


def flip_data_bytes(path, spans, count=48):
    raw = bytearray(open(path, "rb").read())
    for at, length in spans:
        for i in range(at + 12 + 8, at + 12 + min(length, 8 + count)):
            raw[i] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def make_pairs(pattern, tok, **kwargs):
    return pairs.ImageTextPipeline(pattern, 4, tok, config=pairs.PairConfig(max_len=16, p_leading_space=0.0),
                                   image_config=PLAIN, training=False, shuffle=True, shuffle_buffer=8, seed=5,
                                   process_index=0, process_count=1, **kwargs)


def test_damaged_shards_are_skipped_counted_logged_and_restored_exactly(tmp_path, tok, caplog):
    files = write_pairs(tmp_path, "pairs", 4, 40)
    crc_shard, cut_shard = files[1], files[2]
    crc_offset, crc_length = record_spans(crc_shard)[3]  # the shard's 4th record: pair 1 + 4 * 3 = 13
    flip_data_bytes(crc_shard, [(crc_offset, crc_length)])
    spans, half = record_spans(cut_shard), os.path.getsize(cut_shard) // 2
    whole = sum(at + 16 + length <= half for at, length in spans)  # records of the cut shard that survive
    with open(cut_shard, "r+b") as f:
        f.truncate(half)
    lost = {13} | {2 + 4 * k for k in range(whole, len(spans))}
    pattern = str(tmp_path / "pairs-*")

    caplog.set_level(logging.WARNING)
    one_epoch = make_pairs(pattern, tok, num_epochs=1, drop_remainder=False)
    seen = [red_value(e["media"][0], PLAIN) - 10 for e in rows(collect(one_epoch))]
    assert sorted(seen) == sorted(set(range(40)) - lost)  # every readable record, once, to the end
    assert nonzero(one_epoch.skip_counts()) == {"corrupt_record": 1, "truncated_shard": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"damaged data at byte {crc_offset} of {crc_shard}: corrupt_record" in m for m in messages)
    assert any(f"damaged data at byte {spans[whole][0]} of {cut_shard}: truncated_shard" in m for m in messages)

    # An endless stream through the mixture: a restore mid-stream continues exactly, counts included.
    def mixture():
        return Mixture({"pairs": make_pairs(pattern, tok)}, {"pairs": 1.0})

    reference = mixture()
    batches = [next(reference)["pairs"] for _ in range(14)]  # 56 records: well into the second epoch
    run = mixture()
    for _ in range(9):  # 36 records: past the first epoch's 34
        next(run)
    state = json.dumps(run.get_state())
    restored = mixture()
    restored.set_state(json.loads(state))
    assert restored.skip_counts() == run.skip_counts()
    assert_same([next(restored)["pairs"] for _ in range(5)], batches[9:])
    assert restored.skip_counts() == reference.skip_counts()
    counts = reference.skip_counts()["pairs"]
    assert counts["corrupt_record"] >= 1 and counts["truncated_shard"] >= 1


def test_a_mostly_damaged_dataset_stops_with_a_message_naming_it(tmp_path, tok):
    [shard] = write_pairs(tmp_path, "pairs", 1, 30)
    flip_data_bytes(shard, [span for i, span in enumerate(record_spans(shard)) if i % 3])  # 20 of 30 damaged
    strict = make_pairs(str(tmp_path / "pairs-*"), tok, max_skip_fraction=0.25, skip_check_min_records=8)
    with pytest.raises(RuntimeError, match=r"dataset 'image_text': \d+ of \d+ records read were skipped \(\d+% > "
                                           r"max_skip_fraction=0.25\): \{'corrupt_record': \d+\}") as error:
        for _ in range(10):
            next(strict)
    assert shard in str(error.value) and len(str(error.value).splitlines()) <= 3
    lenient = make_pairs(str(tmp_path / "pairs-*"), tok, num_epochs=1, drop_remainder=False, max_skip_fraction=1.0)
    assert len(rows(collect(lenient))) == 10 and lenient.skip_counts()["corrupt_record"] == 20


def test_a_folder_with_two_shard_sets_of_one_name_is_refused(tmp_path, tok):
    write_pairs(tmp_path / "a", "x", 2, 4)
    write_pairs(tmp_path / "b", "x", 4, 4)
    for path in (tmp_path / "b").iterdir():
        shutil.copy(path, tmp_path / "a")
    with pytest.raises(ValueError, match=r"x-00000-of-00002\.tfrecord beside x-00000-of-00004\.tfrecord"):
        make_pairs(str(tmp_path / "a" / "x-*"), tok)


def test_a_shard_that_vanishes_after_listing_is_skipped_and_counted(tmp_path, tok, caplog):
    files = write_pairs(tmp_path, "pairs", 2, 8)  # shard 0: pairs 0, 2, 4, 6; shard 1: 1, 3, 5, 7
    pipeline = make_pairs(str(tmp_path / "pairs-*"), tok, num_epochs=1, drop_remainder=False)
    os.remove(files[1])
    caplog.set_level(logging.WARNING)
    seen = sorted(red_value(e["media"][0], PLAIN) - 10 for e in rows(collect(pipeline)))
    assert seen == [0, 2, 4, 6] and nonzero(pipeline.skip_counts()) == {"unreadable_file": 1}
    assert any(f"damaged data at byte 0 of {files[1]}: unreadable_file" in r.getMessage() for r in caplog.records)
