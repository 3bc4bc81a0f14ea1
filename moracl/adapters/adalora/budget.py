"""The rank budget of AdaLoRA: importance of every singular triplet, a falling global budget,
and the mask keeping the most important triplets across all layers.

With ``t`` the step just taken (0 for the first optimiser step), ``T`` the total steps,
``b₀ = Σ r_layer`` the initial and ``b_T = target_rank × layers`` the final budget:

    b(t) = b₀                                                 t <= tinit
    b(t) = ⌊(b₀ − b_T) (1 − (t − tinit) / (T − tfinal − tinit))³ + b_T⌋   tinit < t <= T − tfinal
    b(t) = b_T                                                t > T − tfinal

Each step before ``T − tfinal`` updates, for every entry ``w`` of ``A``, ``E`` and ``B``, the
sensitivity ``I = |w · ∂L/∂w|``, its EMA ``Ī ← β₁ Ī + (1 − β₁) I`` and the uncertainty
``Ū ← β₂ Ū + (1 − β₂) |I − Ī|``.  A triplet's score is ``S = s(E_k) + mean_i s(A_k,i) +
mean_o s(B_o,k)`` with ``s = Ī · Ū``.  Every ``delta_t`` steps while the budget falls, the
triplets whose score is at most the ``(b₀ − b(t))``-th smallest over all layers get ``E_k = 0``
(they may grow back); at ``t = T − tfinal`` this allocation becomes final: it sets each
layer's ``rank_mask`` and is enforced at every later step.  All of it is PEFT's
``RankAllocator`` / ``AdaLoraModel.update_and_allocate``, step for step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moracl.adapters.adalora.config import AdaLoRAConfig
from moracl.adapters.adalora.module import AdaLoRA, adalora_modules
from moracl.guard import check_int

__all__ = ["RankAllocator"]

_FACTORS = ("lora_A", "lora_E", "lora_B")


class RankAllocator:
    """Allocates AdaLoRA's rank budget over the trained AdaLoRA adapters of ``model``.

    Call :meth:`update_and_allocate` once per optimiser step, after ``optimizer.step()`` and
    before the gradients are cleared: it reads each parameter's new value and the gradient
    that produced it.  :class:`~moracl.optim.MoRAScheduler` does this for you when given the
    allocator (``MoRAScheduler(opt, total_steps=T, rank_allocator=allocator)``; then
    ``loss.backward(); opt.step(); scheduler.step(); opt.zero_grad()``).

    Args:
        model: the model holding the adapters (a ``MoRAModel`` or any module).
        total_steps: ``T``, the optimiser steps of the whole run.
        adapter_name: only adapters of this name (``....adapters.<name>``); default: every
            AdaLoRA adapter whose parameters train, which must then share one config.
    """

    def __init__(self, model: nn.Module, *, total_steps: int, adapter_name: str | None = None):
        found = adalora_modules(model)
        if adapter_name is not None:
            found = {p: m for p, m in found.items() if p.rsplit(".", 1)[-1] == adapter_name}
        if not found:
            which = "" if adapter_name is None else f" named {adapter_name!r}"
            raise ValueError(f"the model has no trained adalora adapter{which} to allocate")
        configs = {_schedule_of(m.config) for m in found.values()}
        if len(configs) > 1:
            raise ValueError(
                "the model's adalora adapters have different budget settings; pick one with "
                "adapter_name="
            )
        self.adapters: dict[str, AdaLoRA] = dict(sorted(found.items()))
        self.config: AdaLoRAConfig = next(iter(self.adapters.values())).config
        self.total_steps = check_int("total_steps", total_steps, gt=0)
        cfg = self.config
        if cfg.tinit >= self.total_steps - cfg.tfinal:
            raise ValueError(
                f"the budget schedule leaves no step to reduce the rank: tinit={cfg.tinit} must "
                f"be < total_steps - tfinal = {self.total_steps} - {cfg.tfinal}; lower "
                "tinit or tfinal, or train longer"
            )
        self.init_budget = sum(m.rank for m in self.adapters.values())
        self.target_budget = cfg.target_rank * len(self.adapters)
        self.exp_avg_ipt: dict[str, Tensor] = {}
        self.exp_avg_unc: dict[str, Tensor] = {}
        self.rank_pattern: dict[str, list[bool]] | None = None
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
            self.rank_pattern = self._mask_to_budget(budget)
            for path, adapter in self.adapters.items():
                adapter.rank_mask.copy_(torch.tensor(self.rank_pattern[path]))
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        else:
            budget = self.target_budget
            for adapter in self.adapters.values():
                adapter.zero_triplets(adapter.rank_mask)
        self.budget = budget
        return budget

    def kept(self) -> dict[str, int]:
        """Per adapter path, the triplets whose singular value is not zero."""
        return {p: int((m.singular_values() != 0).sum()) for p, m in self.adapters.items()}

    @torch.no_grad()
    def _update_importance(self, step: int) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for path, adapter in self.adapters.items():
            for name in _FACTORS:
                p = getattr(adapter, name)
                if p.grad is None:
                    raise ValueError(
                        f"step {step}: {path}.{name} has no gradient; the rank allocator reads "
                        "each step's gradients, so step it after optimizer.step() and before "
                        "optimizer.zero_grad()"
                    )
                key = f"{path}.{name}"
                ipt = (p * p.grad).abs()  # sensitivity, the parameter's shape
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                avg = b1 * avg + (1 - b1) * ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _score(self, path: str, name: str) -> Tensor:
        key = f"{path}.{name}"
        if key not in self.exp_avg_ipt:
            raise ValueError(
                f"no importance recorded for {key} yet: the allocation at step tinit + 1 needs "
                "the importance of the steps before it"
            )
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the triplets scoring at most the ``(b₀ − budget)``-th smallest score; returns
        each adapter's kept triplets."""
        scores: dict[str, Tensor] = {}
        for path in self.adapters:
            s_a = self._score(path, "lora_A").mean(dim=1)  # (r, i) -> (r,)
            s_b = self._score(path, "lora_B").mean(dim=0)  # (o, r) -> (r,)
            s_e = self._score(path, "lora_E").view(-1)  # (r, 1) -> (r,)
            scores[path] = s_e + (s_a + s_b)
        drop = self.init_budget - budget
        if drop <= 0:
            return {p: [True] * len(s) for p, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=drop)[0].item()
        pattern: dict[str, list[bool]] = {}
        for path, adapter in self.adapters.items():
            keep = ~(scores[path] <= threshold)  # (r,)
            adapter.zero_triplets(keep)
            pattern[path] = keep.tolist()
        return pattern

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The importance EMAs, the last allocation and each adapter's final mask."""
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


def _schedule_of(config: AdaLoRAConfig) -> tuple[Any, ...]:
    """The settings of ``config`` that the allocator reads (one value per run)."""
    return (
        config.target_rank,
        config.beta1,
        config.beta2,
        config.tinit,
        config.tfinal,
        config.delta_t,
    )
