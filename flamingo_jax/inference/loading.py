"""Reloading what a training run wrote: config, trainable weights, frozen backbones.

A Flamingo checkpoint holds the train state and a JSON record with the run's
config and the backbone checkpoints it used (see `core.checkpoint`). The
frozen weights come from those backbone checkpoints; a backbone the run left
random (tests, the tiny default) is re-created from the config's seed exactly
as the trainer created it, which gives the same weights on the same device
layout.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from absl import logging
from etils import epath

from flamingo_jax.core import backbones
from flamingo_jax.core.checkpoint import absolute
from flamingo_jax.core.parts import ModelParts
from flamingo_jax.core.restore import restore_trainable
from flamingo_jax.data.images import ImageConfig
from flamingo_jax.data.mixture import image_config_from
from flamingo_jax.data.tokenizer import Tokenizer, load_tokenizer
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.flamingo import Flamingo


def workdir_path(workdir: str) -> epath.Path:
    """A local or cloud (gs://...) directory; local ones made absolute."""
    return epath.Path(absolute(workdir))


@dataclasses.dataclass
class TrainedModel:
    model: Flamingo
    tokenizer: Tokenizer
    image_config: ImageConfig
    config: ml_collections.ConfigDict
    step: int


def load_trained(workdir: str, *, step: int | None = None, tokenizer_path: str | None = None,
                 devices: list[jax.Device] | None = None) -> TrainedModel:
    """Restores the checkpoint at `step` (default: latest) of the run in `workdir`."""
    restored = restore_trainable(workdir, lambda config: ModelParts.flamingo(FlamingoConfig.from_dict(config.model)),
                                 step=step, devices=devices)
    config, meta, parts, frozen_shardings = restored.config, restored.meta, restored.parts, restored.frozen_shardings
    abstract_frozen = parts.abstract()[1]

    recorded = meta.get("backbones", {})
    paths = backbones.check_paths(recorded)
    loaded = {backbones.COMPONENTS[name] for name in paths}
    if len(loaded) < len(backbones.COMPONENTS):
        logging.warning("the run used random frozen backbones; re-creating them from seed %d", config.seed)
    random_frozen = jax.jit(lambda: {k: v for k, v in parts.init(config.seed)[1].items() if k not in loaded},
                            out_shardings={k: v for k, v in frozen_shardings.items() if k not in loaded})()
    frozen = backbones.load_into(random_frozen, abstract_frozen, frozen_shardings, paths)
    model = parts.merge(restored.params, frozen)

    tokenizer_path = tokenizer_path or config.data.tokenizer
    if not tokenizer_path or not os.path.exists(tokenizer_path):
        raise FileNotFoundError(f"the run's tokenizer {tokenizer_path!r} is not there; pass --tokenizer=<the "
                                "SentencePiece .model the run was trained with>.")
    return TrainedModel(model, load_tokenizer(tokenizer_path), image_config_from(config.data), config, restored.step)
