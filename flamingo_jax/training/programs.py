"""A run's jitted programs, kept for the next Trainer of the same run in this process.

A second Trainer of one run in one process (a resume after an interruption, a notebook cell run
again) would trace, lower and compile (or fetch from the persistent cache) the same train step
and initialisers again. JAX's own jit cache cannot tell: each Trainer builds new closures. Here they are keyed by what determines
them (`run_key`: the whole config, the devices of the mesh, the tokenizer file, whose ids a
program may hold as constants). What is kept is the jitted function, not an executable, so JAX
still traces afresh for other argument shapes or JAX settings.
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any, Callable

KEPT = 8  # the newest programs; a run has at most a few (a step per dataset under round-robin)
_programs: collections.OrderedDict[tuple, Any] = collections.OrderedDict()


def run_key(config, mesh, tokenizer) -> str | None:
    """A digest of everything a Trainer's programs are built from; None (nothing is kept) for a
    tokenizer without a `digest` of its file."""
    if tokenizer is not None and not getattr(tokenizer, "digest", None):
        return None
    identity = {
        "config": json.loads(config.to_json_best_effort()),
        "mesh": {name: int(size) for name, size in mesh.shape.items()},
        "devices": [(d.platform, int(d.id)) for d in mesh.devices.flat],
        "tokenizer": None if tokenizer is None else tokenizer.digest,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=repr).encode()).hexdigest()


def reuse(run: str | None, program: tuple, build: Callable[[], Any]) -> Any:
    """The program `program` (a name and what else tells a run's programs apart) of the run
    `run_key` gave `run`, kept from an earlier Trainer; else `build()`'s, kept from now on
    (never for a run without a key)."""
    if run is None:
        return build()
    key = (run, *program)
    if key in _programs:
        _programs.move_to_end(key)
        return _programs[key]
    built = _programs[key] = build()
    while len(_programs) > KEPT:
        _programs.popitem(last=False)
    return built


def clear() -> None:
    """Forgets every kept program (their executables are freed once nothing else holds them)."""
    _programs.clear()
