"""Video frames on disk, in time order: the one listing that prompts, eval readers and importers share.

Frame names are not always zero-padded (`f1.png ... f10.png`): plain text order would feed
`f10` before `f2`, so names compare their digit runs as numbers. `sample_indices` is the rule
that picks the frames of a clip the model sees at inference.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key that puts `frame_2` before `frame_10` (digit runs compare as numbers)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(name)]


def list_frames(folder: str | os.PathLike, suffixes: Iterable[str]) -> list[Path]:
    """Files directly in `folder` whose lower-cased suffix (".png", with the dot) is in `suffixes`,
    in natural name order; empty if none."""
    allowed = {s.lower() if s.startswith(".") else "." + s.lower() for s in suffixes}
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in allowed]
    return sorted(files, key=lambda p: natural_key(p.name))


def sample_indices(num_stored: int, count: int, *, stored_fps: float | None = None,
                   fps: float | None = None) -> list[int]:
    """Which of a clip's `num_stored` frames to feed when `count` are wanted.

    Both rates known: one frame every `stored_fps / fps` stored frames, a window of `count`
    frames centred in the clip (the paper's 30 frames at 3 FPS); a clip shorter than the window
    repeats its last frame, as training's sampler does (`data.pairs.frame_indices`).
    Either rate unknown (frame folders of MSVD-QA, arrays): `count` frames evenly spaced over the
    whole clip, first and last included; a clip of fewer frames is all of them, its last repeated.
    """
    if num_stored < 1 or count < 1:
        raise ValueError(f"sample_indices: {num_stored} stored frames, {count} wanted; both must be >= 1.")
    if stored_fps is None or fps is None:
        if num_stored >= count:
            return [int(i) for i in np.linspace(0, num_stored - 1, count).round().astype(int)]
        return list(range(num_stored)) + [num_stored - 1] * (count - num_stored)
    offsets = np.floor(np.arange(count) * (stored_fps / fps) + 1e-6).astype(int)
    start = max(0, (num_stored - 1 - int(offsets[-1])) // 2)
    return [int(i) for i in np.minimum(start + offsets, num_stored - 1)]
