"""The synthetic corpus and the mixture built from a config over it; the throughput benchmark."""

import importlib.util
import json
import os
import re

import ml_collections
import numpy as np
import pytest

from flamingo_jax.data import mixture, synthetic
from flamingo_jax.data.tokenizer import Tokenizer

from helpers import training_texts
from test_data_utils import check_contract

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(num_examples=24, num_documents=12, num_videos=4, num_eval=6, image_size=32, video_seconds=4,
             video_fps=2.0, vocab_size=400, num_shards=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    synthetic.generate(out, seed=0, **SIZES)
    return out


def template_regex(template: str, **fields: str) -> re.Pattern:
    """`template` ("... {colour} {kind}") as a regex, each named field one of the given alternatives
    (a named group)."""
    pattern = re.escape(template)
    for name, alternatives in fields.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alternatives})")
    return re.compile(pattern)


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
        sentences = image["sentences"]
        assert len(sentences) == 2 and all(s["raw"] and s["tokens"] for s in sentences)
        # "a red tovel." / "a large red tovel.": one shape, its colour and its held-out name.
        assert len({s["tokens"][-1] for s in sentences}) == 1
        assert sentences[0]["tokens"][-1] in synthetic.HELD_OUT_SHAPE_NAMES.values()
        assert all(s["tokens"][-2] in synthetic.COLOURS for s in sentences)
    vqa = tasks["vqa"]
    questions = json.load(open(os.path.join(evaluation, vqa["query"]["questions"])))["questions"]
    annotations = json.load(open(os.path.join(evaluation, vqa["query"]["annotations"])))["annotations"]
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in annotations]
    for q, a in zip(questions, annotations):
        assert q["question"] == synthetic.HELD_OUT_QUESTION and len(a["answers"]) == 10
        assert a["multiple_choice_answer"] in synthetic.HELD_OUT_TEXTURE_NAMES.values()
        assert {answer["answer"] for answer in a["answers"]} == {a["multiple_choice_answer"]}
        assert os.path.isfile(os.path.join(evaluation, vqa["image_root"], vqa["image_filename"].format(**q)))
    with open(os.path.join(evaluation, tasks["classification"]["query"])) as f:
        memes = [json.loads(line) for line in f]
    assert memes and all(set(m) == {"id", "img", "label", "text"} and m["label"] in (0, 1) for m in memes)
    claim = template_regex(synthetic.HELD_OUT_CLAIM, article="an?", colour="|".join(synthetic.COLOURS),
                           kind="|".join(synthetic.SHAPES))
    assert all(claim.fullmatch(m["text"]) for m in memes), [m["text"] for m in memes]
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


def test_held_out_families_name_what_the_scene_shows():
    shape_names, texture_names = synthetic.HELD_OUT_SHAPE_NAMES, synthetic.HELD_OUT_TEXTURE_NAMES
    assert len(set(shape_names.values())) == len(synthetic.SHAPES)
    assert len(set(texture_names.values())) == len(synthetic.TEXTURES)
    assert not synthetic.HELD_OUT_NAMES & (set(synthetic.COLOURS) | set(synthetic.SHAPES) | set(synthetic.TEXTURES))
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = synthetic.random_scene(rng, num_shapes=1)
        shape = scene.shapes[0]
        short, sized = (text.rstrip(".").split() for text in synthetic.named_caption(scene))
        assert short == [synthetic.article(shape.colour), shape.colour, shape_names[shape.kind]]
        size = "large" if shape.large else "small"
        assert sized == [synthetic.article(size), size, shape.colour, shape_names[shape.kind]]
        scene = synthetic.random_scene(rng)
        assert synthetic.texture_question(scene) == (synthetic.HELD_OUT_QUESTION, texture_names[scene.texture])


def test_verification_claims_hold_of_the_scene_exactly_when_true():
    rng = np.random.default_rng(2)
    wrong = {"colour": 0, "kind": 0}
    for i in range(200):
        scene = synthetic.random_scene(rng)
        present = {(s.colour, s.kind) for s in scene.shapes}
        false = bool(i % 2)
        colour, kind = synthetic.verification_claim(scene, rng, false=false)
        assert colour in synthetic.COLOURS and kind in synthetic.SHAPES
        assert ((colour, kind) in present) is not false, (scene, colour, kind, false)
        if false:  # false claims are near misses too: a shape of the scene with another colour, or kind
            wrong["colour"] += kind in {k for _, k in present}
            wrong["kind"] += colour in {c for c, _ in present}
    assert min(wrong.values()) >= 20, wrong


NAMING_PATTERNS = [template_regex(frame, name="[a-z]+", a="an?", colour="|".join(synthetic.COLOURS))
                   for frame in synthetic.NAMING_FRAMES + synthetic.COLOURED_NAMING_FRAMES]


def _value(scene, attribute):
    return scene.texture if attribute == "texture" else getattr(scene.shapes[0], attribute)


def test_naming_episodes_bind_fresh_names_one_to_one_within_a_document():
    rng = np.random.default_rng(3)
    bound_attributes, names_of = set(), {}
    for _ in range(80):
        scenes, texts = synthetic.naming_episode(rng)
        assert len(scenes) == len(texts) and 4 <= len(texts) <= 6
        pattern = next(p for p in NAMING_PATTERNS if all(p.fullmatch(t) for t in texts))  # one frame per document
        matches = [pattern.fullmatch(t) for t in texts]
        names = [m["name"] for m in matches]
        assert not set(names) & synthetic.HELD_OUT_NAMES
        for scene, match in zip(scenes, matches):
            groups = match.groupdict()
            assert groups.get("a", synthetic.article(match["name"])) == synthetic.article(match["name"])
            assert groups.get("colour", scene.shapes[0].colour) == scene.shapes[0].colour
        # Same value -> same name, different values -> different names, for the attribute the episode names.
        bound = [a for a in ("kind", "colour", "texture")
                 if len({(_value(s, a), n) for s, n in zip(scenes, names)}) == len({_value(s, a) for s in scenes})
                 == len(set(names))]
        assert bound, list(zip(scenes, names))
        bound_attributes.update(bound)
        for scene, name in zip(scenes, names):
            names_of.setdefault((bound[0], _value(scene, bound[0])), set()).add(name)
    assert bound_attributes == {"kind", "colour", "texture"}
    assert max(len(n) for n in names_of.values()) > 3, "each document draws its own names"


def held_out_leaks(text: str) -> list[str]:
    """The held-out evaluation families' fixed words that `text` contains (case-insensitive; names
    as whole words)."""
    video = synthetic.motion_question(synthetic.Shape("star", "green", False, (0, 0))).split("green star")
    claim = synthetic.HELD_OUT_CLAIM.split("{")[0]
    phrases = [synthetic.HELD_OUT_QUESTION, claim, "is an image with written", *video]
    found = [p.strip() for p in phrases if p.strip().lower() in text.lower()]
    return found + re.findall(r"\b(?:" + "|".join(sorted(synthetic.HELD_OUT_NAMES)) + r")\b", text, re.IGNORECASE)


def test_held_out_families_stay_held_out_of_every_training_text(synthetic_corpus):
    """Acceptance: no text that training or pretraining reads (the corpus' image-text, interleaved
    and video-text records, and at scale every document style's text) holds a held-out family's
    question, claim, frame or name."""
    assert held_out_leaks("Question: What paper is it drawn on? Answer: Nezu.") == [
        "What paper is it drawn on?", "Nezu"]
    assert held_out_leaks('the picture shows a red star') == ["the picture shows"]
    assert held_out_leaks("How does the red star change during the video?") == [
        "How does the", "change during the video?"]
    assert held_out_leaks("a red tovelka and a mine.") == ["mine"]
    texts = training_texts(synthetic_corpus)
    claims = [template_regex(frame, a="an?", colour="[a-z]+", kind="[a-z]+", answer="yes|no")
              for frame in synthetic.CLAIM_FRAMES]
    assert any(" moves " in t for t in texts) and any("Question:" in t for t in texts)  # videos, VQA documents
    assert any(p.fullmatch(t) for p in NAMING_PATTERNS for t in texts)
    assert any(p.fullmatch(t) for p in claims for t in texts)
    rng = np.random.default_rng(4)  # rarer draws (e.g. a document's made-up author names), text only
    texts += [text for _ in range(1500) for text in synthetic.interleaved_document(rng, 8, lambda image: b"")[1]]
    texts += [synthetic.caption(synthetic.random_scene(rng), rng) for _ in range(500)]
    texts += [synthetic.video(rng, 8, 2)[1] for _ in range(100)]
    leaks = {text: held_out_leaks(text) for text in texts if held_out_leaks(text)}
    assert not leaks, leaks


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


def test_synthetic_interleaved_text_sees_the_image_it_follows(corpus):
    """Every synthetic text follows the image it is about, so in training batches (random windows)
    each token cross-attends to the last image marker at or before it: none before the window's
    first marker. Under the paper's p_next=0.5 about half the documents' text would see the next
    image, which it does not describe (the visual path then learns nothing in the recipe's budget)."""
    data = synthetic.data_config(corpus, image_size=32, interleaved_len=64, max_images=5, num_frames=2)
    pipeline = mixture.Mixture.from_config(data, seed=3, process_index=0, process_count=1).pipelines["interleaved"]
    (marker,) = pipeline.tokenizer.image_marker_ids
    rows = 0
    for _ in range(4):
        batch = next(pipeline)
        for tokens, media_index in zip(batch["tokens"], batch["media_index"]):
            previous = np.cumsum(tokens == marker) - 1
            expected = np.where(previous < 5, previous, -1)
            np.testing.assert_array_equal(media_index[tokens != pipeline.tokenizer.pad_id],
                                          expected[tokens != pipeline.tokenizer.pad_id])
            rows += int((tokens == marker).any())
    assert rows >= 8  # windows with images were checked


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
