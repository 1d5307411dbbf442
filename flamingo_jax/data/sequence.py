"""Token sequences with per-token roles: where `<EOC>` goes, what each token
sees, what is trained on. Pure numpy; the pipelines call it from tf.data.

A document is tokenised once into parallel arrays: ids, a role per token
(TEXT, MARKER, EOC, BOS, EOS) and, for marker tokens, the ordinal of their
image in the document. Everything else is derived from these positions, never
by searching ids for markers (a marker may be several plain-text tokens).

Paper rules (appendix B.1.2): `<EOC>` before every `<image>` marker except a
marker at the very start of the document, and at the end of the document
before EOS; BOS first if the vocabulary has one. A paired example is the
one-image document [image, caption]: BOS `<image>` caption `<EOC>` EOS.

Batch fields built from a window of the document (`window`), for an example of
L tokens and N media slots:
  tokens      int32   [L]  input ids (pad_id after the window's end)
  targets     int32   [L]  tokens shifted left by one; the last position is padding
  loss_mask   float32 [L]  1 where the target is text, `<EOC>` or EOS; 0 where it is
                           padding or (part of) an image marker
  media_index int32   [L]  media slot each input token cross-attends to, -1 for none
  images      int32   [N]  document ordinal of the image in each slot, -1 = empty slot
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from flamingo_jax.data.tokenizer import Tokenizer

TEXT, MARKER, EOC, BOS, EOS, PAD = range(6)
ROLE_NAMES = ("text", "marker", "eoc", "bos", "eos", "pad")
LOSS_ROLES = (TEXT, EOC, EOS)
_CARRIES_LOSS = np.isin(np.arange(len(ROLE_NAMES)), LOSS_ROLES)  # role -> bool lookup


@dataclasses.dataclass(frozen=True)
class Document:
    """A tokenised document: ids, roles and image ordinals, all [n]."""

    ids: np.ndarray  # int32 [n]
    roles: np.ndarray  # int8 [n]
    image: np.ndarray  # int32 [n]: image ordinal for MARKER tokens, -1 elsewhere

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_images(self) -> int:
        return int(self.image.max()) + 1 if len(self.image) else 0


def tokenize_document(segments: Sequence[str | None], tokenizer: Tokenizer,
                      encoded: Sequence[Sequence[int]] | None = None) -> Document:
    """Segments in document order (str = text, None = image slot) -> Document.

    `encoded` may carry the text segments' ids already (same order as the
    str segments), so callers can encode many texts in one batch call.
    """
    texts = [s for s in segments if s is not None]
    if encoded is None:
        encoded = tokenizer.encode_batch(texts) if texts else []
    if len(encoded) != len(texts):
        raise ValueError(f"{len(encoded)} encoded texts for {len(texts)} text segments.")
    ids: list[int] = []
    roles: list[int] = []
    image: list[int] = []

    def add(new_ids: Sequence[int], role: int, ordinal: int = -1) -> None:
        ids.extend(new_ids)
        roles.extend([role] * len(new_ids))
        image.extend([ordinal] * len(new_ids))

    if tokenizer.bos_id is not None:
        add([tokenizer.bos_id], BOS)
    start = len(ids)
    text_iter = iter(encoded)
    num_images = 0
    for segment in segments:
        if segment is None:
            if len(ids) > start:  # not at the very start of the document
                add([tokenizer.eoc_id], EOC)
            add(tokenizer.image_marker_ids, MARKER, num_images)
            num_images += 1
        else:
            add(next(text_iter), TEXT)
    add([tokenizer.eoc_id], EOC)
    if tokenizer.eos_id is not None:
        add([tokenizer.eos_id], EOS)
    return Document(np.asarray(ids, np.int32), np.asarray(roles, np.int8), np.asarray(image, np.int32))


def media_association(document: Document, next_image: bool) -> np.ndarray:
    """Image ordinal each token cross-attends to, -1 for none: int32 [n].

    Marker tokens see their own image. Otherwise, 'previous' (default): the
    last image whose marker starts at or before the token (text before any
    image: -1). 'next' (p_next): the first image whose marker comes after the
    token (text after the last image, the final `<EOC>` and EOS: -1).
    """
    markers = np.where(document.roles == MARKER, document.image, -1)
    if not next_image:
        return np.maximum.accumulate(markers) if len(markers) else markers
    big = np.iinfo(np.int32).max
    upcoming = np.where(markers >= 0, markers, big)
    upcoming = np.minimum.accumulate(upcoming[::-1])[::-1] if len(upcoming) else upcoming
    return np.where(upcoming == big, -1, upcoming).astype(np.int32)


def openflamingo_media_index(ids: np.ndarray, image_id: int) -> np.ndarray:
    """OpenFlamingo's media association for token ids [..., n]: int32 [..., n].

    OpenFlamingo marks `media_locations = ids == <image>` and lets token t see image
    cumsum(media_locations)[t] (1-based, 0 = none): the `<image>` token sees its own image,
    text before the first `<image>` sees nothing. As a media slot: that count minus one."""
    ids = np.asarray(ids)
    return (np.cumsum(ids == image_id, axis=-1) - 1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [L]
    targets: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # float32 [L]
    media_index: np.ndarray  # int32 [L]
    images: np.ndarray  # int32 [N]


def window(document: Document, start: int, max_len: int, max_images: int, next_image: bool,
           pad_id: int) -> Example:
    """The L=`max_len` tokens from `start`, with the first N=`max_images` images in them.

    Images are those with at least one marker token in the window, in order;
    tokens whose image is not among the first N (or lies outside the window)
    see -1.
    """
    if not 0 <= start <= max(0, len(document) - 1):
        raise ValueError(f"window start {start} outside a document of {len(document)} tokens.")
    see = media_association(document, next_image)
    stop = min(start + max_len, len(document))
    ids, roles, see = document.ids[start:stop], document.roles[start:stop], see[start:stop]
    marker_images = document.image[start:stop][roles == MARKER]
    in_window = np.unique(marker_images)  # sorted; ordinals grow along the document
    kept = in_window[:max_images]
    slot_of = np.full(document.num_images + 1, -1, np.int32)  # ordinal -> slot; last entry serves -1
    slot_of[kept] = np.arange(len(kept), dtype=np.int32)
    count = stop - start

    tokens = np.full(max_len, pad_id, np.int32)
    tokens[:count] = ids
    targets = np.full(max_len, pad_id, np.int32)
    targets[:count - 1] = ids[1:]
    loss_mask = np.zeros(max_len, np.float32)
    loss_mask[:count - 1] = _CARRIES_LOSS[roles[1:]]
    media_index = np.full(max_len, -1, np.int32)
    media_index[:count] = slot_of[see]  # see = -1 reads the last entry, which is -1
    images = np.full(max_images, -1, np.int32)
    images[:len(kept)] = kept
    return Example(tokens, targets, loss_mask, media_index, images)
