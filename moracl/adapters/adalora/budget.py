"""The rank budget of AdaLoRA: importance of every singular triplet, a falling global budget,
and the mask keeping the most important triplets across all layers and experts.

A triplet is one ``(layer, k)`` of a single adapter, or one ``(layer, expert, k)`` of an
expert bank (:class:`~moracl.adapters.adalora.AdaLoRABank`): each expert of a bank is in the
budget as one more adapter would be.  With ``t`` the step just taken (0 for the first
optimiser step), ``T`` the total steps, ``u`` the number of adapters (each expert of a bank
counting as one), ``b₀`` their triplets (``Σ r``) the initial and ``b_T = target_rank × u`` the
final budget:

    b(t) = b₀                                                 t <= tinit
    b(t) = ⌊(b₀ − b_T) (1 − (t − tinit) / (T − tfinal − tinit))³ + b_T⌋   tinit < t <= T − tfinal
    b(t) = b_T                                                t > T − tfinal

Each step before ``T − tfinal`` updates, for every entry ``w`` of ``A``, ``E`` and ``B``, the
sensitivity ``I = |w · ∂L/∂w|``, its EMA ``Ī ← β₁ Ī + (1 − β₁) I`` and the uncertainty
``Ū ← β₂ Ū + (1 − β₂) |I − Ī|``.  A triplet's score is ``S = s(E_k) + mean_i s(A_k,i) +
mean_o s(B_o,k)`` with ``s = Ī · Ū``.  Every ``delta_t`` steps while the budget falls, the
triplets whose score is at most the ``(b₀ − b(t))``-th smallest over all layers (and
experts) get ``E_k = 0`` (they may grow back); at ``t = T − tfinal`` this allocation becomes
final: it sets each layer's ``rank_mask`` (each expert's row of a bank's) and is enforced at
every later step.  All of it is PEFT's ``RankAllocator`` / ``AdaLoraModel.update_and_allocate``,
step for step; a bank's experts are scored and masked exactly as separate adapters would be.
Only modules whose singular values train are in the budget: frozen experts (earlier
experiences' in a continual run) keep their ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moracl.adapters.adalora.bank import AdaLoRABank
from moracl.adapters.adalora.config import AdaLoRAConfig
from moracl.adapters.adalora.module import AdaLoRA, rank_budget_modules
from moracl.guard import check_int

__all__ = ["RankAllocator"]

_FACTORS = ("lora_A", "lora_E", "lora_B")


class RankAllocator:
    """Allocates AdaLoRA's rank budget over the trained AdaLoRA adapters and expert banks of
    ``model`` (:func:`~moracl.adapters.adalora.rank_budget_modules`).

    Call :meth:`update_and_allocate` once per optimiser step, after ``optimizer.step()`` and
    before the gradients are cleared: it reads each parameter's new value and the gradient
    that produced it.  :class:`~moracl.optim.MoRAScheduler` does this for you when given the
    allocator (``MoRAScheduler(opt, total_steps=T, rank_allocator=allocator)``; then
    ``loss.backward(); opt.step(); scheduler.step(); opt.zero_grad()``).

    Args:
        model: the model holding the adapters (a ``MoRAModel`` or any module).
        total_steps: ``T``, the optimiser steps of the whole run (default: the adapters'
            ``total_step``).
        adapter_name: only adapters of this name (``....adapters.<name>``); default: every
            AdaLoRA adapter and expert bank whose parameters train, which must then share one
            budget schedule.

    Attributes:
        adapters: the allocated modules by path (an :class:`AdaLoRA` or an
            :class:`AdaLoRABank`).
        rank_pattern: the last allocation, per path the kept flags of each triplet (a list
            for an adapter, one list per expert for a bank); ``None`` before the first.
    """

    def __init__(
        self, model: nn.Module, *, total_steps: int | None = None, adapter_name: str | None = None
    ):
        found = rank_budget_modules(model)
        if adapter_name is not None:
            found = {p: m for p, m in found.items() if p.rsplit(".", 1)[-1] == adapter_name}
        if not found:
            which = "" if adapter_name is None else f" named {adapter_name!r}"
            raise ValueError(
                f"the model has no trained adalora adapter{which} (nor adalora experts) to allocate"
            )
        configs = {_schedule_of(m.config) for m in found.values()}
        if len(configs) > 1:
            raise ValueError(
                "the model's adalora adapters have different budget settings; pick one with "
                "adapter_name="
            )
        self.adapters: dict[str, AdaLoRA | AdaLoRABank] = dict(sorted(found.items()))
        self.config: AdaLoRAConfig = next(iter(self.adapters.values())).config
        if total_steps is None:
            total_steps = self.config.total_step
            if total_steps is None:
                raise ValueError(
                    "RankAllocator needs the run's length: give total_steps=, or set "
                    "total_step in the adalora adapter config"
                )
        self.total_steps = check_int("total_steps", total_steps, gt=0)
        cfg = self.config
        if cfg.tinit >= self.total_steps - cfg.tfinal:
            raise ValueError(
                f"the budget schedule leaves no step to reduce the rank: tinit={cfg.tinit} must "
                f"be < total_steps - tfinal = {self.total_steps} - {cfg.tfinal}; lower "
                "tinit or tfinal, or train longer"
            )
        self.init_budget = sum(m.rank_mask.numel() for m in self.adapters.values())
        self.target_budget = cfg.target_rank * sum(_units(m) for m in self.adapters.values())
        self.exp_avg_ipt: dict[str, Tensor] = {}
        self.exp_avg_unc: dict[str, Tensor] = {}
        self.rank_pattern: dict[str, list[Any]] | None = None
        self.budget = self.init_budget

    # -- the schedule --------------------------------------------------------------------
    @property
    def final_step(self) -> int:
        """``T − tfinal``: the step whose allocation becomes final."""
        return self.total_steps - self.config.tfinal

    def budget_at(self, step: int) -> tuple[int, bool]:
        """``(b(step), whether step reallocates)`` (PEFT's ``budget_schedule``)."""
        t = check_int("step", step, ge=0)
        tinit, final = self.config.tinit, self.final_step
        if t <= tinit:
            return self.init_budget, False
        if t > final:
            return self.target_budget, True
        mul = 1 - (t - tinit) / (final - tinit)
        budget = int((self.init_budget - self.target_budget) * (mul**3) + self.target_budget)
        return budget, t % self.config.delta_t == 0

    # -- one step ------------------------------------------------------------------------
    def update_and_allocate(self, step: int) -> int:
        """Update the importance with this step's gradients and reallocate when due; returns
        the budget ``b(step)``.  ``step`` is the optimiser step just taken (0 first)."""
        t = check_int("step", step, ge=0)
        if t < self.final_step:
            self._update_importance(t)
            budget, due = self.budget_at(t)
            if due:
                self.rank_pattern = self._mask_to_budget(budget)
        elif t == self.final_step:
            budget = self.target_budget
            self._allocate_final()
        else:
            budget = self.target_budget
            for adapter in self.adapters.values():
                adapter.zero_triplets(adapter.rank_mask)
        self.budget = budget
        return budget

    @property
    def finished(self) -> bool:
        """Whether the final allocation is made (the masks are set)."""
        return self.rank_pattern is not None and not self.exp_avg_ipt

    def finalize(self) -> bool:
        """Make the final allocation now, from the importance recorded so far, unless it is
        made already: for a run that ends before step ``T − tfinal`` (early stopping,
        skipped steps).  Returns whether the masks are set; ``False`` when no step recorded
        any importance (the masks then keep every triplet)."""
        if not self.finished and self.exp_avg_ipt:
            self._allocate_final()
            self.budget = self.target_budget
        return self.finished

    @torch.no_grad()
    def _allocate_final(self) -> None:
        self.rank_pattern = self._mask_to_budget(self.target_budget)
        for path, adapter in self.adapters.items():
            adapter.rank_mask.copy_(torch.tensor(self.rank_pattern[path]))
        self.exp_avg_ipt, self.exp_avg_unc = {}, {}

    def kept(self) -> dict[str, int]:
        """Per module path, the triplets whose singular value is not zero (all experts of a
        bank together; :meth:`kept_per_expert` splits them)."""
        return {p: int((m.singular_values() != 0).sum()) for p, m in self.adapters.items()}

    def kept_per_expert(self) -> dict[str, list[int]]:
        """Per module path, each expert's triplets whose singular value is not zero (one
        entry for a single adapter)."""
        return {
            p: (m.singular_values() != 0).reshape(-1, m.rank_mask.shape[-1]).sum(1).tolist()
            for p, m in self.adapters.items()
        }

    @torch.no_grad()
    def _update_importance(self, step: int) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        keys, params, grads = [], [], []
        for path, adapter in self.adapters.items():
            for name in _FACTORS:
                p = getattr(adapter, name)
                if p.grad is None:
                    raise ValueError(
                        f"step {step}: {path}.{name} has no gradient; the rank allocator reads "
                        "each step's gradients, so step it after optimizer.step() and before "
                        "optimizer.zero_grad()"
                    )
                keys.append(f"{path}.{name}")
                params.append(p.detach())
                grads.append(p.grad)
        for ema in (self.exp_avg_ipt, self.exp_avg_unc):  # zero before the first step
            for k, p in zip(keys, params, strict=True):
                if k not in ema:
                    ema[k] = torch.zeros_like(p)
        avg = [self.exp_avg_ipt[k] for k in keys]
        unc = [self.exp_avg_unc[k] for k in keys]
        # every entry of every factor at once, rounding as b1 * avg + (1 - b1) * ipt does
        ipt = torch._foreach_mul(params, grads)
        torch._foreach_abs_(ipt)  # I = |w · ∂L/∂w|
        torch._foreach_mul_(avg, b1)
        torch._foreach_add_(avg, torch._foreach_mul(ipt, 1 - b1))  # Ī ← β₁ Ī + (1 − β₁) I
        torch._foreach_sub_(ipt, avg)
        torch._foreach_abs_(ipt)  # |I − Ī|
        torch._foreach_mul_(unc, b2)
        torch._foreach_mul_(ipt, 1 - b2)
        torch._foreach_add_(unc, ipt)  # Ū ← β₂ Ū + (1 − β₂) |I − Ī|

    def _score(self, path: str, name: str) -> Tensor:
        key = f"{path}.{name}"
        if key not in self.exp_avg_ipt:
            raise ValueError(
                f"no importance recorded for {key} yet: the allocation at step tinit + 1 needs "
                "the importance of the steps before it"
            )
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> dict[str, list[Any]]:
        """Zero the triplets scoring at most the ``(b₀ − budget)``-th smallest score; returns
        each module's kept triplets (``(r,)`` of an adapter, ``(e, r)`` of a bank, as lists)."""
        scores: dict[str, Tensor] = {}
        for path in self.adapters:
            # an adapter: A (r, i), B (o, r), E (r, 1); a bank: A (e, r, i), B (o, e, r),
            # E (e, r, 1); either way the scores have rank_mask's shape, (r,) or (e, r)
            s_a = self._score(path, "lora_A").mean(dim=-1)  # (..., r, i) -> (..., r)
            s_b = self._score(path, "lora_B").mean(dim=0)  # (o, ..., r) -> (..., r)
            s_e = self._score(path, "lora_E")[..., 0]  # (..., r, 1) -> (..., r)
            scores[path] = s_e + (s_a + s_b)
        drop = self.init_budget - budget
        if drop <= 0:
            return {p: torch.ones_like(s, dtype=torch.bool).tolist() for p, s in scores.items()}
        flat = torch.cat([s.flatten() for s in scores.values()])  # (b₀,)
        threshold = torch.kthvalue(flat, k=drop)[0]  # a tensor: no wait for the device
        keeps = {path: ~(s <= threshold) for path, s in scores.items()}  # rank_mask's shapes
        for path, adapter in self.adapters.items():
            adapter.zero_triplets(keeps[path])
        return _as_lists(keeps)  # one copy to the host for every module

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The importance EMAs, the last allocation and each module's final mask."""
        return {
            "total_steps": self.total_steps,
            "budget": self.budget,
            "exp_avg_ipt": {k: v.clone() for k, v in self.exp_avg_ipt.items()},
            "exp_avg_unc": {k: v.clone() for k, v in self.exp_avg_unc.items()},
            "rank_pattern": None
            if self.rank_pattern is None
            else {k: list(v) for k, v in self.rank_pattern.items()},
            "masks": {p: m.rank_mask.clone() for p, m in self.adapters.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (masks included) onto the same adapters."""
        expected = set(self.state_dict())
        unknown, missing = set(state_dict) - expected, expected - set(state_dict)
        if unknown or missing:
            raise ValueError(
                f"not a RankAllocator state: unknown keys {sorted(unknown)}, missing keys "
                f"{sorted(missing)}"
            )
        masks = state_dict["masks"]
        if set(masks) != set(self.adapters):
            raise ValueError(
                f"the state's adapters {sorted(masks)[:3]}... are not this allocator's "
                f"{sorted(self.adapters)[:3]}..."
            )
        for path, mask in masks.items():
            target = self.adapters[path].rank_mask
            if tuple(mask.shape) != tuple(target.shape):
                raise ValueError(
                    f"{path}: the state's mask has shape {tuple(mask.shape)}, the adapter's "
                    f"{tuple(target.shape)}"
                )
        self.total_steps = check_int("total_steps", state_dict["total_steps"], gt=0)
        self.budget = int(state_dict["budget"])
        self.exp_avg_ipt = {k: self._on_param(k, v) for k, v in state_dict["exp_avg_ipt"].items()}
        self.exp_avg_unc = {k: self._on_param(k, v) for k, v in state_dict["exp_avg_unc"].items()}
        pattern = state_dict["rank_pattern"]
        self.rank_pattern = None if pattern is None else {k: list(v) for k, v in pattern.items()}
        for path, mask in masks.items():
            self.adapters[path].rank_mask.copy_(mask)

    def _on_param(self, key: str, value: Tensor) -> Tensor:
        path, name = key.rsplit(".", 1)
        adapter = self.adapters.get(path)
        if adapter is None or name not in _FACTORS:
            raise ValueError(f"the state's importance {key!r} names no parameter of this model")
        p = getattr(adapter, name)
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(
                f"the state's importance {key!r} has shape {tuple(value.shape)}, the parameter "
                f"{tuple(p.shape)}"
            )
        return value.to(device=p.device, dtype=p.dtype).clone()

    def __repr__(self) -> str:
        return (
            f"RankAllocator(adapters={len(self.adapters)}, budget={self.budget}, "
            f"init_budget={self.init_budget}, target_budget={self.target_budget}, "
            f"total_steps={self.total_steps})"
        )


def _units(module: AdaLoRA | AdaLoRABank) -> int:
    """How many adapters ``module`` counts as in the budget: 1, or a bank's experts."""
    return module.rank_mask.numel() // module.rank_mask.shape[-1]


def _as_lists(tensors: dict[str, Tensor]) -> dict[str, list[Any]]:
    """Each tensor as nested lists, copied to the host together."""
    flat = torch.cat([t.flatten() for t in tensors.values()]).tolist()
    out: dict[str, list[Any]] = {}
    start = 0
    for key, t in tensors.items():
        part = flat[start : start + t.numel()]
        start += t.numel()
        if t.dim() == 2:  # a bank's (e, r): one list per expert
            part = [part[i : i + t.shape[1]] for i in range(0, len(part), t.shape[1])]
        out[key] = part
    return out


def _schedule_of(config: AdaLoRAConfig) -> tuple[Any, ...]:
    """The settings of ``config`` that the allocator reads (one value per run)."""
    return (
        config.target_rank,
        config.beta1,
        config.beta2,
        config.tinit,
        config.tfinal,
        config.delta_t,
        config.total_step,
    )
