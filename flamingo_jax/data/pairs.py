"""Image-text and video-text pairs (the paper's ALIGN/LTIP and VTP) -> training batches.

Each pair is the one-image document [media, caption]:
  BOS `<image>` caption `<EOC>` EOS, cut or padded to L tokens (paper: 32 or 64),
with a single space prepended to the caption with probability 0.5 in training
(paper, appendix B.1.2; tokenizers that keep whitespace, like ours and
LLaMA's, then see both spellings of the first word). Captions longer than L
lose their end.

Video: `num_frames` frames (default 8) sampled at `fps` (default 1 frame per
second) using the record's stored frame rate, from a random start in
training and from the first frame otherwise; a video shorter than
num_frames / fps seconds repeats its last frame. All frames of a video get the
same flip and colour jitter.

Batch (B = batch size, L = max_len, T = num_frames):
  tokens, targets, media_index int32 [B, L]; loss_mask float32 [B, L]
  media float32 [B, 1, 1, S, S, 3] (images) or [B, 1, T, S, S, 3] (video)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flamingo_jax.data import formats, images, sequence
from flamingo_jax.data._tf import tf
from flamingo_jax.data.pipeline import REASON_CODE, RecordPipeline, assemble_example, numpy_rng, text_reason
from flamingo_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PairConfig:
    max_len: int = 32  # L (paper: 32 or 64)
    p_leading_space: float = 0.5
    num_frames: int = 8  # video only: T
    fps: float = 1.0  # video only: frames sampled per second of video

    def __post_init__(self):
        if self.max_len < 2:
            raise ValueError(f"pair max_len={self.max_len} must be >= 2 (a token and its target).")
        if not 0.0 <= self.p_leading_space <= 1.0:
            raise ValueError(f"p_leading_space={self.p_leading_space} must be a probability in [0, 1].")
        if self.num_frames < 1:
            raise ValueError(f"num_frames={self.num_frames} must be >= 1.")
        if self.fps <= 0:
            raise ValueError(f"fps={self.fps} must be positive (frames sampled per second).")


def caption_example(caption: str, tokenizer: Tokenizer, config: PairConfig,
                    rng: np.random.Generator | None) -> sequence.Example:
    """One caption -> the pair's token fields (a window from the start of [image, caption]).

    The leading-space augmentation needs `rng` (training only)."""
    if rng is not None and rng.random() < config.p_leading_space:
        caption = " " + caption
    document = sequence.tokenize_document([None, caption], tokenizer)
    return sequence.window(document, 0, config.max_len, 1, False, tokenizer.pad_id)


def frame_indices(num_stored: int, frame_rate: float, num_frames: int, fps: float,
                  rng: np.random.Generator | None) -> np.ndarray:
    """Indices [num_frames] of the stored frames to use: one every frame_rate / fps frames.

    `rng` None starts at frame 0; otherwise the start is uniform over the
    starts that keep every sampled frame inside the video.
    """
    step = frame_rate / fps
    offsets = np.floor(np.arange(num_frames) * step + 1e-6).astype(np.int64)
    last_start = max(0, num_stored - 1 - int(offsets[-1]))
    start = 0 if rng is None else int(rng.integers(0, last_start + 1))
    return np.minimum(start + offsets, num_stored - 1).astype(np.int32)


class _PairPipeline(RecordPipeline):
    """Shared by image and video pairs: a Python step that parses, validates,
    tokenises and picks the frames to decode, then decoding in the graph."""

    media_field = ""  # the schema field holding the encoded image(s)

    def __init__(self, pattern, batch_size: int, tokenizer: Tokenizer, *, config: PairConfig = PairConfig(),
                 image_config: images.ImageConfig = images.ImageConfig(), **kwargs: Any):
        super().__init__(pattern, batch_size, **kwargs)
        self.tokenizer = tokenizer
        self.config = config
        self.image_config = image_config

    @property
    def num_frames(self) -> int:
        return 1

    def _choose_frames(self, fields: dict[str, list], rng: np.random.Generator) -> tuple[list[int], str]:
        """Indices of the stored images to use, or an error detail (-> malformed)."""
        count = len(fields[self.media_field])
        return ([0], "") if count == 1 else ([], f"{count} images; the schema has one")

    def _sample(self, serialized: bytes, seed_ints: np.ndarray):
        """Python step: parse, validate, tokenise, pick the frames and decode them."""
        rng = numpy_rng(seed_ints)
        example, chosen = None, []
        try:
            fields = formats.parse(serialized, self.kind)
            captions = fields["caption"]
            if len(captions) > 1:
                raise ValueError(f"{len(captions)} captions; the schema has one")
            caption = captions[0].decode("utf-8", "replace") if captions else ""
            reason, detail = text_reason([caption.strip()], len(fields[self.media_field]), None)
            if not reason:
                indices, detail = self._choose_frames(fields, rng)
                if detail:
                    raise ValueError(detail)
                chosen = [fields[self.media_field][i] for i in indices]
                example = caption_example(caption, self.tokenizer, self.config, rng if self.training else None)
                pixels, shapes, image_reason, image_detail = images.decode_all(chosen, self.image_config)
                if image_reason:
                    example, reason, detail = None, REASON_CODE[image_reason], f"the image: {image_detail}"
        except Exception as error:  # noqa: BLE001 - one odd record must never stop a training run
            example, reason, detail = None, REASON_CODE["malformed"], f"{type(error).__name__}: {error}"
        if example is None:
            return self.refused_fields(self.config.max_len, reason, detail)
        return (example.tokens, example.targets, example.loss_mask, example.media_index, pixels, shapes,
                np.int32(0), b"")

    def _process(self, example: dict[str, Any]) -> dict[str, Any]:
        t = tf()
        length, size, frames = self.config.max_len, self.image_config.size, self.num_frames
        tokens, targets, loss_mask, media_index, pixels, shapes, reason, detail = self._sample_in_graph(example, length)
        reason = t.reshape(reason, [])
        decoded = images.prepare_decoded(pixels, shapes, self.image_config, self.training, example["seed"],
                                         same_augmentation=True)
        media = t.cond(reason == 0, lambda: t.reshape(decoded, [1, frames, size, size, 3]),
                       lambda: t.zeros([1, frames, size, size, 3], t.float32))
        return assemble_example(tokens, targets, loss_mask, media_index, media, reason, detail, length)


class ImageTextPipeline(_PairPipeline):
    """Batches of image-caption pairs; media [B, 1, 1, S, S, 3]."""

    kind = formats.IMAGE_TEXT
    media_field = "image_encoded"


class VideoTextPipeline(_PairPipeline):
    """Batches of video-caption pairs; media [B, 1, T, S, S, 3]."""

    kind = formats.VIDEO_TEXT
    media_field = "frames_encoded"

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    def _choose_frames(self, fields: dict[str, list], rng: np.random.Generator) -> tuple[list[int], str]:
        rate = fields["frame_rate"]
        if len(rate) != 1 or not np.isfinite(rate[0]) or rate[0] <= 0:
            return [], f"frame_rate {rate} must be one positive number"
        indices = frame_indices(len(fields[self.media_field]), float(rate[0]), self.config.num_frames,
                                self.config.fps, rng if self.training else None)
        return indices.tolist(), ""
