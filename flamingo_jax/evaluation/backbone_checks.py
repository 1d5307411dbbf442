"""The pretrained backbones checked on their own, before Flamingo freezes them.

* Vision encoder (contrastive run): image-to-text recall@1 among held-out pairs, the dual
  encoder ranking every caption for every image (chance: one in the number of pairs).
* Language model (LM run): held-out perplexity, beside the same model at its random
  initialisation, so the figure says how much the pretraining taught.

Both read the synthetic corpus' validation split (`data.synthetic.validation_data_config`)
through the training pipelines, in file order, once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from flamingo_jax.core.checkpoint import CheckpointError
from flamingo_jax.core.config import RunConfig
from flamingo_jax.core.restore import restore_trainable
from flamingo_jax.data import synthetic
from flamingo_jax.data.mixture import Mixture
from flamingo_jax.training.objectives import ContrastiveObjective, LanguageModelObjective, Objective, make_objective


@dataclasses.dataclass
class PretrainingRun:
    """A pretraining run's last weights, merged into its model, with its objective."""

    run: RunConfig
    config: ml_collections.ConfigDict
    objective: Objective
    model: nnx.Module
    step: int


def load_pretraining_run(workdir: str, step: int | None = None) -> PretrainingRun:
    """The model of a `contrastive` or `lm` run in `workdir` at `step` (default: latest)."""
    built = {}

    def pretraining_parts(config: ml_collections.ConfigDict):
        run = RunConfig.from_config(config)
        if run.objective not in ("contrastive", "lm"):
            raise CheckpointError(f"{workdir} is a {run.objective!r} run; these checks are for the backbones' "
                                  "pretraining runs (objective 'contrastive' or 'lm').")
        mix = Mixture.from_config(run.data, training=False, num_epochs=1)
        built.update(run=run, objective=make_objective(run, mix.tokenizer))
        mix.close()
        return built["objective"].parts()

    restored = restore_trainable(workdir, pretraining_parts, step=step, devices=jax.devices()[:1])
    run, objective, parts = built["run"], built["objective"], restored.parts
    _, frozen = parts.init(run.seed)  # a pretraining run trains every weight: nothing is frozen
    return PretrainingRun(run, restored.config, objective, parts.merge(restored.params, frozen), restored.step)


def validation_batches(run: RunConfig, kind: str) -> Iterator[dict[str, np.ndarray]]:
    """The validation split's batches of one dataset kind ('image_text', 'interleaved'); none
    when the run trained on no dataset of that kind."""
    out_dir = run.synthetic.out_dir
    if not out_dir:
        raise CheckpointError("the run did not train on the synthetic corpus, which holds the validation split.")
    data = synthetic.validation_data_config(dict(run.data), out_dir)
    data["datasets"] = [d for d in data["datasets"] if d["kind"] == kind]
    if not data["datasets"]:
        return
    mix = Mixture.from_config(data, training=False, num_epochs=1)
    try:
        for pipeline in mix.pipelines.values():
            yield from pipeline
    finally:
        mix.close()


def _jitted_over_weights(model: nnx.Module, fn):
    """`fn(model, *args)` jitted as `(weights, *args)`: one compile serves every weight set of
    `model`'s structure and placement."""
    graphdef, _ = nnx.split(model)
    return jax.jit(lambda weights, *args: fn(nnx.merge(graphdef, weights), *args))


def retrieval_recall(pretrained: PretrainingRun) -> dict[str, float]:
    """Image-to-text recall@1 and @5 over the validation pairs: a caption counts as found when its
    text is the pair's (two images may share a caption, "a red circle.")."""
    objective = pretrained.objective
    if not isinstance(objective, ContrastiveObjective):
        raise TypeError(f"retrieval_recall needs a contrastive run, got {type(objective).__name__}.")

    def embed(model, media, tokens):
        return model.embed_media(media[:, 0]), model.embed_text(tokens, objective.text_positions(tokens))

    embed = _jitted_over_weights(pretrained.model, embed)
    weights = nnx.state(pretrained.model)
    images, texts, captions = [], [], []
    for batch in validation_batches(pretrained.run, "image_text"):
        image, text = embed(weights, batch["media"], batch["tokens"])
        images.append(np.asarray(image))
        texts.append(np.asarray(text))
        own = np.asarray(objective.text_positions(jnp.asarray(batch["tokens"])))  # not padding (id 3, not 0)
        captions += [tuple(row[mask]) for row, mask in zip(np.asarray(batch["tokens"]), own)]
    return image_to_text_recall(np.concatenate(images) @ np.concatenate(texts).T, captions)


def image_to_text_recall(similarity: np.ndarray, captions: list) -> dict[str, float]:
    """Recall@1 and @5 (percent) of `similarity[image, text]` over pairs (image i, captions[i]): a
    ranked text counts as found when its caption equals the image's own."""
    ranked = np.argsort(-similarity, axis=1, kind="stable")
    found = np.array([[captions[j] == captions[i] for j in row] for i, row in enumerate(ranked)])
    n = len(captions)
    return {"recall_at_1": 100.0 * float(np.mean(found[:, 0])), "recall_at_5": 100.0 * float(np.mean(found[:, :5].any(1))),
            "num_pairs": n, "chance_at_1": 100.0 / n}


def perplexity(pretrained: PretrainingRun) -> dict[str, float]:
    """Held-out perplexity of the LM over the validation documents' and captions' text, and of
    the same model at its random initialisation (the run's seed)."""
    objective = pretrained.objective
    if not isinstance(objective, LanguageModelObjective):
        raise TypeError(f"perplexity needs an LM run, got {type(objective).__name__}.")

    def loss(model, batch):
        result = objective.batch_loss(model, batch)
        return result.total, result.count

    trained = nnx.state(pretrained.model)
    random_params, frozen = objective.parts().init(pretrained.run.seed)
    random = jax.device_put(nnx.state(objective.parts().merge(random_params, frozen)),
                            jax.tree.map(lambda a: a.sharding, trained))  # the trained weights' placement
    weight_sets = {"perplexity": trained, "random_init_perplexity": random}
    compiled_loss = _jitted_over_weights(pretrained.model, loss)
    sums = {name: [0.0, 0.0] for name in weight_sets}
    for kind in ("interleaved", "image_text"):
        for batch in validation_batches(pretrained.run, kind):
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            for name, weights in weight_sets.items():
                total, count = compiled_loss(weights, batch)
                sums[name][0] += float(total)
                sums[name][1] += float(count)
    result: dict[str, Any] = {name: math.exp(total / max(count, 1.0)) for name, (total, count) in sums.items()}
    result["num_tokens"] = int(sums["perplexity"][1])
    return result
