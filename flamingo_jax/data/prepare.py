"""Importers: public dataset layouts -> this project's TFRecord formats (`formats.py`).

  python -m flamingo_jax.data.prepare interleaved --input='docs/*.jsonl' --output_dir=out --num_shards=8
  python -m flamingo_jax.data.prepare image_text  --input='shards/{00000..00009}.tar' ...   (globs, comma lists)
  python -m flamingo_jax.data.prepare video_text  --input=captions.csv --frames_dir=frames ...

interleaved: JSON lines (.jsonl/.json), a .json holding one document or a list of them
  (pretty-printed JSON is recognised in either), or parquet rows of
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

Nothing a single record or file gets wrong stops an import: it is skipped, counted by
reason and logged with its file and line (row, item or tar sample):
  malformed        not a JSON object, wrong field types or missing fields/columns
  bad_encoding     a line, caption or row that is not UTF-8
  bad_number       a frame rate that is not a positive number
  missing_image    an image file that does not exist, a URL (not fetched)
  corrupt_image    an image that does not decode; image_too_large: over the pixel limit
  empty_text, no_image, too_many_images   as the readers define them
  unreadable_file  a file that is not what its extension says (not parquet, not a tar) or
                   cannot be read to its end: skipped (from the point of damage on), the
                   other files are still imported
The counts are logged and printed as JSON at the end. Output appears only when the import
is complete (`formats.ShardedWriter` stages the shards): a failed or interrupted import,
or one where nothing was importable (an error, not an empty dataset), leaves --output_dir
as it was. An --output_dir holding the dataset under another shard count is refused unless
--overwrite.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import io
import json
import math
import os
import sys
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging

from flamingo_jax import cli
from flamingo_jax.data import formats, images
from flamingo_jax.data import frames as frame_files

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
_STORED_FORMATS = {"JPEG", "PNG", "GIF", "BMP", "WEBP"}  # kept as they are; other formats become PNG


class SkipRecord(Exception):
    """A record that cannot be imported; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class SkipFile(SkipRecord):
    """A whole input file (or the rest of it) that cannot be read: counted once as `unreadable_file`."""

    def __init__(self, detail: str):
        super().__init__("unreadable_file", detail)


@dataclasses.dataclass
class ImportStats:
    name: str
    written: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    files: list[str] = dataclasses.field(default_factory=list)

    def skip(self, error: SkipRecord, source: str, where: str) -> None:
        self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
        logging.warning("import %s: skipping %s of %s: %s (%s)", self.name, where, source, error.reason, error)

    def skip_file(self, error: SkipFile, source: str) -> None:
        self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
        logging.warning("import %s: skipping file %s: %s (%s)", self.name, source, error.reason, error)

    def finish(self, inputs: Any, writer: formats.ShardedWriter) -> None:
        """Summarises the import; raises (the writer then discards everything) if nothing was importable."""
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())) or "none"
        if not self.written:
            raise ValueError(
                f"import {self.name}: no record of {inputs!r} could be imported (skipped: {skipped}); nothing was "
                "written.\nThe log lines above name each skipped file and line; fix them or point --input elsewhere.")
        self.files = writer.paths
        logging.info("import %s: wrote %d records into %d shards in %s; skipped: %s", self.name, self.written,
                     len(writer.paths), writer.output_dir, skipped)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def _unexpected(error: Exception) -> SkipRecord:
    """A record whose content broke an assumption (a list where a dict belongs...): skipped, not fatal."""
    return SkipRecord("malformed", f"unexpected content ({type(error).__name__}: {_one_line(error)})")


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Comma-separated globs (or a list of them) -> sorted existing files; raises if none."""
    files = formats.list_files(inputs)
    if not files:
        raise FileNotFoundError(f"--input={inputs!r} matches no files; give a path, glob or comma-separated list.")
    return files


# ---------------------------------------------------------------- images
def check_image(data: bytes) -> bytes:
    """Decodes fully, by the readers' policy (`images.decode_pixels`: truncation, bombs...);
    re-encodes formats other than JPEG/PNG/GIF/BMP/WebP as PNG of the decoded pixels."""
    from PIL import Image

    try:
        pixels = images.decode_pixels(data, images.ImageConfig().background)
    except images.ImageDecodeError as error:
        raise SkipRecord(error.reason, f"image {error}") from error
    with Image.open(io.BytesIO(data)) as image:
        if image.format in _STORED_FORMATS:
            return data
    return images.encode_image(pixels, "PNG")


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
def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(where, row) per row of a JSON lines, JSON or parquet file: `where` names the line,
    item or row; `row` is the parsed value, or a SkipRecord for a row that cannot be read.
    Raises SkipFile for a file that is not what its extension says (or breaks off)."""
    if path.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    if path.endswith(".json") or first.strip() in (b"{", b"["):  # one JSON document, maybe pretty-printed
        document = _json_document(path)
        if document is not None:
            yield from document
            return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield f"line {number}", SkipRecord("bad_encoding", f"not UTF-8 ({error.reason} at byte {error.start})")
            except json.JSONDecodeError as error:
                yield f"line {number}", SkipRecord("malformed", f"bad JSON line: {error}")


def _json_document(path: str) -> list[tuple[str, Any]] | None:
    """The rows of a file holding one JSON value (a list of rows or a single row), or None if
    it does not parse as one (then it is read as JSON lines)."""
    with open(path, "rb") as f:
        try:
            document = json.loads(f.read())
        except ValueError:  # JSONDecodeError, UnicodeDecodeError: not one document
            return None
    if isinstance(document, list):
        return [(f"item {i}", row) for i, row in enumerate(document)]
    if isinstance(document, dict):
        return [("document", document)]
    raise SkipFile(f"holds a single JSON {type(document).__name__}; expected one document object, a list of them, "
                   "or JSON lines (one object per line)")


def _parquet_rows(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # noqa: BLE001 - ArrowInvalid, OSError...: not a parquet file
        raise SkipFile(f"not a readable parquet file ({_one_line(error)})") from error
    number = 0
    try:
        for batch in table.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield f"row {number}", row
                number += 1
    except Exception as error:  # noqa: BLE001 - a damaged page or column chunk
        raise SkipFile(f"parquet read failed after row {number} ({_one_line(error)})") from error


def _texts(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SkipRecord("malformed", f"`{field}` is a {type(value).__name__}, expected a list")
    return value


def document_items(row: dict[str, Any]) -> list[str | Any]:
    """OBELICS or MMC4 row -> items in order: str text, or an image reference (wrapped in a tuple)."""
    if isinstance(row, SkipRecord):
        raise row
    if not isinstance(row, dict):
        raise SkipRecord("malformed", f"a JSON {type(row).__name__} ({json.dumps(row)[:40]}), expected an object "
                                      "with OBELICS `texts`+`images` or MMC4 `text_list`+`image_info`")
    items: list[Any] = []
    if "texts" in row and "images" in row:  # OBELICS
        texts, image_refs = _texts(row["texts"], "texts"), _texts(row["images"], "images")
        if len(texts) != len(image_refs):
            raise SkipRecord("malformed", f"`texts` has {len(texts)} entries but `images` {len(image_refs)}")
        for text, image in zip(texts, image_refs):
            if image is not None:
                items.append((image,))
            elif text is not None:
                if not isinstance(text, str):
                    raise SkipRecord("malformed", f"a `texts` entry is a {type(text).__name__}, expected a string")
                items.append(text)
    elif "text_list" in row and "image_info" in row:  # MMC4
        sentences = _texts(row["text_list"], "text_list")
        if not all(isinstance(sentence, str) for sentence in sentences):
            raise SkipRecord("malformed", "`text_list` holds a non-string entry")
        before: dict[int, list[Any]] = {}
        for info in _texts(row["image_info"], "image_info"):
            index = info.get("matched_text_index") if isinstance(info, dict) else None
            if not isinstance(index, int) or not 0 <= index < max(1, len(sentences)):
                raise SkipRecord("malformed", f"image_info entry with matched_text_index={index!r} "
                                              f"for {len(sentences)} sentences")
            before.setdefault(index, []).append(info)
        for index, sentence in enumerate(sentences or [""]):
            items.extend((info,) for info in before.get(index, []))
            items.append(sentence)
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
                       on_missing_image: str = "skip_document", validate_images: bool = True,
                       overwrite: bool = False) -> ImportStats:
    """MMC4/OBELICS JSON lines or parquet -> interleaved shards."""
    if on_missing_image not in ("skip_document", "drop_image"):
        raise ValueError(f"on_missing_image={on_missing_image!r}; use 'skip_document' or 'drop_image'.")
    files = expand_inputs(inputs)
    stats = ImportStats(name)
    with formats.InterleavedWriter(output_dir, name, num_shards, overwrite=overwrite) as writer:
        for path in files:
            search = [image_dir or "", os.path.dirname(os.path.abspath(path))]
            try:
                for where, row in read_rows(path):
                    try:
                        items = _document(row, search, max_images, on_missing_image, validate_images)
                    except SkipRecord as error:
                        stats.skip(error, path, where)
                        continue
                    except Exception as error:  # noqa: BLE001 - one odd record never stops the import
                        stats.skip(_unexpected(error), path, where)
                        continue
                    doc_id = row.get("url") or row.get("id") or f"{os.path.basename(path)}:{where}"
                    writer.write(items, doc_id=str(doc_id))
                    stats.written += 1
            except SkipFile as error:
                stats.skip_file(error, path)
            except OSError as error:
                stats.skip_file(SkipFile(f"cannot be read ({_one_line(error)})"), path)
        stats.finish(inputs, writer)
    return stats


def _document(row: Any, search: Sequence[str], max_images: int, on_missing_image: str,
              validate_images: bool) -> list[str | bytes]:
    """One row -> the document's items (str text, bytes image), validated; raises SkipRecord."""
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
    return items


# ---------------------------------------------------------------- webdataset pairs
def _split_key(member_name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first '.' of the basename."""
    directory, base = os.path.split(member_name)
    stem, _, extension = base.partition(".")
    return os.path.join(directory, stem), extension.lower()


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive members sharing a key. Raises SkipFile for a
    file that is not a tar archive or breaks off (after yielding the samples before the damage)."""
    current_key, current = None, {}
    try:
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
    except (tarfile.TarError, EOFError, OSError) as error:
        where = f"after sample {current_key}" if current_key else "from its start"
        raise SkipFile(f"not a tar archive, or damaged {where} ({_one_line(error)})") from error
    if current:
        yield current_key, current


def _caption_from(sample: dict[str, bytes], caption_field: str | None) -> str:
    try:
        if "txt" in sample:
            return sample["txt"].decode("utf-8")
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except json.JSONDecodeError as error:
                raise SkipRecord("malformed", f"bad .json: {error}") from error
            for field in ([caption_field] if caption_field else ["caption", "text", "TEXT"]):
                if isinstance(meta, dict) and isinstance(meta.get(field), str):
                    return meta[field]
    except UnicodeDecodeError as error:
        raise SkipRecord("bad_encoding", f"caption is not UTF-8 ({error.reason} at byte {error.start})") from error
    return ""


def import_webdataset(inputs: str | Sequence[str], output_dir: str, num_shards: int, *,
                      name: str = formats.IMAGE_TEXT, caption_field: str | None = None,
                      validate_images: bool = True, overwrite: bool = False) -> ImportStats:
    """LAION-style webdataset tar shards -> image_text shards."""
    files = expand_inputs(inputs)
    stats = ImportStats(name)
    with formats.ImageTextWriter(output_dir, name, num_shards, overwrite=overwrite) as writer:
        for path in files:
            try:
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
                        stats.skip(error, path, f"sample {key}")
                        continue
                    writer.write(image, caption, example_id=key)
                    stats.written += 1
            except SkipFile as error:
                stats.skip_file(error, path)
        stats.finish(inputs, writer)
    return stats


# ---------------------------------------------------------------- video frame folders
def _no_video_files(path: str) -> None:
    if path.lower().endswith(VIDEO_EXTENSIONS):
        raise ValueError(
            f"{path!r} is a video file. Decoding video needs ffmpeg, which flamingo_jax does not depend on; "
            "extract frames first, e.g. `ffmpeg -i VIDEO.mp4 -vf fps=2 frames/VIDEO_ID/%03d.jpg`, then pass "
            "--frames_dir=frames and --frame_rate=2."
        )


def read_captions(path: str) -> list[tuple[str, dict[str, Any] | SkipRecord]]:
    """Captions file -> (where, {'video_id', 'caption', 'frame_rate' (as written, or None)}) per row,
    or (where, SkipRecord) for a row that cannot be read. Raises ValueError for a file that is
    not a captions table at all (there is only one: the import cannot go on without it)."""
    _no_video_files(path)
    expected = ("expected JSON {video_id: caption}, a JSON list of {video_id, caption[, frame_rate]} records, "
                "or a CSV with columns video_id, caption[, frame_rate]")
    if path.endswith(".csv"):
        return _csv_captions(path, expected)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"captions file {path}: not JSON ({_one_line(error)});\n{expected}.") from error
    if isinstance(data, dict):
        return [(f"key {key!r}", _caption_row({"video_id": key, "caption": value})) for key, value in data.items()]
    if isinstance(data, list):
        return [(f"item {i}", _caption_row(row)) for i, row in enumerate(data)]
    raise ValueError(f"captions file {path}: holds a JSON {type(data).__name__};\n{expected}.")


def _csv_captions(path: str, expected: str) -> list[tuple[str, dict[str, Any] | SkipRecord]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:  # bad bytes: per row
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if not {"video_id", "id", "video"} & set(columns) or not {"caption", "text"} & set(columns):
            raise ValueError(f"captions file {path}: columns {columns};\n{expected}.")
        rows: list[tuple[str, dict[str, Any] | SkipRecord]] = []
        for row in reader:
            where = f"line {reader.line_num}"
            values = [v for v in row.values() if isinstance(v, str)]
            try:
                "".join(values).encode("utf-8")
            except UnicodeEncodeError:
                rows.append((where, SkipRecord("bad_encoding", "the row is not UTF-8")))
                continue
            if None in row.values():
                rows.append((where, SkipRecord("malformed", f"{len(values)} fields, the header has {len(columns)}")))
                continue
            rows.append((where, _caption_row(row)))
    return rows


def _caption_row(row: Any) -> dict[str, Any] | SkipRecord:
    if not isinstance(row, dict):
        return SkipRecord("malformed", f"a JSON {type(row).__name__}, expected an object with video_id and caption")
    video_id = row.get("video_id", row.get("id", row.get("video")))
    return {"video_id": None if video_id is None else str(video_id), "caption": row.get("caption", row.get("text")),
            "frame_rate": row.get("frame_rate", row.get("fps"))}


def _frame_rate(value: Any, default: float | None, video_id: str) -> float:
    """The row's frame rate (validated), else --frame_rate; raises SkipRecord for a bad number."""
    if value is None or value == "":
        if default is None:
            raise ValueError(
                f"frame rate of video {video_id!r} is unknown: pass --frame_rate=FPS (the rate the frames "
                "were extracted at) or add a frame_rate column to the captions file.")
        return default
    try:
        if isinstance(value, bool):
            raise ValueError("a boolean")
        rate = float(value)
    except (TypeError, ValueError) as error:
        raise SkipRecord("bad_number", f"frame_rate={value!r} is not a number") from error
    if not math.isfinite(rate) or rate <= 0:
        raise SkipRecord("bad_number", f"frame_rate={value!r} must be a positive number of frames per second")
    return rate


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
                        validate_images: bool = True, overwrite: bool = False) -> ImportStats:
    """Captions + one folder of frames per video -> video_text shards (one record per caption).

    `input_path` is the captions file, or the folder holding it and the frame folders.
    """
    if os.path.isdir(input_path):
        frames_dir = frames_dir or input_path
        input_path = _captions_in(input_path)
    frames_dir = frames_dir or os.path.dirname(os.path.abspath(input_path))
    if frame_rate is not None and not (math.isfinite(frame_rate) and frame_rate > 0):
        raise ValueError(f"--frame_rate={frame_rate} must be positive (frames per second of the stored frames).")
    rows = read_captions(input_path)
    stats = ImportStats(name)
    with formats.VideoTextWriter(output_dir, name, num_shards, overwrite=overwrite) as writer:
        for where, row in rows:
            try:
                video_id, caption, rate, frames = _video(row, frames_dir, frame_rate, validate_images)
            except SkipRecord as error:
                stats.skip(error, input_path, where)
                continue
            writer.write(frames, rate, caption, example_id=video_id)
            stats.written += 1
        stats.finish(input_path, writer)
    return stats


def _video(row: dict[str, Any] | SkipRecord, frames_dir: str, default_rate: float | None,
           validate_images: bool) -> tuple[str, str, float, list[bytes]]:
    """One captions row -> (video_id, caption, frame rate, encoded frames); raises SkipRecord."""
    if isinstance(row, SkipRecord):
        raise row
    video_id = row["video_id"]
    if not video_id:
        raise SkipRecord("malformed", "row without video_id")
    _no_video_files(video_id)
    folder = os.path.join(frames_dir, video_id)
    if not os.path.isdir(folder):
        for extension in VIDEO_EXTENSIONS:
            if os.path.exists(folder + extension):
                _no_video_files(folder + extension)  # raises: say how to extract frames
        raise SkipRecord("missing_image", f"no frame folder {folder!r}")
    names = [p.name for p in frame_files.list_frames(folder, IMAGE_EXTENSIONS)]  # time order: f2 before f10
    if not names:
        raise SkipRecord("no_image", f"frame folder {folder!r} holds no images")
    caption = row["caption"] if isinstance(row["caption"], str) else ""
    if not caption.strip():
        raise SkipRecord("empty_text", "no caption")
    rate = _frame_rate(row["frame_rate"], default_rate, video_id)
    frames = [load_image(os.path.join(folder, n), [], validate_images) for n in names]
    return video_id, caption, rate, frames


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
    flags.DEFINE_bool("overwrite", False, "Replace the dataset's shards in --output_dir even if their shard count "
                      "differs (shards of the same count are always replaced).", flag_values=fv)
    rest = cli.parse(fv, argv, __doc__)
    kinds = formats.KINDS
    if len(rest) != 2 or rest[1] not in kinds or not fv.input or not fv.output_dir:
        print(f"usage: python -m flamingo_jax.data.prepare {{{'|'.join(kinds)}}} --input=... --output_dir=... "
              "[--num_shards=8]", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    kind, name = rest[1], fv.name or rest[1]
    common = dict(name=name, validate_images=fv.validate_images, overwrite=fv.overwrite)
    try:
        if kind == formats.INTERLEAVED:
            stats = import_interleaved(fv.input, fv.output_dir, fv.num_shards, image_dir=fv.image_dir,
                                       max_images=fv.max_images, on_missing_image=fv.on_missing_image, **common)
        elif kind == formats.IMAGE_TEXT:
            stats = import_webdataset(fv.input, fv.output_dir, fv.num_shards, caption_field=fv.caption_field,
                                      **common)
        else:
            stats = import_video_frames(fv.input, fv.output_dir, fv.num_shards, frames_dir=fv.frames_dir,
                                        frame_rate=fv.frame_rate, **common)
    except (ValueError, OSError) as error:  # what the user can fix: the message says how
        print(f"prepare {kind}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(stats.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard(lambda: _main(sys.argv)))
