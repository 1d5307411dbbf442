"""Defaults that every config file in `configs/` starts from.

A config file is an ml_collections file with `get_config()`; it calls `base()`
and overrides what differs. `config.model` mirrors `models.config.FlamingoConfig`
field for field (ConfigDict keeps the types: a typo or a wrong type fails at
load time, and `FlamingoConfig.from_dict` validates the values).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from flamingo_jax.models.config import FlamingoConfig


def model_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(FlamingoConfig()))


def base() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "flamingo"
    config.seed = 0
    config.model = model_defaults()
    return config
