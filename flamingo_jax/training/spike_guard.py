"""Loss-spike rollback: when the loss leaves its running level for several steps, go back.

Large multimodal runs suffer loss spikes that training does not recover from (the
public IDEFICS-80B logs record 11 manual rollbacks, each restart also losing the
data order). The guard keeps the median of the last `window` losses; a step whose
loss exceeds `factor` times that median is a spike, and `patience` spikes in a row
ask for a rollback: the trainer restores the newest checkpoint from before the
first of them, keeps the data stream where it is (so the batches that caused the
spike are skipped, not replayed), optionally lowers the learning rate, and goes on.
At most `max_rollbacks` per run; each is recorded in the metrics.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

MIN_HISTORY = 10  # losses seen before a median means anything


@dataclasses.dataclass
class Spike:
    first_step: int  # the first step of the spiking run
    last_step: int
    losses: list[float]
    median: float


class SpikeGuard:
    def __init__(self, config):
        self.config = config  # core.config.SpikeGuardConfig
        self.history: collections.deque[float] = collections.deque(maxlen=config.window)
        self.run: list[tuple[int, float]] = []
        self.rollbacks = 0

    def observe(self, step: int, loss: float) -> Spike | None:
        """Records `step`'s loss; returns the spike when this step completes `patience` of them."""
        if not self.config.enabled or not math.isfinite(loss):
            return None  # non-finite steps are skipped updates, handled by the trainer
        enough = len(self.history) >= min(MIN_HISTORY, self.config.window)
        median = float(np.median(self.history)) if self.history else math.inf
        if enough and loss > self.config.factor * median:
            self.run.append((step, loss))
            if len(self.run) >= self.config.patience:
                spike = Spike(self.run[0][0], step, [value for _, value in self.run], median)
                self.run = []
                return spike
            return None
        self.run = []
        self.history.append(loss)
        return None

    def reset_run(self) -> None:
        """After a rollback: the steps of the abandoned run no longer count."""
        self.run = []
