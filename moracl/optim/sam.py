"""SAM and ASAM as a wrapper over any optimiser (Foret et al., 2021; Kwon et al., 2021).

One SAM step at weights ``w`` with gradient ``g = ∇L(w)``:

    ε = ρ · g / ‖g‖                       (SAM; ‖·‖ over *all* parameters of all groups)
    ε = ρ · T²g / ‖T g‖,  T = |w| + η     (ASAM, ``adaptive=True``; element-wise)
    g' = ∇L(w + ε);   w ← base_step(w, g')  (from the original ``w``)

Two ways to drive it:

* ``loss = sam.step(closure)``: ``closure()`` runs forward and ``backward()`` and returns the
  loss; ``step`` zeroes the gradients before each of its two calls and returns the loss of the
  first.  With ``model=`` given, the first pass runs inside ``model.no_sync()`` when the model
  has it (DDP: each rank perturbs with its local gradient and the gradients are all-reduced
  once, in the second pass), and the second pass runs with BatchNorm running statistics frozen
  (:func:`disable_running_stats`), so they are updated by the first pass only.
* ``first_step()`` after the first backward, then the second forward/backward, then
  ``second_step()``; use ``model.no_sync()`` and :func:`disable_running_stats` yourself.

Mixed precision: under bf16 autocast nothing special is needed (parameters and gradients stay in
their own dtype; norms accumulate in float32).  With fp16 and a ``GradScaler`` pass it as
``grad_scaler=``: the first step unscales the gradients (recorded for this wrapper) and, if any is
inf/NaN, does not perturb and marks the step skipped; the second step restores the weights and
calls ``grad_scaler.step(base_optimizer)``, which unscales the second gradients and skips the
update on inf/NaN.  Call ``grad_scaler.update()`` afterwards as usual.

Per-group options: ``sam_rho`` (ρ), ``sam_adaptive``, ``sam_eta`` (η) — a scheduler may change
``sam_rho`` between steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.amp import GradScaler
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from moracl.optim._foreach import buckets, check_nonneg, norms
from moracl.optim.wrapper import OptimizerWrapper

__all__ = ["SAM", "SAMConfig", "disable_running_stats"]

_NORM_EPS = 1e-12


@dataclass(frozen=True)
class SAMConfig:
    """Sharpness-aware minimisation settings.

    Args:
        rho: neighbourhood radius ρ (>= 0); ASAM typically wants a larger one (0.5–2).
        adaptive: ASAM's element-wise scaling ``T = |w| + η``.
        eta: ASAM's η (>= 0); with 0 a zero-initialised tensor is not perturbed.
    """

    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.0

    def __post_init__(self) -> None:
        check_nonneg("rho", self.rho)
        check_nonneg("eta", self.eta)


@contextlib.contextmanager
def disable_running_stats(module: nn.Module) -> Iterator[None]:
    """Forward passes inside leave BatchNorm running statistics (and their counter) unchanged.

    Batch statistics are still used for normalisation in training mode, exactly as in a normal
    training forward; only the buffer update is skipped.
    """
    frozen = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True


@dataclass
class _Bucket:
    """Parameters of one device and dtype, across groups, with their SAM settings."""

    params: list[Tensor]
    grads: list[Tensor]
    rhos: list[float]  # ρ of each tensor's group
    adaptive: list[int]  # indices of tensors in ASAM groups
    t: list[Tensor] | None  # ASAM's T for those tensors


class SAM(OptimizerWrapper):
    """Sharpness-aware minimisation over ``base_optimizer`` (sharing its ``param_groups``).

    Args:
        base_optimizer: the optimiser taking the step from the original weights.
        rho, adaptive, eta: see :class:`SAMConfig`; stored per group as ``sam_rho``,
            ``sam_adaptive``, ``sam_eta``.
        model: the module the closure runs, for ``no_sync`` (DDP) in the first pass and frozen
            BatchNorm statistics in the second; only used by :meth:`step`.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        model: nn.Module | None = None,
    ) -> None:
        config = SAMConfig(rho=rho, adaptive=adaptive, eta=eta)
        defaults = {"sam_rho": config.rho, "sam_adaptive": config.adaptive, "sam_eta": config.eta}
        super().__init__(base_optimizer, defaults)
        self.model = model
        self._backup: dict[Tensor, Tensor] = {}
        self._perturbed: list[Tensor] = []
        self._pending = False  # first_step done, second_step not yet
        self._skip = False  # the first pass had inf/NaN gradients

    def check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("rho", group["sam_rho"])
        check_nonneg("eta", group["sam_eta"])

    # -- the two steps ------------------------------------------------------------------
    def _buckets(self) -> list[_Bucket]:
        """Every parameter with a gradient, across groups, bucketed by device and dtype."""
        params: list[Tensor] = []
        owners: list[dict[str, Any]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    owners.append(group)
        out = []
        for idx in buckets(params):
            ps = [params[i] for i in idx]
            groups = [owners[i] for i in idx]
            adaptive = [j for j, g in enumerate(groups) if g["sam_adaptive"]]
            t = None
            if adaptive:  # ASAM's T = |w| + η, for the adaptive groups' tensors
                t = list(torch._foreach_abs([ps[j] for j in adaptive]))
                etas = [float(groups[j]["sam_eta"]) for j in adaptive]
                if any(etas):
                    torch._foreach_add_(t, etas)
            out.append(
                _Bucket(
                    params=ps,
                    grads=[p.grad for p in ps if p.grad is not None],
                    rhos=[float(g["sam_rho"]) for g in groups],
                    adaptive=adaptive,
                    t=t,
                )
            )
        return out

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True, *, grad_scaler: GradScaler | None = None) -> bool:
        """Move to ``w + ε``; returns ``False`` (no move, step to be skipped) on inf/NaN.

        The inf/NaN check runs only with an enabled ``grad_scaler`` (it reads one value back
        from the device); without one, gradients are used as they are.
        """
        if self._pending:
            raise RuntimeError("first_step() called twice; call second_step() in between")
        scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        if scaler is not None:
            scaler.unscale_(self)
        self._pending, self._skip, self._perturbed = True, False, []
        parts = self._buckets()
        if not parts:
            return True
        # one global norm of g (SAM) or T g (ASAM) over all groups: a few ops per bucket
        squares = []
        for part in parts:
            tg = list(part.grads)
            if part.t is not None:
                scaled = torch._foreach_mul(part.t, [tg[j] for j in part.adaptive])
                for j, v in zip(part.adaptive, scaled):
                    tg[j] = v
            squares.append(norms(tg).square().sum())
        first = parts[0].params[0]
        dtype = torch.promote_types(torch.float32, first.dtype)
        norm = torch.stack([q.to(first.device, dtype) for q in squares]).sum().sqrt()
        if scaler is not None and not bool(torch.isfinite(norm)):
            self._skip = True
            if zero_grad:
                self.zero_grad()
            return False

        inv_norm = 1.0 / (norm + _NORM_EPS)
        # On the CPU reading the norm back is free and Python scalars skip a broadcast per
        # tensor; on an accelerator it stays a 0-d tensor so the step never waits.
        inv_host = float(inv_norm) if inv_norm.device.type == "cpu" else None
        for part in parts:
            ps = part.params
            backup = [self._backup_of(p) for p in ps]
            torch._foreach_copy_(backup, ps)
            if inv_host is not None and part.t is None and len(set(part.rhos)) == 1:
                torch._foreach_add_(ps, part.grads, alpha=part.rhos[0] * inv_host)  # ρ g / ‖g‖
                self._perturbed.extend(ps)
                continue
            if inv_host is not None:
                e = list(torch._foreach_mul(part.grads, [r * inv_host for r in part.rhos]))
            else:
                e = list(torch._foreach_mul(part.grads, inv_norm.to(ps[0].device)))
                torch._foreach_mul_(e, part.rhos)  # ρ g / ‖g‖, ρ of each tensor's group
            if part.t is not None:  # ASAM: ρ T² g / ‖T g‖
                t2 = list(torch._foreach_mul(part.t, part.t))
                torch._foreach_mul_(t2, [e[j] for j in part.adaptive])
                for j, v in zip(part.adaptive, t2):
                    e[j] = v
            torch._foreach_add_(ps, e)
            self._perturbed.extend(ps)
        if zero_grad:
            self.zero_grad()
        return True

    def _backup_of(self, p: Tensor) -> Tensor:
        buf = self._backup.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._backup[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return buf

    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = False, *, grad_scaler: GradScaler | None = None
    ) -> bool:
        """Restore ``w`` and let the base optimiser step with the gradient taken at ``w + ε``.

        Returns ``False`` when the step was skipped because the first pass had inf/NaN
        gradients (a skip caused by the second pass is decided inside ``grad_scaler.step``).
        """
        if not self._pending:
            raise RuntimeError("second_step() needs a first_step() before it")
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, [self._backup[p] for p in self._perturbed])
        self._perturbed = []
        self._pending = False
        stepped = not self._skip
        self._skip = False
        if stepped:
            if grad_scaler is not None and grad_scaler.is_enabled():
                grad_scaler.step(self.base_optimizer)
            else:
                self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()
        return stepped

    # -- the closure API ----------------------------------------------------------------
    def first_pass(self) -> contextlib.AbstractContextManager[Any]:
        """``model.no_sync()`` if the model has it (DDP), else a no-op context."""
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if callable(no_sync) else contextlib.nullcontext()

    def second_pass(self) -> contextlib.AbstractContextManager[Any]:
        """BatchNorm running statistics frozen for the model, if one was given."""
        if self.model is None:
            return contextlib.nullcontext()
        return disable_running_stats(self.model)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        grad_scaler: GradScaler | None = None,
    ) -> Tensor:
        """Both passes: ``closure`` computes the loss and calls ``backward()`` (see the module).

        Returns the loss of the first pass (at the original weights).
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that computes the loss and calls backward(); "
                "or call first_step() and second_step() around your own passes"
            )
        run = torch.enable_grad()(closure)
        self.zero_grad()
        with self.first_pass():
            loss = run()
        if self.first_step(zero_grad=True, grad_scaler=grad_scaler):
            with self.second_pass():
                run()
        self.second_step(grad_scaler=grad_scaler)
        return loss
