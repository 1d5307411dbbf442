"""The frozen backbones: pretrained vision encoder and language model weights.

Each is an orbax checkpoint of the component's frozen weights as a pure dict
(the layout of `nnx.to_pure_dict(nnx.state(model.vision_encoder))` and of
`model.decoder`). `config.backbones.vision` / `config.backbones.decoder` name
them; Flamingo checkpoints record these paths instead of copying the weights.
Without them the backbones are random, which is only useful for tests and
benchmarks: the run says so loudly.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import orbax.checkpoint as ocp
from absl import logging

from flamingo_jax.core.checkpoint import abstract_with_shardings
from flamingo_jax.errors import UserError

COMPONENTS = {"vision": "vision_encoder", "decoder": "decoder"}


class BackboneError(UserError, FileNotFoundError):
    """A backbone checkpoint named in the config that cannot be used."""


def check_paths(configured: Mapping[str, str] | None) -> dict[str, str]:
    """The configured backbone paths ({'vision': ..., 'decoder': ...}, '' for none), checked
    to exist before anything compiles."""
    paths = {}
    for name in COMPONENTS:
        path = (configured or {}).get(name, "")
        if not path:
            continue
        if not os.path.isdir(path):
            raise BackboneError(
                f"config field `backbones.{name}` = {path!r}: no such checkpoint directory. Point it at an "
                f"orbax checkpoint of the {name} weights (see flamingo_jax/core/backbones.py), or set it "
                "to '' to train on randomly initialised weights (tests only).")
        paths[name] = os.path.abspath(path)
    missing = [name for name in COMPONENTS if name not in paths]
    if missing:
        logging.warning(
            "\n%s\nNO PRETRAINED WEIGHTS for %s: these frozen backbones are RANDOMLY INITIALISED, so the model "
            "cannot learn anything useful from them. Set config.backbones.%s to an orbax checkpoint of the "
            "pretrained weights (save one with flamingo_jax.core.backbones.save).\n%s",
            "!" * 78, ", ".join(missing), missing[0], "!" * 78)
    return paths


def save(path: str, weights: Any) -> None:
    """Writes one component's frozen weights (a pure dict) as an orbax checkpoint, replacing
    one already there (orbax writes to a temporary directory and renames it when complete)."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), weights, force=True)
        checkpointer.wait_until_finished()


def restore(path: str, abstract: Any, shardings: Any) -> Any:
    """Reads one component's weights onto the given shardings, checking shapes."""
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            return checkpointer.restore(os.path.abspath(path), abstract_with_shardings(abstract, shardings))
        except (ValueError, KeyError) as error:
            raise BackboneError(
                f"backbone checkpoint {path!r} does not match the configured model: {error}. Check that the "
                "config's model sizes are those the backbone was trained with.") from error


def load_into(weights: Any, abstract: Any, shardings: Any, paths: dict[str, str], *, role: str = "frozen") -> Any:
    """Adds the components named in `paths` that `abstract` holds, read from their checkpoints,
    to the pure dict `weights`: the frozen weights, or the trainable ones of a run that trains a
    backbone (`model.freeze_lm` off), which start from it."""
    weights = dict(weights)
    for name, path in paths.items():
        key = COMPONENTS[name]
        if key in abstract:
            weights[key] = restore(path, abstract[key], shardings[key])
            logging.info("restored %s %s from %s", role, key, path)
    return weights
