"""Mocked TFDS builders for the tests: `coco_captions` and `imagenet2012` with a few
deterministic examples, through `tfds.testing.mock_data` (nothing is downloaded).

TFDS's default random examples cannot be made for `coco_captions` (its nested
Sequence gets features of different lengths), and under `MockPolicy.USE_CODE` a builder
knows no splits. So `mocked(root)` writes each builder's real metadata with our split
sizes into `root` (`MockPolicy.USE_FILES`) and reads examples from `EXAMPLES` instead of
files: they are serialised with the builder's own features and decoded by them (with the
caller's decoders, `SkipDecoding` included), and split slicing, `even_splits` and
`split_for_jax_process` resolve against the metadata as on real data.
"""

from __future__ import annotations

import contextlib
import functools
import os
from unittest import mock

import numpy as np

from flamingo_jax.data._tf import tf
from flamingo_jax.data.tfds_source import tfds

SPLITS = {"coco_captions": {"train": 20, "restval": 4, "test": 6}, "imagenet2012": {"train": 8, "validation": 6}}
WORDS = ("a red circle", "a blue square", "two green triangles", "one small star", "a big yellow shape")
CLASSES = 3  # imagenet2012 labels used: 0..2
EMPTY_CAPTIONS = 3  # coco_captions train example without any caption: a counted skip


def _image(seed: int, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros([size, size + 4, 3], np.uint8) + rng.integers(0, 255, [1, 1, 3], dtype=np.uint8)
    image[size // 4: size // 2, :: 3] = 255
    return image


def coco_example(split: str, index: int) -> dict:
    offset = {"train": 0, "restval": 500, "test": 1000}[split]
    texts = [] if (split == "train" and index == EMPTY_CAPTIONS) else [
        f"{WORDS[(index + k) % len(WORDS)]} number {index}" for k in range(2 + index % 2)]
    empty = np.zeros([0], np.int64)
    return {"image": _image(offset + index), "image/filename": f"{split}_{index}.jpg", "image/id": offset + index,
            "captions": {"text": texts, "id": np.arange(len(texts), dtype=np.int64) + 10 * index},
            "objects": {"area": empty, "bbox": np.zeros([0, 4], np.float32), "id": empty,
                        "is_crowd": np.zeros([0], bool), "label": empty}}


def imagenet_example(split: str, index: int) -> dict:
    offset = 5000 if split == "validation" else 4000
    return {"image": _image(offset + index), "label": index % CLASSES, "file_name": f"{split}_{index}.JPEG"}


EXAMPLES = {"coco_captions": coco_example, "imagenet2012": imagenet_example}


def write_metadata(root: str) -> None:
    """dataset_info.json (features and split sizes) of each mocked builder under `root`."""
    datasets = tfds()
    for name, splits in SPLITS.items():
        builder = datasets.builder(name)
        directory = os.path.join(root, *builder.info.full_name.split("/"))
        os.makedirs(directory, exist_ok=True)
        template = lambda split: datasets.core.ShardedFileTemplate(  # noqa: E731
            data_dir=directory, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", dataset_name=name,
            split=split, filetype_suffix="tfrecord")
        builder.info.set_splits(datasets.core.SplitDict([
            datasets.core.SplitInfo(name=split, shard_lengths=[count], num_bytes=0, filename_template=template(split))
            for split, count in splits.items()]))
        builder.info.write_to_directory(directory)


def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """`FileReaderBuilder._as_dataset` over EXAMPLES: the split's file instructions say which."""
    del read_config, shuffle_files
    t = tf()
    make = EXAMPLES[self.name]
    rows = []
    for instruction in self.info.splits[split].file_instructions:
        split_name = os.path.basename(instruction.filename).split("-")[1].split(".")[0]
        rows += [make(split_name, i) for i in range(instruction.skip, instruction.skip + instruction.take)]
    serialized = [self.info.features.serialize_example(row) for row in rows]
    dataset = t.data.Dataset.from_tensor_slices(t.constant(serialized, t.string))
    return dataset.map(functools.partial(self.info.features.deserialize_example, decoders=decoders))


@contextlib.contextmanager
def mocked(root: str):
    """Inside: `tfds.builder('coco_captions' | 'imagenet2012', data_dir=...)` reads EXAMPLES.

    `mock_data` also wraps `DatasetBuilder.as_dataset` in a process-wide fake file system
    (for builders without metadata); with ours on disk that is not needed, and it would
    make the TFRecord reads of other pipelines' threads fail while a TFDS dataset is built."""
    datasets = tfds()
    write_metadata(root)
    builder_class = datasets.core.dataset_builder.DatasetBuilder
    real_as_dataset = builder_class.as_dataset
    with datasets.testing.mock_data(policy=datasets.testing.MockPolicy.USE_FILES, data_dir=root,
                                    as_dataset_fn=_as_dataset), \
            mock.patch.object(builder_class, "as_dataset", real_as_dataset):
        yield

def write_synset_mapping(root: str) -> None:
    """LOC_synset_mapping.txt naming the mocked imagenet2012 labels (0..CLASSES-1) only."""
    synsets = tfds().builder("imagenet2012").info.features["label"].names[:CLASSES]
    names = ("tench", "goldfish", "great white shark")
    with open(os.path.join(root, "LOC_synset_mapping.txt"), "w") as f:
        f.writelines(f"{synset} {name}, other name\n" for synset, name in zip(synsets, names))


if __name__ == "__main__":  # python tests/tfds_mock.py ROOT -m MODULE ARGS...: MODULE's CLI on the mocked builders
    import runpy
    import sys

    root, flag, module, *args = sys.argv[1:]
    assert flag == "-m", "usage: tfds_mock.py ROOT -m MODULE [ARGS...]"
    sys.argv = [module, *args]
    with mocked(root):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
