"""AdamW as the paper trains Flamingo (appendix B.1.2).

Linear warm-up from 0 to the peak learning rate, then constant; global-norm
clipping at 1.0; weight decay 0.1 on every trainable weight except the
Perceiver Resampler's. `train.weight_decay_exempt` names the exempt leaves by path
(`exempts`: '/'-joined prefixes or fnmatch patterns, e.g. ("resampler", "*gate*",
"*norm*") for the ablation without decay on the gates and norms too); an entry that
matches no leaf is an error, not a silent decay of everything. The optimizer only
ever sees trainable parameters; `train_config` is a `core.config.TrainConfig`.
"""

from __future__ import annotations

import fnmatch
import functools
from typing import Any, Sequence

import jax
import optax

from flamingo_jax.errors import UserError


def learning_rate_schedule(train_config) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then constant, linear to 0 or cosine to 0 at `steps`."""
    peak = train_config.learning_rate
    warmup = train_config.warmup_steps
    decay_steps = max(train_config.steps - warmup, 1)
    if train_config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif train_config.schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    elif train_config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        raise ValueError(f"config field `train.schedule`: {train_config.schedule!r} is unknown; "
                         "use 'constant' (the paper), 'linear' or 'cosine'.")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


class WeightDecayExemptError(UserError, ValueError):
    """A `train.weight_decay_exempt` entry that names no trainable weight."""


def leaf_name(path: Sequence[Any]) -> str:
    """A pytree path as the '/'-joined names the entries match: 'xattn/attention_norm/scale'."""
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def exempts(entry: str, name: str) -> bool:
    """Whether one entry exempts the leaf `name`: the entry, an fnmatch pattern (`*` crosses
    '/'), matches the leaf's whole name or a part of it ending at a '/'. So 'resampler' and
    'xattn/ffw' are prefixes (subtrees), '*gate*' and '*norm*' any leaf whose name has them."""
    parts = name.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[:end]), entry) for end in range(1, len(parts) + 1))


def check_weight_decay_exempt(params: Any, exempt: Sequence[str]) -> None:
    """Fails on an entry that exempts no leaf of `params`: a typo would decay every weight."""
    names = [leaf_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    for entry in exempt:
        if not any(exempts(entry, name) for name in names):
            roots = sorted({name.split("/")[0] for name in names})
            raise WeightDecayExemptError(
                f"config field `train.weight_decay_exempt`: {entry!r} matches no trainable weight; entries are "
                f"'/'-joined path prefixes or fnmatch patterns of leaves under {roots} (e.g. 'resampler', "
                "'*gate*').")


def weight_decay_mask(params: Any, exempt: Sequence[str] = ("resampler",)) -> Any:
    """True for every leaf that gets weight decay: all but those an entry of `exempt`
    (`train.weight_decay_exempt`) matches, by the rule of `exempts`. Checks the entries first."""
    exempt = tuple(exempt)
    check_weight_decay_exempt(params, exempt)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(exempts(entry, leaf_name(path)) for entry in exempt), params)


def adamw(train_config, schedule: optax.Schedule, exempt: Sequence[str] | None = None
          ) -> optax.GradientTransformation:
    """AdamW with the config's moments, epsilon and weight decay, off for the leaves `exempt`
    matches (default: the config's `weight_decay_exempt`)."""
    exempt = train_config.weight_decay_exempt if exempt is None else exempt
    return optax.adamw(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2, eps=train_config.adam_eps,
                       weight_decay=train_config.weight_decay,
                       mask=functools.partial(weight_decay_mask, exempt=tuple(exempt)))


def make_optimizer(train_config, exempt: Sequence[str] | None = None) -> optax.GradientTransformation:
    """The paper's Flamingo optimizer: global-norm clipping, then AdamW."""
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm),
                       adamw(train_config, learning_rate_schedule(train_config), exempt))
