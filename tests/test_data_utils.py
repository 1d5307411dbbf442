"""Helpers shared by the tests/test_data_*.py modules (no tests here).

Images in these tests carry their identity in their pixels: a solid colour
whose red channel is the value to recover, written losslessly (PNG), so a test
can tell exactly which image landed in which media slot.
"""

from __future__ import annotations

import os

import numpy as np

from flamingo_jax.data import images, tokenizer

WORDS = ("a the red green blue yellow circle square triangle star on left right top bottom of image "
         "two three one has more fewer than first second question what colour is answer moves to "
         "striped dotted record document number end start cat dog sits runs big small").split()


def make_tokenizer(directory: str, vocab_size: int = 300, with_image_symbol: bool = True) -> tokenizer.Tokenizer:
    """A tiny SentencePiece model trained on a few KB of fixed text."""
    rng = np.random.default_rng(0)
    text_path = os.path.join(directory, "corpus.txt")
    with open(text_path, "w") as f:
        for _ in range(400):
            f.write(" ".join(rng.choice(WORDS, 10)) + f" {rng.integers(0, 100)}.\n")
    prefix = os.path.join(directory, "spm" if with_image_symbol else "spm_plain")
    if with_image_symbol:
        return tokenizer.Tokenizer(tokenizer.train([text_path], prefix, vocab_size, num_threads=1))
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=text_path, model_prefix=prefix, vocab_size=vocab_size, byte_fallback=True,
                                   num_threads=1, minloglevel=2)
    return tokenizer.Tokenizer(prefix + ".model")


def solid_png(value: int, height: int = 12, width: int = 16) -> bytes:
    """A PNG whose red channel is `value` everywhere (green 100, blue 50)."""
    array = np.zeros((height, width, 3), np.uint8)
    array[..., 0], array[..., 1], array[..., 2] = value, 100, 50
    return images.encode_image(array, "PNG")


def red_value(media_item: np.ndarray, config: images.ImageConfig) -> int:
    """Red value at the centre of a model-input image [S, S, 3] (or [T, S, S, 3]: first frame)."""
    media_item = media_item[0] if media_item.ndim == 4 else media_item
    centre = media_item.shape[0] // 2
    return int(images.denormalize(media_item[centre, centre], config)[0])


def collect(pipeline) -> list[dict[str, np.ndarray]]:
    """Every batch of a finite pipeline."""
    return list(pipeline)


def rows(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Batches -> one dict per example."""
    out = []
    for batch in batches:
        for i in range(len(batch["tokens"])):
            out.append({key: value[i] for key, value in batch.items()})
    return out


def occupied_slots(media: np.ndarray) -> np.ndarray:
    """[B, N] (or [N]) True where a media slot holds an image (unused slots are all zeros)."""
    lead = media.ndim - 4  # media is [..., T, S, S, 3]
    return np.abs(media).reshape(*media.shape[:lead], -1).max(-1) > 0


def check_contract(batch: dict[str, np.ndarray], vocab_size: int) -> None:
    """The invariants every batch must satisfy (shapes, dtypes, index validity)."""
    b, length = batch["tokens"].shape
    assert batch["tokens"].dtype == np.int32 and batch["targets"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32 and batch["media"].dtype == np.float32
    assert batch["media_index"].dtype == np.int32 and "media_mask" not in batch
    assert batch["targets"].shape == batch["loss_mask"].shape == batch["media_index"].shape == (b, length)
    num_media = batch["media"].shape[1]
    assert batch["media"].shape[:2] == (b, num_media) and batch["media"].shape[-1] == 3
    assert batch["tokens"].min() >= 0 and batch["tokens"].max() <= vocab_size
    np.testing.assert_array_equal(batch["targets"][:, :-1][batch["loss_mask"][:, :-1] > 0],
                                  batch["tokens"][:, 1:][batch["loss_mask"][:, :-1] > 0])
    assert not batch["loss_mask"][:, -1].any()
    index = batch["media_index"]
    assert ((index >= -1) & (index < num_media)).all()
    rows_, cols = np.nonzero(index >= 0)
    used = np.zeros(batch["media"].shape[:2], bool)
    used[rows_, index[rows_, cols]] = True
    assert occupied_slots(batch["media"])[used].all(), "media_index points at an empty slot"
