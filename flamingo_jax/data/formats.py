"""On-disk record formats: TFRecord shards of `tf.train.Example`, and their writers.

Every dataset is a set of shards `<name>-00000-of-00008.tfrecord` (5-digit index
and count). Writers deal records round-robin over the shards, so record r is
record r // num_shards of shard r % num_shards; hosts read whole shards, so
write at least as many shards as there will be data-loading hosts.

A folder holds one coherent shard set per dataset name: writers stage their
shards in a hidden folder and move them into place only once every record is
written, refusing (unless told to overwrite) a folder that already holds the
name with another shard count; readers refuse a pattern that matches two
shard sets of one name (`check_shard_sets`).

Text is stored raw (UTF-8) and tokenised when read, so one set of records
serves any vocabulary. Images are stored encoded (JPEG/PNG/GIF/BMP/WebP; the
importers re-encode other formats as PNG) and decoded when read
(`images.decode_pixels`), at the resolution the run asks for.

Schema `interleaved` (MMC4/OBELICS-style web documents; paper's M3W):
  segment_text      bytes list [S]  one entry per segment, in document order;
                                    the text of a text segment, b"" for an image slot
  segment_is_image  int64 list [S]  1 where the segment is an image slot, else 0
  image_encoded     bytes list [M]  the encoded image of each image slot, in slot
                                    order (M = number of 1s in segment_is_image)
  doc_id            bytes list [1]  optional, for logs and debugging

Schema `image_text` (LAION/ALIGN/LTIP-style pairs):
  image_encoded     bytes list [1]  the encoded image
  caption           bytes list [1]  UTF-8 caption
  example_id        bytes list [1]  optional

Schema `video_text` (VTP-style pairs; frames stored, not a video file):
  frames_encoded    bytes list [F]  encoded frames in time order
  frame_rate        float list [1]  frames per second of the stored frames
  caption           bytes list [1]  UTF-8 caption
  example_id        bytes list [1]  optional

Batches (what the pipelines make of these records; `data/__init__.py` has the shapes) carry
`media_index`, the slot each token cross-attends to, and no media mask: an unused slot is one
no token points at and holds zeros, and `media_index` alone decides what the model reads.

The readers validate records (see `pipeline.SKIP_REASONS`); writers only check
Python types, so a record that a reader will skip can still be written (the
importers in `prepare.py` validate before writing).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Sequence
from typing import Any

from flamingo_jax.data._tf import tf

INTERLEAVED = "interleaved"
IMAGE_TEXT = "image_text"
VIDEO_TEXT = "video_text"
KINDS = (INTERLEAVED, IMAGE_TEXT, VIDEO_TEXT)


def shard_name(name: str, index: int, num_shards: int) -> str:
    """`<name>-00003-of-00008.tfrecord`."""
    return f"{name}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(directory: str, name: str) -> str:
    """The glob that matches every shard of dataset `name` in `directory`."""
    return os.path.join(directory, f"{name}-*-of-*.tfrecord")


_SHARD_NAME = re.compile(r"^(?P<name>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")


def parse_shard_name(path: str) -> tuple[str, int, int] | None:
    """(dataset name, index, shard count) of a `shard_name` file, or None for other names."""
    match = _SHARD_NAME.match(os.path.basename(path))
    return (match["name"], int(match["index"]), int(match["count"])) if match else None


def check_shard_sets(files: Sequence[str], what: str) -> list[str]:
    """Raises if `files` hold one dataset name (in one folder) with two shard counts; returns
    warnings for sets with shards missing. Files not named by `shard_name` are not checked."""
    sets: dict[tuple[str, str], dict[int, list[str]]] = {}
    for path in files:
        parsed = parse_shard_name(path)
        if parsed:
            sets.setdefault((os.path.dirname(path), parsed[0]), {}).setdefault(parsed[2], []).append(path)
    warnings = []
    for (directory, name), by_count in sorted(sets.items()):
        if len(by_count) > 1:
            first, second = (sorted(paths)[0] for _, paths in sorted(by_count.items())[:2])
            counts = " and ".join(str(count) for count in sorted(by_count))
            raise ValueError(
                f"{what}: {directory} mixes shard sets of dataset {name!r} with {counts} shards "
                f"({os.path.basename(first)} beside {os.path.basename(second)}), e.g. left by an import with "
                "another --num_shards.\nKeep one set: delete the other's files, or import again with --overwrite."
            )
        [(count, paths)] = by_count.items()
        if len(paths) < count:
            warnings.append(f"{what}: {directory} holds {len(paths)} of the {count} shards of dataset {name!r}; "
                            "an incomplete copy? Reading what is there.")
    return warnings


def list_files(pattern: str | Sequence[str]) -> list[str]:
    """Sorted files matching a glob (or several, comma-separated or as a list)."""
    patterns = pattern.split(",") if isinstance(pattern, str) else list(pattern)
    files: set[str] = set()
    for p in patterns:
        p = p.strip()
        if p:
            files.update(tf().io.gfile.glob(p))
    return sorted(files)


# ---------------------------------------------------------------- Example building
def _bytes(values: Sequence[bytes]) -> Any:
    return tf().train.Feature(bytes_list=tf().train.BytesList(value=list(values)))


def _ints(values: Sequence[int]) -> Any:
    return tf().train.Feature(int64_list=tf().train.Int64List(value=list(values)))


def _floats(values: Sequence[float]) -> Any:
    return tf().train.Feature(float_list=tf().train.FloatList(value=list(values)))


def _utf8(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}: {text!r:.80}")
    return text.encode("utf-8")


def _image_bytes(image: bytes, what: str) -> bytes:
    if not isinstance(image, (bytes, bytearray)):
        raise TypeError(
            f"{what} must be encoded image bytes (JPEG/PNG...), got {type(image).__name__}; "
            "encode arrays with flamingo_jax.data.images.encode_image."
        )
    return bytes(image)


def interleaved_example(items: Sequence[str | bytes], doc_id: str = "") -> bytes:
    """Serialises a document given as its items in order: str = text, bytes = encoded image."""
    texts, is_image, images = [], [], []
    for position, item in enumerate(items):
        if isinstance(item, str):
            texts.append(item.encode("utf-8"))
            is_image.append(0)
        else:
            images.append(_image_bytes(item, f"document item {position}"))
            texts.append(b"")
            is_image.append(1)
    features = {
        "segment_text": _bytes(texts),
        "segment_is_image": _ints(is_image),
        "image_encoded": _bytes(images),
        "doc_id": _bytes([_utf8(doc_id, "doc_id")]),
    }
    return tf().train.Example(features=tf().train.Features(feature=features)).SerializeToString()


def image_text_example(image: bytes, caption: str, example_id: str = "") -> bytes:
    features = {
        "image_encoded": _bytes([_image_bytes(image, "image")]),
        "caption": _bytes([_utf8(caption, "caption")]),
        "example_id": _bytes([_utf8(example_id, "example_id")]),
    }
    return tf().train.Example(features=tf().train.Features(feature=features)).SerializeToString()


def video_text_example(frames: Sequence[bytes], frame_rate: float, caption: str, example_id: str = "") -> bytes:
    features = {
        "frames_encoded": _bytes([_image_bytes(f, f"frame {i}") for i, f in enumerate(frames)]),
        "frame_rate": _floats([float(frame_rate)]),
        "caption": _bytes([_utf8(caption, "caption")]),
        "example_id": _bytes([_utf8(example_id, "example_id")]),
    }
    return tf().train.Example(features=tf().train.Features(feature=features)).SerializeToString()


# Field -> protobuf list type, per kind (the schemas above, minus the optional ids).
SCHEMAS = {
    INTERLEAVED: {"segment_text": "bytes_list", "segment_is_image": "int64_list", "image_encoded": "bytes_list"},
    IMAGE_TEXT: {"image_encoded": "bytes_list", "caption": "bytes_list"},
    VIDEO_TEXT: {"frames_encoded": "bytes_list", "frame_rate": "float_list", "caption": "bytes_list"},
}


def _schema(kind: str) -> dict[str, str]:
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; use one of {KINDS}.")
    return SCHEMAS[kind]


def parse(serialized: bytes, kind: str) -> dict[str, list[Any]]:
    """One serialised record -> {field: list of values}; a missing field is [].

    Python protobuf parsing (about 10 us per document), used by the pipelines
    inside their per-record Python step, where a bad record must become a
    counted skip: raises ValueError (never a crash of the input pipeline) for
    bytes that are not a `tf.train.Example` or a field of the wrong type.
    """
    from google.protobuf.message import DecodeError

    example = tf().train.Example()
    try:
        example.ParseFromString(serialized)
    except DecodeError as error:
        raise ValueError(f"not a tf.train.Example ({error})") from error
    features = example.features.feature
    fields: dict[str, list[Any]] = {}
    for key, list_type in _schema(kind).items():
        if key not in features:
            fields[key] = []
            continue
        held = features[key].WhichOneof("kind")
        if held not in (None, list_type):
            raise ValueError(f"field {key!r} holds a {held}, the {kind} schema needs a {list_type}")
        fields[key] = list(getattr(features[key], list_type).value)
    return fields


def feature_spec(kind: str) -> dict[str, Any]:
    """`tf.io.parse_single_example` spec of the schema, for reading records with TensorFlow
    directly: every field a variable-length 1-D list (missing fields parse as empty)."""
    t = tf()
    dtypes = {"bytes_list": t.string, "int64_list": t.int64, "float_list": t.float32}
    return {key: t.io.FixedLenSequenceFeature([], dtypes[list_type], allow_missing=True)
            for key, list_type in _schema(kind).items()}


# ---------------------------------------------------------------- writers
class ShardedWriter:
    """Writes serialised records round-robin into `num_shards` TFRecord shards.

    Use as a context manager: the shards are written into a hidden staging
    folder inside `output_dir` and moved into place when the block ends without
    an error (or on `commit()`); an error, or an interrupted run, leaves
    `output_dir` as it was (`discard()` removes the staging folder). Shards of
    dataset `name` that `output_dir` already holds under another shard count
    are refused before anything is written, unless `overwrite`, in which case
    they are deleted once the new set is in place. Shards of the same count are
    replaced.
    """

    def __init__(self, output_dir: str, name: str, num_shards: int, *, overwrite: bool = False):
        if num_shards < 1:
            raise ValueError(f"num_shards={num_shards}: write at least one shard.")
        if not name or "/" in name:
            raise ValueError(f"dataset name {name!r} must be a non-empty file name prefix without '/'.")
        self.output_dir, self.name, self.overwrite = output_dir, name, overwrite
        self.paths = [os.path.join(output_dir, shard_name(name, i, num_shards)) for i in range(num_shards)]
        self._stale()  # refuse early, before any input is read
        self._staging = os.path.join(output_dir, f".{name}.partial-{uuid.uuid4().hex[:12]}")
        tf().io.gfile.makedirs(self._staging)
        self._staged = [os.path.join(self._staging, os.path.basename(p)) for p in self.paths]
        self._writers = [tf().io.TFRecordWriter(p) for p in self._staged]
        self.num_written = 0

    def _stale(self) -> list[str]:
        """Shards of this name in `output_dir` that the new set would not replace; raises unless overwrite."""
        existing = tf().io.gfile.glob(shard_pattern(self.output_dir, self.name))
        stale = sorted(set(existing) - set(self.paths))
        if stale and not self.overwrite:
            counts = sorted({parse_shard_name(p)[2] for p in stale if parse_shard_name(p)})
            raise FileExistsError(
                f"{self.output_dir} already holds dataset {self.name!r} as {' and '.join(map(str, counts))} shard(s) "
                f"({os.path.basename(stale[0])}); writing {len(self.paths)} beside them would mix two shard sets.\n"
                "Replace them with overwrite=True (prepare: --overwrite), or write to another folder or --name."
            )
        return stale

    def write_serialized(self, record: bytes) -> None:
        self._writers[self.num_written % len(self._writers)].write(record)
        self.num_written += 1

    def commit(self) -> None:
        """Moves the finished shards into place (and deletes stale ones under `overwrite`)."""
        if not self._writers:
            return
        self._close_writers()
        stale = self._stale()
        for staged, final in zip(self._staged, self.paths, strict=True):
            tf().io.gfile.rename(staged, final, overwrite=True)
        for path in stale:
            tf().io.gfile.remove(path)
        tf().io.gfile.rmtree(self._staging)

    def discard(self) -> None:
        """Drops everything written; `output_dir` keeps what it held before."""
        self._close_writers()
        if tf().io.gfile.exists(self._staging):
            tf().io.gfile.rmtree(self._staging)

    close = commit

    def _close_writers(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class InterleavedWriter(ShardedWriter):
    """Interleaved documents: `write(["text", jpeg_bytes, "more text", ...])`."""

    def write(self, items: Sequence[str | bytes], doc_id: str = "") -> None:
        self.write_serialized(interleaved_example(items, doc_id))


class ImageTextWriter(ShardedWriter):
    """Image-caption pairs: `write(jpeg_bytes, "a caption")`."""

    def write(self, image: bytes, caption: str, example_id: str = "") -> None:
        self.write_serialized(image_text_example(image, caption, example_id))


class VideoTextWriter(ShardedWriter):
    """Video-caption pairs as encoded frames: `write([jpeg, ...], frame_rate, "a caption")`."""

    def write(self, frames: Sequence[bytes], frame_rate: float, caption: str, example_id: str = "") -> None:
        self.write_serialized(video_text_example(frames, frame_rate, caption, example_id))


WRITERS = {INTERLEAVED: InterleavedWriter, IMAGE_TEXT: ImageTextWriter, VIDEO_TEXT: VideoTextWriter}
