"""Copying and recall drills for a language model: rows of random tokens that only the row's
own earlier tokens predict.

A frozen LM can only support Flamingo's few-shot learning if it copies from its context: a
name that one support example shows must come back in the answer. Small LMs learn copying
(an induction head) abruptly and late, and a corpus as predictable as the synthetic one keeps
them in the easier solution of boosting recently seen tokens. Runs of uniformly random tokens
can only be predicted the second time, and only by finding the first, so a stage that trains
on them first learns to copy at any offset (bench/induction.py measures when).

Copying runs is not yet the lookup a few-shot prompt needs. Its examples share one frame and
differ in one thing, the key (what the image shows), and the answer is the value that followed
the same key earlier, among several, often with frame words between key and value. Recall drills
(multi-query associative recall, as in the Zoology study of in-context recall) train that lookup:

  copy    BOS r1 r1 r2 r2 ...  each run `min_run`..`max_run` ordinary pieces; the loss covers the
          second saying (`first_copy_loss` adds the first, which carries only the unigram prior)
  recall  BOS k f v k' f v' k f v ...  the row binds 2..`max_keys` distinct one-piece keys to
          values (runs of `min_run`..`max_run` pieces) and says key, frame, value in random order;
          the frame (0..`max_frame_len` pieces) is the row's own, the same for every pair, and no
          key occurs inside a frame or value; the loss covers every value whose key the row has
          said before

Rows are cut to `max_len + 1` tokens. Row k of process p is a pure function of (seed, p, k), so
the state is a row count and a resumed run sees the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flamingo_jax.data.errors import DataError

KIND = "repeats"
DRILLS = ("copy", "recall")
STATE_VERSION = 1


def ordinary_ids(vocab_size: int, special_ids: Sequence[int]) -> np.ndarray:
    """The token ids a drill draws from: every id below `vocab_size` but the special ones."""
    ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int32), np.asarray(special_ids, np.int32))
    if len(ids) < 2:
        raise DataError(f"a drill needs at least 2 ordinary token ids; the tokenizer has {len(ids)}.")
    return ids


class RepeatsPipeline:
    """Batches {tokens, targets, loss_mask} [batch_size, max_len] of copying or recall drills;
    the iterator-with-state interface of the record pipelines (`next`, `get_state`, `set_state`)."""

    def __init__(self, name: str, batch_size: int, token_ids: np.ndarray, *, max_len: int, min_run: int,
                 max_run: int, bos_id: int | None, first_copy_loss: bool = False, drill: str = "copy",
                 max_keys: int = 6, max_frame_len: int = 0, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        if drill not in DRILLS:
            raise DataError(f"dataset {name!r}: drill={drill!r} is unknown; use one of {DRILLS}.")
        if drill == "recall" and not 2 <= max_keys < len(token_ids):
            raise DataError(f"dataset {name!r}: max_keys={max_keys}; a recall drill binds 2..max_keys distinct "
                            f"keys, so it needs 2 <= max_keys < {len(token_ids)} (the tokenizer's ordinary pieces).")
        if max_frame_len < 0:
            raise DataError(f"dataset {name!r}: max_frame_len={max_frame_len} must be >= 0.")
        if not 1 <= min_run <= max_run:
            raise DataError(f"dataset {name!r}: repeat runs of {min_run}..{max_run} tokens; need "
                            "1 <= min_repeat_len <= max_repeat_len.")
        shortest = 2 * min_run if drill == "copy" else 2 * (1 + max_frame_len + min_run)
        if shortest > max_len:
            raise DataError(f"dataset {name!r}: max_len={max_len} cannot hold one {drill} drill of {min_run}-token "
                            f"runs ({shortest} tokens); raise max_len to at least {shortest} or lower "
                            "min_repeat_len.")
        self.name, self.batch_size, self.max_len = name, int(batch_size), int(max_len)
        self.token_ids = np.asarray(token_ids, np.int32)
        self.min_run, self.max_run = int(min_run), int(max_run)
        self.bos_id, self.first_copy_loss = bos_id, bool(first_copy_loss)
        self.drill, self.max_keys, self.max_frame_len = drill, int(max_keys), int(max_frame_len)
        self.seed, self.process_index, self.process_count = int(seed), int(process_index), int(process_count)
        self.rows = 0  # rows handed out by this process

    def __iter__(self):
        return self

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row `k` of this process: its max_len + 1 tokens and which of them are targets."""
        rng = np.random.default_rng((self.seed, self.process_index, k))
        tokens = [] if self.bos_id is None else [int(self.bos_id)]
        scored = [False] * len(tokens)
        if self.drill == "copy":
            while len(tokens) < self.max_len + 1:
                run = self._run(rng, self.token_ids)
                tokens += run + run
                scored += [self.first_copy_loss] * len(run) + [True] * len(run)
        else:
            keys = rng.choice(self.token_ids, int(rng.integers(2, self.max_keys + 1)), replace=False)
            others = np.setdiff1d(self.token_ids, keys)  # a key never occurs inside a frame or a value
            frame = rng.choice(others, int(rng.integers(0, self.max_frame_len + 1))).tolist()
            keys, values = keys.tolist(), [self._run(rng, others) for _ in keys]
            said = set()
            while len(tokens) < self.max_len + 1:
                i = int(rng.integers(0, len(keys)))
                tokens += [keys[i]] + frame + values[i]
                scored += [False] * (1 + len(frame)) + [i in said] * len(values[i])
                said.add(i)
        return np.asarray(tokens[:self.max_len + 1], np.int32), np.asarray(scored[:self.max_len + 1])

    def _run(self, rng: np.random.Generator, token_ids: np.ndarray) -> list[int]:
        return rng.choice(token_ids, int(rng.integers(self.min_run, self.max_run + 1))).tolist()

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self.row(self.rows + i) for i in range(self.batch_size)]
        self.rows += self.batch_size
        tokens = np.stack([t for t, _ in rows])
        scored = np.stack([s for _, s in rows])
        return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": scored[:, 1:].astype(np.float32)}

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "name": self.name, "kind": KIND, "drill": self.drill, "seed": self.seed,
                "process_index": self.process_index, "process_count": self.process_count, "rows": self.rows}

    def set_state(self, state: Mapping[str, Any]) -> None:
        expected = {"kind": KIND, "drill": self.drill, "seed": self.seed, "process_count": self.process_count}
        for key, value in expected.items():
            if state.get(key, "copy" if key == "drill" else None) != value:
                raise DataError(f"dataset {self.name!r}: saved state has {key}={state.get(key)!r}, this run "
                                f"{value!r}; resume with the same data config and seed.")
        self.rows = int(state["rows"])

    def skip_counts(self) -> dict[str, int]:
        return {}  # generated rows are never damaged

    def close(self) -> None:
        pass
