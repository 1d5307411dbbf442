"""RICES: Retrieval-based In-Context Example Selection (paper, section 3 / B.1.5).

The support examples whose visual features are most similar to the query's,
most similar last (next to the query).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from flamingo_jax.inference.items import Media

Example = Any  # a record of flamingo_jax.evaluation.readers


def _unit_rows(features: np.ndarray, what: str) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), as float64."""
    features = np.asarray(features, dtype=np.float64)
    if not np.isfinite(features).all():
        raise ValueError(f"RICES {what} contain NaN or inf.")
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


class RicesIndex:
    """Retrieval-based In-Context Example Selection (paper, section 3 / B.1.5).

    Holds the L2-normalised visual features of the support pool; `select`
    returns, per query, the k support examples of highest cosine similarity
    ordered least to most similar, so the most similar ends the prompt, next
    to the query. Ties go to the lower support index (it ends up later,
    i.e. nearer the query), so the choice is deterministic.
    """

    def __init__(self, support_features: np.ndarray, pool: Sequence[Example] | None = None) -> None:
        support_features = np.asarray(support_features)
        if support_features.ndim != 2 or support_features.shape[0] == 0:
            raise ValueError(f"RicesIndex needs support features [N, D] with N >= 1, "
                             f"got shape {support_features.shape}.")
        if pool is not None and len(pool) != support_features.shape[0]:
            raise ValueError(f"RicesIndex: {support_features.shape[0]} feature rows for a pool of {len(pool)}.")
        self.features = _unit_rows(support_features, "support features")  # [N, D]
        self.pool = pool

    def __len__(self) -> int:
        return self.features.shape[0]

    @classmethod
    def from_pool(
        cls,
        pool: Sequence[Example],
        media_of: Callable[[Example], Media],
        featurize: Callable[[list[Media]], np.ndarray],
        batch_size: int = 64,
    ) -> RicesIndex:
        """Featurises the pool in batches of `batch_size` (featurize: list of
        Media -> [B, D]); the index keeps `pool` for `select_examples`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        chunks = []
        for start in range(0, len(pool), batch_size):
            batch = [media_of(e) for e in pool[start:start + batch_size]]
            features = np.asarray(featurize(batch))
            if features.ndim != 2 or features.shape[0] != len(batch):
                raise ValueError(f"featurize returned shape {features.shape} for {len(batch)} media; "
                                 "expected [batch, feature_dim].")
            chunks.append(features)
        if not chunks:
            raise ValueError("RicesIndex.from_pool: the support pool is empty.")
        return cls(np.concatenate(chunks, axis=0), pool=pool)

    def select(self, query_features: np.ndarray, k: int) -> np.ndarray:
        """Indices of the k most similar support examples, least similar first:
        [k] for query features [D], [Q, k] for [Q, D]."""
        if not 0 <= k <= len(self):
            raise ValueError(f"RICES: cannot select {k} of {len(self)} support examples.")
        query = np.asarray(query_features)
        single = query.ndim == 1
        query = _unit_rows(query[None] if single else query, "query features")  # [Q, D]
        if query.ndim != 2 or query.shape[1] != self.features.shape[1]:
            raise ValueError(f"RICES: query features of shape {np.shape(query_features)} do not match "
                             f"support features [N, {self.features.shape[1]}].")
        similarity = query @ self.features.T  # [Q, N]
        most_similar_first = np.argsort(-similarity, axis=1, kind="stable")[:, :k]  # [Q, k]
        selected = most_similar_first[:, ::-1]
        return selected[0] if single else selected

    def select_examples(self, query_features: np.ndarray, k: int) -> list[Example]:
        """The examples `select` picks for one query ([D] features), least similar first."""
        if self.pool is None:
            raise ValueError("select_examples needs an index built with a pool (RicesIndex.from_pool).")
        return [self.pool[int(i)] for i in self.select(np.asarray(query_features).reshape(-1), k)]
