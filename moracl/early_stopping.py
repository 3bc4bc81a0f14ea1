"""Early stopping on a validation metric, restoring the best weights.

Every training loop of moracl that has a validation split uses it the same way::

    stopper = EarlyStopping(config.train.early_stopping)      # None: never stops early
    for epoch in range(config.train.epochs):                   # epochs: the maximum
        train_one_epoch()
        if stopper.update(epoch, val_loss=..., val_acc=..., state=trainable_state(model)):
            break
    stopper.restore(model)                                      # the best epoch's weights

The metric is read from the validation split only; the test split has no part in it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from moracl.guard import check_int, check_number

__all__ = [
    "EarlyStopping",
    "EarlyStoppingConfig",
    "StopMetric",
    "snapshot_state",
    "trainable_state",
]


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s parameters that train now, by their ``state_dict`` names (not copied:
    :class:`EarlyStopping` copies the best epoch's)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def snapshot_state(model: nn.Module) -> dict[str, Tensor]:
    """What restoring an epoch needs (not copied): :func:`trainable_state` plus the buffers
    training changes, Delta-LoRA's frozen-weight updates (``base_delta``, ``steps``) and
    AdaLoRA's rank masks, so that a restored epoch computes what it computed when it was
    validated."""
    from moracl.adapters.adalora import adalora_buffers
    from moracl.adapters.delta_lora import delta_lora_buffers

    return {**trainable_state(model), **delta_lora_buffers(model), **adalora_buffers(model)}


class StopMetric(str, Enum):
    """What early stopping watches: validation loss (lower is better) or accuracy (higher)."""

    VAL_LOSS = "val_loss"
    VAL_ACC = "val_acc"


@dataclass
class EarlyStoppingConfig:
    """``train.early_stopping``: stop when the validation metric has not improved by more
    than ``min_delta`` for ``patience`` epochs in a row, and restore the best epoch's
    weights; ``train.epochs`` is then the maximum."""

    patience: int = field(default=2, metadata={"help": "epochs without improvement to stop"})
    metric: StopMetric = field(
        default=StopMetric.VAL_LOSS, metadata={"help": "val_loss or val_acc"}
    )
    min_delta: float = field(
        default=0.0, metadata={"help": "the least change that counts as an improvement"}
    )

    def __post_init__(self) -> None:
        check_int("train.early_stopping.patience", self.patience, ge=1)
        check_number("train.early_stopping.min_delta", self.min_delta, ge=0)
        if not isinstance(self.metric, StopMetric):
            try:
                self.metric = StopMetric(self.metric)
            except ValueError:
                raise ValueError(
                    f"train.early_stopping.metric={self.metric!r}; expected one of "
                    f"{[m.value for m in StopMetric]}"
                ) from None


class EarlyStopping:
    """Tracks the best epoch of a validation metric and keeps a copy of its weights.

    Args:
        config: the rule; ``None`` never stops early, but still keeps the last epoch's
            weights (so :meth:`restore` is a no-op) and records the metric.

    Attributes:
        best_epoch: the epoch whose weights :meth:`restore` puts back (``-1``: none yet).
        best_value: its metric value (loss or accuracy).
        history: ``(epoch, val_loss, val_acc)`` of every epoch seen.
        stopped_epoch: the epoch after which training stopped early (``None``: it did not).
    """

    def __init__(self, config: EarlyStoppingConfig | None) -> None:
        self.config = config
        self.best_epoch = -1
        self.best_value = math.nan
        self.best_state: dict[str, Tensor] | None = None
        self.history: list[tuple[int, float, float]] = []
        self.stopped_epoch: int | None = None
        self._bad = 0

    def _value(self, val_loss: float, val_acc: float) -> float:
        metric = self.config.metric if self.config is not None else StopMetric.VAL_LOSS
        return val_loss if metric is StopMetric.VAL_LOSS else val_acc

    def _better(self, value: float) -> bool:
        if self.best_epoch < 0:
            return True
        delta = self.config.min_delta if self.config is not None else 0.0
        if self.config is not None and self.config.metric is StopMetric.VAL_ACC:
            return value > self.best_value + delta
        return value < self.best_value - delta

    def update(
        self, epoch: int, *, val_loss: float, val_acc: float, state: Mapping[str, Tensor]
    ) -> bool:
        """Record ``epoch``'s validation loss and accuracy; ``state`` is the model's trainable
        state after it (copied when the epoch is the best so far). Returns whether to stop.

        Raises:
            ValueError: a non-finite validation loss or accuracy (a diverged model must not
                be selected).
        """
        if not (math.isfinite(val_loss) and math.isfinite(val_acc)):
            raise ValueError(
                f"epoch {epoch}: validation loss {val_loss}, accuracy {val_acc}; expected "
                f"finite values (training diverged)"
            )
        self.history.append((epoch, float(val_loss), float(val_acc)))
        value = self._value(val_loss, val_acc)
        if self.config is None:
            self.best_epoch, self.best_value, self.best_state = epoch, value, None
            return False
        if self._better(value):
            self.best_epoch, self.best_value, self._bad = epoch, value, 0
            self.best_state = {k: v.detach().clone() for k, v in state.items()}
            return False
        self._bad += 1
        if self._bad >= self.config.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights into ``model`` (a no-op without a rule, or when
        the last epoch seen was the best)."""
        if self.best_state is None:
            return
        if self.history and self.history[-1][0] == self.best_epoch:
            return
        missing = set(self.best_state) - set(model.state_dict())
        if missing:
            raise ValueError(
                f"the saved best weights name tensors the model lacks: {sorted(missing)[:5]}"
            )
        with torch.no_grad():
            current = model.state_dict()
            for name, value in self.best_state.items():
                current[name].copy_(value)

    def summary(self) -> dict[str, Any]:
        """What happened, for ``metrics.json``: best epoch, its value, epochs run, and
        whether training stopped early."""
        return {
            "best_epoch": self.best_epoch,
            "best_value": None if math.isnan(self.best_value) else self.best_value,
            "epochs_run": len(self.history),
            "stopped_early": self.stopped_epoch is not None,
        }
