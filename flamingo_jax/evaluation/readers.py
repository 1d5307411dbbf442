"""Readers for the public annotation files of Flamingo's evaluation benchmarks.

Each reader takes files exactly as the benchmarks distribute them (no
conversion step) and returns a list of plain dataclass records, so the
evaluation loop, the few-shot support sampling and the metrics in
`flamingo_jax.evaluation.metrics` never see a dataset-specific layout.

Readers only parse annotations; they do not open images or frames. Paths are
built from the annotation and the image directory and returned as-is, so an
annotation file can be inspected without the (large) image archives.

Errors: a missing file or directory raises `FileNotFoundError` naming the path
and what was expected there; a file that exists but does not have the public
format raises `AnnotationFormatError` naming the file, the record and the
missing field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from flamingo_jax.data import frames as frame_files
from flamingo_jax.errors import UserError

PathLike = str | Path


@dataclass
class CaptionExample:
    """One image with its reference captions (COCO, Flickr30K)."""

    id: int | str
    image_path: Path
    captions: list[str]


@dataclass
class VQAExample:
    """One question; `answers` holds every annotator's answer (10 for VQAv2,
    OK-VQA, VizWiz and TextVQA), the input of `vqa_accuracy`. Empty for test
    splits that ship without answers."""

    question_id: int | str
    image_path: Path
    question: str
    answers: list[str]


@dataclass
class ClassificationExample:
    """One image to classify. `text` is the meme text for HatefulMemes and
    None for plain image classification; `label` is 0/1 for HatefulMemes, the
    class name for image folders, and None for unlabelled test splits."""

    id: int | str
    image_path: Path
    text: str | None
    label: int | str | None


@dataclass
class VideoQAExample:
    """One question about a video stored as a folder of extracted frames; `fps` is the rate
    they were extracted at, when the release says (the engine then samples at its own rate)."""

    id: int | str
    frames_dir: Path
    question: str
    answer: str
    fps: float | None = None


class AnnotationFormatError(UserError, ValueError):
    """An annotation file exists but does not have its public format."""


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _require_file(path: PathLike, expected: str) -> Path:
    """Return `path` as a Path, or fail with a message saying what belongs there."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file not found: {path}. Expected {expected}.")
    return path


def _require_dir(path: PathLike, expected: str) -> Path:
    """Return `path` as a Path, or fail with a message saying what belongs there."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Directory not found: {path}. Expected {expected}.")
    return path


def _load_json(path: PathLike, expected: str) -> Any:
    """Parse a JSON annotation file, naming the file in every error."""
    path = _require_file(path, expected)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationFormatError(f"{path} is not valid JSON ({e}); expected {expected}.") from e


def _field(record: Any, key: str, source: Path, where: str) -> Any:
    """`record[key]`, or an error naming the file, the record and the field."""
    if not isinstance(record, Mapping) or key not in record:
        raise AnnotationFormatError(
            f"{source}: {where} has no field '{key}' (record: {str(record)[:200]})"
        )
    return record[key]


def _list_field(data: Any, key: str, source: Path, expected: str) -> list[Any]:
    """The top-level list `data[key]` of an annotation file."""
    if not isinstance(data, Mapping) or not isinstance(data.get(key), list):
        raise AnnotationFormatError(
            f"{source}: expected a JSON object with a list '{key}' ({expected})."
        )
    return data[key]


# ---------------------------------------------------------------------------
# Captioning: Karpathy splits of COCO and Flickr30K
# ---------------------------------------------------------------------------

KARPATHY_SPLITS = ("train", "val", "test", "restval")
_KARPATHY_FORMAT = (
    "Karpathy-split JSON: {'images': [{'split', 'filename', optional 'filepath', "
    "'sentences': [{'raw'}], 'cocoid' or 'imgid'}]}"
)


def _normalise_splits(splits: str | Sequence[str]) -> set[str]:
    """Accept one split or several ("train" + "restval" is Karpathy's full train)."""
    wanted = {splits} if isinstance(splits, str) else set(splits)
    unknown = wanted - set(KARPATHY_SPLITS)
    if not wanted or unknown:
        raise ValueError(
            f"Unknown Karpathy split(s) {sorted(unknown)}; choose from {KARPATHY_SPLITS}."
        )
    return wanted


def _karpathy_example(image: Mapping[str, Any], source: Path, image_root: Path) -> CaptionExample:
    """One Karpathy `images[]` entry as a CaptionExample."""
    filename = _field(image, "filename", source, "an images[] entry")
    where = f"image '{filename}'"
    sentences = _field(image, "sentences", source, where)
    captions = [str(_field(s, "raw", source, f"a sentence of {where}")).strip() for s in sentences]
    image_id = image["cocoid"] if "cocoid" in image else _field(image, "imgid", source, where)
    folder = image_root / image["filepath"] if "filepath" in image else image_root
    return CaptionExample(id=image_id, image_path=folder / filename, captions=captions)


def read_karpathy_captions(
    annotation_file: PathLike, image_root: PathLike, splits: str | Sequence[str]
) -> list[CaptionExample]:
    """Images of the given Karpathy split(s), in file order.

    The id is COCO's `cocoid` (the image id COCO's caption annotations use) or,
    for Flickr30K which has none, Karpathy's `imgid`. The image path is
    ``image_root/filepath/filename`` (COCO: filepath is train2014 or val2014)
    or ``image_root/filename`` when the entry has no filepath (Flickr30K).
    """
    wanted = _normalise_splits(splits)
    source = _require_file(annotation_file, _KARPATHY_FORMAT)
    images = _list_field(_load_json(source, _KARPATHY_FORMAT), "images", source, _KARPATHY_FORMAT)
    image_root = Path(image_root)
    return [
        _karpathy_example(image, source, image_root)
        for image in images
        if _field(image, "split", source, "an images[] entry") in wanted
    ]


def read_coco_karpathy(
    root: PathLike,
    splits: str | Sequence[str],
    *,
    annotation_file: str = "dataset_coco.json",
    image_root: PathLike | None = None,
) -> list[CaptionExample]:
    """COCO Karpathy split from ``root/dataset_coco.json``; images under
    ``image_root`` (default `root`) in their train2014/ and val2014/ folders."""
    root = Path(root)
    return read_karpathy_captions(root / annotation_file, image_root or root, splits)


def read_flickr30k_karpathy(
    root: PathLike,
    splits: str | Sequence[str],
    *,
    annotation_file: str = "dataset_flickr30k.json",
    image_root: PathLike | None = None,
) -> list[CaptionExample]:
    """Flickr30K Karpathy split from ``root/dataset_flickr30k.json``; images in
    ``image_root`` (default ``root/flickr30k-images``, the official archive's
    folder name)."""
    root = Path(root)
    return read_karpathy_captions(
        root / annotation_file, image_root or root / "flickr30k-images", splits
    )


# ---------------------------------------------------------------------------
# VQA: VQAv2, OK-VQA (VQA format), VizWiz and TextVQA (own formats)
# ---------------------------------------------------------------------------

# Image file names from a question's image_id. The COCO ones are the official
# VQAv2/OK-VQA layout; "vizwiz"/"textvqa" match VizWiz/TextVQA converted to VQA
# format as OpenFlamingo distributes them (image_id is the file name / stem).
VQA_IMAGE_TEMPLATES: dict[str, str] = {
    "coco_train2014": "COCO_train2014_{image_id:012d}.jpg",
    "coco_val2014": "COCO_val2014_{image_id:012d}.jpg",
    "coco_test2015": "COCO_test2015_{image_id:012d}.jpg",
    "vizwiz": "{image_id}",
    "textvqa": "{image_id}.jpg",
}
_VQA_QUESTIONS_FORMAT = (
    "VQA questions JSON: {'questions': [{'image_id', 'question', 'question_id'}]}"
)
_VQA_ANNOTATIONS_FORMAT = (
    "VQA annotations JSON: {'annotations': [{'question_id', 'answers': [{'answer'}], "
    "'multiple_choice_answer'}]}"
)


def _answers_by_question(annotations_file: PathLike) -> dict[Any, list[str]]:
    """question_id -> every annotator's answer, from a VQA annotations file."""
    source = _require_file(annotations_file, _VQA_ANNOTATIONS_FORMAT)
    records = _list_field(
        _load_json(source, _VQA_ANNOTATIONS_FORMAT), "annotations", source, _VQA_ANNOTATIONS_FORMAT
    )
    answers = {}
    for record in records:
        qid = _field(record, "question_id", source, "an annotations[] entry")
        where = f"annotation of question {qid}"
        annotators = _field(record, "answers", source, where)
        answers[qid] = [str(_field(a, "answer", source, where)) for a in annotators]
    return answers


def read_vqa_format(
    questions_file: PathLike,
    annotations_file: PathLike | None,
    image_dir: PathLike,
    image_template: str,
) -> list[VQAExample]:
    """Questions (and answers) in the VQA API's two-file format.

    `image_template` builds the image file name from the question's image_id
    (see `VQA_IMAGE_TEMPLATES`). With ``annotations_file=None`` (test splits)
    answers are empty; otherwise every question must have an annotation,
    since a silently unanswered question would be scored as wrong.
    """
    source = _require_file(questions_file, _VQA_QUESTIONS_FORMAT)
    questions = _list_field(
        _load_json(source, _VQA_QUESTIONS_FORMAT), "questions", source, _VQA_QUESTIONS_FORMAT
    )
    answers = _answers_by_question(annotations_file) if annotations_file is not None else None
    image_dir = Path(image_dir)
    examples = []
    for q in questions:
        qid = _field(q, "question_id", source, "a questions[] entry")
        where = f"question {qid}"
        image_id = _field(q, "image_id", source, where)
        if answers is not None and qid not in answers:
            raise AnnotationFormatError(
                f"{annotations_file}: no annotation for question {qid} of {source}; "
                "are the questions and annotations files from the same split?"
            )
        examples.append(VQAExample(
            question_id=qid,
            image_path=image_dir / image_template.format(image_id=image_id),
            question=str(_field(q, "question", source, where)),
            answers=answers[qid] if answers is not None else [],
        ))
    return examples


def read_vqav2(root: PathLike, split: str = "val") -> list[VQAExample]:
    """VQAv2 train/val with the official file names, all in `root`:
    ``v2_OpenEnded_mscoco_{split}2014_questions.json``,
    ``v2_mscoco_{split}2014_annotations.json`` and images in ``{split}2014/``."""
    return _read_coco_vqa(root, split, "v2_", "read_vqav2")


def read_okvqa(root: PathLike, split: str = "val") -> list[VQAExample]:
    """OK-VQA train/val with the official file names, all in `root`:
    ``OpenEnded_mscoco_{split}2014_questions.json``,
    ``mscoco_{split}2014_annotations.json`` and COCO images in ``{split}2014/``."""
    return _read_coco_vqa(root, split, "", "read_okvqa")


def _read_coco_vqa(root: PathLike, split: str, prefix: str, reader: str) -> list[VQAExample]:
    """A VQA-format benchmark over COCO 2014 images, its files named `<prefix>OpenEnded_mscoco_...`."""
    if split not in ("train", "val"):
        raise ValueError(f"{reader}: split must be 'train' or 'val', got {split!r}.")
    root = Path(root)
    return read_vqa_format(
        root / f"{prefix}OpenEnded_mscoco_{split}2014_questions.json",
        root / f"{prefix}mscoco_{split}2014_annotations.json",
        root / f"{split}2014",
        VQA_IMAGE_TEMPLATES[f"coco_{split}2014"],
    )


_VIZWIZ_FORMAT = (
    "VizWiz JSON (train.json/val.json/test.json): a list of {'image', 'question', "
    "'answers': [{'answer', 'answer_confidence'}]}"
)


def read_vizwiz(annotation_file: PathLike, image_dir: PathLike) -> list[VQAExample]:
    """VizWiz-VQA in its own single-file format.

    VizWiz has one question per image and no question ids, so the image file
    stem ("VizWiz_val_00000000") serves as question_id. All annotators'
    answers are kept whatever their `answer_confidence`, as the official VizWiz
    evaluation does. Test files have no 'answers': answers are then empty.
    """
    source = _require_file(annotation_file, _VIZWIZ_FORMAT)
    records = _load_json(source, _VIZWIZ_FORMAT)
    if not isinstance(records, list):
        raise AnnotationFormatError(f"{source}: expected a JSON list ({_VIZWIZ_FORMAT}).")
    image_dir = Path(image_dir)
    examples = []
    for record in records:
        image = str(_field(record, "image", source, "an entry"))
        where = f"entry for image '{image}'"
        examples.append(VQAExample(
            question_id=Path(image).stem,
            image_path=image_dir / image,
            question=str(_field(record, "question", source, where)),
            answers=[str(_field(a, "answer", source, where)) for a in record.get("answers", [])],
        ))
    return examples


_TEXTVQA_FORMAT = (
    "TextVQA JSON (TextVQA_0.5.1_<split>.json): {'data': [{'question_id', 'image_id', "
    "'question', 'answers': [str]}]}"
)


def read_textvqa(annotation_file: PathLike, image_dir: PathLike) -> list[VQAExample]:
    """TextVQA in its own format; images are ``image_dir/{image_id}.jpg``
    (train and val images both live in the release's train_images/ folder).
    The test file has no 'answers': answers are then empty."""
    source = _require_file(annotation_file, _TEXTVQA_FORMAT)
    records = _list_field(_load_json(source, _TEXTVQA_FORMAT), "data", source, _TEXTVQA_FORMAT)
    image_dir = Path(image_dir)
    examples = []
    for record in records:
        qid = _field(record, "question_id", source, "a data[] entry")
        where = f"question {qid}"
        image_id = _field(record, "image_id", source, where)
        examples.append(VQAExample(
            question_id=qid,
            image_path=image_dir / f"{image_id}.jpg",
            question=str(_field(record, "question", source, where)),
            answers=[str(a) for a in record.get("answers", [])],
        ))
    return examples


# ---------------------------------------------------------------------------
# Classification: HatefulMemes and image folders
# ---------------------------------------------------------------------------

_HATEFUL_MEMES_FORMAT = (
    "HatefulMemes JSON lines (train.jsonl/dev.jsonl/test.jsonl): one "
    "{'id', 'img', 'text', 'label'} object per line, 'img' relative to the dataset root"
)


def _parse_jsonl_line(line: str, source: Path, line_number: int) -> Any:
    """One JSON object of a .jsonl file, naming file and line on failure."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise AnnotationFormatError(f"{source}:{line_number} is not valid JSON ({e}).") from e


def read_hateful_memes(annotation_file: PathLike, root: PathLike) -> list[ClassificationExample]:
    """HatefulMemes examples; `label` is 1 for hateful, 0 for not, None when
    the file has no labels (the unlabelled test splits). Images are
    ``root/img`` since 'img' already holds the "img/" folder."""
    source = _require_file(annotation_file, _HATEFUL_MEMES_FORMAT)
    root = Path(root)
    examples = []
    with source.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = _parse_jsonl_line(line, source, line_number)
            where = f"line {line_number}"
            label = record.get("label") if isinstance(record, Mapping) else None
            examples.append(ClassificationExample(
                id=_field(record, "id", source, where),
                image_path=root / str(_field(record, "img", source, where)),
                text=str(_field(record, "text", source, where)),
                label=int(label) if label is not None else None,
            ))
    return examples


IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _files_with_suffix(folder: Path, suffixes: Iterable[str]) -> list[Path]:
    """Files directly in `folder` whose lower-cased suffix is one of `suffixes`,
    sorted by name (".JPEG", ImageNet's suffix, counts as ".jpeg")."""
    allowed = {s.lower() for s in suffixes}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in allowed)


def image_folder_classes(root: PathLike) -> list[str]:
    """Class folder names of an ImageNet-style tree, sorted: position i is the
    class index i (ImageNet's synset order)."""
    root = _require_dir(root, "an image-folder dataset: one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise AnnotationFormatError(
            f"{root} has no class sub-folders (expected root/<class>/<image>)."
        )
    return classes


def read_image_folder(
    root: PathLike,
    *,
    class_names: Mapping[str, str] | None = None,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> list[ClassificationExample]:
    """Images of ``root/<class>/*`` in sorted class then file order.

    `label` is the folder name, or ``class_names[folder]`` when a mapping is
    given (e.g. ImageNet synset "n01440764" to "tench", for prompts). The id is
    "<folder>/<file name>". An empty class folder is an error: it usually
    means an incomplete extraction, which would silently bias the accuracy.
    """
    root = Path(root)
    allowed = {e.lower() for e in extensions}
    examples = []
    for folder in image_folder_classes(root):
        files = _files_with_suffix(root / folder, allowed)
        if not files:
            raise AnnotationFormatError(
                f"Class folder {root / folder} holds no images with extensions {sorted(allowed)}."
            )
        if class_names is not None and folder not in class_names:
            raise KeyError(f"class_names has no entry for class folder '{folder}' of {root}.")
        label = class_names[folder] if class_names is not None else folder
        examples.extend(
            ClassificationExample(id=f"{folder}/{p.name}", image_path=p, text=None, label=label)
            for p in files
        )
    return examples


_SYNSET_MAPPING_FORMAT = (
    "ImageNet synset mapping (LOC_synset_mapping.txt): one 'n01440764 tench, Tinca tinca' "
    "line per class"
)


def read_synset_mapping(mapping_file: PathLike) -> dict[str, str]:
    """Synset folder name -> class name, the first of the line's comma-separated
    names ("n01440764 tench, Tinca tinca" -> "tench"): prompts need words, not
    synset ids."""
    source = _require_file(mapping_file, _SYNSET_MAPPING_FORMAT)
    mapping = {}
    for line_number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        synset, _, names = line.strip().partition(" ")
        name = names.split(",")[0].strip()
        if not name:
            raise AnnotationFormatError(
                f"{source}:{line_number} has no class name ({_SYNSET_MAPPING_FORMAT})."
            )
        mapping[synset] = name
    return mapping


# ---------------------------------------------------------------------------
# Video QA: MSVD-QA, MSRVTT-QA over extracted frames
# ---------------------------------------------------------------------------

_VIDEO_QA_FORMAT = (
    "video QA JSON (MSVD-QA / MSRVTT-QA): a list of {'video_id' or 'video', 'question', "
    "'answer'} objects, optionally with 'id'"
)
_VIDEO_EXTENSION = re.compile(r"\.(mp4|avi|webm|mkv|mov)$", re.IGNORECASE)
FRAME_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")


def list_frames(frames_dir: PathLike) -> list[Path]:
    """Frame images of one video in temporal (natural name) order."""
    frames_dir = _require_dir(frames_dir, "a folder of extracted frames (*.jpg)")
    return frame_files.list_frames(frames_dir, FRAME_EXTENSIONS)


def _video_key(record: Any, source: Path, index: int) -> str:
    """The video's folder key: 'video_id', else 'video' without a file extension."""
    if isinstance(record, Mapping) and "video_id" in record:
        return str(record["video_id"])
    video = str(_field(record, "video", source, f"entry {index} (neither 'video_id' nor 'video')"))
    return _VIDEO_EXTENSION.sub("", video)


def read_video_qa(
    annotation_file: PathLike,
    frames_root: PathLike,
    *,
    video_dir_template: str = "{video_id}",
    check_frames: bool = False,
    fps: float | None = None,
) -> list[VideoQAExample]:
    """MSVD-QA / MSRVTT-QA questions over ``frames_root/<video folder>/``.

    The folder name is ``video_dir_template.format(video_id=...)``; MSVD-QA
    and MSRVTT-QA give integer video ids, so e.g. ``"vid{video_id}"`` or
    ``"video{video_id}"`` match frame folders named after the video files.
    The example id is the record's 'id' (or 'question_id'), else its index.
    With `check_frames`, every frame folder must exist and hold frames, which
    catches a wrong template before a long evaluation starts. `fps`: the frames' stored
    rate, if known (MSVD-QA and MSRVTT-QA do not fix one; the synthetic corpus does).
    """
    source = _require_file(annotation_file, _VIDEO_QA_FORMAT)
    records = _load_json(source, _VIDEO_QA_FORMAT)
    if not isinstance(records, list):
        raise AnnotationFormatError(f"{source}: expected a JSON list ({_VIDEO_QA_FORMAT}).")
    frames_root = Path(frames_root)
    examples = []
    for index, record in enumerate(records):
        folder = video_dir_template.format(video_id=_video_key(record, source, index))
        frames_dir = frames_root / folder
        if check_frames and not list_frames(frames_dir):
            raise FileNotFoundError(f"No frames (*{'/*'.join(FRAME_EXTENSIONS)}) in {frames_dir}.")
        where = f"entry {index}"
        examples.append(VideoQAExample(
            id=record.get("id", record.get("question_id", index)),
            frames_dir=frames_dir,
            question=str(_field(record, "question", source, where)),
            answer=str(_field(record, "answer", source, where)),
            fps=fps,
        ))
    return examples
