"""DER++ (Buzzega et al. 2020, "Dark Experience for General Continual Learning: a Strong,
Simple Baseline", NeurIPS; as Mammoth's ``models/derpp.py`` implements it): a reservoir buffer
of training rows with the logits the model gave them when they were stored, replayed with two
terms added to each step's loss,

    loss = CE(f(x), y) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y''),

where ``(x', z')`` and ``(x'', y'')`` are two mini-batches drawn independently from the buffer.

Shape legend: ``b`` rows, ``c`` the stream's classes (the classifier's global columns),
``m`` buffer rows.

The classifier masks columns it must not predict (classes not seen yet, other tasks' classes)
with the lowest float. Those columns of a stored row are not targets: the buffer keeps, per
row, which columns were real logits (``valid``) and stores zeros elsewhere, and the MSE is the
mean over the valid entries only, so the lowest float never enters the loss (a column masked
at storage time and predicted since would otherwise give an infinite loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch import Tensor

from moracl.continual.batches import derive_seed
from moracl.continual.stateful import PluginState

__all__ = ["DERBuffer", "DERPlusPlusPlugin", "masked_logit_mse", "valid_logits"]

#: the tensors of a buffer, in its state and checkpoint (``plugins.derpp.<name>``)
_FIELDS = ("x", "y", "logits", "valid", "t")


def valid_logits(logits: Tensor) -> Tensor:
    """``(b, c)`` bool: the entries of ``logits (b, c)`` that are real logits (finite, not
    the lowest float a classifier masks columns with)."""
    return torch.isfinite(logits) & (logits > torch.finfo(logits.dtype).min)


def masked_logit_mse(out: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """The mean of ``(out - target) ** 2`` over the ``valid (b, c)`` entries of ``out (b, c)``
    and ``target (b, c)`` (a scalar; 0 without valid entries). Invalid entries contribute
    neither a value nor a gradient, whatever they hold (the lowest float, infinities)."""
    dtype = torch.promote_types(out.dtype, torch.float32)  # at least float32
    diff = torch.where(valid, out.to(dtype) - target.to(dtype), 0.0)  # (b, c)
    return diff.pow(2).sum() / valid.sum().clamp_min(1)


class DERBuffer:
    """A reservoir buffer of ``size`` rows (Vitter's algorithm R, as Mammoth's ``reservoir``):
    the ``k``-th row offered (0-based) takes a free slot while there is one, else replaces
    slot ``j ~ U{0..k}`` when ``j < size``; so after ``n`` rows each is held with probability
    ``size / n``. Draws come from the generator passed in.

    Holds, per row, the input ``x (m, ...)``, label ``y (m,)``, the logits stored with it
    ``logits (m, c)`` (zeros where not ``valid``), ``valid (m, c)`` and task label ``t (m,)``;
    storage is allocated, on the device of the first rows offered, when they arrive (their
    shapes are the buffer's).

    Args:
        size: rows held (> 0).
    """

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"DER++ buffer size={size!r}; expected an integer > 0")
        self.size = size
        self.seen = 0  # rows offered so far
        self.filled = 0  # rows held
        self.tensors: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return self.filled

    def slots(self, n: int, generator: torch.Generator) -> list[tuple[int, int]]:
        """``(slot, row)`` for the rows of the next ``n`` offered that the reservoir keeps,
        one per slot (a later row replacing an earlier one of the same batch wins); advances
        :attr:`seen`."""
        kept: dict[int, int] = {}
        for row in range(n):
            if self.seen < self.size:
                kept[self.seen] = row
            else:
                j = int(torch.randint(self.seen + 1, (1,), generator=generator))
                if j < self.size:
                    kept[j] = row
            self.seen += 1
        return list(kept.items())

    def add(
        self, x: Tensor, y: Tensor, logits: Tensor, t: Tensor, generator: torch.Generator
    ) -> None:
        """Offer rows ``x (b, ...)``, ``y (b,)``, ``logits (b, c)`` (as the model gave them:
        masked columns at the lowest float) and ``t (b,)`` to the reservoir."""
        valid = valid_logits(logits)  # (b, c)
        rows = {
            "x": x,
            "y": y.long(),
            "logits": torch.where(valid, logits, 0.0),
            "valid": valid,
            "t": t.long(),
        }
        if not self.tensors:
            self.tensors = {
                k: v.new_zeros((self.size, *v.shape[1:])).detach() for k, v in rows.items()
            }
        for k, v in rows.items():
            held = self.tensors[k]
            if v.shape[1:] != held.shape[1:]:
                raise ValueError(
                    f"DER++ buffer: rows of {k} with shape {tuple(v.shape[1:])}; the buffer "
                    f"holds {tuple(held.shape[1:])} (every row of a stream must have one shape)"
                )
        pairs = self.slots(len(y), generator)
        self.filled = min(self.seen, self.size)
        if not pairs:
            return
        device = self.tensors["y"].device
        slot = torch.tensor([s for s, _ in pairs], device=device)
        row = torch.tensor([r for _, r in pairs], device=device)
        for k, v in rows.items():
            self.tensors[k][slot] = v.detach().to(device)[row]

    def sample(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``min(n, len(self))`` rows drawn without replacement (Mammoth's ``get_data``)."""
        take = torch.randperm(self.filled, generator=generator)[:n]
        take = take.to(self.tensors["y"].device)
        return {k: v[take] for k, v in self.tensors.items()}

    def state_dict(self) -> PluginState:
        """The rows held (tensors ``x``, ``y``, ``logits``, ``valid``, ``t``) and the counts
        (values ``seen``, ``filled``)."""
        tensors = {k: v[: self.filled].detach().clone() for k, v in self.tensors.items()}
        return PluginState(tensors=tensors, values={"seen": self.seen, "filled": self.filled})

    def load_state_dict(self, state: PluginState, device: torch.device | str | None) -> None:
        """Take back :meth:`state_dict`'s state, on ``device``.

        Raises:
            ValueError: counts or tensors that this buffer cannot have written.
        """
        seen, filled = state.values.get("seen"), state.values.get("filled")
        for key, value in (("seen", seen), ("filled", filled)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"derpp.{key}={value!r}; expected an integer >= 0")
        assert isinstance(seen, int) and isinstance(filled, int)
        if filled != min(seen, self.size):
            raise ValueError(
                f"derpp.filled={filled}; expected min(seen, size) = {min(seen, self.size)}"
            )
        names = set(state.tensors)
        if filled == 0 and not names:
            self.seen, self.filled, self.tensors = seen, 0, {}
            return
        if names != set(_FIELDS) or any(len(v) != filled for v in state.tensors.values()):
            raise ValueError(
                f"derpp state tensors {sorted(names)} with rows "
                f"{[len(v) for v in state.tensors.values()]}; expected {list(_FIELDS)} with "
                f"{filled} rows each"
            )
        tensors = {}
        for k in _FIELDS:
            v = state.tensors[k].to(device)
            full = v.new_zeros((self.size, *v.shape[1:]))
            full[:filled] = v
            tensors[k] = full
        self.seen, self.filled, self.tensors = seen, filled, tensors


class DERPlusPlusPlugin(SupervisedPlugin):
    """DER++ on any strategy of the lean template (see the module docstring).

    Each training step draws two buffer mini-batches of ``batch_size`` rows (the strategy's
    ``train_mb_size`` by default, as Mammoth's ``minibatch_size``), adds ``alpha`` times the
    masked logit MSE on the first and ``beta`` times the strategy's criterion on the second to
    the loss, and after the step offers the step's rows, with the logits the model gave them
    in that step's forward (before the update), to the reservoir. Every draw comes from a
    generator seeded by ``(seed, experience)``, so a run resumed between experiences with the
    checkpointed buffer repeats them.

    Defaults: ``alpha=0.1``, ``beta=0.5``, the values of Buzzega et al. 2020's best
    hyper-parameters for Seq-CIFAR-10 with a 200-row buffer (their appendix's table of
    hyper-parameters; Mammoth's ``best_args`` for ``derpp``).

    Reads ``strategy.experience``, ``strategy.mb_x``, ``strategy.mb_y``,
    ``strategy.mb_task_id``, ``strategy.mb_output``, ``strategy.model``,
    ``strategy._criterion``, ``strategy.train_mb_size``; writes ``strategy.loss``.

    Args:
        mem_size: buffer rows.
        alpha: weight of the logit-matching term (>= 0).
        beta: weight of the replayed-label term (>= 0).
        batch_size: rows per buffer mini-batch (``None``: the strategy's ``train_mb_size``).
        seed: seeds the reservoir and the buffer draws.
    """

    state_key = "derpp"

    def __init__(
        self,
        mem_size: int,
        *,
        alpha: float = 0.1,
        beta: float = 0.5,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"DER++ {name}={value!r}; expected a number >= 0")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0
        ):
            raise ValueError(f"DER++ batch_size={batch_size!r}; expected an integer > 0 or None")
        self.buffer = DERBuffer(mem_size)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.batch_size = batch_size
        self.seed = seed
        self.generator = torch.Generator().manual_seed(derive_seed(seed, "derpp", 0))

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        exp = int(strategy.experience.current_experience)
        self.generator = torch.Generator().manual_seed(derive_seed(self.seed, "derpp", exp))

    def penalty(self, strategy: Any) -> Tensor | None:
        """``alpha * MSE + beta * CE`` on two fresh buffer mini-batches (``None`` while the
        buffer is empty)."""
        if not len(self.buffer):
            return None
        n = self.batch_size or strategy.train_mb_size
        model = strategy.model
        first = self.buffer.sample(n, self.generator)
        out = avalanche_forward(model, first["x"], first["t"])  # (n, c)
        loss = self.alpha * masked_logit_mse(out, first["logits"], first["valid"])
        second = self.buffer.sample(n, self.generator)
        out = avalanche_forward(model, second["x"], second["t"])  # (n, c)
        penalty: Tensor = loss + self.beta * strategy._criterion(out, second["y"])
        return penalty

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        penalty = self.penalty(strategy)
        if penalty is not None:
            strategy.loss = strategy.loss + penalty

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        logits = strategy.mb_output.detach()
        if not bool(torch.isfinite(logits).all()):
            return  # a skipped step: its outputs are no targets
        self.buffer.add(strategy.mb_x, strategy.mb_y, logits, strategy.mb_task_id, self.generator)

    def state_dict(self) -> PluginState:
        """The buffer's rows and counts (:meth:`DERBuffer.state_dict`)."""
        return self.buffer.state_dict()

    def load_state_dict(self, state: PluginState, *, strategy: Any, trained: Sequence[Any]) -> None:
        """Take back the buffer, on the strategy's device."""
        self.buffer.load_state_dict(state, getattr(strategy, "device", None))
