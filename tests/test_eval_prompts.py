"""Prompt items (inference.items), the templates' text (evaluation.templates),
few-shot and zero-shot assembly, seeded sampling, RICES and ensemble orders."""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from flamingo_jax.evaluation import readers as R
from flamingo_jax.evaluation import rices, templates
from flamingo_jax.evaluation import support as selection
from flamingo_jax.inference import items as prompt_items

EOC = prompt_items.END_OF_CHUNK


def caption_example(i: int) -> R.CaptionExample:
    return R.CaptionExample(id=i, image_path=Path(f"img{i}.jpg"),
                            captions=[f"caption {i} one.", f"caption {i} two."])


def vqa_example(i: int, answers: list[str] | None = None) -> R.VQAExample:
    return R.VQAExample(question_id=i, image_path=Path(f"q{i}.jpg"), question=f"What is {i}?",
                        answers=answers if answers is not None else [f"thing {i}"] * 10)


# ---------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------


def test_end_of_chunk_is_one_object_everywhere() -> None:
    assert repr(EOC) == "<EOC>"
    assert copy.copy(EOC) is EOC and copy.deepcopy([EOC])[0] is EOC
    assert pickle.loads(pickle.dumps(EOC)) is EOC
    assert type(EOC)() is EOC


def test_media_holds_exactly_one_valid_source(tmp_path: Path) -> None:
    assert prompt_items.Media(path="a.jpg").path == Path("a.jpg")
    image = prompt_items.Media(array=np.zeros((4, 5, 3), np.uint8))
    video = prompt_items.Media(array=np.zeros((2, 4, 5, 3), np.uint8))
    frames = prompt_items.Media(frames=["f1.jpg", "f2.jpg"])
    assert not image.is_video and video.is_video and frames.is_video
    assert not prompt_items.Media(path="a.jpg").is_video
    assert frames.frames == [Path("f1.jpg"), Path("f2.jpg")]
    with pytest.raises(ValueError, match="exactly one"):
        prompt_items.Media()
    with pytest.raises(ValueError, match="exactly one"):
        prompt_items.Media(path="a.jpg", frames=["f.jpg"])
    with pytest.raises(ValueError, match="uint8"):
        prompt_items.Media(array=np.zeros((4, 5, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        prompt_items.Media(array=np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        prompt_items.Media(frames=[])
    assert prompt_items.Media(array=np.ones((2, 2, 3), np.uint8)) == prompt_items.Media(array=np.ones((2, 2, 3), np.uint8))
    assert prompt_items.Media(array=np.ones((2, 2, 3), np.uint8)) != prompt_items.Media(array=np.zeros((2, 2, 3), np.uint8))
    assert prompt_items.Media(path="a.jpg") != prompt_items.Media(path="b.jpg")


def test_media_of_example_uses_frames_for_video(tmp_path: Path) -> None:
    frames_dir = tmp_path / "video3"
    frames_dir.mkdir()
    for i in (10, 2, 1):
        (frames_dir / f"frame_{i}.jpg").write_bytes(b"")
    video = R.VideoQAExample(id=0, frames_dir=frames_dir, question="what moves?", answer="circle")
    media = templates.media_of_example(video)
    assert [p.name for p in media.frames] == ["frame_1.jpg", "frame_2.jpg", "frame_10.jpg"]
    assert templates.media_of_example(caption_example(1)) == prompt_items.Media(path=Path("img1.jpg"))
    with pytest.raises(TypeError, match="image_path or frames_dir"):
        templates.media_of_example(object())


def test_merge_text_and_render() -> None:
    media = prompt_items.Media(path="x.jpg")
    assert prompt_items.merge_text(["a", "b", EOC, "c", media, "d", "e"]) == ["ab", EOC, "c", media, "de"]
    assert prompt_items.render_prompt([media, "Output: x", EOC, media, "Output:"]) == (
        "<image>Output: x<EOC><image>Output:")
    with pytest.raises(TypeError):
        prompt_items.render_prompt([3])


# ---------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------


def test_captioning_template() -> None:
    template = templates.CaptioningTemplate()
    example = caption_example(7)
    assert template.query(example) == [prompt_items.Media(path=Path("img7.jpg")), "Output:"]
    assert template.support(example) == [prompt_items.Media(path=Path("img7.jpg")), "Output: caption 7 one.", EOC]
    assert template.answer(example) == "caption 7 one."
    assert template.candidates([example]) is None


def test_vqa_template_uses_paper_wording_and_consensus_answer() -> None:
    template = templates.VQATemplate()
    example = vqa_example(3, ["two", "2", "2", "two", "2", "three", "2", "2", "two", "2"])
    assert prompt_items.render_prompt(template.query(example)) == "<image>Question: What is 3? Answer:"
    assert prompt_items.render_prompt(template.support(example)) == "<image>Question: What is 3? Answer: 2<EOC>"
    assert templates.most_common_answer(["b", "a", "a", "b"]) == "b"  # a tie goes to the first given
    with pytest.raises(ValueError, match="no answers"):
        template.support(vqa_example(4, answers=[]))
    assert template.query(vqa_example(4, answers=[]))[-1] == "Question: What is 4? Answer:"


def test_video_qa_template_puts_all_frames_in_one_media(tmp_path: Path) -> None:
    (tmp_path / "vid1").mkdir()
    for i in range(3):
        (tmp_path / "vid1" / f"{i}.jpg").write_bytes(b"")
    example = R.VideoQAExample(id=0, frames_dir=tmp_path / "vid1", question="who runs?", answer="Man ")
    items = templates.VQATemplate().support(example)
    assert isinstance(items[0], prompt_items.Media) and len(items[0].frames) == 3
    assert items[1:] == ["Question: who runs? Answer: Man", EOC]


def test_hateful_memes_template() -> None:
    template = templates.HatefulMemesTemplate()
    hateful = R.ClassificationExample(id=1, image_path=Path("img/01.png"), text="some text ", label=1)
    benign = R.ClassificationExample(id=2, image_path=Path("img/02.png"), text="other", label=0)
    assert prompt_items.render_prompt(template.support(hateful)) == (
        '<image>is an image with written: "some text" on it. Is it hateful? Answer: yes<EOC>')
    assert template.query(benign)[-1] == 'is an image with written: "other" on it. Is it hateful? Answer:'
    assert template.answer(benign) == "no"
    assert template.candidates([]) == ["yes", "no"]
    unlabelled = R.ClassificationExample(id=3, image_path=Path("x.png"), text="t", label=None)
    with pytest.raises(ValueError, match="no label"):
        template.support(unlabelled)
    asks = templates.HatefulMemesTemplate(question="Is it false?").query(benign)[-1]
    assert asks.endswith("on it. Is it false? Answer:")


def test_class_name_template_and_candidates() -> None:
    template = templates.ClassNameTemplate()
    tench = R.ClassificationExample(id="n1/a.JPEG", image_path=Path("a.JPEG"), text=None, label="tench")
    shark = R.ClassificationExample(id="n2/b.JPEG", image_path=Path("b.JPEG"), text=None, label="shark")
    assert template.support(tench)[1:] == ["Output: tench", EOC]
    assert template.query(tench)[1:] == ["Output:"]
    assert template.candidates([tench, shark, tench]) == ["shark", "tench"]


@pytest.mark.parametrize("template, example", [
    (templates.CaptioningTemplate(), caption_example(0)),
    (templates.VQATemplate(), vqa_example(0)),
    (templates.HatefulMemesTemplate(), R.ClassificationExample(1, Path("m.png"), "words", 0)),
    (templates.ClassNameTemplate(), R.ClassificationExample(1, Path("c.png"), None, "goldfish")),
])
def test_support_is_query_plus_answer_then_end_of_chunk(template, example) -> None:
    query, support = template.query(example), template.support(example)
    assert isinstance(query[0], prompt_items.Media) and isinstance(query[-1], str)
    assert query[-1].endswith(":") and not query[-1].endswith(" ")  # the open slot, no trailing space
    assert support == query[:-1] + [query[-1] + template.continuation(template.answer(example)), EOC]
    assert template.continuation("x") == " x"


# ---------------------------------------------------------------------------
# Prompt assembly
# ---------------------------------------------------------------------------


def test_build_prompt_few_shot_order_and_end_of_chunk() -> None:
    template = templates.CaptioningTemplate()
    support = [caption_example(i) for i in (5, 2, 9)]
    prompt = templates.build_prompt(template, support, caption_example(1))
    assert prompt_items.render_prompt(prompt) == (
        "<image>Output: caption 5 one.<EOC><image>Output: caption 2 one.<EOC>"
        "<image>Output: caption 9 one.<EOC><image>Output:")
    assert [item.path.name for item in prompt if isinstance(item, prompt_items.Media)] == [
        "img5.jpg", "img2.jpg", "img9.jpg", "img1.jpg"]
    eoc_positions = [i for i, item in enumerate(prompt) if item is EOC]
    assert len(eoc_positions) == 3
    assert all(prompt[i - 1].endswith(" one.") and isinstance(prompt[i + 1], prompt_items.Media) for i in eoc_positions)
    assert prompt[-1] == "Output:"


def test_zero_shot_is_two_text_only_examples_then_the_query() -> None:
    template = templates.VQATemplate()
    pool = [vqa_example(i) for i in range(10)]
    text_examples = selection.zero_shot_examples(pool, np.random.default_rng(0))
    assert len(text_examples) == templates.ZERO_SHOT_TEXT_EXAMPLES == 2
    prompt = templates.build_prompt(template, [], vqa_example(99), zero_shot_text_only=text_examples)
    media = [i for i, item in enumerate(prompt) if isinstance(item, prompt_items.Media)]
    assert len(media) == 1 and prompt[media[0]].path == Path("q99.jpg")  # only the query's image
    assert sum(item is EOC for item in prompt) == 2 and prompt[media[0] - 1] is EOC
    first, second = text_examples
    assert prompt_items.render_prompt(prompt) == (
        f"Question: {first.question} Answer: {first.answers[0]}<EOC>"
        f"Question: {second.question} Answer: {second.answers[0]}<EOC>"
        "<image>Question: What is 99? Answer:")
    with pytest.raises(ValueError, match="not both"):
        templates.build_prompt(template, pool[:1], vqa_example(99), zero_shot_text_only=text_examples)


def test_build_prompt_with_no_examples_is_the_query() -> None:
    assert templates.build_prompt(templates.CaptioningTemplate(), [], caption_example(1)) == [
        prompt_items.Media(path=Path("img1.jpg")), "Output:"]


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


def test_random_support_is_seeded_distinct_and_in_random_order() -> None:
    pool = list(range(100))
    draw = [selection.random_support(pool, 8, np.random.default_rng(seed)) for seed in range(5)]
    assert selection.random_support(pool, 8, np.random.default_rng(0)) == draw[0]
    assert all(len(set(d)) == 8 for d in draw)
    assert len({tuple(d) for d in draw}) == 5
    assert any(d != sorted(d) for d in draw)
    assert selection.random_support(pool, 0, np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="pool of 100"):
        selection.random_support(pool, 101, np.random.default_rng(0))


def test_sample_queries_is_deterministic_and_keeps_pool_order() -> None:
    pool = [f"q{i}" for i in range(50)]
    subset = selection.sample_queries(pool, 10, seed=3)
    assert subset == selection.sample_queries(pool, 10, seed=3)
    assert subset != selection.sample_queries(pool, 10, seed=4)
    assert len(set(subset)) == 10 and [pool.index(q) for q in subset] == sorted(pool.index(q) for q in subset)
    assert selection.sample_queries(pool, None, seed=3) == pool
    assert selection.sample_queries(pool, 50, seed=3) == pool and selection.sample_queries(pool, 80, seed=3) == pool
    assert selection.sample_queries(pool, 0, seed=3) == []


@pytest.mark.parametrize("num_shots, expected", [(0, 1), (1, 1), (2, 2), (3, 6), (4, 6), (32, 6)])
def test_ensemble_orders_are_distinct_permutations_identity_first(num_shots, expected) -> None:
    orders = selection.ensemble_orders(num_shots, 6, np.random.default_rng(1))
    assert len(orders) == expected == min(6, math.factorial(num_shots))
    assert orders[0] == list(range(num_shots))
    assert all(sorted(order) == list(range(num_shots)) for order in orders)
    assert len({tuple(order) for order in orders}) == len(orders)
    assert orders == selection.ensemble_orders(num_shots, 6, np.random.default_rng(1))
    assert selection.ensemble_orders(num_shots) == selection.ensemble_orders(num_shots)  # fixed seed by default


def test_reorder_applies_an_order() -> None:
    assert selection.reorder(["a", "b", "c"], [2, 0, 1]) == ["c", "a", "b"]


# ---------------------------------------------------------------------------
# RICES
# ---------------------------------------------------------------------------

SUPPORT_FEATURES = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])


def test_rices_orders_most_similar_last() -> None:
    index = rices.RicesIndex(SUPPORT_FEATURES)
    # cosine with [1, 0.1]: #0 0.995, #2 0.778, #1 0.0995, #3 -0.995
    assert index.select(np.array([1.0, 0.1]), 3).tolist() == [1, 2, 0]
    assert index.select(np.array([1.0, 0.1]), 1).tolist() == [0]
    assert index.select(np.array([0.1, 1.0]), 4).tolist() == [3, 0, 2, 1]
    assert index.select(np.array([1.0, 0.1]), 0).tolist() == []


def test_rices_uses_cosine_not_dot_product() -> None:
    index = rices.RicesIndex(np.array([[1.0, 0.0], [5.0, 5.0]]))  # dot product would prefer #1
    assert index.select(np.array([1.0, 0.2]), 2).tolist() == [1, 0]
    scaled = rices.RicesIndex(SUPPORT_FEATURES * np.array([[10.0], [0.1], [3.0], [7.0]]))
    assert scaled.select(np.array([10.0, 1.0]), 4).tolist() == [3, 1, 2, 0]


def test_rices_batches_and_breaks_ties_by_index() -> None:
    index = rices.RicesIndex(np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]))
    selected = index.select(np.array([[1.0, 0.0], [0.0, 1.0]]), 2)
    assert selected.shape == (2, 2)
    assert selected.tolist() == [[2, 1], [3, 0]]  # equal similarity: the lower index nearer the query
    with pytest.raises(ValueError, match="cannot select 5"):
        index.select(np.array([1.0, 0.0]), 5)
    with pytest.raises(ValueError, match="do not match"):
        index.select(np.array([1.0, 0.0, 0.0]), 1)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        rices.RicesIndex(np.zeros((3,)))


def test_rices_from_pool_featurizes_in_batches() -> None:
    pool = [caption_example(i) for i in range(5)]
    batch_sizes = []

    def featurize(media: list[prompt_items.Media]) -> np.ndarray:
        batch_sizes.append(len(media))
        return np.array([[float(m.path.stem[-1]), 1.0] for m in media])  # img{i}.jpg -> [i, 1]

    index = rices.RicesIndex.from_pool(pool, templates.media_of_example, featurize, batch_size=2)
    assert batch_sizes == [2, 2, 1] and len(index) == 5
    chosen = index.select_examples(np.array([4.0, 1.0]), 2)
    assert [e.id for e in chosen] == [3, 4]
    with pytest.raises(ValueError, match="expected \\[batch, feature_dim\\]"):
        rices.RicesIndex.from_pool(pool, templates.media_of_example, lambda media: np.zeros((1, 2)), batch_size=2)
    with pytest.raises(ValueError, match="built with a pool"):
        rices.RicesIndex(SUPPORT_FEATURES).select_examples(np.array([1.0, 0.0]), 1)
