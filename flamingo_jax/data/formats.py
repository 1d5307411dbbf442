"""On-disk record formats: TFRecord shards of `tf.train.Example`, and their writers.

Every dataset is a set of shards `<name>-00000-of-00008.tfrecord` (5-digit index
and count). Writers deal records round-robin over the shards, so record r is
record r // num_shards of shard r % num_shards; hosts read whole shards, so
write at least as many shards as there will be data-loading hosts.

Text is stored raw (UTF-8) and tokenised when read, so one set of records
serves any vocabulary. Images are stored encoded (JPEG/PNG/GIF/BMP/WebP, as
`tf.io.decode_image` reads them) and decoded when read, at the resolution the
run asks for.

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

The readers validate records (see `pipeline.SKIP_REASONS`); writers only check
Python types, so a record that a reader will skip can still be written (the
importers in `prepare.py` validate before writing).
"""

from __future__ import annotations

import os
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

    Use as a context manager (or call `close`); shards are written under their
    final names, so consumers should only start once the writer has closed.
    """

    def __init__(self, output_dir: str, name: str, num_shards: int):
        if num_shards < 1:
            raise ValueError(f"num_shards={num_shards}: write at least one shard.")
        if not name or "/" in name:
            raise ValueError(f"dataset name {name!r} must be a non-empty file name prefix without '/'.")
        tf().io.gfile.makedirs(output_dir)
        self.paths = [os.path.join(output_dir, shard_name(name, i, num_shards)) for i in range(num_shards)]
        self._writers = [tf().io.TFRecordWriter(p) for p in self.paths]
        self.num_written = 0

    def write_serialized(self, record: bytes) -> None:
        self._writers[self.num_written % len(self._writers)].write(record)
        self.num_written += 1

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


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
