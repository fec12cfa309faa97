"""Early stopping on a monitored validation value, with checkpointable state."""

from __future__ import annotations

import math

LOWER_IS_BETTER = ("loss",)


def metric_mode(name: str) -> str:
    """``"min"`` for losses (names ending in ``loss``), ``"max"`` for scores such as accuracy."""
    return "min" if name.endswith(LOWER_IS_BETTER) else "max"


class EarlyStopping:
    """Tracks the best value and stops after ``patience`` epochs without improvement.

    With the best value at epoch ``b`` and no later improvement, training stops
    after epoch ``b + patience``. A non-finite value never counts as an
    improvement.
    """

    def __init__(self, patience: int, mode: str = "min"):
        """Create the tracker.

        Args:
            patience: epochs without improvement tolerated (``_early_stop``).
            mode: ``"min"`` (lower is better) or ``"max"``.
        """
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r}; allowed: 'min', 'max'")
        self.patience = int(patience)
        self.mode = mode
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0

    def is_better(self, value: float) -> bool:
        """True when ``value`` improves on the best value so far."""
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def step(self, value: float, epoch: int) -> bool:
        """Record the value of ``epoch``; return whether it is a new best."""
        improved = self.is_better(value)
        if improved:
            self.best, self.best_epoch, self.bad_epochs = float(value), int(epoch), 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        """Whether the patience is exhausted."""
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        """Plain-type state for checkpoints."""
        return {
            "patience": self.patience,
            "mode": self.mode,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the progress saved by :meth:`state_dict` (the patience stays as configured)."""
        self.best = state["best"]
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
