"""Tests for flamingo_jax.evaluation.tasks: the registry, each task's loading
from its public layout (and the errors when a file is missing), each metric on
small hand-computed outputs, and the synthetic held-out tasks end to end on
the session's synthetic corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from flamingo_jax.data import synthetic
from flamingo_jax.evaluation import metrics as M
from flamingo_jax.evaluation import readers as R
from flamingo_jax.evaluation import tasks as T
from flamingo_jax.evaluation import templates
from flamingo_jax.inference import items as prompt_items

ALL_TASKS = ("coco", "flickr30k", "vqav2", "okvqa", "vizwiz", "textvqa", "hateful_memes", "imagenet",
             "msvdqa", "msrvttqa", "synthetic_captioning", "synthetic_vqa", "synthetic_classification",
             "synthetic_video_qa")


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def vqa(i: int, answers: list[str]) -> R.VQAExample:
    return R.VQAExample(question_id=i, image_path=Path(f"{i}.jpg"), question="q?", answers=answers)


def labelled(i: int, label: int | str, classes: tuple[str, ...] = ()) -> T.ClassNameExample:
    return T.ClassNameExample(id=i, image_path=Path(f"{i}.jpg"), text="t", label=label, classes=classes)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def test_registry_has_every_task_with_a_consistent_mode() -> None:
    assert tuple(T.TASKS) == ALL_TASKS
    for name, task in T.TASKS.items():
        assert task.name == name and T.get_task(name) is task
        assert task.media is task.template.media
        if task.mode == "rank":
            assert task.kind == "classification" and task.candidates is not None and task.rices
        else:
            assert task.max_new_tokens == (20 if task.kind == "captioning" else 5)
            assert task.candidates is None and not task.rices
    kinds = {name: task.kind for name, task in T.TASKS.items()}
    assert kinds["coco"] == kinds["synthetic_captioning"] == "captioning"
    assert kinds["msvdqa"] == kinds["msrvttqa"] == kinds["synthetic_video_qa"] == "video_qa"
    assert T.get_task("hateful_memes").candidates([]) == ["yes", "no"]


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'cocoo'.*coco, flickr30k, .*synthetic_classification"):
        T.get_task("cocoo")


def test_task_rejects_inconsistent_fields() -> None:
    coco = T.get_task("coco")
    with pytest.raises(ValueError, match="rank mode needs candidates"):
        T.Task(name="x", kind="captioning", template=coco.template, mode="rank", max_new_tokens=0,
               load=coco.load, media=coco.media, postprocess=coco.postprocess, score=coco.score)
    with pytest.raises(ValueError, match="kind 'detection'"):
        T.Task(name="x", kind="detection", template=coco.template, mode="generate", max_new_tokens=1,
               load=coco.load, media=coco.media, postprocess=coco.postprocess, score=coco.score)


# ---------------------------------------------------------------------------
# Loading the public layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_TASKS)
def test_missing_files_name_the_task_and_the_path(name: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"Task '{name}'.*{tmp_path}.*expects under {tmp_path}"):
        T.get_task(name).load(tmp_path)


def test_coco_support_is_karpathy_train_and_queries_are_test(tmp_path: Path) -> None:
    def image(cocoid: int, split: str) -> dict:
        return {"filepath": "val2014", "filename": f"{cocoid}.jpg", "split": split, "cocoid": cocoid,
                "sentences": [{"raw": f"caption {cocoid}"}]}

    write_json(tmp_path / "coco" / "dataset_coco.json", {"images": [
        image(1, "train"), image(2, "test"), image(3, "restval"), image(4, "val"), image(5, "test")]})
    support, queries = T.get_task("coco").load(tmp_path)
    assert [e.id for e in support] == [1, 3] and [e.id for e in queries] == [2, 5]
    assert queries[0].image_path == tmp_path / "coco" / "val2014" / "2.jpg"


def test_flickr30k_layout(tmp_path: Path) -> None:
    write_json(tmp_path / "flickr30k" / "dataset_flickr30k.json", {"images": [
        {"filename": "a.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "x"}]},
        {"filename": "b.jpg", "imgid": 1, "split": "test", "sentences": [{"raw": "y"}]}]})
    support, queries = T.get_task("flickr30k").load(tmp_path)
    assert [e.id for e in support] == [0]
    assert queries[0].image_path == tmp_path / "flickr30k" / "flickr30k-images" / "b.jpg"


def write_vqa_split(root: Path, questions_name: str, annotations_name: str, question_id: int) -> None:
    write_json(root / questions_name, {"questions": [
        {"image_id": 9, "question": "What?", "question_id": question_id}]})
    write_json(root / annotations_name, {"annotations": [
        {"question_id": question_id, "answers": [{"answer": "yes"}] * 10}]})


def test_vqav2_and_okvqa_layouts(tmp_path: Path) -> None:
    for split, qid in (("train", 1), ("val", 2)):
        write_vqa_split(tmp_path / "vqav2", f"v2_OpenEnded_mscoco_{split}2014_questions.json",
                        f"v2_mscoco_{split}2014_annotations.json", qid)
        write_vqa_split(tmp_path / "okvqa", f"OpenEnded_mscoco_{split}2014_questions.json",
                        f"mscoco_{split}2014_annotations.json", qid)
    for name in ("vqav2", "okvqa"):
        support, queries = T.get_task(name).load(tmp_path)
        assert [e.question_id for e in support] == [1] and [e.question_id for e in queries] == [2]
        assert queries[0].image_path == tmp_path / name / "val2014" / "COCO_val2014_000000000009.jpg"


def test_vizwiz_and_textvqa_layouts(tmp_path: Path) -> None:
    for split in ("train", "val"):
        write_json(tmp_path / "vizwiz" / f"{split}.json", [
            {"image": f"VizWiz_{split}_00000001.jpg", "question": "What?", "answers": [{"answer": "a"}]}])
        write_json(tmp_path / "textvqa" / f"TextVQA_0.5.1_{split}.json", {"data": [
            {"question_id": split, "image_id": f"img_{split}", "question": "What?", "answers": ["b"]}]})
    support, queries = T.get_task("vizwiz").load(tmp_path)
    assert queries[0].image_path == tmp_path / "vizwiz" / "val" / "VizWiz_val_00000001.jpg"
    assert support[0].question_id == "VizWiz_train_00000001"
    support, queries = T.get_task("textvqa").load(tmp_path)
    assert queries[0].image_path == tmp_path / "textvqa" / "train_images" / "img_val.jpg"


def test_hateful_memes_layout_uses_test_seen(tmp_path: Path) -> None:
    root = tmp_path / "hateful_memes"
    write_jsonl(root / "train.jsonl", [{"id": 1, "img": "img/01.png", "text": "a", "label": 1}])
    with pytest.raises(FileNotFoundError, match=r"Task 'hateful_memes'.*test_seen\.jsonl"):
        T.get_task("hateful_memes").load(tmp_path)
    write_jsonl(root / "test_seen.jsonl", [{"id": 2, "img": "img/02.png", "text": "b", "label": 0}])
    support, queries = T.get_task("hateful_memes").load(tmp_path)
    assert support[0].label == 1 and queries[0].image_path == root / "img" / "02.png"


def make_image_folders(root: Path, folders: list[str]) -> None:
    for split in ("train", "val"):
        for folder in folders:
            (root / split / folder).mkdir(parents=True)
            (root / split / folder / f"{split}_{folder}.JPEG").write_bytes(b"")


def test_imagenet_names_classes_from_the_synset_mapping(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    synsets = ["n01440764", "n02012849", "n03126707"]
    make_image_folders(root, synsets)
    with pytest.raises(FileNotFoundError, match=r"Task 'imagenet'.*LOC_synset_mapping\.txt"):
        T.get_task("imagenet").load(tmp_path)
    (root / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn02012849 crane\nn03126707 crane\n", encoding="utf-8")
    task = T.get_task("imagenet")
    support, queries = task.load(tmp_path)
    assert [e.label for e in queries] == ["tench", "crane", "crane"]
    assert task.candidates(support) == ["tench", "crane"]  # ImageNet's repeated name counted once
    assert all(e.classes == ("tench", "crane") for e in support + queries)
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench\n", encoding="utf-8")
    with pytest.raises(R.AnnotationFormatError, match=r"Task 'imagenet'.*n02012849"):
        task.load(tmp_path)


def test_imagenet_style_folders_named_by_class(tmp_path: Path) -> None:
    make_image_folders(tmp_path / "imagenet", ["goldfish", "tench"])
    support, queries = T.get_task("imagenet").load(tmp_path)
    assert [e.label for e in support] == ["goldfish", "tench"]
    assert T.get_task("imagenet").candidates(support) == ["goldfish", "tench"]


def test_read_synset_mapping(tmp_path: Path) -> None:
    path = tmp_path / "map.txt"
    path.write_text("n01440764 tench, Tinca tinca\n\nn01443537 goldfish, Carassius auratus\n")
    assert R.read_synset_mapping(path) == {"n01440764": "tench", "n01443537": "goldfish"}
    path.write_text("n01440764\n")
    with pytest.raises(R.AnnotationFormatError, match=r"map\.txt:1 has no class name"):
        R.read_synset_mapping(path)


@pytest.mark.parametrize("name, folder", [("msvdqa", "vid1"), ("msrvttqa", "video1")])
def test_video_qa_layouts(name: str, folder: str, tmp_path: Path) -> None:
    root = tmp_path / name
    for split in ("train", "test"):
        write_json(root / f"{split}_qa.json", [{"id": 0, "video_id": 1, "question": "who?", "answer": "man"}])
    (root / "frames" / folder).mkdir(parents=True)
    for i in range(2):
        (root / "frames" / folder / f"{i}.jpg").write_bytes(b"")
    task = T.get_task(name)
    support, queries = task.load(tmp_path)
    assert queries[0].frames_dir == root / "frames" / folder
    assert len(task.media(queries[0]).frames) == 2


# ---------------------------------------------------------------------------
# Metrics on hand-computed outputs
# ---------------------------------------------------------------------------


def test_vqa_score_is_official_accuracy_in_percent() -> None:
    queries = [vqa(0, ["yes"] * 10), vqa(1, ["2"] * 3 + ["3"] * 7)]
    # q0: 10 agree -> 1.0. q1: 3 agree -> (3 * min(1, 2/3) + 7 * 1) / 10 = 0.9.
    assert T.get_task("vqav2").score(["yes", "2"], queries)["vqa_accuracy"] == pytest.approx(95.0)
    assert T.get_task("vqav2").score(["no", "3"], queries)["vqa_accuracy"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="without ground-truth"):
        T.score_vqa(["a"], [vqa(2, [])])
    with pytest.raises(ValueError, match="2 outputs for 1 queries"):
        T.score_vqa(["a", "b"], [vqa(2, ["a"])])


def test_captioning_score_is_cider_over_all_references() -> None:
    queries = [R.CaptionExample(id=0, image_path=Path("a.jpg"), captions=["a red circle", "a circle"]),
               R.CaptionExample(id=0, image_path=Path("b.jpg"), captions=["two blue squares", "squares"]),
               R.CaptionExample(id=2, image_path=Path("c.jpg"), captions=["a green star", "a star"])]
    outputs = ["a red circle", "two blue squares", "one dog"]
    score = T.get_task("coco").score(outputs, queries)["cider"]
    expected, per_image = M.cider_d(dict(enumerate(outputs)), {i: q.captions for i, q in enumerate(queries)})
    assert score == pytest.approx(expected)  # keyed by position: the repeated id 0 is not merged
    assert per_image[0] > 0 and per_image[2] == 0
    better = T.score_captioning(["a red circle", "two blue squares", "a green star"], queries)["cider"]
    assert better > score


def test_video_qa_score_is_exact_match() -> None:
    queries = [R.VideoQAExample(id=i, frames_dir=Path("f"), question="q", answer=a)
               for i, a in enumerate(["Dog", "cat", "man"])]
    assert T.get_task("msvdqa").score(["dog", "cats", " man "], queries) == {
        "top1_accuracy": pytest.approx(200 / 3)}


def test_class_name_score_is_top1_over_the_class_list() -> None:
    classes = ("tench", "goldfish", "shark")
    queries = [labelled(0, "tench", classes), labelled(1, "goldfish", classes), labelled(2, "shark", classes)]
    outputs = [np.array([-1.0, -2.0, -3.0]), np.array([-5.0, -1.0, -2.0]), np.array([0.0, -1.0, -0.5])]
    assert T.get_task("imagenet").score(outputs, queries)["top1_accuracy"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="2 candidates, expected 3"):
        T.score_class_names([np.zeros(2)] * 3, queries)
    with pytest.raises(ValueError, match="share one non-empty class list"):
        T.score_class_names(outputs, [labelled(0, "tench", classes), labelled(1, "shark", ("shark",)),
                                      labelled(2, "shark", classes)])


def test_yes_no_score_is_roc_auc_of_p_yes() -> None:
    labels = [1, 0, 1, 0]
    log_yes_minus_no = [2.0, -1.0, 0.5, 1.0]
    outputs = [np.array([d - 3.0, -3.0]) for d in log_yes_minus_no]  # [log p(yes), log p(no)]
    queries = [labelled(i, label) for i, label in enumerate(labels)]
    metrics = T.get_task("hateful_memes").score(outputs, queries)
    # positives 2.0, 0.5 vs negatives -1.0, 1.0: 3 of 4 pairs ordered right.
    assert metrics["roc_auc"] == pytest.approx(75.0)
    assert metrics["accuracy"] == pytest.approx(75.0)  # yes, no, yes, yes
    one_class = T.score_yes_no(outputs[:1] * 2, queries[:1] * 2)
    assert math.isnan(one_class["roc_auc"]) and one_class["accuracy"] == 100.0


def test_postprocessing() -> None:
    assert T.get_task("coco").postprocess(' A dog runs."<EOC>Output: x') == "a dog runs."
    assert T.get_task("vqav2").postprocess(" Yes<EOC>") == "yes"
    assert T.get_task("vqav2").postprocess(" top left.") == "top left."  # official: no normalising
    assert T.get_task("synthetic_vqa").postprocess(" Top left.\nQuestion") == "top left"
    assert T.get_task("hateful_memes").postprocess("yes") == "yes"


# ---------------------------------------------------------------------------
# Synthetic held-out tasks on the session corpus
# ---------------------------------------------------------------------------


def test_synthetic_tasks_load_from_the_corpus(synthetic_corpus: str) -> None:
    loaded = {name: T.get_task(name).load(Path(synthetic_corpus))
              for name in ("synthetic_captioning", "synthetic_vqa", "synthetic_classification")}
    for name, (support, queries) in loaded.items():
        assert (len(support), len(queries)) == (8, 8), name  # num_eval=16: half support, half query
        task = T.get_task(name)
        assert all(task.media(e).path.is_file() for e in support + queries), name
        prompt = templates.build_prompt(task.template, support[:2], queries[0])
        assert sum(isinstance(item, prompt_items.Media) for item in prompt) == 3
        assert sum(item is prompt_items.END_OF_CHUNK for item in prompt) == 2
    captions, _ = loaded["synthetic_captioning"]
    assert all(isinstance(e, R.CaptionExample) and len(e.captions) == 2 for e in captions)
    assert all(e.captions[0].rstrip(".").split()[-1] in synthetic.HELD_OUT_SHAPE_NAMES.values() for e in captions)
    for e in loaded["synthetic_vqa"][0] + loaded["synthetic_vqa"][1]:
        assert e.question == synthetic.HELD_OUT_QUESTION and len(e.answers) == 10
        assert set(e.answers) <= set(synthetic.HELD_OUT_TEXTURE_NAMES.values()) and len(set(e.answers)) == 1
    assert {e.label for e in loaded["synthetic_classification"][0]} <= {0, 1}
    eval_dir = Path(synthetic_corpus) / "eval"
    assert T.get_task("synthetic_vqa").load(eval_dir) == loaded["synthetic_vqa"]


def test_synthetic_tasks_score_oracle_outputs_perfectly(synthetic_corpus: str) -> None:
    task = T.get_task("synthetic_vqa")
    _, queries = task.load(Path(synthetic_corpus))
    oracle = [task.postprocess(" " + task.template.answer(q) + ".<EOC>") for q in queries]
    assert task.score(oracle, queries)["vqa_accuracy"] == pytest.approx(100.0)

    task = T.get_task("synthetic_classification")
    support, queries = task.load(Path(synthetic_corpus))
    candidates = task.candidates(support)
    assert candidates == ["yes", "no"]
    oracle = [np.array([0.0, -5.0]) if q.label == 1 else np.array([-5.0, 0.0]) for q in queries]
    metrics = task.score(oracle, queries)
    assert metrics["accuracy"] == 100.0
    assert {q.label for q in queries} == {0, 1} and metrics["roc_auc"] == 100.0

    task = T.get_task("synthetic_captioning")
    _, queries = task.load(Path(synthetic_corpus))
    right = task.score([q.captions[0] for q in queries], queries)["cider"]
    shifted = task.score([q.captions[0] for q in queries[1:] + queries[:1]], queries)["cider"]
    assert right > shifted


def test_synthetic_tasks_json_with_wrong_format_is_named(tmp_path: Path) -> None:
    write_json(tmp_path / "eval" / "tasks.json", {"vqa": {"format": "textvqa"}})
    with pytest.raises(R.AnnotationFormatError, match=r"Task 'synthetic_vqa'.*'vqa' entry of format 'vqav2'"):
        T.get_task("synthetic_vqa").load(tmp_path)


def test_results_are_named_by_what_was_evaluated():
    from flamingo_jax.evaluation.evaluator import EvalSettings, results_stem

    full = results_stem(300, ["coco", "vqav2"], EvalSettings(shots=(0, 4, 32)))
    assert full.startswith("step_300.coco+vqav2.shots-0-4-32.queries-all.")
    assert results_stem(300, ["coco", "vqav2"], EvalSettings(shots=(0, 4, 32), batch_size=2)) == full  # same evaluation
    others = [results_stem(300, ["coco", "vqav2"], EvalSettings(shots=(0, 4, 32), num_queries=4)),
              results_stem(300, ["coco"], EvalSettings(shots=(0, 4, 32))),
              results_stem(300, ["coco", "vqav2"], EvalSettings(shots=(0, 4))),
              results_stem(300, ["coco", "vqav2"], EvalSettings(shots=(0, 4, 32), seed=1))]
    assert len({full, *others}) == 5  # a quick or different run never replaces the full one


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("num_beams", 0), ("ensemble", 0),
                                          ("support_size", 0), ("num_queries", 0), ("shots", ())])
def test_impossible_eval_settings_fail_naming_the_flag(field, value):
    from flamingo_jax.errors import UserError
    from flamingo_jax.evaluation.evaluator import EvalSettings

    with pytest.raises(UserError, match=f"--{field}"):
        EvalSettings(**{field: value})
