"""Export one task's routed experts as a plain LoRA.

Under task routing a task's gates do not depend on the input, so its update on a layer is one
fixed matrix ``ΔW_t = Σ_e g_{t,e} ΔW_e``.  Every expert kind here is a product of two
factors — LoRA ``s·B_e A_e``, MoRA-sharing ``D (M_e C)`` — so ``ΔW_t = B_t A_t`` exactly, with
``A_t`` the experts' down factors stacked (rank ``Σ r_e``) and ``B_t`` the gated up factors.
That is written in PEFT's format (scaling 1: ``lora_alpha = r``), or folded into the weights.

Shape legend: ``i``/``o`` layer sizes, ``R`` the exported rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from moracl.experts.mixture import Mixture
from moracl.experts.routers.config import type_name
from moracl.experts.routers.task import TaskRouter
from moracl.peft_files import write_lora_folder

__all__ = ["task_gates", "task_lora_factors", "write_peft_lora"]


@torch.no_grad()
def task_gates(mixture: Mixture, task_id: int) -> Tensor:
    """Task ``task_id``'s gates over the experts, ``(e,)``; only a task router has fixed ones."""
    if not isinstance(mixture.router, TaskRouter):
        raise ValueError(
            f"only task-routed mixtures have a fixed update per task; this layer's router is "
            f"{type_name(mixture.router.config.type)!r}"
        )
    dtype = next(
        (p.dtype for p in mixture.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )  # a float64 model routes in float64
    x = torch.zeros(1, mixture.in_features, device=mixture.router.expert_masks.device, dtype=dtype)
    return mixture.router(x, task_ids=torch.tensor([task_id], device=x.device)).gates[0]


@torch.no_grad()
def task_lora_factors(mixture: Mixture, task_id: int) -> tuple[Tensor, Tensor]:
    """``(A (R × i), B (o × R))`` with ``B @ A`` = task ``task_id``'s update on this layer;
    experts with zero gate are left out."""
    gates = task_gates(mixture, task_id)
    downs, ups, start = [], [], 0
    for bank in mixture.expert_banks():
        for j in range(bank.num_experts):
            g = gates[start + j]
            if g == 0:
                continue
            down, up = bank.expert_factors(j)  # (R_j, i), (o, R_j)
            downs.append(down)
            ups.append(up * g)
        start += bank.num_experts
    if not downs:
        raise ValueError(f"task {task_id} routes to no expert on this layer")
    return torch.cat(downs), torch.cat(ups, dim=1)


def write_peft_lora(
    directory: str | os.PathLike[str],
    factors: dict[str, tuple[Tensor, Tensor]],
    *,
    fan_in_fan_out: bool = False,
) -> Path:
    """Save ``{module path: (A, B)}`` as a PEFT LoRA adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads, with moracl's
    ``checksums.json`` beside them (which PEFT ignores; :func:`moracl.checkpoint.verify_folder`
    checks it).  Non-finite factors are refused before anything is written
    (:func:`moracl.peft_files.write_lora_folder`)."""
    return write_lora_folder(directory, factors, fan_in_fan_out=fan_in_fan_out)
