"""Importers: small files in each public format, written here, become records the pipelines read."""

import base64
import csv
import io
import json
import logging
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flamingo_jax.data import images, interleaved, pairs, prepare, records

from test_data_utils import collect, make_tokenizer, occupied_slots, red_value, rows, solid_png

IMAGE_CONFIG = images.ImageConfig(size=16, random_flip=False, color_jitter=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def read_docs(pattern, tok):
    config = interleaved.InterleavedConfig(max_len=128, max_images=5, p_next=0.0)
    return rows(collect(interleaved.InterleavedPipeline(
        pattern, 1, tok, config=config, image_config=IMAGE_CONFIG, training=False, num_epochs=1,
        process_index=0, process_count=1)))


def doc_text(tok, example):
    return tok.decode(example["tokens"][example["tokens"] != tok.pad_id])


def test_obelics_jsonl_and_parquet(tmp_path, tok):
    images_dir = tmp_path / "imgs"
    images_dir.mkdir()
    (images_dir / "a.png").write_bytes(solid_png(30))
    data_uri = "data:image/png;base64," + base64.b64encode(solid_png(40)).decode()
    jsonl_rows = [
        {"texts": ["red cat", None, "blue dog"], "images": [None, "a.png", None]},
        {"texts": [None, "first image", None], "images": [data_uri, None, "imgs/a.png"]},
        {"texts": ["missing", None], "images": [None, "https://example.com/x.jpg"]},  # URL: not fetched
        {"texts": ["no images here"], "images": [None]},
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in jsonl_rows) + "\nnot json\n")
    stats = prepare.import_interleaved(str(tmp_path / "docs.jsonl"), str(tmp_path / "out"), 2,
                                       image_dir=str(images_dir))
    assert stats.written == 2
    assert stats.skipped == {"missing_image": 1, "no_image": 1, "malformed": 1}
    examples = read_docs(str(tmp_path / "out" / "interleaved-*"), tok)
    assert sorted(doc_text(tok, e) for e in examples) == sorted(
        ["red cat<EOC><image> blue dog<EOC>", "<image> first image<EOC><image><EOC>"])
    values = sorted(tuple(red_value(m, IMAGE_CONFIG) for m in e["media"][occupied_slots(e["media"])]) for e in examples)
    assert values == [(30,), (40, 30)]

    # Parquet, Hugging Face style: images as {"bytes": ..., "path": ...} structs.
    table = pa.table({
        "texts": [["a star", None], [None, "two", None]],
        "images": [[None, {"bytes": solid_png(50), "path": None}],
                   [{"bytes": None, "path": str(images_dir / "a.png")}, None, {"bytes": b"broken", "path": None}]],
    })
    pq.write_table(table, str(tmp_path / "docs.parquet"))
    stats = prepare.import_interleaved(str(tmp_path / "docs.parquet"), str(tmp_path / "pq"), 1, name="web")
    assert stats.written == 1 and stats.skipped == {"corrupt_image": 1}
    [example] = read_docs(str(tmp_path / "pq" / "web-*"), tok)
    assert doc_text(tok, example) == "a star<EOC><image><EOC>"
    assert red_value(example["media"][0], IMAGE_CONFIG) == 50


def test_mmc4_images_go_before_their_matched_sentence(tmp_path, tok):
    (tmp_path / "cat.png").write_bytes(solid_png(60))
    row = {"url": "http://page", "text_list": ["one cat.", "two dogs.", "the end."],
           "image_info": [{"image_name": "cat.png", "matched_text_index": 1, "matched_sim": 0.3},
                          {"image_base64": base64.b64encode(solid_png(70)).decode(), "matched_text_index": 2}]}
    missing = dict(row, image_info=[{"image_name": "gone.png", "matched_text_index": 0}, row["image_info"][0]])
    (tmp_path / "mmc4.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(missing) + "\n")
    stats = prepare.import_interleaved(str(tmp_path / "mmc4.jsonl"), str(tmp_path / "out"), 1)
    assert stats.written == 1 and stats.skipped == {"missing_image": 1}
    [example] = read_docs(str(tmp_path / "out" / "interleaved-*"), tok)
    assert doc_text(tok, example) == "one cat.<EOC><image> two dogs.<EOC><image> the end.<EOC>"
    assert [red_value(m, IMAGE_CONFIG) for m in example["media"][:2]] == [60, 70]
    # drop_image keeps the document without the missing image.
    stats = prepare.import_interleaved(str(tmp_path / "mmc4.jsonl"), str(tmp_path / "drop"), 1,
                                       on_missing_image="drop_image")
    assert stats.written == 2 and stats.skipped == {}


def _add(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_webdataset_tar_shards(tmp_path, tok):
    with tarfile.open(tmp_path / "00000.tar", "w") as archive:
        _add(archive, "s/000.jpg", images.encode_image(np.full((10, 10, 3), 128, np.uint8)))
        _add(archive, "s/000.txt", b"a grey square")
        _add(archive, "s/001.png", solid_png(90))
        _add(archive, "s/001.json", json.dumps({"caption": "a red thing", "width": 16}).encode())
        _add(archive, "s/002.jpg", solid_png(10))
        _add(archive, "s/002.json", json.dumps({"url": "no caption"}).encode())
        _add(archive, "s/003.jpg", b"\xff\xd8\xff broken jpeg")
        _add(archive, "s/003.txt", b"corrupt")
        _add(archive, "s/004.txt", b"caption without image")
    stats = prepare.import_webdataset(str(tmp_path / "*.tar"), str(tmp_path / "out"), 2)
    assert stats.written == 2
    assert stats.skipped == {"empty_text": 1, "corrupt_image": 1, "no_image": 1}
    pipeline = pairs.ImageTextPipeline(str(tmp_path / "out" / "image_text-*"), 1, tok,
                                       config=pairs.PairConfig(max_len=32, p_leading_space=0.0),
                                       image_config=IMAGE_CONFIG, training=False, num_epochs=1,
                                       process_index=0, process_count=1)
    got = {tok.decode(e["targets"][e["loss_mask"] > 0]): red_value(e["media"][0], IMAGE_CONFIG)
           for e in rows(collect(pipeline))}
    assert set(got) == {"a grey square<EOC>", "a red thing<EOC>"}  # targets: caption, <EOC>, EOS (decodes to "")
    assert abs(got["a grey square<EOC>"] - 128) <= 2 and got["a red thing<EOC>"] == 90


def _frames(folder, count):
    """Frames named f0.png, f1.png, ... f10.png (unpadded: text order would put f10 before f2)."""
    folder.mkdir(parents=True)
    for k in range(count):
        (folder / f"f{k}.png").write_bytes(solid_png(10 * k + 5))


def test_video_frame_folders_with_csv_or_json_captions(tmp_path, tok):
    _frames(tmp_path / "frames" / "v1", 12)
    _frames(tmp_path / "frames" / "v2", 4)
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "caption", "frame_rate"])
        writer.writerows([["v1", "a cat runs", "2"], ["v2", "a dog sits", "1"], ["v3", "missing", "1"]])
    stats = prepare.import_video_frames(str(tmp_path / "captions.csv"), str(tmp_path / "out"), 1,
                                        frames_dir=str(tmp_path / "frames"))
    assert stats.written == 2 and stats.skipped == {"missing_image": 1}
    pipeline = pairs.VideoTextPipeline(str(tmp_path / "out" / "video_text-*"), 2, tok,
                                       config=pairs.PairConfig(max_len=16, num_frames=3, fps=1.0),
                                       image_config=IMAGE_CONFIG, training=False, num_epochs=1,
                                       process_index=0, process_count=1)
    [first, second] = rows(collect(pipeline))
    picked = [[(red_value(frame[None], IMAGE_CONFIG) - 5) // 10 for frame in e["media"][0]] for e in (first, second)]
    assert picked == [[0, 2, 4], [0, 1, 2]]  # 1 FPS from 2 FPS and 1 FPS frames, in time order (f2 before f10)

    (tmp_path / "captions.json").write_text(json.dumps({"v2": "a dog sits"}))
    with pytest.raises(ValueError, match="--frame_rate"):
        prepare.import_video_frames(str(tmp_path / "captions.json"), str(tmp_path / "j"), 1,
                                    frames_dir=str(tmp_path / "frames"))
    stats = prepare.import_video_frames(str(tmp_path / "captions.json"), str(tmp_path / "j"), 1,
                                        frames_dir=str(tmp_path / "frames"), frame_rate=1.0)
    assert stats.written == 1
    (tmp_path / "frames" / "captions.json").write_text(json.dumps([{"video_id": "v1", "caption": "c", "fps": 2}]))
    assert prepare.import_video_frames(str(tmp_path / "frames"), str(tmp_path / "d"), 1).written == 1

    (tmp_path / "frames" / "v4.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (tmp_path / "mp4.json").write_text(json.dumps({"v4": "a video file"}))
    with pytest.raises(ValueError, match="ffmpeg"):
        prepare.import_video_frames(str(tmp_path / "mp4.json"), str(tmp_path / "m"), 1,
                                    frames_dir=str(tmp_path / "frames"), frame_rate=1.0)
    with pytest.raises(ValueError, match="ffmpeg"):
        prepare.import_video_frames(str(tmp_path / "frames" / "v4.mp4"), str(tmp_path / "m"), 1)


def test_command_line_prints_counts(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(solid_png(30))
    (tmp_path / "d.jsonl").write_text(json.dumps({"texts": ["hi", None], "images": [None, "a.png"]}) + "\n")
    code = prepare._main(["prepare", "interleaved", f"--input={tmp_path / 'd.jsonl'}",
                          f"--output_dir={tmp_path / 'out'}", "--num_shards=3", "--name=mine"])
    assert code == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["written"] == 1 and stats["skipped"] == {}
    assert sorted(os.listdir(tmp_path / "out")) == [f"mine-0000{i}-of-00003.tfrecord" for i in range(3)]


# ---------------------------------------------------------------- bad input: skipped and named, never fatal or silent
def _doc(text="a red cat", value=30):
    uri = "data:image/png;base64," + base64.b64encode(solid_png(value)).decode()
    return {"texts": [text, None], "images": [None, uri]}


def _jsonl(*rows):
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


# case -> (files to write, documents written, skip counts, a log line that names the file and place)
INTERLEAVED_CASES = {
    "a JSON line that is a bare number": (
        {"d.jsonl": _jsonl(_doc(), b"5", _doc("two"))}, 2, {"malformed": 1}, "line 2 of {d.jsonl}: malformed"),
    "a line that is not UTF-8": (
        {"d.jsonl": _jsonl(_doc(), '{"texts": ["caf\xe9", null], "images": [null, "x.png"]}'.encode("latin-1"),
                           _doc("two"))}, 2, {"bad_encoding": 1}, "line 2 of {d.jsonl}: bad_encoding"),
    "fields of the wrong type": (
        {"d.jsonl": _jsonl({"texts": 5, "images": None}, {"texts": [{"a": 1}, None], "images": [None, "x"]},
                           _doc())}, 1, {"malformed": 2}, "line 1 of {d.jsonl}: malformed"),
    "a .parquet file that is not parquet": (
        {"a.jsonl": _jsonl(_doc()), "b.parquet": b"PAR1 this is not parquet"}, 1, {"unreadable_file": 1},
        "skipping file {b.parquet}: unreadable_file"),
    "a pretty-printed single-document .json": ({"d.json": json.dumps(_doc(), indent=2).encode()}, 1, {}, None),
    "a pretty-printed list in a .jsonl": ({"d.jsonl": json.dumps([_doc(), _doc("b")], indent=1).encode()}, 2, {},
                                          None),
}


@pytest.mark.parametrize("case", list(INTERLEAVED_CASES))
def test_interleaved_inputs_with_bad_rows_or_files(tmp_path, caplog, case):
    files, written, skipped, logged = INTERLEAVED_CASES[case]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    caplog.set_level(logging.WARNING)
    stats = prepare.import_interleaved(str(tmp_path / "*.json*") + "," + str(tmp_path / "*.parquet"),
                                       str(tmp_path / "out"), 1)
    assert (stats.written, stats.skipped) == (written, skipped)
    if logged:
        expected = logged
        for name in files:
            expected = expected.replace("{" + name + "}", str(tmp_path / name))
        assert any(expected in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    [shard] = (tmp_path / "out").glob("interleaved-*")
    assert sum(not r.damage for r in records.read_records(str(shard))) == written


def _captions_csv(path, rows, header=("video_id", "caption", "frame_rate")):
    with open(path, "wb") as f:
        f.write(",".join(header).encode() + b"\n")
        for row in rows:
            f.write(row + b"\n")


VIDEO_CASES = {
    "frame_rate=fast": (b"v2,a dog,fast", {"bad_number": 1}, "line 3 of {csv}: bad_number (frame_rate='fast'"),
    "frame_rate=-2": (b"v2,a dog,-2", {"bad_number": 1}, "line 3 of {csv}: bad_number (frame_rate='-2' must be"),
    "a row that is not UTF-8": (b"v2,caf\xe9,1", {"bad_encoding": 1}, "line 3 of {csv}: bad_encoding"),
    "a row with a missing column": (b"v2,a dog", {"malformed": 1}, "line 3 of {csv}: malformed"),
}


@pytest.mark.parametrize("case", list(VIDEO_CASES))
def test_video_captions_with_bad_rows(tmp_path, caplog, case):
    row, skipped, logged = VIDEO_CASES[case]
    _frames(tmp_path / "v1", 2)
    _frames(tmp_path / "v2", 2)
    _captions_csv(tmp_path / "captions.csv", [b"v1,a cat,2", row])
    caplog.set_level(logging.WARNING)
    stats = prepare.import_video_frames(str(tmp_path / "captions.csv"), str(tmp_path / "out"), 1)
    assert (stats.written, stats.skipped) == (1, skipped)
    expected = logged.format(csv=tmp_path / "captions.csv")
    assert any(expected in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_webdataset_with_a_file_that_is_not_a_tar_and_a_caption_that_is_not_utf8(tmp_path, caplog):
    with tarfile.open(tmp_path / "a.tar", "w") as archive:
        _add(archive, "s/000.png", solid_png(40))
        _add(archive, "s/000.txt", b"a red square")
        _add(archive, "s/001.png", solid_png(50))
        _add(archive, "s/001.txt", b"caf\xe9")
    (tmp_path / "b.tar").write_bytes(b"not a tar archive at all" * 40)
    caplog.set_level(logging.WARNING)
    stats = prepare.import_webdataset(str(tmp_path / "*.tar"), str(tmp_path / "out"), 1)
    assert (stats.written, stats.skipped) == (1, {"bad_encoding": 1, "unreadable_file": 1})
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"sample s/001 of {tmp_path / 'a.tar'}: bad_encoding" in m for m in messages)
    assert any(f"skipping file {tmp_path / 'b.tar'}: unreadable_file" in m for m in messages)


def _cli(capsys, kind, *flags):
    code = prepare._main(["prepare", kind, *flags])
    return code, capsys.readouterr().err.strip()


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_failed_import_never_touches_the_existing_dataset(tmp_path, capsys, monkeypatch):
    (tmp_path / "d.jsonl").write_bytes(_jsonl(_doc(), _doc("b"), _doc("c"), _doc("d")))
    out = tmp_path / "out"
    assert _cli(capsys, "interleaved", f"--input={tmp_path / 'd.jsonl'}", f"--output_dir={out}",
                "--num_shards=4")[0] == 0
    before = _snapshot(out)
    assert len(before) == 4

    code, err = _cli(capsys, "interleaved", "--input=typo/*.jsonl", f"--output_dir={out}", "--num_shards=4")
    assert code == 1 and "--input='typo/*.jsonl' matches no files" in err and len(err.splitlines()) <= 3
    assert _snapshot(out) == before

    (tmp_path / "bad.jsonl").write_bytes(_jsonl(b"1", b"[2]", b"not json"))
    code, err = _cli(capsys, "interleaved", f"--input={tmp_path / 'bad.jsonl'}", f"--output_dir={out}",
                     "--num_shards=4")
    assert code == 1 and "no record of" in err and "bad.jsonl" in err and len(err.splitlines()) <= 3
    assert _snapshot(out) == before

    code, err = _cli(capsys, "interleaved", f"--input={tmp_path / 'd.jsonl'}", f"--output_dir={out}",
                     "--num_shards=2")
    assert code == 1 and "already holds dataset 'interleaved' as 4 shard(s)" in err and "--overwrite" in err
    assert len(err.splitlines()) <= 3 and _snapshot(out) == before

    calls = []

    def interrupted(*args, **kwargs):  # Ctrl-C in the middle of an import
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return solid_png(30)

    monkeypatch.setattr(prepare, "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.import_interleaved(str(tmp_path / "d.jsonl"), str(out), 4)
    monkeypatch.undo()
    assert _snapshot(out) == before  # no staging folder left either

    assert _cli(capsys, "interleaved", f"--input={tmp_path / 'd.jsonl'}", f"--output_dir={out}", "--num_shards=2",
                "--overwrite")[0] == 0
    assert sorted(_snapshot(out)) == [f"interleaved-0000{i}-of-00002.tfrecord" for i in range(2)]


def test_a_captions_file_without_the_needed_columns_is_refused_with_what_is_expected(tmp_path, capsys):
    _captions_csv(tmp_path / "captions.csv", [b"v1,a cat"], header=("id", "description"))
    code, err = _cli(capsys, "video_text", f"--input={tmp_path / 'captions.csv'}", f"--output_dir={tmp_path / 'o'}")
    assert code == 1 and "columns ['id', 'description']" in err and "video_id, caption" in err
    assert len(err.splitlines()) <= 3 and not (tmp_path / "o").exists()
