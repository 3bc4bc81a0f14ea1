"""Guards against non-finite numbers: training stops (or skips the step, where the config
asks for it) at the first non-finite loss or gradient, and no writer lets a NaN or an
infinity reach a file.

A job names where it is (``strategy 'naive', experience 1, epoch 0, step 12``) and calls
:meth:`StepGuard.check` each step; writers call :func:`assert_finite` (tensors) and
:func:`finite_json` (JSON text) before anything touches the disk.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "NamedParams",
    "NonFiniteError",
    "OnNonFinite",
    "StepGuard",
    "assert_finite",
    "check_choice",
    "check_int",
    "check_number",
    "finite_json",
    "first_nonfinite",
    "loss_and_gradient_peak",
    "parse_on_nonfinite",
]


class NonFiniteError(ValueError):
    """A loss, gradient, tensor or number that should be finite is not; the message names
    where (job, strategy, experience, epoch, step, tensor) and the value."""


class OnNonFinite(str, Enum):
    """What training does at a non-finite loss or gradient."""

    STOP = "stop"  # raise NonFiniteError: the run stops, nothing non-finite is written
    SKIP = "skip"  # drop the step (no update), count it, and go on


def parse_on_nonfinite(value: Any, key: str) -> OnNonFinite:
    """``value`` (a member or its name) as an :class:`OnNonFinite`; else ``ValueError`` naming
    the config ``key``, the value and the choices."""
    try:
        return OnNonFinite(value)
    except ValueError:
        choices = [m.value for m in OnNonFinite]
        raise ValueError(f"{key}={value!r}; expected one of {choices}") from None


def _describe(value: Tensor) -> str:
    """``nan``, ``inf`` or ``-inf``: the first non-finite entry of ``value``."""
    bad = value.detach().reshape(-1)
    bad = bad[~torch.isfinite(bad)]
    return str(float(bad[0])) if bad.numel() else "finite"


def first_nonfinite(tensors: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """``(name, value)`` of the first tensor in ``tensors`` holding a NaN or infinity
    (integer and boolean tensors are always finite); ``None`` when all are finite."""
    for name, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        if not bool(torch.isfinite(t.detach()).all()):
            return name, _describe(t)
    return None


def assert_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` if a tensor of ``tensors`` is not finite.

    Args:
        tensors: named tensors about to be written or used.
        what: where they come from, for the message (``"checkpoint of 'naive'"``).
    """
    found = first_nonfinite(tensors)
    if found is not None:
        name, value = found
        raise NonFiniteError(
            f"{what}: tensor {name!r} holds {value}; refusing to write or use non-finite values"
        )


def finite_json(data: Any, what: str, **dumps: Any) -> str:
    """``json.dumps(data, **dumps)`` that refuses NaN and infinities, naming ``what`` and
    the first offending key path, so that a written JSON file is always valid JSON."""
    try:
        return json.dumps(data, allow_nan=False, **dumps)
    except ValueError:
        raise NonFiniteError(
            f"{what}: {_first_bad_number(data, '') or 'a value'} is not finite; refusing to "
            f"write invalid JSON"
        ) from None


def _first_bad_number(data: Any, path: str) -> str | None:
    if isinstance(data, float) and not math.isfinite(data):
        return f"{path or 'the value'}={data}"
    if isinstance(data, Mapping):
        for k, v in data.items():
            found = _first_bad_number(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    if isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            found = _first_bad_number(v, f"{path}[{i}]")
            if found:
                return found
    return None


def check_number(
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> float:
    """``value`` as a float, if it is a finite number (not a bool) within the given bounds;
    else ``ValueError`` naming ``name``, the value and the allowed range, e.g.
    ``check_number("train.lr", lr, gt=0)`` -> ``train.lr must be a finite number > 0, got nan``.
    """
    bounds = [
        f"{op} {bound:g}"
        for op, bound in ((">", gt), (">=", ge), ("<", lt), ("<=", le))
        if bound is not None
    ]
    if len(bounds) == 2 and (gt is not None or ge is not None):  # an interval: [0, 1), (0, 1]
        low = f"[{ge:g}" if ge is not None else f"({gt:g}"
        high = f"{le:g}]" if le is not None else f"{lt:g})"
        expected = f"a finite number in {low}, {high}"
    else:
        expected = " and ".join(["a finite number", *bounds]) if bounds else "a finite number"
        expected = expected.replace("number and ", "number ", 1)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        number = float(value) if ok else math.nan
    except OverflowError:  # an int beyond float's range
        number = math.nan
    ok = ok and math.isfinite(number)
    ok = ok and (gt is None or number > gt) and (ge is None or number >= ge)
    ok = ok and (lt is None or number < lt) and (le is None or number <= le)
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


E = TypeVar("E", bound=Enum)


def check_choice(what: str, value: Any, choices: type[E]) -> E:
    """``value`` (a member of ``choices`` or its value) as that member; else ``ValueError``
    naming ``what``, the value and the choices (``unknown MoRA compression 'zip'; expected
    one of ['sharing', ...]``)."""
    try:
        return choices(value)
    except ValueError:
        expected = [m.value for m in choices]
        raise ValueError(f"unknown {what} {value!r}; expected one of {expected}") from None


def check_int(
    name: str, value: Any, *, gt: int | None = None, ge: int | None = None, le: int | None = None
) -> int:
    """``value`` if it is an integer (not a bool) within the given bounds; else ``ValueError``
    naming ``name``, the value and the allowed range (``train.epochs must be > 0, got 0``;
    ``train.epochs must be an integer > 0, got 'many'``)."""
    if ge is not None and le is not None:
        bounds = f"in [{ge}, {le}]"
    else:
        parts = [f"{op} {b}" for op, b in ((">", gt), (">=", ge), ("<=", le)) if b is not None]
        bounds = " and ".join(parts)
    if isinstance(value, bool) or not isinstance(value, int):
        expected = f"an integer {bounds}" if bounds else "an integer"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if (gt is not None and value <= gt) or (ge is not None and value < ge):
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    if le is not None and value > le:
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return int(value)


# -- one check per training step ------------------------------------------------------------


def loss_and_gradient_peak(loss: Tensor, params: Iterable[Tensor]) -> tuple[float, float]:
    """``(loss, largest |gradient entry| of params)`` read back in one host sync.

    The peak is the infinity norm over every gradient: NaN if a gradient holds a NaN, ``inf``
    if one holds an infinity, and (unlike an L2 norm, which overflows float32 for entries
    above ~1e19) finite whenever all of them are. Parameters without a gradient are left out;
    with none, the peak is 0.
    """
    value = loss.detach().reshape(()).float()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return float(value), 0.0
    peak = torch.nn.utils.get_total_norm(grads, math.inf, foreach=True)
    out = torch.stack([value, peak.float().to(value.device)]).tolist()  # the one sync
    return float(out[0]), float(out[1])


NamedParams = Callable[[], Iterable[tuple[str, Tensor]]]
"""``named() -> (name, parameter) pairs``, e.g. ``model.named_parameters``."""


class StepGuard:
    """The non-finite check of a training loop: one call per step, before the update.

    ``check`` returns the loss's value when the step may go on; otherwise it raises
    :class:`NonFiniteError` (``stop``) or counts the step as skipped and returns ``None``
    (``skip``: the caller must not update). The counts survive across epochs and experiences
    (:attr:`steps`, :attr:`skipped`); :meth:`warn_skipped` warns once for a stretch of steps.

    Args:
        on_nonfinite: stop or skip.
        setting: the config key that chooses it, named in the messages
            (``"train.on_nonfinite"``).
        advice: what the error message suggests first.
    """

    def __init__(
        self,
        on_nonfinite: OnNonFinite | str = OnNonFinite.STOP,
        *,
        setting: str = "train.on_nonfinite",
        advice: str = "lower the learning rate",
    ) -> None:
        self.policy = parse_on_nonfinite(on_nonfinite, "on_nonfinite")
        self.setting = setting
        self.advice = advice
        self.steps = 0  # steps checked (taken or skipped)
        self.skipped = 0  # steps skipped
        self.last_skip = ""  # what the last skipped step saw, for the warning

    def check(
        self,
        loss: Tensor,
        params: Sequence[Tensor],
        where: str | Callable[[], str],
        named: NamedParams | None = None,
    ) -> float | None:
        """Check ``loss`` and the gradients of ``params`` (one host sync).

        Args:
            loss: the full loss of the step (after every penalty was added).
            params: the parameters about to be updated.
            where: the step, for the message (a callable is called only on failure):
                ``"moracl run: strategy 'naive', experience 1, epoch 0, step 12"``.
            named: ``(name, parameter)`` pairs, read on failure to name the parameter with a
                non-finite gradient, and to tell whether a parameter itself is no longer
                finite (an earlier update diverged): then the step is never skipped, since
                skipping cannot repair the parameters.

        Returns:
            The loss's value, or ``None`` for a skipped step.

        Raises:
            NonFiniteError: a non-finite value under ``stop``.
        """
        self.steps += 1
        value, peak = loss_and_gradient_peak(loss, params)
        if math.isfinite(value) and math.isfinite(peak):
            return value
        place = where() if callable(where) else where
        if not math.isfinite(value):
            what = f"the training loss is {value}"
        else:
            found = None
            if named is not None:
                grads = {n: p.grad for n, p in named() if p.grad is not None}
                found = first_nonfinite(grads)
            what = (
                f"the loss is {value:.6g} but the gradient of {found[0]!r} holds {found[1]}"
                if found
                else f"the loss is {value:.6g} but a gradient holds {peak}"
            )
        broken = first_nonfinite(dict(named())) if named is not None else None
        if broken is not None:  # an earlier update diverged: skipping cannot undo it
            raise NonFiniteError(
                f"{place}: {what}, and the parameter {broken[0]!r} already holds {broken[1]}: "
                f"an earlier update diverged ({self.advice}; skipping steps cannot undo it)"
            )
        if self.policy is OnNonFinite.STOP:
            raise NonFiniteError(
                f"{place}: {what}; training diverged ({self.advice}, or set "
                f"{self.setting}=skip to drop such steps)"
            )
        self.skipped += 1
        self.last_skip = f"{place}: {what}"
        return None

    def warn_skipped(self, since: int, steps: int, where: str) -> None:
        """Warn once if steps were skipped since the count was ``since`` (``steps`` steps)."""
        n = self.skipped - since
        if n > 0:
            warnings.warn(
                f"{where}: skipped {n} of {steps} steps with a non-finite loss or gradient "
                f"({self.setting}=skip); the last: {self.last_skip}",
                RuntimeWarning,
                stacklevel=2,
            )
