"""Benchmarks read from prepared TFDS builders, beside the annotation-file readers.

TFDS has two of the paper's benchmarks: `coco_captions` (the Karpathy splits: support
train + restval, queries test, as `tasks._load_coco`) and `imagenet2012` (support train,
queries validation). `python -m flamingo_jax.evaluate --tasks=coco,imagenet --source=tfds
--tfds_data_dir=gs://bucket/tfds` evaluates them from there.

The evaluator wants lists of examples with image files; a TFDS split is a stream. So:
- the support pool is the first `support_size` examples of the support split read with
  TFDS's file shuffling seeded by the evaluation seed (TFDS stores a split's examples in a
  hash-shuffled order, so this is a random pool without a pass over ImageNet's 1.28M);
- the queries are the evaluator's own seeded subset of the query split (the indices
  `support.sample_queries` takes from the whole split; all of it without --num_queries),
  found in one pass;
- only the images kept are written, still encoded (TFDS does not decode them), into a
  cache folder, and the examples point at those files.
ImageNet's TFDS labels are synset ids; the prompts need class names, from Kaggle's
`LOC_synset_mapping.txt` in `<tfds_data_dir>/` (or `<tfds_data_dir>/imagenet2012/`).
The classes ranked are the labels the mapping names, in label order.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from flamingo_jax.data.tfds_source import open_builder, tfds
from flamingo_jax.errors import UserError
from flamingo_jax.evaluation import readers
from flamingo_jax.evaluation.tasks import ClassNameExample

Example = Any


class TfdsTaskError(UserError, ValueError):
    """A task asked from TFDS that TFDS does not have, or TFDS data it cannot use."""


@dataclasses.dataclass(frozen=True)
class TfdsBenchmark:
    builder: str
    support_split: str
    query_split: str
    make: Callable[..., Example | None]  # (numpy example, image path, index, classes) -> example or None
    classes: Callable[[Any, str], tuple[dict[int, str], tuple[str, ...]]] | None = None  # label names


def _caption_example(example: dict, image_path: Path, index: int, classes: Any) -> readers.CaptionExample | None:
    texts = [t.decode("utf-8") for t in np.ravel(example["captions"]["text"]) if t.strip()]
    if not texts:
        return None  # nothing to show as support, nothing to score a query against
    return readers.CaptionExample(id=int(example["image/id"]), image_path=image_path, captions=texts)


def _imagenet_classes(builder: Any, data_dir: str) -> tuple[dict[int, str], tuple[str, ...]]:
    """{label: class name} and the ranked classes, from LOC_synset_mapping.txt."""
    candidates = [Path(data_dir or builder.data_dir_root) / name for name in
                  ("LOC_synset_mapping.txt", "imagenet2012/LOC_synset_mapping.txt")]
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise TfdsTaskError(f"task 'imagenet' from TFDS: labels are synset ids and the prompts need class names; "
                            f"put Kaggle's LOC_synset_mapping.txt at {candidates[0]} (or {candidates[1]}).")
    mapping = readers.read_synset_mapping(found[0])
    synsets = builder.info.features["label"].names
    names = {label: mapping[synset] for label, synset in enumerate(synsets) if synset in mapping}
    return names, tuple(dict.fromkeys(names.values()))  # ImageNet repeats two names ("crane", "maillot")


def _imagenet_example(example: dict, image_path: Path, index: int, classes: Any) -> ClassNameExample:
    names, ranked = classes
    label = int(example["label"])
    if label not in names:
        raise TfdsTaskError(f"task 'imagenet' from TFDS: example {index} has label {label}, which the synset "
                            "mapping names no class for; use the full LOC_synset_mapping.txt.")
    file_name = example.get("file_name", b"")
    return ClassNameExample(id=file_name.decode("utf-8") if file_name else index, image_path=image_path,
                            text=None, label=names[label], classes=ranked)


BENCHMARKS = {
    "coco": TfdsBenchmark("coco_captions", "train+restval", "test", _caption_example),
    "imagenet": TfdsBenchmark("imagenet2012", "train", "validation", _imagenet_example, _imagenet_classes),
}


def _read(task: str, bench: TfdsBenchmark, split: str, data_dir: str, cache_dir: Path, *,
          first: int | None = None, keep: set[int] | None = None, seed: int = 0) -> list[Example]:
    """Examples of `split`: its first `first` (file order shuffled by `seed`) or those at `keep`."""
    builder, _ = open_builder(bench.builder, split, data_dir, f"task {task!r} (--source=tfds)")
    classes = bench.classes(builder, data_dir) if bench.classes else None
    datasets = tfds()
    shuffled = first is not None
    read_config = datasets.ReadConfig(try_autocache=False, shuffle_seed=seed if shuffled else None)
    dataset = builder.as_dataset(split=split, shuffle_files=shuffled, read_config=read_config,
                                 decoders={"image": datasets.decode.SkipDecoding()})
    folder = cache_dir / bench.builder / re.sub(r"[^\w.+-]", "_", split)
    folder.mkdir(parents=True, exist_ok=True)
    examples, unusable = [], 0
    for index, example in enumerate(dataset.as_numpy_iterator()):
        if first is not None and len(examples) == first:
            break
        if keep is not None and index not in keep:
            continue
        path = folder / f"{index}.img"
        made = bench.make(example, path, index, classes)
        if made is None:
            unusable += 1
            continue
        path.write_bytes(example["image"])
        examples.append(made)
    if unusable:
        logging.warning("task %r: %d example(s) of TFDS %s split %r have no reference text; left out.", task,
                        unusable, bench.builder, split)
    return examples


def tfds_loader(task: str, data_dir: str, cache_dir: Path, *, support_size: int, num_queries: int | None,
                seed: int) -> Callable[[Any], tuple[list, list]]:
    """`Task.load` for `task` from TFDS (the argument, an annotation folder, is unused)."""
    if task not in BENCHMARKS:
        raise TfdsTaskError(f"task {task!r} has no TFDS source; TFDS has {sorted(BENCHMARKS)} "
                            f"(use --source={task}=files for the annotation files).")
    bench = BENCHMARKS[task]

    def load(_: Any) -> tuple[list, list]:
        support = _read(task, bench, bench.support_split, data_dir, cache_dir, first=support_size, seed=seed)
        _, info = open_builder(bench.builder, bench.query_split, data_dir, f"task {task!r} (--source=tfds)")
        total = info.num_examples
        keep = None
        if num_queries is not None and num_queries < total:  # the indices support.sample_queries takes
            keep = {int(i) for i in np.random.default_rng(seed + 1).choice(total, size=num_queries, replace=False)}
        return support, _read(task, bench, bench.query_split, data_dir, cache_dir, keep=keep)

    return load


def parse_sources(value: str, tasks: list[str]) -> dict[str, str]:
    """--source: 'files', 'tfds', or per task 'coco=tfds,vqav2=files' -> {task: source}."""
    value = (value or "files").strip()
    if "=" not in value:
        if value not in ("files", "tfds"):
            raise TfdsTaskError(f"--source={value!r}: use 'files', 'tfds' or per task 'coco=tfds,vqav2=files'.")
        return {task: value for task in tasks}
    sources = {task: "files" for task in tasks}
    for item in filter(None, (part.strip() for part in value.split(","))):
        task, _, source = item.partition("=")
        if task not in sources or source not in ("files", "tfds"):
            raise TfdsTaskError(f"--source item {item!r}: name one of the evaluated tasks {tasks} and 'files' or "
                                "'tfds'.")
        sources[task] = source
    return sources


def check_tfds_dir(data_dir: str) -> None:
    if data_dir and not os.path.exists(data_dir) and "://" not in data_dir:
        raise TfdsTaskError(f"--tfds_data_dir={data_dir} does not exist; give the folder the builders were "
                            "prepared into.")
