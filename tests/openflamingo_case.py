"""The OpenFlamingo parity case shared by the module and converter tests: two rows with 3 `<image>`
each, text before the first image, several `<|endofchunk|>`, row 1 left-padded; OpenFlamingo's
logits on it, and ours with its media association and HF-style positions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flamingo_jax.data.sequence import openflamingo_media_index

B, T, M = 2, 12, 3  # rows, tokens, images per row


def token_ids(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """[B, T] ids below `vocab`, with `<|endofchunk|>` = vocab and `<image>` = vocab + 1 (OpenFlamingo's
    order); pad id 0."""
    eoc, image = vocab, vocab + 1
    ids = rng.integers(1, vocab, (B, T))
    ids[0, [1, 5, 9]] = image
    ids[0, [4, 8]] = eoc
    ids[1, :3] = 0
    ids[1, [4, 6, 10]] = image
    ids[1, 9] = eoc
    return ids


def inputs(vocab: int, image_size: int, seed: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [B, T], valid [B, T] (row 0 all valid), pixels [B, M, 1, 3, S, S] in torch's layout."""
    rng = np.random.default_rng(seed)
    ids = token_ids(rng, vocab)
    valid = ids != 0
    valid[0] = True
    pixels = rng.standard_normal((B, M, 1, 3, image_size, image_size)).astype(np.float32)
    return ids, valid, pixels


def reference_logits(reference, ids: np.ndarray, valid: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.from_numpy(pixels), torch.from_numpy(ids),
                         attention_mask=torch.from_numpy(valid).long()).logits.numpy()


def our_logits(model, ids: np.ndarray, valid: np.ndarray, pixels: np.ndarray, image_id: int) -> np.ndarray:
    """Our Flamingo on the same case: OpenFlamingo's media index, and positions 0..T-1 in every row as
    a plain forward of the HF decoder numbers them (padding included)."""
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return np.asarray(nnx.jit(lambda m, *a: m(*a))(
        model, jnp.asarray(ids), jnp.asarray(pixels.transpose(0, 1, 2, 4, 5, 3)),
        jnp.asarray(openflamingo_media_index(ids, image_id)), jnp.asarray(positions), jnp.asarray(valid)))
