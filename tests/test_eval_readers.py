"""Tests for flamingo_jax.evaluation.readers: each reader on a small file in
its public format, written here, plus the errors for missing or malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flamingo_jax.evaluation import readers as R


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Karpathy captions
# ---------------------------------------------------------------------------

COCO_KARPATHY = {
    "dataset": "coco",
    "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
         "split": "test", "cocoid": 391895,
         "sentences": [{"raw": "A man with a red helmet on a small moped on a dirt road. ",
                        "tokens": ["a", "man"], "imgid": 0, "sentid": 770337},
                       {"raw": "Man riding a motor bike on a dirt road.", "tokens": [],
                        "imgid": 0, "sentid": 771687}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000057870.jpg", "imgid": 1,
         "split": "train", "cocoid": 57870,
         "sentences": [{"raw": "A restaurant has modern wooden tables.", "tokens": []}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "imgid": 2,
         "split": "restval", "cocoid": 42, "sentences": [{"raw": "A dog.", "tokens": []}]},
    ],
}


def test_coco_karpathy_splits(tmp_path: Path) -> None:
    write_json(tmp_path / "dataset_coco.json", COCO_KARPATHY)
    test = R.read_coco_karpathy(tmp_path, "test")
    assert test == [R.CaptionExample(
        id=391895,
        image_path=tmp_path / "val2014" / "COCO_val2014_000000391895.jpg",
        captions=["A man with a red helmet on a small moped on a dirt road.",
                  "Man riding a motor bike on a dirt road."],
    )]
    train = R.read_coco_karpathy(tmp_path, ("train", "restval"))
    assert [e.id for e in train] == [57870, 42]
    assert train[0].image_path == tmp_path / "train2014" / "COCO_train2014_000000057870.jpg"
    assert R.read_coco_karpathy(tmp_path, "val") == []
    with pytest.raises(ValueError, match="Unknown Karpathy split"):
        R.read_coco_karpathy(tmp_path, "testing")


def test_flickr30k_karpathy(tmp_path: Path) -> None:
    write_json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test",
         "sentences": [{"raw": "Two young guys with shaggy hair."}, {"raw": "Two men outside."}]},
        {"filename": "10002456.jpg", "imgid": 1, "split": "train",
         "sentences": [{"raw": "Several men in hard hats."}]},
    ]})
    (example,) = R.read_flickr30k_karpathy(tmp_path, "test")
    assert example.id == 0
    assert example.image_path == tmp_path / "flickr30k-images" / "1000092795.jpg"
    assert example.captions == ["Two young guys with shaggy hair.", "Two men outside."]


def test_karpathy_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset_coco\.json.*Karpathy-split JSON"):
        R.read_coco_karpathy(tmp_path, "test")
    write_json(tmp_path / "dataset_coco.json", {"images": [{"filename": "x.jpg", "split": "test"}]})
    with pytest.raises(R.AnnotationFormatError, match="no field 'sentences'"):
        R.read_coco_karpathy(tmp_path, "test")
    write_json(tmp_path / "dataset_coco.json", [1, 2])
    with pytest.raises(R.AnnotationFormatError, match="list 'images'"):
        R.read_coco_karpathy(tmp_path, "test")


# ---------------------------------------------------------------------------
# VQA family
# ---------------------------------------------------------------------------


def vqa_answers(*answers: str) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(answers)]


def write_vqav2(root: Path, split: str = "val") -> None:
    write_json(root / f"v2_OpenEnded_mscoco_{split}2014_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
        "data_subtype": f"{split}2014",
        "questions": [
            {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
            {"image_id": 393225, "question": "What is the man holding?", "question_id": 393225001},
        ],
    })
    write_json(root / f"v2_mscoco_{split}2014_annotations.json", {
        "info": {}, "data_subtype": f"{split}2014",
        "annotations": [
            {"question_id": 393225001, "image_id": 393225, "question_type": "what is the man",
             "answer_type": "other", "multiple_choice_answer": "bat",
             "answers": vqa_answers(*(["bat"] * 9 + ["baseball bat"]))},
            {"question_id": 262148000, "image_id": 262148, "question_type": "where is he",
             "answer_type": "other", "multiple_choice_answer": "down",
             "answers": vqa_answers(*(["down"] * 7 + ["at table", "skateboard", "table"]))},
        ],
    })


def test_vqav2(tmp_path: Path) -> None:
    write_vqav2(tmp_path)
    examples = R.read_vqav2(tmp_path, "val")
    assert [e.question_id for e in examples] == [262148000, 393225001]  # question-file order
    first = examples[0]
    assert first.image_path == tmp_path / "val2014" / "COCO_val2014_000000262148.jpg"
    assert first.question == "Where is he looking?"
    assert first.answers == ["down"] * 7 + ["at table", "skateboard", "table"]
    assert examples[1].answers[-1] == "baseball bat"


def test_vqa_format_without_annotations_and_missing_answer(tmp_path: Path) -> None:
    write_vqav2(tmp_path)
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    examples = R.read_vqa_format(questions, None, tmp_path / "imgs", "{image_id}.png")
    assert [e.answers for e in examples] == [[], []]
    assert examples[0].image_path == tmp_path / "imgs" / "262148.png"
    partial = write_json(tmp_path / "partial.json", {"annotations": [
        {"question_id": 262148000, "answers": vqa_answers("down")}]})
    with pytest.raises(R.AnnotationFormatError, match="no annotation for question 393225001"):
        R.read_vqa_format(questions, partial, tmp_path, R.VQA_IMAGE_TEMPLATES["coco_val2014"])


def test_vqa_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"v2_OpenEnded_mscoco_val2014_questions\.json"):
        R.read_vqav2(tmp_path)
    write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": []})
    annotations = r"v2_mscoco_val2014_annotations\.json.*annotations"
    with pytest.raises(FileNotFoundError, match=annotations):
        R.read_vqav2(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"OpenEnded_mscoco_train2014_questions\.json"):
        R.read_okvqa(tmp_path, "train")


def test_okvqa(tmp_path: Path) -> None:
    write_json(tmp_path / "OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"image_id": 297147, "question": "What sport can you use this for?",
         "question_id": 2971475}]})
    write_json(tmp_path / "mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 2971475, "image_id": 297147, "answer_type": "other",
         "question_type": "eight", "confidence": 3,
         "answers": vqa_answers(*(["race"] * 4 + ["racing"] * 6))}]})
    (example,) = R.read_okvqa(tmp_path)
    assert example.image_path == tmp_path / "val2014" / "COCO_val2014_000000297147.jpg"
    assert example.answers == ["race"] * 4 + ["racing"] * 6


def test_vizwiz_native_format(tmp_path: Path) -> None:
    path = write_json(tmp_path / "val.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "Ok. There is another picture?",
         "answerable": 0, "answer_type": "unanswerable",
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"},
                     {"answer": "chili", "answer_confidence": "maybe"}]},
        {"image": "VizWiz_test_00000001.jpg", "question": "What is this?"},  # test: no answers
    ])
    examples = R.read_vizwiz(path, tmp_path / "val")
    assert examples[0] == R.VQAExample(
        question_id="VizWiz_val_00000000", image_path=tmp_path / "val" / "VizWiz_val_00000000.jpg",
        question="Ok. There is another picture?", answers=["unanswerable", "chili"])
    assert examples[1].answers == []
    with pytest.raises(FileNotFoundError, match=r"train\.json.*VizWiz"):
        R.read_vizwiz(tmp_path / "train.json", tmp_path)
    bad = write_json(tmp_path / "bad.json", [{"question": "no image"}])
    with pytest.raises(R.AnnotationFormatError, match="no field 'image'"):
        R.read_vizwiz(bad, tmp_path)


def test_textvqa_native_format(tmp_path: Path) -> None:
    path = write_json(tmp_path / "TextVQA_0.5.1_val.json", {
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
        "data": [{"question": "what is the brand of phone?", "image_id": "0054c91397f2fe05",
                  "image_classes": ["Mobile phone"], "question_tokens": ["what"],
                  "question_id": 0, "set_name": "val",
                  "answers": ["nokia"] * 9 + ["toshiba"]}],
    })
    (example,) = R.read_textvqa(path, tmp_path / "train_images")
    assert example.question_id == 0
    assert example.image_path == tmp_path / "train_images" / "0054c91397f2fe05.jpg"
    assert example.answers == ["nokia"] * 9 + ["toshiba"]
    with pytest.raises(FileNotFoundError, match=r"TextVQA_0\.5\.1_test\.json.*'data'"):
        R.read_textvqa(tmp_path / "TextVQA_0.5.1_test.json", tmp_path)


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------


def test_hateful_memes(tmp_path: Path) -> None:
    lines = [
        {"id": 42953, "img": "img/42953.png", "label": 0,
         "text": "its their character not their color that matters"},
        {"id": 23058, "img": "img/23058.png", "label": 1, "text": "don't be afraid"},
    ]
    path = tmp_path / "dev.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    examples = R.read_hateful_memes(path, tmp_path)
    assert examples[0] == R.ClassificationExample(
        id=42953, image_path=tmp_path / "img" / "42953.png",
        text="its their character not their color that matters", label=0)
    assert [e.label for e in examples] == [0, 1]
    test_path = tmp_path / "test.jsonl"
    unlabelled = {"id": 1, "img": "img/00001.png", "text": "x"}
    test_path.write_text(json.dumps(unlabelled), encoding="utf-8")
    assert R.read_hateful_memes(test_path, tmp_path)[0].label is None


def test_hateful_memes_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl.*HatefulMemes"):
        R.read_hateful_memes(tmp_path / "train.jsonl", tmp_path)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "img": "img/1.png", "text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(R.AnnotationFormatError, match=r"bad\.jsonl:2"):
        R.read_hateful_memes(path, tmp_path)


def test_image_folder(tmp_path: Path) -> None:
    for folder, files in {"n01443537": ["b.JPEG", "a.jpeg", "notes.txt"],
                          "n01440764": ["x.png"]}.items():
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).write_bytes(b"")
    assert R.image_folder_classes(tmp_path) == ["n01440764", "n01443537"]
    examples = R.read_image_folder(tmp_path)
    assert [(e.id, e.label) for e in examples] == [
        ("n01440764/x.png", "n01440764"),
        ("n01443537/a.jpeg", "n01443537"),
        ("n01443537/b.JPEG", "n01443537"),
    ]
    assert examples[0].image_path == tmp_path / "n01440764" / "x.png"
    assert examples[0].text is None
    names = {"n01440764": "tench", "n01443537": "goldfish"}
    named = R.read_image_folder(tmp_path, class_names=names)
    assert [e.label for e in named] == ["tench", "goldfish", "goldfish"]
    with pytest.raises(KeyError, match="n01443537"):
        R.read_image_folder(tmp_path, class_names={"n01440764": "tench"})


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="one sub-folder of images per class"):
        R.read_image_folder(tmp_path / "imagenet" / "val")
    with pytest.raises(R.AnnotationFormatError, match="no class sub-folders"):
        R.read_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(R.AnnotationFormatError, match="holds no images"):
        R.read_image_folder(tmp_path)


# ---------------------------------------------------------------------------
# Video QA
# ---------------------------------------------------------------------------


def test_video_qa_msvd_and_msrvtt_styles(tmp_path: Path) -> None:
    msvd = write_json(tmp_path / "msvd_test_qa.json", [
        {"answer": "man", "id": 0, "question": "who is cutting a banana?", "video_id": 1},
        {"answer": "slice", "id": 1, "question": "what does a man do?", "video_id": 1},
    ])
    examples = R.read_video_qa(msvd, tmp_path / "frames", video_dir_template="vid{video_id}")
    assert examples[0] == R.VideoQAExample(
        id=0, frames_dir=tmp_path / "frames" / "vid1", question="who is cutting a banana?",
        answer="man")
    msrvtt = write_json(tmp_path / "msrvtt_test.json", [
        {"video": "video7010.mp4", "question": "what is a man doing?", "answer": "sing"}])
    (example,) = R.read_video_qa(msrvtt, tmp_path / "frames")
    assert example.id == 0  # no 'id': the index
    assert example.frames_dir == tmp_path / "frames" / "video7010"


def test_video_qa_frames_and_errors(tmp_path: Path) -> None:
    frames = tmp_path / "frames" / "video7"
    frames.mkdir(parents=True)
    for i in (10, 2, 1):
        (frames / f"f{i}.jpg").write_bytes(b"")
    assert [p.name for p in R.list_frames(frames)] == ["f1.jpg", "f2.jpg", "f10.jpg"]  # time order
    path = write_json(tmp_path / "qa.json", [
        {"video_id": 7, "question": "q", "answer": "a"},
        {"video_id": 8, "question": "q", "answer": "a"},
    ])
    examples = R.read_video_qa(path, tmp_path / "frames", video_dir_template="video{video_id}")
    assert [e.frames_dir.name for e in examples] == ["video7", "video8"]
    with pytest.raises(FileNotFoundError, match=r"video8.*extracted frames"):
        R.read_video_qa(path, tmp_path / "frames", video_dir_template="video{video_id}",
                        check_frames=True)
    with pytest.raises(FileNotFoundError, match=r"val_qa\.json.*MSVD-QA"):
        R.read_video_qa(tmp_path / "val_qa.json", tmp_path)
    bad = write_json(tmp_path / "bad.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(R.AnnotationFormatError, match="neither 'video_id' nor 'video'"):
        R.read_video_qa(bad, tmp_path)
