"""Importers: public dataset layouts -> this project's TFRecord formats (`formats.py`).

  python -m flamingo_jax.data.prepare interleaved --input='docs/*.jsonl' --output_dir=out --num_shards=8
  python -m flamingo_jax.data.prepare image_text  --input='shards/{00000..00009}.tar' ...   (globs, comma lists)
  python -m flamingo_jax.data.prepare video_text  --input=captions.csv --frames_dir=frames ...

interleaved: JSON lines (.jsonl/.json; a .json may also hold one list) or parquet rows of
  * OBELICS: `texts` and `images`, parallel lists where each position holds either a
    text (image None) or an image (text None);
  * MMC4: `text_list` (sentences) and `image_info` (dicts with `matched_text_index`; the
    image goes before its matched sentence, as OpenFlamingo does).
  An image is given as bytes, a dict with `bytes`/`path` (Hugging Face parquet), a
  `data:...;base64,` URI, base64 (`image_base64`/`base64` keys), or a file path
  (`image_path`/`path`/`image_name`, or a plain string), relative paths resolved
  against --image_dir, then the input file's folder. URLs are not downloaded (no
  network is assumed): fetch images first (e.g. with img2dataset) and point at files.
image_text: webdataset tar shards: members `key.jpg` (or png/jpeg/webp/bmp/gif) with
  `key.txt` and/or `key.json` (caption field --caption_field, else `caption`/`text`).
video_text: a captions file (JSON {video_id: caption}, or a JSON list / CSV with columns
  video_id, caption[, frame_rate]; --input may also be the folder holding it, then named
  captions.json/.csv or the only .json/.csv there) and a folder per video of extracted frames
  (`frames_dir/video_id/000.jpg, 001.jpg, ...`, in name order). Video files (.mp4 ...)
  would need ffmpeg, which this project does not depend on: extract frames first.

Bad inputs are skipped, counted by reason and logged with file and record index:
a missing image file, an image that does not decode, empty text, no image, more
than --max_images images in a document. The command prints the counts as JSON.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import io
import json
import os
import sys
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging

from flamingo_jax import cli
from flamingo_jax.data import formats

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
_TF_FORMATS = {"JPEG", "PNG", "GIF", "BMP", "WEBP"}  # what tf.io.decode_image reads


class SkipRecord(Exception):
    """A record that cannot be imported; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclasses.dataclass
class ImportStats:
    name: str
    written: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    files: list[str] = dataclasses.field(default_factory=list)

    def skip(self, error: SkipRecord, source: str, index: Any) -> None:
        self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
        logging.warning("import %s: skipping record %s of %s: %s (%s)", self.name, index, source, error.reason, error)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Comma-separated globs (or a list of them) -> sorted existing files; raises if none."""
    files = formats.list_files(inputs)
    if not files:
        raise FileNotFoundError(f"--input={inputs!r} matches no files; give a path, glob or comma-separated list.")
    return files


# ---------------------------------------------------------------- images
def check_image(data: bytes) -> bytes:
    """Decodes fully (catches truncation); re-encodes formats TensorFlow cannot read as PNG."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in _TF_FORMATS:
                return data
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            return buffer.getvalue()
    except Exception as error:  # PIL raises many types for bad data
        raise SkipRecord("corrupt_image", f"image does not decode: {error}") from error


def _read_local(path: str, search_dirs: Sequence[str]) -> bytes:
    candidates = [path] if os.path.isabs(path) else [os.path.join(d, path) for d in search_dirs if d] + [path]
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate, "rb") as f:
                return f.read()
    raise SkipRecord("missing_image", f"image file {path!r} not found (looked in {candidates})")


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=False)
    except (binascii.Error, ValueError) as error:
        raise SkipRecord("corrupt_image", f"bad base64 image: {error}") from error


def load_image(ref: Any, search_dirs: Sequence[str], validate: bool = True) -> bytes:
    """Any supported image reference (see module docstring) -> encoded bytes."""
    if isinstance(ref, (bytes, bytearray)):
        data = bytes(ref)
    elif isinstance(ref, dict):
        if ref.get("bytes") is not None:
            data = bytes(ref["bytes"])
        elif ref.get("image_base64") or ref.get("base64"):
            data = _b64(ref.get("image_base64") or ref.get("base64"))
        else:
            path = ref.get("image_path") or ref.get("path") or ref.get("image_name")
            if path:
                return load_image(str(path), search_dirs, validate)
            url = ref.get("raw_url") or ref.get("url")
            raise SkipRecord("missing_image", f"no local image for {url or ref!r:.120}")
    elif isinstance(ref, str):
        if ref.startswith("data:"):
            data = _b64(ref)
        elif ref.startswith(("http://", "https://")):
            raise SkipRecord("missing_image", f"{ref!r:.120} is a URL; download images first (no network fetches)")
        else:
            data = _read_local(ref, search_dirs)
    else:
        raise SkipRecord("malformed", f"unsupported image reference of type {type(ref).__name__}")
    return check_image(data) if validate else data


# ---------------------------------------------------------------- interleaved
def read_rows(path: str) -> Iterator[dict[str, Any]]:
    """Rows of a JSON lines, JSON list or parquet file, as dicts."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()
        return
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            head = f.read(1)
            f.seek(0)
            if head == "[":
                yield from json.load(f)
                return
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    yield {"__error__": f"bad JSON line: {error}"}


def document_items(row: dict[str, Any]) -> list[str | Any]:
    """OBELICS or MMC4 row -> items in order: str text, or an image reference (wrapped in a tuple)."""
    if "__error__" in row:
        raise SkipRecord("malformed", row["__error__"])
    items: list[Any] = []
    if "texts" in row and "images" in row:  # OBELICS
        texts, images = row["texts"] or [], row["images"] or []
        if len(texts) != len(images):
            raise SkipRecord("malformed", f"`texts` has {len(texts)} entries but `images` {len(images)}")
        for text, image in zip(texts, images):
            if image is not None:
                items.append((image,))
            elif text is not None:
                items.append(str(text))
    elif "text_list" in row and "image_info" in row:  # MMC4
        sentences = row["text_list"] or []
        before: dict[int, list[Any]] = {}
        for info in row["image_info"] or []:
            index = info.get("matched_text_index") if isinstance(info, dict) else None
            if not isinstance(index, int) or not 0 <= index < max(1, len(sentences)):
                raise SkipRecord("malformed", f"image_info entry with matched_text_index={index!r} "
                                              f"for {len(sentences)} sentences")
            before.setdefault(index, []).append(info)
        for index, sentence in enumerate(sentences or [""]):
            items.extend((info,) for info in before.get(index, []))
            items.append(str(sentence))
    else:
        raise SkipRecord("malformed", f"row has keys {sorted(row)[:8]}; expected OBELICS `texts`+`images` "
                                      "or MMC4 `text_list`+`image_info`")
    merged: list[Any] = []  # adjacent sentences become one text segment
    for item in items:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] = f"{merged[-1]} {item}" if merged[-1] and item else merged[-1] + item
        else:
            merged.append(item)
    return merged


def import_interleaved(inputs: str | Sequence[str], output_dir: str, num_shards: int, *,
                       name: str = formats.INTERLEAVED, image_dir: str | None = None, max_images: int = 32,
                       on_missing_image: str = "skip_document", validate_images: bool = True) -> ImportStats:
    """MMC4/OBELICS JSON lines or parquet -> interleaved shards."""
    if on_missing_image not in ("skip_document", "drop_image"):
        raise ValueError(f"on_missing_image={on_missing_image!r}; use 'skip_document' or 'drop_image'.")
    stats = ImportStats(name)
    with formats.InterleavedWriter(output_dir, name, num_shards) as writer:
        for path in expand_inputs(inputs):
            search = [image_dir or "", os.path.dirname(os.path.abspath(path))]
            for index, row in enumerate(read_rows(path)):
                try:
                    items: list[str | bytes] = []
                    for item in document_items(row):
                        if isinstance(item, str):
                            items.append(item)
                            continue
                        try:
                            items.append(load_image(item[0], search, validate_images))
                        except SkipRecord as error:
                            if error.reason != "missing_image" or on_missing_image == "skip_document":
                                raise
                    num_images = sum(isinstance(i, bytes) for i in items)
                    if num_images == 0:
                        raise SkipRecord("no_image", "the document has no image")
                    if num_images > max_images:
                        raise SkipRecord("too_many_images", f"{num_images} images > --max_images={max_images}")
                    if not any(isinstance(i, str) and i.strip() for i in items):
                        raise SkipRecord("empty_text", "the document has no text")
                except SkipRecord as error:
                    stats.skip(error, path, index)
                    continue
                writer.write(items, doc_id=str(row.get("url") or row.get("id") or f"{os.path.basename(path)}:{index}"))
                stats.written += 1
        stats.files = writer.paths
    return stats


# ---------------------------------------------------------------- webdataset pairs
def _split_key(member_name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first '.' of the basename."""
    directory, base = os.path.split(member_name)
    stem, _, extension = base.partition(".")
    return os.path.join(directory, stem), extension.lower()


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive members sharing a key."""
    current_key, current = None, {}
    with tarfile.open(path, "r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, extension = _split_key(member.name)
            if key != current_key and current:
                yield current_key, current
                current = {}
            current_key = key
            current[extension] = archive.extractfile(member).read()
    if current:
        yield current_key, current


def _caption_from(sample: dict[str, bytes], caption_field: str | None) -> str:
    if "txt" in sample:
        return sample["txt"].decode("utf-8", "replace")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except json.JSONDecodeError as error:
            raise SkipRecord("malformed", f"bad .json: {error}") from error
        for field in ([caption_field] if caption_field else ["caption", "text", "TEXT"]):
            if isinstance(meta, dict) and isinstance(meta.get(field), str):
                return meta[field]
    return ""


def import_webdataset(inputs: str | Sequence[str], output_dir: str, num_shards: int, *,
                      name: str = formats.IMAGE_TEXT, caption_field: str | None = None,
                      validate_images: bool = True) -> ImportStats:
    """LAION-style webdataset tar shards -> image_text shards."""
    stats = ImportStats(name)
    with formats.ImageTextWriter(output_dir, name, num_shards) as writer:
        for path in expand_inputs(inputs):
            for key, sample in _tar_samples(path):
                try:
                    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                    if image_ext is None:
                        raise SkipRecord("no_image", f"no image member among {sorted(sample)}")
                    caption = _caption_from(sample, caption_field)
                    if not caption.strip():
                        raise SkipRecord("empty_text", "no caption (.txt or .json field)")
                    image = check_image(sample[image_ext]) if validate_images else sample[image_ext]
                except SkipRecord as error:
                    stats.skip(error, path, key)
                    continue
                writer.write(image, caption, example_id=key)
                stats.written += 1
        stats.files = writer.paths
    return stats


# ---------------------------------------------------------------- video frame folders
def _no_video_files(path: str) -> None:
    if path.lower().endswith(VIDEO_EXTENSIONS):
        raise ValueError(
            f"{path!r} is a video file. Decoding video needs ffmpeg, which flamingo_jax does not depend on; "
            "extract frames first, e.g. `ffmpeg -i VIDEO.mp4 -vf fps=2 frames/VIDEO_ID/%03d.jpg`, then pass "
            "--frames_dir=frames and --frame_rate=2."
        )


def read_captions(path: str) -> list[dict[str, Any]]:
    """Captions file -> [{'video_id', 'caption', 'frame_rate' (optional)}]."""
    _no_video_files(path)
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            rows = [{"video_id": k, "caption": v} for k, v in data.items()]
        elif isinstance(data, list):
            rows = data
        else:
            raise ValueError(f"{path!r}: expected a JSON object {{video_id: caption}} or a list of records.")
    out = []
    for row in rows:
        video_id = row.get("video_id", row.get("id", row.get("video")))
        rate = row.get("frame_rate", row.get("fps"))
        out.append({"video_id": None if video_id is None else str(video_id),
                    "caption": row.get("caption", row.get("text")),
                    "frame_rate": float(rate) if rate not in (None, "") else None})
    return out


def _captions_in(directory: str) -> str:
    """The captions file of a video folder: captions.json/.csv, or its only .json/.csv file."""
    names = sorted(os.listdir(directory))
    videos = [n for n in names if n.lower().endswith(VIDEO_EXTENSIONS)]
    tables = [n for n in names if n.endswith((".json", ".csv"))]
    preferred = [n for n in ("captions.json", "captions.csv") if n in names]
    if preferred or len(tables) == 1:
        return os.path.join(directory, (preferred or tables)[0])
    if videos:
        _no_video_files(os.path.join(directory, videos[0]))
    raise ValueError(f"{directory!r} holds {len(tables)} .json/.csv files; pass the captions file as --input.")


def import_video_frames(input_path: str, output_dir: str, num_shards: int, *, name: str = formats.VIDEO_TEXT,
                        frames_dir: str | None = None, frame_rate: float | None = None,
                        validate_images: bool = True) -> ImportStats:
    """Captions + one folder of frames per video -> video_text shards (one record per caption).

    `input_path` is the captions file, or the folder holding it and the frame folders.
    """
    if os.path.isdir(input_path):
        frames_dir = frames_dir or input_path
        input_path = _captions_in(input_path)
    frames_dir = frames_dir or os.path.dirname(os.path.abspath(input_path))
    if frame_rate is not None and frame_rate <= 0:
        raise ValueError(f"--frame_rate={frame_rate} must be positive (frames per second of the stored frames).")
    stats = ImportStats(name)
    with formats.VideoTextWriter(output_dir, name, num_shards) as writer:
        for index, row in enumerate(read_captions(input_path)):
            video_id = row["video_id"]
            try:
                if not video_id:
                    raise SkipRecord("malformed", "row without video_id")
                _no_video_files(video_id)
                folder = os.path.join(frames_dir, video_id)
                if not os.path.isdir(folder):
                    for extension in VIDEO_EXTENSIONS:
                        if os.path.exists(folder + extension):
                            _no_video_files(folder + extension)  # raises: say how to extract frames
                    raise SkipRecord("missing_image", f"no frame folder {folder!r}")
                names = sorted(n for n in os.listdir(folder) if n.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
                if not names:
                    raise SkipRecord("no_image", f"frame folder {folder!r} holds no images")
                caption = row["caption"] if isinstance(row["caption"], str) else ""
                if not caption.strip():
                    raise SkipRecord("empty_text", "no caption")
                rate = row["frame_rate"] or frame_rate
                if rate is None:
                    raise ValueError(
                        f"frame rate of video {video_id!r} is unknown: pass --frame_rate=FPS (the rate the frames "
                        "were extracted at) or add a frame_rate column to the captions file.")
                frames = [load_image(os.path.join(folder, n), [], validate_images) for n in names]
            except SkipRecord as error:
                stats.skip(error, input_path, index)
                continue
            writer.write(frames, rate, caption, example_id=video_id)
            stats.written += 1
        stats.files = writer.paths
    return stats


def _main(argv: list[str]) -> int:
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_string("input", None, "Input file(s): glob or comma-separated list (video: the captions file).",
                        flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Where to write the TFRecord shards.", flag_values=fv)
    flags.DEFINE_integer("num_shards", 8, "Shards to write (>= number of data-loading hosts).", flag_values=fv)
    flags.DEFINE_string("name", None, "Dataset name, the shard file prefix (default: the kind).", flag_values=fv)
    flags.DEFINE_string("image_dir", None, "interleaved: folder that relative image paths are under.",
                        flag_values=fv)
    flags.DEFINE_integer("max_images", 32, "interleaved: documents with more images are skipped.", flag_values=fv)
    flags.DEFINE_enum("on_missing_image", "skip_document", ["skip_document", "drop_image"],
                      "interleaved: what a missing image file does.", flag_values=fv)
    flags.DEFINE_string("caption_field", None, "image_text: caption field of the .json members.", flag_values=fv)
    flags.DEFINE_string("frames_dir", None, "video_text: folder of per-video frame folders.", flag_values=fv)
    flags.DEFINE_float("frame_rate", None, "video_text: frames per second of the stored frames.", flag_values=fv)
    flags.DEFINE_bool("validate_images", True, "Decode every image once to reject corrupt ones.", flag_values=fv)
    rest = cli.parse(fv, argv, __doc__)
    kinds = formats.KINDS
    if len(rest) != 2 or rest[1] not in kinds or not fv.input or not fv.output_dir:
        print(f"usage: python -m flamingo_jax.data.prepare {{{'|'.join(kinds)}}} --input=... --output_dir=... "
              "[--num_shards=8]", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    kind, name = rest[1], fv.name or rest[1]
    if kind == formats.INTERLEAVED:
        stats = import_interleaved(fv.input, fv.output_dir, fv.num_shards, name=name, image_dir=fv.image_dir,
                                   max_images=fv.max_images, on_missing_image=fv.on_missing_image,
                                   validate_images=fv.validate_images)
    elif kind == formats.IMAGE_TEXT:
        stats = import_webdataset(fv.input, fv.output_dir, fv.num_shards, name=name,
                                  caption_field=fv.caption_field, validate_images=fv.validate_images)
    else:
        stats = import_video_frames(fv.input, fv.output_dir, fv.num_shards, name=name, frames_dir=fv.frames_dir,
                                    frame_rate=fv.frame_rate, validate_images=fv.validate_images)
    print(json.dumps(stats.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard(lambda: _main(sys.argv)))
