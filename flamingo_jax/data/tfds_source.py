"""TFDS builders as a record source: a prepared `tensorflow_datasets` split feeds the
same pair pipelines as our TFRecord shards.

A mixture entry names the builder, the split (TFDS slicing: `train[:90%]`), the data
dir and which features are the image (or the video's frames) and the text:

    dict(name="coco", kind="tfds", batch_size=512, weight=0.2, max_len=32,
         tfds_builder="coco_captions", tfds_split="train", tfds_data_dir="gs://bucket/tfds",
         tfds_fields=dict(image="image", text="captions/text"))
    dict(name="videos", kind="tfds", ..., tfds_fields=dict(frames="video", text="caption", frame_rate=25))

`image` makes the entry an image-text dataset, `frames` a video-text one. A field is a
feature path, `/` between nesting levels. When the text feature holds several texts
(COCO: five captions per image) training takes one uniformly at random, seeded by the
run's seed and the example's index in this host's split (the same one on every pass and
after a resume); evaluation (`training=False`) takes the first.

What TFDS gives: a split read in a fixed order (we never let TFDS shuffle files, so the
order is the builder's), sliced with its split syntax, and one disjoint, equally sized
part per host (`tfds.split_for_jax_process`, remainder dropped, so hosts step together).
Images and frames are not decoded by TFDS (`SkipDecoding`): their encoded bytes go into
a record of our own schema (`formats.image_text_example` / `video_text_example`), which
the pipeline then parses, validates, tokenises, decodes and augments exactly as it does a
record read from a shard. So what we add is the pipeline's: per-epoch seeded shuffling,
the (epoch, position) state that resumes exactly (the checkpoint holds it), and bad
examples (no text, an undecodable image) skipped and counted by reason, logged as
`tfds:<builder>/<split>` with the example's index in this host's part of the split.
Skipping to a saved position reads (and re-encodes, without decoding) the examples
before it, as the TFRecord path reads the skipped records' bytes.

Interleaved documents are not read from TFDS: no builder we know of stores them in a
layout a field map could name; import them with `python -m flamingo_jax.data.prepare`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from flamingo_jax.data import formats
from flamingo_jax.data._tf import as_written, tf
from flamingo_jax.data.errors import DataError, DataFileMissing
from flamingo_jax.data.pipeline import REASON_CODE, RecordSource

FIELD_NAMES = ("image", "frames", "text", "frame_rate")
READ_FILES_AT_ONCE = 16  # TFDS's default; without file shuffling its interleave is deterministic


def tfds() -> Any:
    """`tensorflow_datasets`, imported on first use (after TensorFlow is hidden from accelerators)."""
    tf()
    import tensorflow_datasets

    return tensorflow_datasets


@dataclasses.dataclass(frozen=True)
class TfdsFields:
    """Which features of a builder's examples are the media and the text."""

    text: str
    image: str = ""  # an Image feature: image-text pairs
    frames: str = ""  # a Video feature (or a Sequence of Images): video-text pairs
    frame_rate: float | str = 0.0  # video: frames per second, or the feature that holds it

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str) -> TfdsFields:
        values = dict(values or {})
        unknown = sorted(set(values) - set(FIELD_NAMES))
        if unknown:
            raise DataError(f"{where}: tfds_fields has unknown key {unknown[0]!r}; use {FIELD_NAMES}.")
        if not values.get("text"):
            raise DataError(f"{where}: tfds_fields needs `text`, the feature holding the caption(s), e.g. "
                            "dict(image='image', text='captions/text').")
        if bool(values.get("image")) == bool(values.get("frames")):
            raise DataError(f"{where}: tfds_fields names exactly one of `image` (image-text pairs) or `frames` "
                            "(video-text pairs).")
        if values.get("frames") and not values.get("frame_rate"):
            raise DataError(f"{where}: tfds_fields needs `frame_rate` with `frames`: frames per second of the "
                            "stored frames, or the feature that holds it.")
        return cls(**values)

    @property
    def kind(self) -> str:
        """The record kind this builder's examples become."""
        return formats.IMAGE_TEXT if self.image else formats.VIDEO_TEXT


def _feature(features: Any, path: str) -> Any:
    """The feature at a `/`-separated path (through Sequences), or None."""
    feature = features
    for part in path.split("/"):
        while hasattr(feature, "feature") and not hasattr(feature, "keys"):  # Sequence -> its inner feature
            feature = feature.feature
        if not hasattr(feature, "keys") or part not in feature.keys():
            return None
        feature = feature[part]
    return feature


def _value(example: Mapping[str, Any], path: str) -> Any:
    for part in path.split("/"):
        example = example[part]
    return example


def _decoders(path: str) -> dict[str, Any]:
    """{...: SkipDecoding()} nested along `path`: the feature stays encoded bytes."""
    decoders: Any = tfds().decode.SkipDecoding()
    for part in reversed(path.split("/")):
        decoders = {part: decoders}
    return decoders


def choose_text(texts: np.ndarray, training: bool, seed: int, index: int) -> str:
    """The text of one example: the first, or in training a seeded uniform choice."""
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in np.ravel(texts)]
    if not texts:
        return ""
    if not training or len(texts) == 1:
        return texts[0]
    rng = np.random.Generator(np.random.Philox(key=[seed, int(index)]))
    return texts[int(rng.integers(len(texts)))]


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def open_builder(builder_name: str, split: str, data_dir: str, where: str) -> tuple[Any, Any]:
    """(builder, split info) after checking that the data dir, the builder, its prepared
    data and the split exist; a `DataError`/`DataFileMissing` naming the missing one otherwise."""
    t, datasets = tf(), tfds()
    if not builder_name:
        raise DataError(f"{where}: set tfds_builder to a TFDS builder name, e.g. 'coco_captions'.")
    if data_dir and not t.io.gfile.exists(data_dir):
        raise DataFileMissing(f"{where}: tfds_data_dir={data_dir!r} does not exist; give the folder the builder "
                              "was prepared into (`tfds build ... --data_dir=...`).")
    try:  # registered builders, and ones prepared in data_dir from code we do not have
        builder = datasets.builder(builder_name, data_dir=data_dir or None)
    except datasets.core.registered.DatasetNotFoundError:
        name = builder_name.split(":")[0].split("/")[0]
        raise DataError(f"{where}: tfds_builder={builder_name!r} is not a TFDS builder (nor prepared in "
                        f"{data_dir or 'the default data dir'!r}).{_suggest(name, datasets.list_builders())}") from None
    except ValueError as error:  # e.g. an unknown config or version
        raise DataError(f"{where}: tfds_builder={builder_name!r} cannot be opened: {error}") from None
    splits = dict(builder.info.splits)
    if not splits:
        raise DataFileMissing(
            f"{where}: TFDS builder {builder_name!r} is not prepared in {data_dir or builder.data_dir!r}; "
            "prepare it there first (`tfds build` or builder.download_and_prepare()).")
    try:
        info = builder.info.splits[split]
    except (ValueError, KeyError, AssertionError) as error:
        raise DataError(f"{where}: tfds_split={split!r} is not a split of {builder_name!r} ({error}); "
                        f"its splits are {sorted(splits)}, sliced as in 'train[:90%]'.") from None
    return builder, info


class TfdsSource(RecordSource):
    """One TFDS split as the pipeline's records (see the module docstring)."""

    def __init__(self, builder: str, split: str, data_dir: str, fields: TfdsFields, *, where: str = ""):
        self.builder_name, self.split, self.data_dir, self.fields = builder, split, data_dir, fields
        self.where = where or f"tfds {builder!r}"
        self.files = [f"tfds:{builder}/{split}"]
        self.description = f"TFDS {builder!r} split {split!r}"
        self.num_examples = 0
        self._host_split: Any = split
        self._builder: Any = None
        self.seed, self.training = 0, False  # set by for_host: the text choice

    def check_features(self, builder: Any) -> None:
        """Every feature the field map names exists in the builder's examples."""
        features = builder.info.features
        rate = self.fields.frame_rate if isinstance(self.fields.frame_rate, str) else ""
        for path in (self.fields.image, self.fields.frames, self.fields.text, rate):
            if path and _feature(features, path) is None:
                raise DataError(f"{self.where}: tfds_fields names feature {path!r}, which {self.builder_name!r} "
                                f"does not have; its features are {sorted(features.keys())}.")

    def for_host(self, process_index: int, process_count: int, *, name: str, seed: int,
                 training: bool) -> TfdsSource:
        builder, _ = open_builder(self.builder_name, self.split, self.data_dir, self.where)
        self.check_features(builder)
        host_split = tfds().split_for_jax_process(self.split, process_index=process_index,
                                                  process_count=process_count, drop_remainder=True)
        num_examples = builder.info.splits[host_split].num_examples
        if num_examples == 0:
            raise DataError(f"{self.where}: tfds_split={self.split!r} holds too few examples for "
                            f"{process_count} data-loading processes (none left for process {process_index}).")
        bound = TfdsSource(self.builder_name, self.split, self.data_dir, self.fields, where=self.where)
        bound._builder, bound._host_split, bound.num_examples = builder, host_split, num_examples
        bound.seed, bound.training = seed, training
        part = f"[part {process_index + 1} of {process_count}]" if process_count > 1 else ""
        bound.files = [f"tfds:{self.builder_name}/{self.split}{part}"]
        bound.description = f"{num_examples} examples of TFDS {self.builder_name!r} split {self.split!r}{part}"
        return bound

    def identity(self) -> dict[str, Any]:
        return {"num_files": 1, "tfds": f"{self.builder_name}/{self.split}", "num_examples": self.num_examples}

    def dataset(self) -> Any:
        """This host's examples, in the builder's order, media left encoded."""
        fields, datasets = self.fields, tfds()
        decoders = _decoders(fields.image or fields.frames)
        read_config = datasets.ReadConfig(try_autocache=False, skip_prefetch=True, add_tfds_id=False,
                                          interleave_cycle_length=READ_FILES_AT_ONCE)
        return self._builder.as_dataset(split=self._host_split, shuffle_files=False, decoders=decoders,
                                        read_config=read_config)

    def records(self, epoch: Any, base_seed: Any, shuffle: bool, cycle_length: int) -> Any:
        del epoch, base_seed, shuffle, cycle_length  # one fixed order; the pipeline shuffles per epoch
        t = tf()
        fields, origin = self.fields, self.files[0].encode()
        rate_feature = isinstance(fields.frame_rate, str)

        def select(index, example):
            media = _value(example, fields.image or fields.frames)
            rate = (t.cast(t.reshape(_value(example, fields.frame_rate), [-1])[:1], t.float32) if rate_feature
                    else t.constant([float(fields.frame_rate or 0.0)], t.float32))
            return index, t.reshape(media, [-1]), t.reshape(_value(example, fields.text), [-1]), rate

        def convert(index, media, texts, rate):
            record, damage, detail = self._record(int(index), list(media), texts, float(rate[0]) if len(rate) else 0.0)
            return record, np.int32(damage), detail.encode()

        def as_tuple(index, media, texts, rate):
            record, damage, detail = t.numpy_function(convert, [index, media, texts, rate],
                                                      [t.string, t.int32, t.string], stateful=False)
            return (t.constant(origin), index, t.constant(0, t.int64), t.reshape(record, []),
                    t.reshape(damage, []), t.reshape(detail, []))

        return self.dataset().enumerate().map(as_written(select)).map(
            as_written(as_tuple), num_parallel_calls=os.cpu_count() or 1, deterministic=True)

    def _record(self, index: int, media: list[bytes], texts: np.ndarray, frame_rate: float) -> tuple[bytes, int, str]:
        """One example's encoded record of our schema, or (b'', reason code, detail) if it cannot be one."""
        try:
            caption = choose_text(texts, self.training, self.seed, index)
            media = [m for m in media if m]
            if self.fields.image:
                if len(media) != 1:
                    return b"", REASON_CODE["no_image"] if not media else REASON_CODE["malformed"], (
                        f"{len(media)} images in feature {self.fields.image!r}")
                return formats.image_text_example(media[0], caption), 0, ""
            if not media:
                return b"", REASON_CODE["no_image"], f"no frames in feature {self.fields.frames!r}"
            return formats.video_text_example(media, frame_rate, caption), 0, ""
        except Exception as error:  # noqa: BLE001 - one odd example must never stop a training run
            return b"", REASON_CODE["malformed"], f"{type(error).__name__}: {error}"
