"""The synthetic corpus and the mixture built from a config over it; the throughput benchmark."""

import importlib.util
import json
import os

import ml_collections
import numpy as np
import pytest

from flamingo_jax.data import mixture, synthetic
from flamingo_jax.data.tokenizer import Tokenizer

from test_data_utils import check_contract

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(num_examples=24, num_documents=12, num_videos=4, num_eval=6, image_size=32, video_seconds=4,
             video_fps=2.0, vocab_size=400, num_shards=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    synthetic.generate(out, seed=0, **SIZES)
    return out


def _files(directory):
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return out


def _pieces(directory):
    sp = Tokenizer(os.path.join(directory, "spm.model")).sp
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def test_synthetic_corpus_is_deterministic_and_in_public_formats(corpus, tmp_path):
    files = _files(corpus)
    for name in ("interleaved", "image_text", "video_text"):
        assert f"{name}/{name}-00000-of-00002.tfrecord" in files
    assert "spm.model" in files and "eval/tasks.json" in files
    synthetic.generate(str(tmp_path / "again"), seed=0, **SIZES)
    again = _files(str(tmp_path / "again"))
    path_dependent = ("data_config.json", "spm.model")  # hold the output folder's path
    assert {k: v for k, v in again.items() if k not in path_dependent} == {
        k: v for k, v in files.items() if k not in path_dependent}, "same seed, same bytes"
    assert _pieces(str(tmp_path / "again")) == _pieces(corpus)
    synthetic.generate(str(tmp_path / "other"), seed=1, **SIZES)
    assert _files(str(tmp_path / "other"))["image_text/image_text-00000-of-00002.tfrecord"] != files[
        "image_text/image_text-00000-of-00002.tfrecord"]

    evaluation = os.path.join(corpus, "eval")
    tasks = json.load(open(os.path.join(evaluation, "tasks.json")))
    karpathy = json.load(open(os.path.join(evaluation, tasks["captioning"]["annotations"])))
    assert {image["split"] for image in karpathy["images"]} == {"train", "test"}
    for image in karpathy["images"]:
        assert os.path.isfile(os.path.join(evaluation, "captioning", image["filepath"], image["filename"]))
        assert len(image["sentences"]) == 3 and all(s["raw"] and s["tokens"] for s in image["sentences"])
    vqa = tasks["vqa"]
    questions = json.load(open(os.path.join(evaluation, vqa["query"]["questions"])))["questions"]
    annotations = json.load(open(os.path.join(evaluation, vqa["query"]["annotations"])))["annotations"]
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in annotations]
    for q, a in zip(questions, annotations):
        assert q["question"].startswith("Where is the") and len(a["answers"]) == 10
        assert a["multiple_choice_answer"] in synthetic.CELL_WORDS.values()
        assert os.path.isfile(os.path.join(evaluation, vqa["image_root"], vqa["image_filename"].format(**q)))
    with open(os.path.join(evaluation, tasks["classification"]["query"])) as f:
        memes = [json.loads(line) for line in f]
    assert memes and all(set(m) == {"id", "img", "label", "text"} and m["label"] in (0, 1) for m in memes)
    assert all(os.path.isfile(os.path.join(evaluation, "classification", m["img"])) for m in memes)


def test_synthetic_text_is_true_of_the_scene():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = synthetic.random_scene(rng)
        question, answer = synthetic.question_answer(scene, rng)
        if question.startswith("How many"):
            kind = next(k for k in synthetic.SHAPES if synthetic.plural(k, 2) in question)
            assert synthetic.NUMBER_WORDS.index(answer) == sum(s.kind == kind for s in scene.shapes)
        if question.startswith("What colour is the"):
            kind = question.split()[-1].rstrip("?")
            assert [s.colour for s in scene.shapes if s.kind == kind] == [answer]
    one = synthetic.Scene("plain", 0, (synthetic.Shape("circle", "red", True, (1, 0)),))
    image = synthetic.render(one, 30)
    assert tuple(image[15, 5]) == synthetic.COLOURS["red"] and tuple(image[15, 25]) == synthetic.BACKGROUNDS[0]


def test_mixture_from_config_yields_every_dataset_and_resumes(corpus):
    data = ml_collections.ConfigDict(synthetic.data_config(corpus, image_size=32, interleaved_len=64, num_frames=2))
    data.datasets[0]["weight"] = 1.0
    build = lambda: mixture.Mixture.from_config(data, seed=7, process_index=0, process_count=1)  # noqa: E731
    mix = build()
    assert mix.weights == {"interleaved": 1.0, "image_text": 0.2, "video_text": 0.03}
    steps = [next(mix) for _ in range(4)]
    expected_media = {"interleaved": (4, 5, 1, 32, 32, 3), "image_text": (8, 1, 1, 32, 32, 3),
                      "video_text": (2, 1, 2, 32, 32, 3)}
    for step in steps:
        assert set(step) == set(expected_media)
        for name, batch in step.items():
            check_contract(batch, mix.tokenizer.vocab_size)
            assert batch["media"].shape == expected_media[name]
    state = json.loads(json.dumps(mix.get_state()))
    following = [next(mix) for _ in range(3)]
    restored = build()
    restored.set_state(state)
    for expected, got in zip(following, [next(restored) for _ in range(3)]):
        for name in expected:
            for key in expected[name]:
                np.testing.assert_array_equal(expected[name][key], got[name][key])
    assert restored.skip_counts() == mix.skip_counts()

    bad = data.to_dict()
    bad["datasets"][1]["batchsize"] = 4
    with pytest.raises(ValueError, match="unknown field 'batchsize'"):
        mixture.Mixture.from_config(bad, process_index=0, process_count=1)
    state["datasets"].pop("video_text")
    with pytest.raises(ValueError, match="restore with the same data.datasets names"):
        restored.set_state(state)


def test_throughput_benchmark_prints_json(corpus, capsys):
    spec = importlib.util.spec_from_file_location("data_throughput", os.path.join(REPO, "bench", "data_throughput.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["bench", f"--data_dir={corpus}", "--batches=2", "--warmup=1", "--repeats=2",
                       "--image_size=32", "--interleaved_batch=2", "--pair_batch=4", "--max_len=64"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in ("interleaved", "image_text"):
        rates = report["results"][name]["examples_per_s"]
        assert 0 < rates["min"] <= rates["median"] <= rates["max"]
    assert report["machine"]["cpu_count"] >= 1 and report["versions"]["tensorflow"]
    assert report["config"]["interleaved_batch"] == 2
