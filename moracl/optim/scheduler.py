"""``MoRAScheduler``: warmup then cosine / linear / constant, for every group's lr and SAM's ρ.

With ``t`` the step count (``last_step``), ``W`` warmup steps, ``T`` total steps,
``s`` ``warmup_start_ratio`` and ``r`` ``min_lr_ratio``, the multiplier is

    f(t) = s + (1 − s) · t / W                              for t < W
    f(t) = r + (1 − r) · ½ (1 + cos(π p))                  cosine,   p = min(1, (t − W) / (T − W))
    f(t) = r + (1 − r) · (1 − p)                           linear
    f(t) = 1                                               constant

and group ``i`` gets ``lr = initial_lr_i · f(t)``.  SAM's ρ follows ``rho_schedule``:
``constant`` keeps ``initial_rho_i``; ``lr`` ties it to the learning rate,
``ρ = initial_rho_i · (q + (1 − q) · f(t))`` with ``q`` ``min_rho_ratio``.

The scheduler is driven by explicit step counts: ``step()`` advances by one, ``step(n)`` jumps
to ``n``.  Values are closed forms of ``t`` only, so a resumed run (``load_state_dict``)
follows the uninterrupted trajectory exactly.

A rank budget (``rank_allocator``, e.g. AdaLoRA's
:class:`~moracl.adapters.adalora.RankAllocator`) is stepped by the same call.  It reads the
gradients of the step just taken, so the order of a training step is::

    loss.backward()
    optimizer.step()
    scheduler.step()        # the budget for step t, then lr and ρ for step t + 1
    optimizer.zero_grad()

and ``step(n)`` may then only advance by one.  Its state (importance, masks) is part of
:meth:`MoRAScheduler.state_dict`.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from torch.optim import Optimizer

from moracl.optim._foreach import check_nonneg

__all__ = ["MoRAScheduler", "RankBudget", "RhoSchedule", "Schedule"]


class Schedule(str, Enum):
    """Shape of the learning rate after warmup."""

    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class RhoSchedule(str, Enum):
    """How SAM's ρ moves: kept constant, or tied to the learning rate."""

    CONSTANT = "constant"
    LR = "lr"


@runtime_checkable
class RankBudget(Protocol):
    """Anything that allocates a rank budget from each step's gradients (AdaLoRA's
    :class:`~moracl.adapters.adalora.RankAllocator`)."""

    def update_and_allocate(self, step: int) -> int:
        """Read the gradients of optimiser step ``step`` (0 first); returns the budget."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to allocate as the uninterrupted one."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        ...


def _enum(cls: type[Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        valid = [m.value for m in cls]  # type: ignore[attr-defined]
        raise ValueError(f"unknown {what} {value!r}; expected one of {valid}") from None


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _ratio(name: str, value: float) -> float:
    value = check_nonneg(name, value)
    if value > 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


class MoRAScheduler:
    """Warmup + decay of every group's ``lr`` (and ``sam_rho``) of ``optimizer``.

    Args:
        optimizer: any optimiser; groups keep their starting values in ``initial_lr`` and
            ``initial_rho`` (set here unless already present, e.g. from a loaded checkpoint).
        warmup_steps: ``W``, linear warmup length (0 <= W <= total_steps).
        total_steps: ``T`` > 0; after it the final value holds.
        schedule: ``cosine``, ``linear`` or ``constant`` after warmup.
        min_lr_ratio: ``r``, the final multiplier for cosine / linear, in [0, 1].
        warmup_start_ratio: ``s``, the multiplier at step 0, in [0, 1].
        rho_schedule: ``constant`` or ``lr`` (ρ tied to the learning rate).
        min_rho_ratio: ``q``, ρ's multiplier where the lr multiplier is 0, in [0, 1].
        last_step: step count to start from (values are applied at once).
        rank_allocator: a rank budget stepped with the optimiser step just taken
            (see the module's docstring for the order of calls).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        warmup_steps: int = 0,
        total_steps: int,
        schedule: Schedule | str = Schedule.COSINE,
        min_lr_ratio: float = 0.0,
        warmup_start_ratio: float = 0.0,
        rho_schedule: RhoSchedule | str = RhoSchedule.CONSTANT,
        min_rho_ratio: float = 0.0,
        last_step: int = 0,
        rank_allocator: RankBudget | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch Optimizer, got {type(optimizer).__name__}")
        if rank_allocator is not None and not isinstance(rank_allocator, RankBudget):
            raise TypeError(
                "rank_allocator must have update_and_allocate(step), state_dict() and "
                f"load_state_dict(), got {type(rank_allocator).__name__}"
            )
        self.optimizer = optimizer
        self.rank_allocator = rank_allocator
        self._configure(
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            schedule=schedule,
            min_lr_ratio=min_lr_ratio,
            warmup_start_ratio=warmup_start_ratio,
            rho_schedule=rho_schedule,
            min_rho_ratio=min_rho_ratio,
            last_step=last_step,
        )
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            if "sam_rho" in group:
                group.setdefault("initial_rho", group["sam_rho"])
        self.base_lrs: list[float] = [float(g["initial_lr"]) for g in optimizer.param_groups]
        self.base_rhos: list[float | None] = [
            float(g["initial_rho"]) if "initial_rho" in g else None for g in optimizer.param_groups
        ]
        self._apply()

    def _configure(
        self,
        *,
        warmup_steps: int,
        total_steps: int,
        schedule: Schedule | str,
        min_lr_ratio: float,
        warmup_start_ratio: float,
        rho_schedule: RhoSchedule | str,
        min_rho_ratio: float,
        last_step: int,
    ) -> None:
        self.total_steps = _count("total_steps", total_steps)
        if self.total_steps == 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps!r}")
        self.warmup_steps = _count("warmup_steps", warmup_steps)
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps!r}) must not exceed total_steps ({total_steps!r})"
            )
        self.schedule: Schedule = _enum(Schedule, schedule, "schedule")
        self.rho_schedule: RhoSchedule = _enum(RhoSchedule, rho_schedule, "rho_schedule")
        self.min_lr_ratio = _ratio("min_lr_ratio", min_lr_ratio)
        self.warmup_start_ratio = _ratio("warmup_start_ratio", warmup_start_ratio)
        self.min_rho_ratio = _ratio("min_rho_ratio", min_rho_ratio)
        self.last_step = _count("last_step", last_step)

    # -- closed forms -----------------------------------------------------------------------
    def factor(self, step: int) -> float:
        """The learning-rate multiplier ``f(step)``."""
        t = _count("step", step)
        w, total = self.warmup_steps, self.total_steps
        if t < w:
            s = self.warmup_start_ratio
            return s + (1.0 - s) * t / w
        if self.schedule is Schedule.CONSTANT:
            return 1.0
        p = min(1.0, (t - w) / (total - w)) if total > w else 1.0
        r = self.min_lr_ratio
        if self.schedule is Schedule.COSINE:
            return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))
        return r + (1.0 - r) * (1.0 - p)

    def lr_at(self, step: int) -> list[float]:
        """Every group's learning rate at ``step``."""
        f = self.factor(step)
        return [base * f for base in self.base_lrs]

    def rho_at(self, step: int) -> list[float | None]:
        """Every group's ρ at ``step`` (``None`` for groups without SAM)."""
        if self.rho_schedule is RhoSchedule.CONSTANT:
            mult = 1.0
        else:
            q = self.min_rho_ratio
            mult = q + (1.0 - q) * self.factor(step)
        return [None if rho is None else rho * mult for rho in self.base_rhos]

    # -- driving ----------------------------------------------------------------------------
    def step(self, step: int | None = None) -> None:
        """Advance by one step, or set the step count to ``step``, and apply the values.

        With a ``rank_allocator``, first allocate the budget of the optimiser step just taken
        (number ``last_step``, from its gradients); the count then only advances by one."""
        new = self.last_step + 1 if step is None else _count("step", step)
        if self.rank_allocator is not None:
            if new != self.last_step + 1:
                raise ValueError(
                    f"step({step!r}) from step {self.last_step}: a scheduler with a rank "
                    "allocator advances one optimiser step at a time (it reads each step's "
                    "gradients); call step() once after every optimizer.step()"
                )
            self.rank_allocator.update_and_allocate(self.last_step)
        self.last_step = new
        self._apply()

    def _apply(self) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.base_lrs):
            raise ValueError(
                f"the optimizer has {len(groups)} parameter groups, the scheduler "
                f"{len(self.base_lrs)}"
            )
        for group, lr, rho in zip(groups, self.lr_at(self.last_step), self.rho_at(self.last_step)):
            group["lr"] = lr
            if rho is not None:
                group["sam_rho"] = rho

    def get_last_lr(self) -> list[float]:
        """The learning rates applied at the current step (as torch schedulers name it)."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Settings, base values and the step count: all that defines the values (and the rank
        allocator's state, under ``"rank_allocator"``, when there is one)."""
        state: dict[str, Any] = {
            "last_step": self.last_step,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "schedule": self.schedule.value,
            "min_lr_ratio": self.min_lr_ratio,
            "warmup_start_ratio": self.warmup_start_ratio,
            "rho_schedule": self.rho_schedule.value,
            "min_rho_ratio": self.min_rho_ratio,
            "base_lrs": list(self.base_lrs),
            "base_rhos": list(self.base_rhos),
        }
        if self.rank_allocator is not None:
            state["rank_allocator"] = self.rank_allocator.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` and apply its values to the optimiser."""
        expected = set(self.state_dict())
        unknown, missing = set(state_dict) - expected, expected - set(state_dict)
        if unknown or missing:
            raise ValueError(
                f"not a MoRAScheduler state: unknown keys {sorted(unknown)}, "
                f"missing keys {sorted(missing)}"
            )
        if len(state_dict["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(
                f"the state has {len(state_dict['base_lrs'])} groups, the optimizer "
                f"{len(self.optimizer.param_groups)}"
            )
        if self.rank_allocator is not None:  # checks its whole state before changing any
            self.rank_allocator.load_state_dict(state_dict["rank_allocator"])
        self._configure(
            warmup_steps=state_dict["warmup_steps"],
            total_steps=state_dict["total_steps"],
            schedule=state_dict["schedule"],
            min_lr_ratio=state_dict["min_lr_ratio"],
            warmup_start_ratio=state_dict["warmup_start_ratio"],
            rho_schedule=state_dict["rho_schedule"],
            min_rho_ratio=state_dict["min_rho_ratio"],
            last_step=state_dict["last_step"],
        )
        self.base_lrs = [float(v) for v in state_dict["base_lrs"]]
        self.base_rhos = [None if v is None else float(v) for v in state_dict["base_rhos"]]
        for group, lr, rho in zip(self.optimizer.param_groups, self.base_lrs, self.base_rhos):
            group["initial_lr"] = lr
            if rho is not None:
                group["initial_rho"] = rho
        self._apply()

    def __repr__(self) -> str:
        return (
            f"MoRAScheduler(step={self.last_step}, warmup_steps={self.warmup_steps}, "
            f"total_steps={self.total_steps}, schedule={self.schedule.value!r}, "
            f"rho_schedule={self.rho_schedule.value!r})"
        )
