"""Evaluation tasks as data: reader + prompt template + decoding mode + post-processing + metric.

`get_task(name)` returns a `Task`; `task.load(data_dir)` gives the support
pool (a training split, as in the paper) and the query pool (the split the
paper reports). The engine builds prompts with `task.template`, decodes
(``mode='generate'``: beam search up to `max_new_tokens`, then
`task.postprocess`) or ranks `task.candidates(support_pool)` by
log-likelihood (``mode='rank'``), and calls `task.score(outputs, queries)`.

Files expected under ``data_dir`` (the public releases, unconverted):

  coco          coco/dataset_coco.json (Karpathy), images in coco/train2014/, coco/val2014/;
                support: Karpathy train + restval, queries: Karpathy test (5,000 images)
  flickr30k     flickr30k/dataset_flickr30k.json (Karpathy), images in flickr30k/flickr30k-images/;
                support: train, queries: test
  vqav2         vqav2/v2_OpenEnded_mscoco_{train,val}2014_questions.json,
                vqav2/v2_mscoco_{train,val}2014_annotations.json, images in vqav2/{train,val}2014/;
                support: train, queries: val (test-dev needs the evaluation server)
  okvqa         okvqa/OpenEnded_mscoco_{train,val}2014_questions.json,
                okvqa/mscoco_{train,val}2014_annotations.json, COCO images in okvqa/{train,val}2014/;
                support: train, queries: val
  vizwiz        vizwiz/train.json, vizwiz/val.json, images in vizwiz/train/, vizwiz/val/;
                support: train, queries: val (test answers are not public)
  textvqa       textvqa/TextVQA_0.5.1_{train,val}.json, images in textvqa/train_images/;
                support: train, queries: val
  hateful_memes hateful_memes/train.jsonl, hateful_memes/test_seen.jsonl, images in hateful_memes/img/;
                support: train, queries: test_seen (labelled in the challenge's final release)
  imagenet      imagenet/train/<synset>/*.JPEG, imagenet/val/<synset>/*.JPEG (validation images
                sorted into class folders) and imagenet/LOC_synset_mapping.txt for the class
                names (needed when the folders are synset ids); support: train, queries: val
  msvdqa        msvdqa/{train,test}_qa.json, frames in msvdqa/frames/vid{video_id}/;
                support: train, queries: test
  msrvttqa      msrvttqa/{train,test}_qa.json, frames in msrvttqa/frames/video{video_id}/;
                support: train, queries: test
  synthetic_*   <corpus>/eval/tasks.json and the files it names, as written by
                flamingo_jax.data.synthetic (data_dir is the corpus directory)

TFDS: of these, TFDS 4.9 has coco_captions (Karpathy splits) and imagenet2012; with
`--source=tfds` (or per task, `--source=coco=tfds`) the evaluate CLI reads them from
prepared builders instead (`evaluation/tfds_readers.py`: how the support pool and the
queries are drawn from a stream).

`with_protocol(task, prompts=..., vqa_normalization=...)` gives a task OpenFlamingo's
templates, post-processing and ranking (`evaluation/openflamingo.py`) and chooses
how VQA accuracy normalises answers (the evaluate CLI's --prompts, --vqa_normalization).

Scope: queries come from the split the paper reports on; the paper's DEV
protocol (validation on training-split subsets) would be separate task names.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flamingo_jax.errors import UserError
from flamingo_jax.evaluation import metrics, openflamingo, readers
from flamingo_jax.evaluation.templates import (
    YES_NO,
    CaptioningTemplate,
    ClassNameTemplate,
    HatefulMemesTemplate,
    PromptTemplate,
    VQATemplate,
)
from flamingo_jax.inference.items import Media

Example = Any
Loader = Callable[[Path], tuple[list, list]]
Scorer = Callable[[list, list], dict[str, float]]

KINDS = ("captioning", "vqa", "classification", "video_qa")
MODES = ("generate", "rank")
CAPTION_MAX_NEW_TOKENS = 20  # OpenFlamingo's choice; PAPER_FACTS marks the paper's as unconfirmed
VQA_MAX_NEW_TOKENS = 5  # idem


@dataclass(frozen=True)
class Task:
    """One benchmark: everything the engine needs, no dataset-specific code."""

    name: str
    kind: str  # one of KINDS
    template: PromptTemplate
    mode: str  # 'generate' (beam search) | 'rank' (log-likelihood over candidates)
    max_new_tokens: int  # generate mode; 0 in rank mode, which generates nothing
    load: Loader  # data_dir -> (support pool, query pool)
    media: Callable[[Example], Media]  # the example's visual input
    postprocess: Callable[[str], str]  # generated text -> prediction
    score: Scorer  # (outputs, queries) -> metrics, in percent
    candidates: Callable[[list], list[str]] | None = None  # rank mode, given the support pool
    rices: bool = False  # the paper selects classification support examples with RICES
    primary_metric: str = ""  # the metric of the paper's table
    layout: str = ""  # the files `load` expects under data_dir
    # Rank mode: a candidate's score is the sum of its tokens' log-probabilities followed by <EOC>
    # (ours), or, OpenFlamingo's way, their mean without <EOC>.
    rank_with_eoc: bool = True
    rank_mean_over_tokens: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.mode not in MODES:
            raise ValueError(f"Task {self.name}: kind {self.kind!r} / mode {self.mode!r} not in {KINDS} / {MODES}.")
        if (self.mode == "rank") != (self.candidates is not None):
            raise ValueError(f"Task {self.name}: rank mode needs candidates, and only rank mode has them.")


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _task_loader(name: str, layout: str, read: Loader) -> Loader:
    """`read` with errors that name the task and its expected layout, so a
    wrong --data_dir is obvious from the message alone."""

    def load(data_dir: Path | str) -> tuple[list, list]:
        data_dir = Path(data_dir)
        try:
            support, queries = read(data_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"Task '{name}': {e} Task '{name}' expects under {data_dir}: {layout}") from e
        except readers.AnnotationFormatError as e:
            raise readers.AnnotationFormatError(f"Task '{name}': {e}") from e
        return support, queries

    return load


def _load_coco(data_dir: Path) -> tuple[list, list]:
    root = data_dir / "coco"
    return readers.read_coco_karpathy(root, ("train", "restval")), readers.read_coco_karpathy(root, "test")


def _load_flickr30k(data_dir: Path) -> tuple[list, list]:
    root = data_dir / "flickr30k"
    return readers.read_flickr30k_karpathy(root, "train"), readers.read_flickr30k_karpathy(root, "test")


def _load_vqav2(data_dir: Path) -> tuple[list, list]:
    return readers.read_vqav2(data_dir / "vqav2", "train"), readers.read_vqav2(data_dir / "vqav2", "val")


def _load_okvqa(data_dir: Path) -> tuple[list, list]:
    return readers.read_okvqa(data_dir / "okvqa", "train"), readers.read_okvqa(data_dir / "okvqa", "val")


def _load_vizwiz(data_dir: Path) -> tuple[list, list]:
    root = data_dir / "vizwiz"
    return (readers.read_vizwiz(root / "train.json", root / "train"),
            readers.read_vizwiz(root / "val.json", root / "val"))


def _load_textvqa(data_dir: Path) -> tuple[list, list]:
    root = data_dir / "textvqa"
    images = root / "train_images"  # the release keeps train and val images together
    return (readers.read_textvqa(root / "TextVQA_0.5.1_train.json", images),
            readers.read_textvqa(root / "TextVQA_0.5.1_val.json", images))


def _load_hateful_memes(data_dir: Path) -> tuple[list, list]:
    root = data_dir / "hateful_memes"
    return (readers.read_hateful_memes(root / "train.jsonl", root),
            readers.read_hateful_memes(root / "test_seen.jsonl", root))


@dataclass
class ClassNameExample(readers.ClassificationExample):
    """A labelled image that also carries the task's full class list, so the
    candidates (and the top-1 metric) do not depend on which classes a sampled
    support pool or query subset happens to contain. The tuple is shared."""

    classes: tuple[str, ...] = ()


_SYNSET = re.compile(r"n\d{8}")


def _imagenet_class_names(root: Path, folders: Sequence[str]) -> dict[str, str] | None:
    """Folder -> class name from LOC_synset_mapping.txt; None (the folder names
    are the class names) when there is no mapping file and the folders are not
    synset ids. Synset ids without a mapping are an error: ranking "n01440764"
    as text would measure nothing."""
    mapping_file = root / "LOC_synset_mapping.txt"
    if mapping_file.is_file():
        mapping = readers.read_synset_mapping(mapping_file)
        unnamed = [folder for folder in folders if folder not in mapping]
        if unnamed:
            raise readers.AnnotationFormatError(
                f"{mapping_file} names no class for folder(s) {unnamed[:5]} of {root / 'train'}.")
        return mapping
    if any(_SYNSET.fullmatch(folder) for folder in folders):
        raise FileNotFoundError(f"Class-name file not found: {mapping_file}. The class folders are synset "
                                "ids; the prompts need the names in LOC_synset_mapping.txt.")
    return None


def _with_classes(examples: list, classes: tuple[str, ...]) -> list[ClassNameExample]:
    return [ClassNameExample(e.id, e.image_path, e.text, e.label, classes) for e in examples]


def _load_imagenet(data_dir: Path) -> tuple[list, list]:
    root = data_dir / "imagenet"
    folders = readers.image_folder_classes(root / "train")
    class_names = _imagenet_class_names(root, folders)
    named = [class_names[f] if class_names is not None else f for f in folders]
    classes = tuple(dict.fromkeys(named))  # ImageNet repeats two names ("crane", "maillot")
    support = readers.read_image_folder(root / "train", class_names=class_names)
    queries = readers.read_image_folder(root / "val", class_names=class_names)
    return _with_classes(support, classes), _with_classes(queries, classes)


def _load_video_qa(folder: str, video_dir_template: str) -> Loader:
    def load(data_dir: Path) -> tuple[list, list]:
        root = data_dir / folder
        frames = root / "frames"
        return (readers.read_video_qa(root / "train_qa.json", frames, video_dir_template=video_dir_template),
                readers.read_video_qa(root / "test_qa.json", frames, video_dir_template=video_dir_template))

    return load


# Synthetic held-out tasks: <corpus>/eval/tasks.json, written by flamingo_jax.data.synthetic.

SYNTHETIC_TASKS_FILE = "tasks.json"


def _synthetic_spec(data_dir: Path, key: str, expected_format: str) -> tuple[Path, dict]:
    """(eval dir, tasks.json entry) for one synthetic task. `data_dir` is the
    corpus directory, or its eval/ directory itself."""
    eval_dir = data_dir / "eval"
    if not (eval_dir / SYNTHETIC_TASKS_FILE).is_file() and (data_dir / SYNTHETIC_TASKS_FILE).is_file():
        eval_dir = data_dir
    path = eval_dir / SYNTHETIC_TASKS_FILE
    specs = readers._load_json(path, "the eval task index of a corpus written by "
                                     "`python -m flamingo_jax.data.synthetic --out_dir=...`")
    spec = specs.get(key) if isinstance(specs, dict) else None
    if not isinstance(spec, dict) or spec.get("format") != expected_format:
        raise readers.AnnotationFormatError(f"{path}: expected a '{key}' entry of format '{expected_format}'; a "
                                            "corpus written before the task existed lacks it: generate it again.")
    return eval_dir, spec


def _load_synthetic_captioning(data_dir: Path) -> tuple[list, list]:
    eval_dir, spec = _synthetic_spec(data_dir, "captioning", "coco_karpathy")
    annotations, images = eval_dir / spec["annotations"], eval_dir / spec["image_root"]
    return (readers.read_karpathy_captions(annotations, images, spec["support_split"]),
            readers.read_karpathy_captions(annotations, images, spec["query_split"]))


def _load_synthetic_vqa(data_dir: Path) -> tuple[list, list]:
    eval_dir, spec = _synthetic_spec(data_dir, "vqa", "vqav2")

    def read(split: dict) -> list:
        return readers.read_vqa_format(eval_dir / split["questions"], eval_dir / split["annotations"],
                                       eval_dir / spec["image_root"], spec["image_filename"])

    return read(spec["support"]), read(spec["query"])


def _load_synthetic_classification(data_dir: Path) -> tuple[list, list]:
    eval_dir, spec = _synthetic_spec(data_dir, "classification", "hateful_memes")
    root = eval_dir / spec["image_root"]
    return (readers.read_hateful_memes(eval_dir / spec["support"], root),
            readers.read_hateful_memes(eval_dir / spec["query"], root))


def _load_synthetic_video_qa(data_dir: Path) -> tuple[list, list]:
    """MSVD-QA's reader over the corpus' clips, which know their stored rate (tasks.json 'fps')."""
    eval_dir, spec = _synthetic_spec(data_dir, "video_qa", "msvd_qa")
    frames, fps = eval_dir / spec["frames"], float(spec["fps"])

    def read(annotations: str) -> list:
        return readers.read_video_qa(eval_dir / annotations, frames, video_dir_template=spec["video_dir_template"],
                                     fps=fps)

    return read(spec["support"]), read(spec["query"])


# ---------------------------------------------------------------------------
# Post-processing and scoring
# ---------------------------------------------------------------------------


def unchanged(text: str) -> str:
    """Rank mode generates nothing to post-process."""
    return text


def postprocess_synthetic_vqa(generated: str) -> str:
    """`postprocess_vqa_generation`, then a final period dropped: the synthetic
    training corpus ends its answers with one ("Answer: green."), and the
    official VQA accuracy compares unanimous answers without normalising."""
    return metrics.postprocess_vqa_generation(generated).rstrip(".").strip()


def _check_outputs(outputs: Sequence, queries: Sequence, what: str) -> None:
    if len(outputs) != len(queries):
        raise ValueError(f"{what}: {len(outputs)} outputs for {len(queries)} queries.")
    if not queries:
        raise ValueError(f"{what}: no queries to score.")


def score_captioning(outputs: list[str], queries: list) -> dict[str, float]:
    """CIDEr-D (x100) of the captions against all reference captions of each query."""
    _check_outputs(outputs, queries, "score_captioning")
    predictions = dict(enumerate(outputs))  # keyed by position: ids may repeat across splits
    references = {i: q.captions for i, q in enumerate(queries)}
    cider, _ = metrics.cider_d(predictions, references)
    return {"cider": cider}


VQA_NORMALIZATIONS = ("always", "official")
"""How VQA accuracy normalises answers: 'always' (the EvalAI server and
OpenFlamingo: prediction and answers are always normalised) or 'official' (the
VQA API's vqaEval.py: only when the annotators disagree)."""


def score_vqa(outputs: list[str], queries: list, *, normalization: str = "always") -> dict[str, float]:
    """VQA accuracy (x100) over every annotator's answer, normalised as `normalization` says
    (one of VQA_NORMALIZATIONS)."""
    if normalization not in VQA_NORMALIZATIONS:
        raise UserError(f"--vqa_normalization={normalization!r}: choose one of {', '.join(VQA_NORMALIZATIONS)}.")
    _check_outputs(outputs, queries, "score_vqa")
    unanswered = [q.question_id for q in queries if not q.answers]
    if unanswered:
        raise ValueError(f"score_vqa: queries without ground-truth answers (a test split?), e.g. {unanswered[:5]}.")
    predictions = dict(enumerate(outputs))
    answers = {i: q.answers for i, q in enumerate(queries)}
    return {"vqa_accuracy": metrics.vqa_accuracy_corpus(predictions, answers,
                                                        always_normalize=normalization == "always")}


def score_video_qa(outputs: list[str], queries: list) -> dict[str, float]:
    """Top-1 (x100): the post-processed answer equals the single ground-truth
    answer, compared lower-cased and stripped."""
    _check_outputs(outputs, queries, "score_video_qa")
    targets = [q.answer.strip().lower() for q in queries]
    return {"top1_accuracy": metrics.top1_accuracy([o.strip().lower() for o in outputs], targets)}


def _as_scores(outputs: Sequence[np.ndarray], num_candidates: int, what: str) -> np.ndarray:
    """Rank-mode outputs as one [num_queries, num_candidates] array."""
    scores = np.stack([np.asarray(o, dtype=np.float64).reshape(-1) for o in outputs])
    if scores.shape[1] != num_candidates:
        raise ValueError(f"{what}: outputs score {scores.shape[1]} candidates, expected {num_candidates}.")
    return scores


def score_class_names(outputs: list[np.ndarray], queries: list) -> dict[str, float]:
    """Top-1 (x100): the highest log-likelihood class name is the label.
    Candidates are the queries' shared class list (`ClassNameExample.classes`),
    the list `ClassNameTemplate.candidates` gives the engine."""
    _check_outputs(outputs, queries, "score_class_names")
    classes = queries[0].classes
    if not classes or any(q.classes != classes for q in queries):
        raise ValueError("score_class_names: queries must share one non-empty class list.")
    predicted = [classes[i] for i in _as_scores(outputs, len(classes), "score_class_names").argmax(-1)]
    return {"top1_accuracy": metrics.top1_accuracy(predicted, [str(q.label) for q in queries])}


def score_yes_no(outputs: list[np.ndarray], queries: list) -> dict[str, float]:
    """ROC-AUC (x100) of p(yes) = softmax over the [yes, no] log-likelihoods
    against label 1, and the accuracy of the likelier answer. ROC-AUC is NaN
    when the queries hold one class only (undefined; small query subsets)."""
    _check_outputs(outputs, queries, "score_yes_no")
    scores = _as_scores(outputs, len(YES_NO), "score_yes_no")  # [Q, 2] in YES_NO order
    p_yes = 1.0 / (1.0 + np.exp(scores[:, 1] - scores[:, 0]))
    labels = np.array([int(q.label) for q in queries])
    both_classes = 0 < labels.sum() < len(labels)
    return {
        "roc_auc": metrics.roc_auc(p_yes, labels) if both_classes else float("nan"),
        "accuracy": metrics.top1_accuracy((scores[:, 0] > scores[:, 1]).astype(int), labels),
    }


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

_LAYOUTS = {
    "coco": "coco/dataset_coco.json and images in coco/train2014/, coco/val2014/",
    "flickr30k": "flickr30k/dataset_flickr30k.json and images in flickr30k/flickr30k-images/",
    "vqav2": ("vqav2/v2_OpenEnded_mscoco_{train,val}2014_questions.json, "
              "vqav2/v2_mscoco_{train,val}2014_annotations.json, images in vqav2/{train,val}2014/"),
    "okvqa": ("okvqa/OpenEnded_mscoco_{train,val}2014_questions.json, "
              "okvqa/mscoco_{train,val}2014_annotations.json, images in okvqa/{train,val}2014/"),
    "vizwiz": "vizwiz/train.json, vizwiz/val.json, images in vizwiz/train/, vizwiz/val/",
    "textvqa": "textvqa/TextVQA_0.5.1_{train,val}.json, images in textvqa/train_images/",
    "hateful_memes": "hateful_memes/train.jsonl, hateful_memes/test_seen.jsonl, images in hateful_memes/img/",
    "imagenet": ("imagenet/train/<class>/*, imagenet/val/<class>/* and, for synset-id folders, "
                 "imagenet/LOC_synset_mapping.txt"),
    "msvdqa": "msvdqa/train_qa.json, msvdqa/test_qa.json, frames in msvdqa/frames/vid{video_id}/",
    "msrvttqa": "msrvttqa/train_qa.json, msrvttqa/test_qa.json, frames in msrvttqa/frames/video{video_id}/",
    "synthetic": "eval/tasks.json and the files it names (python -m flamingo_jax.data.synthetic)",
}


def _captioning(name: str, read: Loader, layout: str) -> Task:
    template = CaptioningTemplate()
    return Task(name=name, kind="captioning", template=template, mode="generate",
                max_new_tokens=CAPTION_MAX_NEW_TOKENS, load=_task_loader(name, layout, read),
                media=template.media, postprocess=metrics.postprocess_caption_generation,
                score=score_captioning, primary_metric="cider", layout=layout)


def _vqa(name: str, read: Loader, layout: str, postprocess: Callable[[str], str] | None = None) -> Task:
    template = VQATemplate()
    return Task(name=name, kind="vqa", template=template, mode="generate",
                max_new_tokens=VQA_MAX_NEW_TOKENS, load=_task_loader(name, layout, read),
                media=template.media, postprocess=postprocess or metrics.postprocess_vqa_generation,
                score=score_vqa, primary_metric="vqa_accuracy", layout=layout)


def _video_qa(name: str, read: Loader, layout: str, postprocess: Callable[[str], str] | None = None) -> Task:
    template = VQATemplate()
    return Task(name=name, kind="video_qa", template=template, mode="generate",
                max_new_tokens=VQA_MAX_NEW_TOKENS, load=_task_loader(name, layout, read),
                media=template.media, postprocess=postprocess or metrics.postprocess_vqa_generation,
                score=score_video_qa, primary_metric="top1_accuracy", layout=layout)


def _yes_no(name: str, read: Loader, layout: str, question: str) -> Task:
    template = HatefulMemesTemplate(question=question)
    return Task(name=name, kind="classification", template=template, mode="rank", max_new_tokens=0,
                load=_task_loader(name, layout, read), media=template.media, postprocess=unchanged,
                score=score_yes_no, candidates=template.candidates, rices=True,
                primary_metric="roc_auc", layout=layout)


def _class_names(name: str, read: Loader, layout: str) -> Task:
    template = ClassNameTemplate()
    return Task(name=name, kind="classification", template=template, mode="rank", max_new_tokens=0,
                load=_task_loader(name, layout, read), media=template.media, postprocess=unchanged,
                score=score_class_names, candidates=template.candidates, rices=True,
                primary_metric="top1_accuracy", layout=layout)


def _registry() -> dict[str, Task]:
    synthetic = _LAYOUTS["synthetic"]
    tasks = [
        _captioning("coco", _load_coco, _LAYOUTS["coco"]),
        _captioning("flickr30k", _load_flickr30k, _LAYOUTS["flickr30k"]),
        _vqa("vqav2", _load_vqav2, _LAYOUTS["vqav2"]),
        _vqa("okvqa", _load_okvqa, _LAYOUTS["okvqa"]),
        _vqa("vizwiz", _load_vizwiz, _LAYOUTS["vizwiz"]),
        _vqa("textvqa", _load_textvqa, _LAYOUTS["textvqa"]),
        _yes_no("hateful_memes", _load_hateful_memes, _LAYOUTS["hateful_memes"], "Is it hateful?"),
        _class_names("imagenet", _load_imagenet, _LAYOUTS["imagenet"]),
        _video_qa("msvdqa", _load_video_qa("msvdqa", "vid{video_id}"), _LAYOUTS["msvdqa"]),
        _video_qa("msrvttqa", _load_video_qa("msrvttqa", "video{video_id}"), _LAYOUTS["msrvttqa"]),
        _captioning("synthetic_captioning", _load_synthetic_captioning, synthetic),
        _vqa("synthetic_vqa", _load_synthetic_vqa, synthetic, postprocess_synthetic_vqa),
        # Label 1 = the written statement is false about the image (tasks.json's positive_label).
        _yes_no("synthetic_classification", _load_synthetic_classification, synthetic, "Is it false?"),
        _video_qa("synthetic_video_qa", _load_synthetic_video_qa, synthetic, postprocess_synthetic_vqa),
    ]
    return {task.name: task for task in tasks}


TASKS: dict[str, Task] = _registry()


PROMPT_STYLES = ("flamingo", "openflamingo")
"""Whose evaluation protocol builds prompts and post-processes generations: the
paper's (templates.py) or OpenFlamingo's open_flamingo/eval (openflamingo.py)."""

# Registered task -> its OpenFlamingo template / post-processing (openflamingo.TEMPLATES keys).
_OPENFLAMINGO_TASKS = {
    "coco": "captioning", "flickr30k": "captioning", "vqav2": "vqa", "okvqa": "vqa", "vizwiz": "vqa",
    "textvqa": "vqa", "hateful_memes": "hateful_memes", "imagenet": "imagenet",
}


def with_protocol(task: Task, *, prompts: str = "flamingo", vqa_normalization: str = "always") -> Task:
    """`task` with the prompt style and VQA normalisation of the evaluate CLI's
    --prompts and --vqa_normalization flags."""
    if prompts not in PROMPT_STYLES:
        raise UserError(f"--prompts={prompts!r}: choose one of {', '.join(PROMPT_STYLES)}.")
    if vqa_normalization not in VQA_NORMALIZATIONS:
        raise UserError(f"--vqa_normalization={vqa_normalization!r}: choose one of "
                        f"{', '.join(VQA_NORMALIZATIONS)}.")
    changes: dict[str, Any] = {}
    if task.score is score_vqa:
        changes["score"] = functools.partial(score_vqa, normalization=vqa_normalization)
    if prompts == "openflamingo":
        kind = _OPENFLAMINGO_TASKS.get(task.name)
        if kind is None:
            raise UserError(f"--prompts=openflamingo: OpenFlamingo has no prompts for task {task.name!r}; "
                            f"it evaluates {', '.join(_OPENFLAMINGO_TASKS)}. Use --prompts=flamingo for it.")
        template = openflamingo.TEMPLATES[kind]
        changes.update(template=template, media=template.media)
        if task.mode == "generate":
            changes["postprocess"] = openflamingo.POSTPROCESS[kind]
        else:
            changes.update(candidates=template.candidates, rank_with_eoc=False, rank_mean_over_tokens=True)
    return dataclasses.replace(task, **changes)


class UnknownTask(UserError, ValueError):
    """A task name that is not registered."""


def get_task(name: str) -> Task:
    """The registered task called `name`."""
    if name not in TASKS:
        raise UnknownTask(f"unknown evaluation task {name!r}; known tasks: {', '.join(TASKS)}.")
    return TASKS[name]


__all__ = [
    "ClassNameExample", "KINDS", "MODES", "PROMPT_STYLES", "TASKS", "Task", "VQA_NORMALIZATIONS", "get_task",
    "with_protocol",
    "score_captioning", "score_class_names", "score_video_qa", "score_vqa", "score_yes_no",
]
