"""Which examples a few-shot prompt shows, and in what order (paper, B.1.5).

Random support examples in random order; zero-shot as two text-only examples;
a seeded subset of queries; support-order permutations for prompt ensembling.
Retrieval by visual similarity (RICES) is `evaluation.rices`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np

from flamingo_jax.evaluation.templates import ZERO_SHOT_TEXT_EXAMPLES

Example = Any  # a record of flamingo_jax.evaluation.readers


def random_support(
    support_pool: Sequence[Example], num_shots: int, rng: np.random.Generator
) -> list[Example]:
    """`num_shots` distinct pool examples in random order (the paper's default)."""
    if not 0 <= num_shots <= len(support_pool):
        raise ValueError(f"Cannot take {num_shots} support examples from a pool of {len(support_pool)}.")
    chosen = rng.choice(len(support_pool), size=num_shots, replace=False)
    return [support_pool[int(i)] for i in chosen]


def zero_shot_examples(support_pool: Sequence[Example], rng: np.random.Generator) -> list[Example]:
    """The two examples whose text (no media) precedes a zero-shot query."""
    return random_support(support_pool, ZERO_SHOT_TEXT_EXAMPLES, rng)


def sample_queries(pool: Sequence[Example], num: int | None, seed: int) -> list[Example]:
    """A seeded subset of `num` queries in pool order; all of them when `num`
    is None or not smaller than the pool. Same seed, same subset."""
    if num is None or num >= len(pool):
        return list(pool)
    if num < 0:
        raise ValueError(f"sample_queries: num must be >= 0 or None, got {num}.")
    chosen = np.random.default_rng(seed).choice(len(pool), size=num, replace=False)
    return [pool[int(i)] for i in np.sort(chosen)]


def ensemble_orders(
    num_shots: int, num_permutations: int = 6, rng: np.random.Generator | None = None
) -> list[list[int]]:
    """Support orders for prompt ensembling: the given order first, then
    distinct random permutations, `num_permutations` in all (the paper's 6) or
    every permutation when there are fewer (num_shots! < num_permutations).
    Without `rng` the orders come from a fixed seed, so runs are reproducible."""
    if num_shots < 0 or num_permutations < 1:
        raise ValueError(f"ensemble_orders: num_shots={num_shots}, num_permutations={num_permutations}.")
    rng = np.random.default_rng(0) if rng is None else rng
    identity = tuple(range(num_shots))
    wanted = min(num_permutations, math.factorial(num_shots))
    if math.factorial(num_shots) <= 5040:  # <= 7 shots: draw from the full list, no rejection
        others = [p for p in itertools.permutations(identity) if p != identity]
        picked = rng.choice(len(others), size=wanted - 1, replace=False) if wanted > 1 else []
        orders = [identity] + [others[int(i)] for i in picked]
    else:
        orders = [identity]
        while len(orders) < wanted:
            candidate = tuple(int(i) for i in rng.permutation(num_shots))
            if candidate not in orders:
                orders.append(candidate)
    return [list(order) for order in orders]


def reorder(support: Sequence[Example], order: Sequence[int]) -> list[Example]:
    """`support` in the order an `ensemble_orders` entry gives."""
    return [support[i] for i in order]
