"""AdamW as the paper trains Flamingo (appendix B.1.2).

Linear warm-up from 0 to the peak learning rate, then constant; global-norm
clipping at 1.0; weight decay 0.1 on every trainable weight except the
Perceiver Resampler's (`train.weight_decay_exempt`). The optimizer only ever
sees trainable parameters; `train_config` is a `core.config.TrainConfig`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import optax


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


def weight_decay_mask(params: Any, exempt_roots: Sequence[str] = ("resampler",)) -> Any:
    """True for every leaf that gets weight decay: all but those under `exempt_roots`
    (top-level names of the trainable weights, `train.weight_decay_exempt`)."""
    exempt = tuple(exempt_roots)
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[0], "key", None) not in exempt, params)


def adamw(train_config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW with the config's moments, epsilon and weight decay (off under `weight_decay_exempt`)."""
    return optax.adamw(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2, eps=train_config.adam_eps,
                       weight_decay=train_config.weight_decay,
                       mask=functools.partial(weight_decay_mask, exempt_roots=train_config.weight_decay_exempt))


def make_optimizer(train_config) -> optax.GradientTransformation:
    """The paper's Flamingo optimizer: global-norm clipping, then AdamW."""
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm),
                       adamw(train_config, learning_rate_schedule(train_config)))
