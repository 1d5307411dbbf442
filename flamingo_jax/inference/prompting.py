"""Interleaved prompts -> the padded arrays that `decoding.prefill` takes.

A prompt is a list of items (see `flamingo_jax.inference.items`): text,
`Media` (an image or a video, as a path, frame folder or array) and
`END_OF_CHUNK`. Each media item becomes the `<image>` marker in the text and a
slot in the media tensor; text tokens cross-attend to the last media item
before them, exactly as in training (`data.sequence.media_association`).

Shapes are bucketed so that a stream of prompts compiles a handful of programs,
not one per prompt: media counts round up to a power of two, prompt lengths to
a power of two up to `LENGTH_STEP` tokens and to a multiple of it above (and to
at least `min_length`); prompts are left-padded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flamingo_jax.data import frames as frame_files
from flamingo_jax.data import images as image_ops
from flamingo_jax.data import sequence
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.errors import UserError
from flamingo_jax.inference.items import END_OF_CHUNK, Media

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class PromptError(UserError, ValueError):
    """A prompt the model cannot take; the message names the item and the fix."""


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    ids: np.ndarray  # int32 [n]
    media_index: np.ndarray  # int32 [n]: media item each token sees, -1 for none
    media: list[Media]


def encode_prompt(items: Sequence[object], tokenizer: Tokenizer, *,
                  media_association: str = "flamingo") -> EncodedPrompt:
    """Items -> token ids with their media association (`model.xattn.media_association`:
    'flamingo' from the marker positions, 'openflamingo' from the `<image>` ids as
    OpenFlamingo computes it). BOS first if the vocabulary has one."""
    if media_association == "openflamingo" and len(tokenizer.image_marker_ids) != 1:
        raise PromptError(f"an OpenFlamingo-style model needs `<image>` as one token id, but this tokenizer "
                          f"encodes it as {len(tokenizer.image_marker_ids)} ids {tokenizer.image_marker_ids}; "
                          "load the tokenizer the model was converted with.")
    if media_association not in ("flamingo", "openflamingo"):
        raise PromptError(f"media_association {media_association!r} is unknown; use 'flamingo' or 'openflamingo'.")
    ids: list[int] = []
    roles: list[int] = []
    ordinals: list[int] = []
    media: list[Media] = []

    def add(new_ids: Sequence[int], role: int, ordinal: int = -1) -> None:
        ids.extend(new_ids)
        roles.extend([role] * len(new_ids))
        ordinals.extend([ordinal] * len(new_ids))

    if tokenizer.bos_id is not None:
        add([tokenizer.bos_id], sequence.BOS)
    for position, item in enumerate(items):
        if isinstance(item, str):
            add(tokenizer.encode(item), sequence.TEXT)
        elif isinstance(item, Media):
            add(tokenizer.image_marker_ids, sequence.MARKER, len(media))
            media.append(item)
        elif item is END_OF_CHUNK:
            add([tokenizer.eoc_id], sequence.EOC)
        else:
            raise PromptError(f"prompt item {position} is a {type(item).__name__}; use text (str), "
                              "Media(path=... | array=... | frames=...) or END_OF_CHUNK.")
    if not ids:
        raise PromptError("the prompt is empty; give it at least some text or an image.")
    document = sequence.Document(np.asarray(ids, np.int32), np.asarray(roles, np.int8),
                                 np.asarray(ordinals, np.int32))
    if media_association == "openflamingo":
        media_index = sequence.openflamingo_media_index(document.ids, tokenizer.image_marker_ids[0])
    else:
        media_index = sequence.media_association(document, next_image=False)
    return EncodedPrompt(document.ids, media_index, media)


def continuation_ids(items: Sequence[object], text: str, tokenizer: Tokenizer) -> list[int]:
    """The ids `text` adds to the prompt `items` as the training data would tokenize it: as the
    rest of the prompt's last text item, not as a text of its own. Encoded alone, " yes" gets the
    tokenizer's own leading piece too (SentencePiece's dummy prefix: ['▁', '▁ye', 's'], where
    "Answer: yes" ends ['▁ye', 's']), a token the model never sees before an answer. Falls back
    to `text` alone when the prompt ends with media (text after an image starts its own item) or
    when the join changes the prompt's own last tokens."""
    last = items[-1] if items and isinstance(items[-1], str) else None
    if last is None:
        return tokenizer.encode(text)
    head, joined = tokenizer.encode(last), tokenizer.encode(last + text)
    if joined[:len(head)] != head:
        return tokenizer.encode(text)
    return joined[len(head):]


MEDIA_TAG = re.compile(r"<(image|video):([^<>]+)>|<EOC>")
TAG_START = re.compile(r"<(image|video)\b", re.IGNORECASE)


def parse_prompt(text: str, base_dir: Path | None = None) -> list[object]:
    """The CLI's prompt syntax: `<image:cat.jpg> Output:`; `<video:frames_dir>` for a
    folder of frames; `<EOC>` for an end of chunk. Paths resolve against `base_dir`.
    A media tag that is not whole (`<image:>`, `<image>`, an unclosed `<image:x.jpg`) is an
    error naming it: read as text, it would let the model answer without the image."""
    tags = list(MEDIA_TAG.finditer(text))
    starts = {match.start() for match in tags if match.group(0) != "<EOC>"}
    for start in TAG_START.finditer(text):
        if start.start() not in starts:
            end = text.find(">", start.start())
            broken = text[start.start(): end + 1 if end >= 0 else len(text)]
            raise PromptError(f"malformed media tag {broken!r} at character {start.start()}: write "
                              f"<{start.group(1).lower()}:path> with a non-empty path and a closing '>'.")
    items: list[object] = []
    cursor = 0
    for match in tags:
        if match.start() > cursor:
            items.append(text[cursor:match.start()])
        cursor = match.end()
        if match.group(0) == "<EOC>":
            items.append(END_OF_CHUNK)
            continue
        path = Path(match.group(2).strip()).expanduser()
        if not match.group(2).strip():
            raise PromptError(f"media tag {match.group(0)!r} names no file: write <{match.group(1)}:path>.")
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        items.append(Media(frames=sorted_frames(path)) if match.group(1) == "video" else Media(path=path))
    if cursor < len(text):
        items.append(text[cursor:])
    # "<image:a.jpg> Output:" -> the text after an image starts without the space.
    return [item.lstrip(" ") if isinstance(item, str) and i and isinstance(items[i - 1], Media) else item
            for i, item in enumerate(items) if not (isinstance(item, str) and not item.strip(" "))]


def sorted_frames(folder: Path) -> list[Path]:
    """The folder's images in time (natural name) order: f2 before f10."""
    if not folder.is_dir():
        raise PromptError(f"video frame folder {folder} does not exist.")
    frames = frame_files.list_frames(folder, IMAGE_SUFFIXES)
    if not frames:
        raise PromptError(f"video frame folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return frames


class MediaLoader:
    """Media -> model pixels [T, S, S, 3], prepared as the training pipelines prepare them.

    A video becomes `num_frames` frames, picked by `data.frames.sample_indices`: at `fps`
    frames per second when both it and the video's stored rate (`Media.fps`) are known,
    else evenly over the whole clip. The model takes any count: its temporal embeddings
    stretch over more frames than it was trained with (`models.resampler.interpolate_frames`).
    """

    def __init__(self, config: image_ops.ImageConfig, num_frames: int, fps: float | None = None):
        if num_frames < 1:
            raise PromptError(f"videos need at least 1 frame per clip (got num_frames={num_frames}).")
        if fps is not None and not fps > 0:
            raise PromptError(f"the video sampling rate must be > 0 frames per second (got fps={fps}); leave it "
                              "unset to spread the frames evenly over each clip.")
        self.config = config
        self.num_frames = num_frames
        self.fps = fps

    def __call__(self, media: Media) -> np.ndarray:
        if media.frames is not None:
            return np.stack([self._prepare(self.read(path)) for path in self._sample(list(media.frames), media)])
        if media.path is not None:
            return self._prepare(self.read(media.path))[None]
        array = np.asarray(media.array)
        if array.ndim == 4:  # video frames
            return np.stack([self._prepare(frame) for frame in self._sample(list(array), media)])
        return self._prepare(array)[None]

    def _sample(self, frames: list, media: Media) -> list:
        indices = frame_files.sample_indices(len(frames), self.num_frames, stored_fps=media.fps, fps=self.fps)
        return [frames[i] for i in indices]

    def read(self, path: Path) -> np.ndarray:
        """uint8 pixels [H, W, 3] of an image file, decoded as the training pipelines decode it."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError as error:
            raise PromptError(f"image {path} does not exist.") from error
        except OSError as error:
            raise PromptError(f"image {path} cannot be read ({error}).") from error
        try:
            return image_ops.decode_pixels(data, self.config.background, self.config.max_pixels)
        except image_ops.ImageDecodeError as error:
            raise PromptError(f"image {path} cannot be decoded ({error.reason}: {error}); is it a corrupt or non-image "
                              "file?") from error

    def _prepare(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
            raise PromptError(f"an image array must be uint8 [H, W, 3]; got {pixels.dtype} {pixels.shape}.")
        return image_ops.inference_preprocessor(self.config)(pixels).numpy()


class BlindLoader:
    """Every Media -> one fixed image, as many frames as the media would have (one for an
    image, the model's frame count for a video): what a blind evaluation shows the model."""

    def __init__(self, loader: MediaLoader, image: np.ndarray):
        size = loader.config.size
        if image.shape != (size, size, 3):
            raise ValueError(f"a blind image must be prepared pixels [{size}, {size}, 3], got {image.shape}.")
        self.config = loader.config
        self.num_frames = loader.num_frames
        self.image = np.asarray(image, np.float32)

    def __call__(self, media: Media) -> np.ndarray:
        frames = self.num_frames if media.is_video else 1
        return np.broadcast_to(self.image, (frames, *self.image.shape))


def mean_image(load: MediaLoader, media: Sequence[Media]) -> np.ndarray:
    """The pixel-wise mean [S, S, 3] of every image and video frame of `media`, each prepared
    as the model sees it (`load`: resized, normalised)."""
    if not media:
        raise PromptError("the mean image needs at least one media item.")
    total, count = None, 0
    for item in media:
        frames = load(item)  # [T, S, S, 3]
        summed = frames.sum(axis=0, dtype=np.float64)
        total = summed if total is None else total + summed
        count += frames.shape[0]
    return (total / count).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts: every array's leading axis is the batch."""

    tokens: np.ndarray  # int32 [B, P]
    media: np.ndarray  # float32 [B, M, T, S, S, 3] pixels (or [B, M, R, D] visual tokens: `assemble_batch`)
    media_index: np.ndarray  # int32 [B, P]
    positions: np.ndarray  # int32 [B, P]
    valid: np.ndarray  # bool [B, P]

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.tokens, self.media, self.media_index, self.positions, self.valid


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def next_power_of_two(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


LENGTH_STEP = 64
"""Prompt lengths round up to a power of two up to this, then to a multiple of it: a 298-token
prompt pads to 320, not 512 (attention's work grows with the square of the length)."""


def bucket_length(longest: int, min_length: int) -> int:
    """The padded length of a batch whose longest prompt has `longest` tokens."""
    length = next_power_of_two(longest) if longest <= LENGTH_STEP else round_up(longest, LENGTH_STEP)
    return max(min_length, length)


def batch_rows(prompts: Sequence[EncodedPrompt], batch_size: int | None) -> list[EncodedPrompt]:
    """The batch's rows: `prompts`, the last repeated up to `batch_size` (static shapes for a final
    partial batch; callers drop the extra rows)."""
    if not prompts:
        raise PromptError("no prompts to batch.")
    return list(prompts) + [prompts[-1]] * max(0, (batch_size or 0) - len(prompts))


def make_batch(prompts: Sequence[EncodedPrompt], load: MediaLoader | BlindLoader, *, pad_id: int, min_length: int = 32,
               max_length: int | None = None, batch_size: int | None = None) -> PromptBatch:
    """Pads prompts into one batch, media as pixels. `batch_size` > len(prompts) repeats the last
    prompt (`batch_rows`)."""
    rows = batch_rows(prompts, batch_size)
    pixels = [[load(m) for m in p.media] for p in rows]
    frame_counts = {x.shape[0] for row in pixels for x in row}
    if len(frame_counts) > 1:
        raise PromptError(f"media in one batch must have the same number of frames; got {sorted(frame_counts)} "
                          "(batch images and videos separately).")
    size = load.config.size
    return assemble_batch(rows, pixels, (frame_counts.pop() if frame_counts else 1, size, size, 3), np.float32,
                          pad_id=pad_id, min_length=min_length, max_length=max_length)


def assemble_batch(rows: Sequence[EncodedPrompt], media: Sequence[Sequence[np.ndarray]], item_shape: tuple[int, ...],
                   item_dtype: np.dtype, *, pad_id: int, min_length: int = 32,
                   max_length: int | None = None) -> PromptBatch:
    """Rows left-padded to a `bucket_length`, each row's media arrays (all of `item_shape` and
    `item_dtype`: pixels [T, S, S, 3], or visual tokens [R, D]) in slots counted up to a power of
    two; the dtype is given, not read from the items, so a batch without media compiles the same
    program as one with them."""
    longest = max(len(p.ids) for p in rows)
    if max_length is not None and longest > max_length:
        raise PromptError(f"a prompt of {longest} tokens exceeds the model's {max_length}-token context; use "
                          "fewer shots or shorter texts.")
    length = bucket_length(longest, min_length)
    if max_length is not None:
        length = min(length, max_length)
    num_media = next_power_of_two(max(1, max(len(p.media) for p in rows)))
    batch = len(rows)
    media_array = np.zeros((batch, num_media, *item_shape), item_dtype)
    tokens = np.full((batch, length), pad_id, np.int32)
    media_index = np.full((batch, length), -1, np.int32)
    positions = np.zeros((batch, length), np.int32)
    valid = np.zeros((batch, length), bool)
    for row, (prompt, row_media) in enumerate(zip(rows, media)):
        n = len(prompt.ids)
        tokens[row, length - n:] = prompt.ids
        media_index[row, length - n:] = prompt.media_index
        positions[row, length - n:] = np.arange(n)
        valid[row, length - n:] = True
        for slot, x in enumerate(row_media):
            media_array[row, slot] = x
    return PromptBatch(tokens, media_array, media_index, positions, valid)
