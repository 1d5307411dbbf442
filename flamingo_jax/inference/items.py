"""Prompt items: what an interleaved prompt is made of.

A prompt is a flat list of items, each a `str` (text), a `Media` (one image,
or one video as frames) or `END_OF_CHUNK`. The prompt encoder
(`inference.prompting`) turns a Media into an ``<image>`` marker plus pixels
and END_OF_CHUNK into the <EOC> token, and inserts nothing else: whoever builds
the items (a user, the `generate` CLI, evaluation's templates) decides
everything the model reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


class _EndOfChunk:
    """Type of `END_OF_CHUNK`; one instance, which survives copy and pickle."""

    _instance: _EndOfChunk | None = None

    def __new__(cls) -> _EndOfChunk:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<EOC>"

    def __reduce__(self) -> str:
        return "END_OF_CHUNK"  # pickle by reference to the module global

    def __copy__(self) -> _EndOfChunk:
        return self

    def __deepcopy__(self, memo: dict) -> _EndOfChunk:
        return self


END_OF_CHUNK = _EndOfChunk()
"""Ends every support example: the engine writes Flamingo's <EOC> token here."""


@dataclass(eq=False)
class Media:
    """The visual input of one example: exactly one of

    * `path`: an image file;
    * `array`: pixels, uint8 [H, W, 3] for an image or [T, H, W, 3] for video;
    * `frames`: a video's frame files in temporal order (all of them: the
      engine samples the frames it feeds, `prompting.VideoSampling`).

    `fps`: the rate a video's frames were stored at, if known; with it the engine
    samples frames at its own rate, without it evenly over the clip.
    """

    path: Path | None = None
    array: np.ndarray | None = None
    frames: list[Path] | None = None
    fps: float | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("path", "array", "frames") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"Media needs exactly one of path, array, frames; got {given or 'none'}.")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"Media.fps must be > 0 (frames per second of the stored video), got {self.fps}.")
        if self.path is not None:
            self.path = Path(self.path)
        if self.array is not None:
            self._check_array(self.array)
        if self.frames is not None:
            if isinstance(self.frames, (str, Path)) or len(self.frames) == 0:
                raise ValueError(f"Media.frames must be a non-empty list of paths, got {self.frames!r}.")
            self.frames = [Path(p) for p in self.frames]

    @staticmethod
    def _check_array(array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
            raise ValueError(f"Media.array must be a uint8 numpy array, got {type(array).__name__} "
                             f"{getattr(array, 'dtype', '')}.")
        if array.ndim not in (3, 4) or array.shape[-1] != 3:
            raise ValueError(f"Media.array must be [H, W, 3] or [T, H, W, 3], got shape {array.shape}.")

    @property
    def is_video(self) -> bool:
        """A frame folder or a [T, H, W, 3] array; the engine encodes it as one video."""
        return self.frames is not None or (self.array is not None and self.array.ndim == 4)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Media):
            return NotImplemented
        if self.array is not None or other.array is not None:
            return (self.array is not None and other.array is not None
                    and np.array_equal(self.array, other.array))
        return self.path == other.path and self.frames == other.frames and self.fps == other.fps

    def __repr__(self) -> str:
        if self.array is not None:
            return f"Media(array={self.array.dtype}{list(self.array.shape)})"
        if self.frames is not None:
            return f"Media(frames=[{self.frames[0]}, ... {len(self.frames)} frames])"
        return f"Media(path={self.path})"


Item = str | Media | _EndOfChunk


def text_only(items: Sequence[Item]) -> list[Item]:
    """`items` without their Media: a zero-shot example as the paper builds it."""
    return [item for item in items if not isinstance(item, Media)]


def merge_text(items: Sequence[Item]) -> list[Item]:
    """Adjacent text items joined into one, so the engine tokenises each run of
    text once (as it would read in a document)."""
    merged: list[Item] = []
    for item in items:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] = merged[-1] + item
        else:
            merged.append(item)
    return merged


def render_prompt(items: Sequence[Item], image_marker: str = "<image>") -> str:
    """The prompt as one string (for logs and tests): Media as `image_marker`,
    END_OF_CHUNK as "<EOC>"."""
    parts = []
    for item in items:
        if isinstance(item, Media):
            parts.append(image_marker)
        elif item is END_OF_CHUNK:
            parts.append("<EOC>")
        elif isinstance(item, str):
            parts.append(item)
        else:
            raise TypeError(f"Not a prompt item: {item!r}")
    return "".join(parts)
