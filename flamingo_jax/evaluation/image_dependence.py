"""Does a trained Flamingo read the image? Its held-out caption loss with each pair's own image,
another pair's (the images rolled by one) and a blank one (zeros: the mean colour).

A model whose visual path has learnt nothing scores the three the same (with tanh gates at 0,
exactly the same); one that reads colours and shapes pays for the wrong image. The pairs are the
synthetic corpus' validation split, read as `backbone_checks` reads it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax.core.config import RunConfig
from flamingo_jax.evaluation.backbone_checks import validation_batches
from flamingo_jax.training.loss import nll_sum

FIELDS = ("tokens", "targets", "loss_mask", "media", "media_index")


def caption_loss_by_image(model: nnx.Module, run: RunConfig, max_pairs: int = 100) -> dict[str, float]:
    """{'real', 'shuffled', 'blank': mean NLL per caption token, 'num_pairs'} over up to `max_pairs`
    held-out image-text pairs of the run's synthetic corpus."""
    batches, count = [], 0
    for batch in validation_batches(run, "image_text"):
        batches.append(batch)
        count += len(batch["tokens"])
        if count >= max_pairs:
            break
    if not batches:
        raise ValueError("the run has no image_text dataset, so there are no held-out captions to score.")
    pairs = {key: np.concatenate([b[key] for b in batches])[:max_pairs] for key in FIELDS}
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(state, tokens, targets, loss_mask, media, media_index):
        logits = nnx.merge(graphdef, state)(tokens, media, media_index)
        return nll_sum(logits, targets, loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)

    media = pairs["media"]
    score = lambda images: float(loss(state, pairs["tokens"], pairs["targets"], pairs["loss_mask"], images,
                                      pairs["media_index"]))
    return {"real": score(media), "shuffled": score(np.roll(media, 1, axis=0)), "blank": score(np.zeros_like(media)),
            "num_pairs": len(media)}
