"""AdaLoRA: an SVD-form update whose singular triplets a rank budget switches off.

Shapes: ``x (..., i)``, right singular vectors ``A (r × i)``, singular values ``E (r × 1)``,
left singular vectors ``B (o × r)``, the rank mask ``m (r,)``, ``z = s · x (A ⊙ E ⊙ m)ᵀ``
``(..., r)``.  The parameterisation is PEFT's ``SVDLinear``, ``s = alpha / (r_init + 1e-5)``;
so is the default initialisation (``E = 0``, ``A, B ~ N(0, 0.02²)``); ``init: lora`` starts
as a LoRA does instead (:func:`~moracl.adapters.adalora.bank.init_triplets`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moracl.adapters.adalora.bank import AdaLoRABank, init_triplets
from moracl.adapters.adalora.config import AdaLoRAConfig
from moracl.adapters.base import Adapter, ParamRole, linear
from moracl.adapters.fused import _LoRALinear, compute_dtype, fused_enabled

__all__ = ["AdaLoRA", "adalora_buffers", "adalora_modules", "orth_loss", "rank_budget_modules"]


class AdaLoRA(Adapter):
    """``ΔW = s · B (E ⊙ m) A``; ``ΔW`` starts at zero (``E = 0``, or ``B = 0`` under
    ``init: lora``).

    Two kinds of masking, as in the paper: while the budget falls, a
    :class:`~moracl.adapters.adalora.RankAllocator` zeroes the singular values of the least
    important triplets (they may grow back and be chosen again); its final allocation also
    sets the buffer ``rank_mask`` (``m``, all true until then), which the update multiplies by
    from then on and which ``save_pretrained`` uses to keep only the surviving triplets.

    A layer of a saved, pruned adapter is built from its own config (``config.for_layer``):
    ``rank_pattern`` then holds that one layer's surviving rank.
    """

    config: AdaLoRAConfig
    rank_mask: Tensor

    def __init__(self, in_features: int, out_features: int, config: AdaLoRAConfig) -> None:
        super().__init__(in_features, out_features, config)
        r = _built_rank(config)
        self.lora_A = nn.Parameter(torch.empty(r, in_features))  # (r, i)
        self.lora_E = nn.Parameter(torch.empty(r, 1))  # (r, 1)
        self.lora_B = nn.Parameter(torch.empty(out_features, r))  # (o, r)
        init_triplets(self.lora_A, self.lora_E, self.lora_B, config.init)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool))  # (r,)
        self.scaling = config.scaling

    @property
    def rank(self) -> int:
        """The number of singular triplets this layer holds."""
        return self.lora_E.shape[0]

    def singular_values(self) -> Tensor:
        """``E ⊙ m``: ``(r, 1)``, the singular values with the fixed mask applied."""
        return self.lora_E * self.rank_mask[:, None]  # (r, 1) · (r, 1) bool, one kernel

    def fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """``x Wᵀ + b + (x Dᵀ) Bᵀ`` in LoRA's fused node, with the singular values, the mask
        and ``s`` folded into one down projection ``D = A ⊙ (s · E ⊙ m)`` ``(r × i)``: the
        update costs LoRA's passes over the activations plus three ``(r × i)``-sized
        operations, whose gradients autograd takes back to ``A`` and ``E``.  ``None`` (the
        unfused :meth:`forward`) under dropout in training or where fused nodes step aside
        (:func:`~moracl.adapters.fused.fused_enabled`)."""
        if self.training and self.config.dropout > 0:
            return None
        if not fused_enabled(self.lora_A, self.lora_E, self.lora_B):
            return None
        down = self.lora_A * (self.singular_values() * self.scaling)  # (r, i)
        dt = compute_dtype(x)
        if bias is not None and bias.dtype != dt:
            bias = bias.to(dt)
        out: Tensor = _LoRALinear.apply(x.to(dt), weight.to(dt), bias, down, self.lora_B, 1.0)
        return out

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self._input(x, self.lora_A.dtype)
        down = self.lora_A * self.singular_values()  # (r, i)
        return linear(x, down) * self.scaling, self.lora_B  # (..., r), (o, r)

    def delta(self, x: Tensor, *, weight: Tensor | None = None) -> Tensor:
        x = self._input(x, self.lora_A.dtype)
        z = linear(x, self.lora_A * self.singular_values())  # (..., i) -> (..., r)
        # PEFT's order of operations: the same rounding, step for step
        return linear(z, self.lora_B) * self.config.alpha / (self.config.rank + 1e-5)

    def forward(
        self, x: Tensor, base_out: Tensor, *, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        """``base_out + delta(x)`` (unfused, so that it rounds exactly as PEFT's layer)."""
        return base_out + self.delta(x).to(base_out.dtype)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        return self.lora_B @ (self.lora_A * self.singular_values()) * self.scaling  # (o, i)

    def orth_penalty(self) -> tuple[Tensor, Tensor]:
        """``(‖A Aᵀ − I‖_F, ‖Bᵀ B − I‖_F)``: how far ``A``'s rows and ``B``'s columns are
        from orthonormal (PEFT's terms: plain, not squared, Frobenius norms)."""
        a, b = self.lora_A, self.lora_B
        cov_a, cov_b = a @ a.T, b.T @ b  # (r, r), (r, r)
        eye = torch.eye(self.rank, dtype=a.dtype, device=a.device)
        return torch.linalg.matrix_norm(cov_a - eye), torch.linalg.matrix_norm(cov_b - eye)

    @torch.no_grad()
    def zero_triplets(self, keep: Tensor) -> None:
        """Zero the singular values of the triplets where ``keep (r,)`` is false."""
        self.lora_E.masked_fill_(~keep.to(self.lora_E.device)[:, None], 0.0)

    @torch.no_grad()
    def saved_state(self) -> dict[str, Tensor]:
        """The tensors to save: only the triplets ``rank_mask`` keeps (``k`` of them), so a
        layer built from ``config.for_layer(path)`` loads them and gives the same outputs.

        Returns ``lora_A (k, i)``, ``lora_E (k, 1)``, ``lora_B (o, k)``, ``rank_mask (k,)``."""
        keep = self.rank_mask
        return {
            "lora_A": self.lora_A[keep].clone(),
            "lora_E": self.lora_E[keep].clone(),
            "lora_B": self.lora_B[:, keep].clone(),
            "rank_mask": self.rank_mask[keep].clone(),
        }

    def param_roles(self) -> dict[str, ParamRole]:
        return {"lora_A": ParamRole.A, "lora_E": ParamRole.SCALE, "lora_B": ParamRole.B}

    def extra_repr(self) -> str:
        kept = int(self.rank_mask.sum())
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, kept={kept}"


def _built_rank(config: AdaLoRAConfig) -> int:
    """The rank a layer is built with: ``config.rank``, or the one entry of a layer's own
    pruned config (``config.for_layer(path)``)."""
    if config.rank_pattern is None:
        return config.rank
    if len(config.rank_pattern) != 1:
        raise ValueError(
            "an adalora layer is built from its own config (config.for_layer(path)), whose "
            f"rank_pattern names that one layer; got {len(config.rank_pattern)} layers"
        )
    return next(iter(config.rank_pattern.values()))


def adalora_modules(model: nn.Module) -> dict[str, AdaLoRA]:
    """Every :class:`AdaLoRA` adapter under ``model`` whose singular values train, by path."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, AdaLoRA) and m.lora_E.requires_grad
    }


def rank_budget_modules(model: nn.Module) -> dict[str, AdaLoRA | AdaLoRABank]:
    """Every AdaLoRA adapter and AdaLoRA expert bank under ``model`` whose singular values
    train, by path: the modules a rank budget allocates over (frozen experts are not)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (AdaLoRA, AdaLoRABank)) and m.lora_E.requires_grad
    }


def adalora_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Every AdaLoRA adapter's ``rank_mask (r,)`` (an expert bank's ``(e, r)``) under
    ``model``, by its ``model.state_dict()`` name (not copied): what a snapshot of the trained
    state (early stopping's best epoch) needs besides the trainable parameters, so that
    restoring an epoch before the budget's final allocation also restores the mask it trained
    with."""
    return {
        f"{path}.rank_mask" if path else "rank_mask": m.rank_mask.detach()
        for path, m in model.named_modules()
        if isinstance(m, (AdaLoRA, AdaLoRABank))
    }


def orth_loss(model: nn.Module) -> Tensor:
    """The orthogonality regulariser of ``model``'s trained AdaLoRA adapters and experts
    (:func:`rank_budget_modules`), weighted: the mean over every ``A`` and ``B`` (each
    expert's) of ``orth_reg_weight · ‖PᵀP − I‖_F`` (the loss PEFT's
    ``AdaLoraModel.forward`` adds to ``outputs.loss``); a zero scalar without any.

    Add it to the task loss before ``backward()``::

        loss = task_loss + orth_loss(model)
    """
    by_weight: dict[float, list[Tensor]] = {}  # weight -> norms, (k,) tensors
    # single adapters' factors as P (r × d) with P Pᵀ the covariance (A, and Bᵀ), batched by
    # weight, shape, dtype and device: a few batched products instead of two per adapter
    factors: dict[tuple[float, torch.Size, torch.dtype, torch.device], list[Tensor]] = {}
    for module in rank_budget_modules(model).values():
        w = module.config.orth_reg_weight
        if isinstance(module, AdaLoRA):
            for f in (module.lora_A, module.lora_B.t()):  # (r, i), (r, o)
                factors.setdefault((w, f.shape, f.dtype, f.device), []).append(f)
        else:
            by_weight.setdefault(w, []).append(torch.stack(module.orth_penalty()))
    for (w, shape, dtype, device), group in factors.items():
        stacked = torch.stack(group)  # (n, r, d)
        cov = stacked @ stacked.transpose(1, 2)  # (n, r, r)
        eye = torch.eye(shape[0], dtype=dtype, device=device)
        by_weight.setdefault(w, []).append(torch.linalg.matrix_norm(cov - eye))  # (n,)
    count = sum(n.numel() for norms in by_weight.values() for n in norms)
    total: Tensor | None = None
    for w, norms in by_weight.items():
        part = w * (torch.cat(norms).sum() / count)  # summed, divided, then weighted (PEFT)
        total = part if total is None else total + part
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros(()) if p is None else p.new_zeros(())
    return total
