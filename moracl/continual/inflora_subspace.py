"""The subspace arithmetic of InfLoRA (Liang & Li, CVPR 2024): a stored orthonormal basis of
the earlier tasks' input subspace per adapted layer, the new task's designed down-projection
orthogonal to it, and the basis's growth after each task (GPM's energy criterion, Saha et al.
2021, Eq. 9, as InfLoRA's DualGPM update uses it).

Everything is float64 and works on a layer's *input second moment* ``C = Σ x xᵀ`` over the
task's rows (every token of a row is a row), which holds what the SVD of the input matrix
``R = [x₁ … x_n] (d × n)`` would give: ``C = R Rᵀ``, so ``R``'s left singular vectors are
``C``'s eigenvectors and its squared singular values ``C``'s eigenvalues.

For a gradient of a linear layer ``W (o × d)`` is ``G = δ Rᵀ``: its rows lie in the span of
the inputs, so the stored basis ``M`` spans (up to the energy threshold) the old tasks'
gradient subspace, and a down-projection ``A`` with ``A M = 0`` moves the layer only in
directions the old tasks' inputs do not reach (the paper's Proposition: the branch's update
lies in the orthogonal complement of the old gradient subspace).

Shape legend: ``d`` a layer's input width, ``k`` stored basis vectors, ``r`` the branch rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moracl.guard import check_int, check_number

__all__ = [
    "complement_basis",
    "design_rows",
    "energy_threshold",
    "grow_basis",
    "second_moment",
]


def _check_square(name: str, value: Tensor) -> int:
    if value.ndim != 2 or value.shape[0] != value.shape[1]:
        raise ValueError(f"{name} must be a square (d, d) matrix, got shape {tuple(value.shape)}")
    return int(value.shape[0])


def _check_basis(basis: Tensor, d: int) -> None:
    if basis.ndim != 2 or basis.shape[0] != d or basis.shape[1] > d:
        raise ValueError(
            f"basis must be (d, k) with d={d} and k <= d, got shape {tuple(basis.shape)}"
        )


def second_moment(x: Tensor) -> Tensor:
    """``(d, d)`` float64 ``Σ x xᵀ`` over the rows of ``x (n, d)``."""
    if x.ndim != 2:
        raise ValueError(f"expected rows (n, d), got shape {tuple(x.shape)}")
    rows = x.detach().double()  # (n, d)
    return rows.T @ rows  # (d, d)


def complement_basis(basis: Tensor) -> Tensor:
    """``(d, d - k)`` an orthonormal basis of the orthogonal complement of the columns of
    ``basis (d, k)`` (orthonormal columns), float64."""
    d, k = basis.shape
    if k == 0:
        return torch.eye(d, dtype=torch.float64, device=basis.device)
    u, _, _ = torch.linalg.svd(basis.double(), full_matrices=True)  # (d, d)
    return u[:, k:]  # (d, d - k)


def _top_projected(cov: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``(d - k,)`` (descending, clamped at 0) and eigenvectors ``(d, d - k)``
    of the second moment projected off ``basis``, ``(I - M Mᵀ) C (I - M Mᵀ)``, computed
    within the complement so that every eigenvector is orthogonal to ``basis`` (to
    rounding), those of eigenvalue 0 included."""
    q = complement_basis(basis)  # (d, d - k)
    inner = q.T @ cov.double() @ q  # (d - k, d - k)
    inner = (inner + inner.T) / 2
    values, vectors = torch.linalg.eigh(inner)  # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    return values, _canonical_signs(q @ vectors)  # (d - k,), (d, d - k)


def _canonical_signs(vectors: Tensor) -> Tensor:
    """``vectors (d, m)`` with each column's sign chosen so that its entry of largest
    magnitude is positive: an eigenvector's sign is arbitrary (LAPACK builds and the
    slightest change of the input flip it), so without this the same inputs give opposite
    rows on different machines."""
    top = vectors.abs().argmax(0, keepdim=True)  # (1, m)
    signs = vectors.gather(0, top).sign()
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def design_rows(cov: Tensor, basis: Tensor, rank: int) -> Tensor:
    """``(r, d)`` InfLoRA's down-projection for a new task: the top-``r`` principal
    directions of the task's inputs projected off the stored subspace, ``Ĥ = (I - M Mᵀ) R``
    (the eigenvectors of ``Ĥ Ĥᵀ = (I - M Mᵀ) C (I - M Mᵀ)`` of largest eigenvalue), as rows.

    The rows are orthonormal and orthogonal to ``basis``; where the complement has fewer
    than ``r`` dimensions the remaining rows are zero (that part of the branch cannot move
    the layer).

    Args:
        cov: ``(d, d)`` the task's input second moment ``C = R Rᵀ`` (:func:`second_moment`).
        basis: ``(d, k)`` the stored orthonormal basis ``M`` (``k = 0``: none yet).
        rank: ``r``.
    """
    d = _check_square("cov", cov)
    _check_basis(basis, d)
    check_int("rank", rank, gt=0)
    _, vectors = _top_projected(cov, basis)  # (d, d - k)
    rows = torch.zeros(rank, d, dtype=torch.float64, device=cov.device)
    take = min(rank, vectors.shape[1])
    rows[:take] = vectors[:, :take].T
    return rows  # (r, d)


def grow_basis(cov: Tensor, basis: Tensor, threshold: float) -> Tensor:
    """``(d, k')`` the stored basis after a task: ``basis`` followed by the fewest top
    principal directions of the task's inputs projected off it that make the basis capture
    at least ``threshold`` of the inputs' energy (GPM, Saha et al. 2021, Eq. 9):

    ``‖M Mᵀ R‖² + Σ_{i ≤ j} σ_i(Ĥ)² ≥ threshold · ‖R‖²``, smallest ``j ≥ 0``

    with ``Ĥ = (I - M Mᵀ) R`` and ``σ_i`` its singular values in decreasing order
    (``‖·‖`` Frobenius; ``‖R‖² = tr C``). Directions of no energy (below rounding) never
    join, and inputs of zero energy leave the basis unchanged.

    Args:
        cov: ``(d, d)`` the task's input second moment (:func:`second_moment`).
        basis: ``(d, k)`` the stored orthonormal basis.
        threshold: in ``(0, 1]``.
    """
    d = _check_square("cov", cov)
    _check_basis(basis, d)
    threshold = check_number("threshold", threshold, gt=0, le=1)
    cov = cov.double()
    total = torch.trace(cov)
    if not bool(total > 0):
        return basis.double()
    values, vectors = _top_projected(cov, basis)  # (d - k,), (d, d - k)
    captured = (total - values.sum()).clamp_min(0)  # ‖M Mᵀ R‖²
    reached = (captured + torch.cumsum(values, 0)) / total  # (d - k,) after 1, 2, ... more
    # directions of no energy (rounding) never join: a threshold of 1 keeps the inputs' span
    useful = int((values > total * d * torch.finfo(torch.float64).eps).sum())
    if bool(captured / total >= threshold):
        j = 0
    else:
        j = min(int((reached < threshold).sum()) + 1, useful)
    return torch.cat([basis.double().to(vectors.device), vectors[:, :j]], dim=1)  # (d, k + j)


def energy_threshold(task: int, tasks: int, start: float, end: float) -> float:
    """The energy threshold after task ``task`` of ``tasks`` (0-based): ``start`` rising
    linearly toward ``end``, ``start + (end - start) · task / tasks`` (InfLoRA's reference
    code, ``lamb`` and ``lame``)."""
    check_int("tasks", tasks, gt=0)
    check_int("task", task, ge=0, le=tasks - 1)
    return start + (end - start) * task / tasks
