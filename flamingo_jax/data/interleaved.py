"""Interleaved image-text documents (the paper's M3W) -> training batches.

Per document (appendix B.1.2): tokenise with `<EOC>` before every `<image>`
(except at the very start) and at the end before EOS; take a random window of
L tokens (default 256); keep the first N images in it (default 5), padding the
unused media slots as zeros; with probability `p_next` the document's
text cross-attends to the NEXT image instead of the previous one.

With `training=False` there is no randomness: the window is the first L
tokens and text sees the previous image. Only the images kept in the window
are decoded. Batch (B = batch size):
  tokens, targets  int32   [B, L]
  loss_mask        float32 [B, L]
  media_index      int32   [B, L]
  media            float32 [B, N, 1, S, S, 3]
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
class InterleavedConfig:
    max_len: int = 256  # L: tokens per example
    max_images: int = 5  # N: media slots per example
    p_next: float = 0.5  # per document: probability that text sees the next image instead of the previous
    max_images_per_doc: int = 32  # documents with more image slots are skipped as bad records

    def __post_init__(self):
        if self.max_len < 2:
            raise ValueError(f"interleaved max_len={self.max_len} must be >= 2 (a token and its target).")
        if self.max_images < 1:
            raise ValueError(f"interleaved max_images={self.max_images} must be >= 1.")
        if not 0.0 <= self.p_next <= 1.0:
            raise ValueError(f"interleaved p_next={self.p_next} must be a probability in [0, 1].")
        if self.max_images_per_doc < 1:
            raise ValueError(f"interleaved max_images_per_doc={self.max_images_per_doc} must be >= 1.")


def sample_document(fields: dict[str, list], tokenizer: Tokenizer, config: InterleavedConfig,
                    rng: np.random.Generator | None) -> tuple[sequence.Example | None, int, str]:
    """Validates, tokenises and windows one parsed document (`formats.parse` output).

    With `rng` (training) the window starts at random and p_next applies; without
    it (evaluation) the window is the document's first L tokens, 'previous' mode.
    Returns (example or None, reason code, detail).
    """
    texts, is_image = fields["segment_text"], fields["segment_is_image"]
    if len(texts) != len(is_image) or any(flag not in (0, 1) for flag in is_image):
        return None, REASON_CODE["malformed"], "segment_text and segment_is_image disagree"
    num_slots = sum(is_image)
    if num_slots != len(fields["image_encoded"]):
        return None, REASON_CODE["malformed"], (
            f"{num_slots} image slots but {len(fields['image_encoded'])} stored images")
    segments = [None if flag else text.decode("utf-8", "replace") for text, flag in zip(texts, is_image)]
    reason, detail = text_reason([s.strip() for s in segments if s is not None], num_slots,
                                 config.max_images_per_doc)
    if reason:
        return None, reason, detail
    document = sequence.tokenize_document(segments, tokenizer)
    start = int(rng.integers(0, max(0, len(document) - config.max_len) + 1)) if rng is not None else 0
    next_image = bool(rng.random() < config.p_next) if rng is not None else False
    example = sequence.window(document, start, config.max_len, config.max_images, next_image, tokenizer.pad_id)
    return example, 0, ""


class InterleavedPipeline(RecordPipeline):
    """Batches of interleaved documents; see the module docstring for shapes."""

    kind = formats.INTERLEAVED

    def __init__(self, pattern, batch_size: int, tokenizer: Tokenizer, *,
                 config: InterleavedConfig = InterleavedConfig(),
                 image_config: images.ImageConfig = images.ImageConfig(), **kwargs: Any):
        super().__init__(pattern, batch_size, **kwargs)
        self.tokenizer = tokenizer
        self.config = config
        self.image_config = image_config

    def _sample(self, serialized: bytes, seed_ints: np.ndarray):
        """Python step: parse, validate, tokenise, window; decodes the images the window keeps."""
        try:
            fields = formats.parse(serialized, self.kind)
            rng = numpy_rng(seed_ints) if self.training else None
            example, reason, detail = sample_document(fields, self.tokenizer, self.config, rng)
            if example is not None:
                chosen = [fields["image_encoded"][i] for i in example.images if i >= 0]
                pixels, shapes, image_reason, image_detail = images.decode_all(chosen, self.image_config)
                if image_reason:
                    example, reason = None, REASON_CODE[image_reason]
                    detail = f"an image in the window: {image_detail}"
        except Exception as error:  # noqa: BLE001 - one odd record must never stop a training run
            example, reason, detail = None, REASON_CODE["malformed"], f"{type(error).__name__}: {error}"
        if example is None:
            return self.refused_fields(self.config.max_len, reason, detail)
        return (example.tokens, example.targets, example.loss_mask, example.media_index, pixels, shapes, np.int32(0), b"")

    def _process(self, example: dict[str, Any]) -> dict[str, Any]:
        t = tf()
        length, slots, size = self.config.max_len, self.config.max_images, self.image_config.size
        tokens, targets, loss_mask, media_index, pixels, shapes, reason, detail = self._sample_in_graph(example, length)
        decoded = images.prepare_decoded(pixels, shapes, self.image_config, self.training, example["seed"])
        padding = t.zeros([slots - t.shape(decoded)[0], size, size, 3], t.float32)
        media = t.reshape(t.concat([decoded, padding], 0), [slots, 1, size, size, 3])
        return assemble_example(tokens, targets, loss_mask, media_index, media, reason, detail, length)
