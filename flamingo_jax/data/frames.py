"""Video frames on disk, in time order: the one listing that prompts, eval readers and importers share.

Frame names are not always zero-padded (`f1.png ... f10.png`): plain text order would feed
`f10` before `f2`, so names compare their digit runs as numbers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

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
