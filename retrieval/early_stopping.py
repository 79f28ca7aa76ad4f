"""Early stopping on a validation figure: the one loop-side piece every training stage shares.

A stage calls `update(epoch, value, model)` after each validation; it keeps a copy of the
best weights, counts the epochs since the last improvement and says when to stop
(`patience` epochs without a better value). `restore(model)` loads the best weights back.
Only a strictly better value counts as an improvement (ties keep the earlier, cheaper epoch),
optionally by more than `min_delta`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class EarlyStopping:
    """Track the best epoch of a figure that should rise (AUC, Recall@N) and its weights."""

    patience: int  # epochs without improvement before `should_stop`
    min_delta: float = 0.0  # an improvement must exceed the best value by more than this
    best: float = float("-inf")  # best value seen
    best_epoch: int = 0  # epoch of `best` (0 = none yet)
    stale: int = 0  # epochs since the best one
    best_state: dict[str, Any] | None = field(default=None, repr=False)  # weights at best_epoch

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience={self.patience} must be at least 1")

    def update(self, epoch: int, value: float, model: nn.Module | None = None) -> bool:
        """Record epoch's value; True when it is a new best (the model's weights are then copied)."""
        if value > self.best + self.min_delta:
            self.best, self.best_epoch, self.stale = value, epoch, 0
            if model is not None:
                self.best_state = copy.deepcopy(model.state_dict())
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.stale >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best weights into `model` (an error if no epoch was ever recorded)."""
        if self.best_state is None:
            raise RuntimeError("no best weights to restore: update() was never given a model")
        model.load_state_dict(self.best_state)
