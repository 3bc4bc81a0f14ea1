"""Routing and gating of a routed LoRA node as Triton kernels (CUDA): top-k in three
launches, routing by task in two.

Shape legend: ``n`` tokens, ``e`` experts, ``r`` rank per expert, ``k`` chosen per token,
``l`` logit columns (``e``, or ``2e`` with the noise scales).

The same values as :func:`~moracl.experts.routers.topk.topk_gate_forward` and
:func:`~moracl.experts.routers.topk.topk_gate_backward` (tested against them; the balance and
z losses are those of :mod:`moracl.experts.losses`, computed fused), computed per
block of token rows in registers:

- :func:`gate_forward`: one kernel reads each row of ``zl (n, e·r + l)`` once and writes the
  gated activations ``zg``, the gates, probabilities, choices and ``logsumexp`` of the row,
  plus the block's sums over its rows (usage counts, probabilities, z-loss terms); a second,
  one-program kernel adds the blocks' sums in a fixed order (deterministic, no atomics) and
  finishes the balance and z losses;
- :func:`gate_backward`: one kernel writes ``∂L/∂zl`` (the experts' columns and the logits'
  side by side, no concatenation) and ``zg`` recomputed for the up projection's gradient.

Routing by task (fixed gates per task, :class:`~moracl.experts.routers.task.TaskGating`) has a
kernel of its own each way: :func:`task_gate_forward` gathers each row's task mask and weights,
takes their softmax and gates ``za``; :func:`gate_apply_backward` is its backward.

Top-k is ``k`` rounds of ``max`` with ties to the lower index, as
:func:`~moracl.experts.routing.select_topk`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from moracl.experts.gating import RouteGrads

__all__ = [
    "GateForward",
    "GateRecord",
    "gate_apply_backward",
    "gate_backward",
    "gate_forward",
    "supports",
    "supports_task",
    "task_gate_forward",
]

_LOWEST = tl.constexpr(-3.4028234663852886e38)  # float32's lowest: a masked score, as mask_logits
_BLOCK_N = 32  # token rows per program, fewer for wide experts: see _rows_per_block
_TILE = 4096  # elements of a program's (rows, e, r) tile


@triton.jit
def _softplus(x):  # type: ignore[no-untyped-def]
    """``F.softplus`` (threshold 20)."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _scores(clean, scale_ptrs, eps_ptrs, mask, HAS_NOISE: tl.constexpr):  # type: ignore[no-untyped-def]
    """The routing scores: the clean logits, plus with ``HAS_NOISE`` the standard normal
    draws at ``eps_ptrs`` times the softplus of the noise scales at ``scale_ptrs``."""
    if HAS_NOISE:
        scale = tl.load(scale_ptrs, mask=mask, other=0.0).to(tl.float32)
        eps = tl.load(eps_ptrs, mask=mask, other=0.0).to(tl.float32)
        scores = clean + eps * _softplus(scale)
    else:
        scores = clean
    return scores


@triton.jit
def _topk(filled, allowed, cols, K: tl.constexpr, NORMALIZE: tl.constexpr, AXIS: tl.constexpr):  # type: ignore[no-untyped-def]
    """Top-``K`` routing along ``AXIS`` of the masked scores ``filled`` (masked columns
    ``_LOWEST``, padding ``-inf``) under ``allowed``; ``cols`` the column numbers, broadcast
    along ``AXIS``.  Returns the probabilities, the gates, the chosen columns and each
    column's rank among the choices (``K`` when not chosen): ``K`` rounds of ``max``, ties to
    the lower index."""
    mx = tl.expand_dims(tl.max(filled, axis=AXIS), AXIS)  # the first choice
    ex = tl.exp(filled - mx)
    probs = tl.where(allowed, ex / tl.expand_dims(tl.sum(ex, axis=AXIS), AXIS), 0.0)
    rank = tl.zeros(filled.shape, dtype=tl.int32) + K
    rest = filled
    for j in tl.static_range(K):
        m = tl.expand_dims(tl.max(rest, axis=AXIS), AXIS)
        pick = tl.min(tl.where(rest == m, cols, 1 << 30), axis=AXIS)
        hit = cols == tl.expand_dims(pick, AXIS)
        rank = tl.where(hit, j, rank)
        rest = tl.where(hit, float("-inf"), rest)
    sel = rank < K
    chosen = sel & allowed
    if NORMALIZE:  # softmax over the chosen scores
        es = tl.where(sel, ex, 0.0)
        gates = tl.where(allowed, es / tl.expand_dims(tl.sum(es, axis=AXIS), AXIS), 0.0)
    else:
        gates = tl.where(chosen, probs, 0.0)
    return probs, gates, chosen, rank


@triton.jit
def _lse(clean, allowed, pad, AXIS: tl.constexpr):  # type: ignore[no-untyped-def]
    """The z loss's ``logsumexp`` of the clean logits along ``AXIS`` over the allowed
    columns (0 with none; ``pad``: ``-inf`` on padding) and whether any is allowed."""
    has = tl.max(allowed.to(tl.int32), axis=AXIS) > 0
    cm = tl.where(allowed, clean, _LOWEST) + pad
    cmx = tl.max(cm, axis=AXIS)
    lse = cmx + tl.log(tl.sum(tl.exp(cm - tl.expand_dims(cmx, AXIS)), axis=AXIS))
    return tl.where(has, lse, 0.0), has


@triton.jit
def _topk_grad(probs, gates, chosen, allowed, gg, gp, NORMALIZE: tl.constexpr, AXIS: tl.constexpr):  # type: ignore[no-untyped-def]
    """``∂L/∂scores`` of :func:`_topk` from the gradients of its gates and probabilities
    ``gg``, ``gp`` (float32): the probabilities pass ``q ⊙ (G − Σ q G)``; the gates pass ``σ
    ⊙ (g − Σ σ g)`` (``NORMALIZE``) or join ``G`` at the chosen columns."""
    gp = tl.where(allowed, gp, 0.0)
    if not NORMALIZE:  # the chosen gates are probabilities
        gp += tl.where(chosen, gg, 0.0)
    grad = probs * (gp - tl.expand_dims(tl.sum(probs * gp, axis=AXIS), AXIS))
    if NORMALIZE:
        grad += gates * (gg - tl.expand_dims(tl.sum(gates * gg, axis=AXIS), AXIS))
    return tl.where(allowed, grad, 0.0)


@triton.jit
def _fwd_kernel(  # type: ignore[no-untyped-def]
    zl_ptr, noise_ptr, allowed_ptr, act_ptr,
    zg_ptr, gates_ptr, probs_ptr, chosen_ptr, idx_ptr, lse_ptr, part_ptr,
    n, stride_zl, stride_al,
    ER: tl.constexpr, E: tl.constexpr, R: tl.constexpr, E_P: tl.constexpr,
    R_P: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr, P_W: tl.constexpr,
    HAS_NOISE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (B,)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, E_P)  # (E_P,)
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]  # (B, E_P)
    zrow = zl_ptr + rows64[:, None] * stride_zl  # (B, 1)
    clean = tl.load(zrow + ER + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    allowed = tl.load(allowed_ptr + rows64[:, None] * stride_al + cols[None, :], mask=m2, other=0)
    allowed = allowed != 0
    noise_at = noise_ptr + rows64[:, None] * E + cols[None, :]
    scores = _scores(clean, zrow + ER + E + cols[None, :], noise_at, m2, HAS_NOISE)
    pad = tl.where(cmask, 0.0, float("-inf"))[None, :]  # (1, E_P): padding never counts
    filled = tl.where(allowed, scores, _LOWEST) + pad  # (B, E_P)
    probs, gates, chosen, rank = _topk(filled, allowed, cols[None, :], K, NORMALIZE, 1)
    kcols = tl.arange(0, K_P)
    idx = tl.zeros((BLOCK_N, K_P), dtype=tl.int32)
    for j in tl.static_range(K):  # the j-th choice's column
        pick = tl.min(tl.where(rank == j, cols[None, :], E_P), axis=1)  # (B,)
        idx = tl.where(kcols[None, :] == j, pick[:, None], idx)
    # z loss: logsumexp of the clean logits over the allowed experts (0 with none)
    lse, has = _lse(clean, allowed, pad, 1)
    w = has.to(tl.float32)
    # gated activations: each expert's r columns times its gate, rounded as zl's dtype
    rr = tl.arange(0, R_P)
    m3 = rmask[:, None, None] & cmask[None, :, None] & (rr < R)[None, None, :]
    off3 = cols[None, :, None] * R + rr[None, None, :]  # (1, E_P, R_P)
    za = tl.load(zrow[:, :, None] + off3, mask=m3, other=0.0)
    g_c = gates.to(za.dtype).to(tl.float32)[:, :, None]
    zg = (za.to(tl.float32) * g_c).to(za.dtype)
    tl.store(zg_ptr + rows64[:, None, None] * ER + off3, zg, mask=m3)
    out2 = rows64[:, None] * E + cols[None, :]
    tl.store(gates_ptr + out2, gates, mask=m2)
    tl.store(probs_ptr + out2, probs, mask=m2)
    tl.store(chosen_ptr + out2, chosen.to(tl.int8), mask=m2)
    kmask = rmask[:, None] & (kcols < K)[None, :]
    tl.store(idx_ptr + rows64[:, None] * K + kcols[None, :], idx.to(tl.int64), mask=kmask)
    tl.store(lse_ptr + rows64, lse, mask=rmask)
    # this block's sums over the rows the losses count (``a``: 0 past n and, with HAS_ACT,
    # on the rows that are not active)
    if HAS_ACT:
        a = tl.load(act_ptr + rows64, mask=rmask, other=0).to(tl.float32)  # (B,)
    else:
        a = rmask.to(tl.float32)
    part = part_ptr + pid * P_W
    tl.store(part + cols, tl.sum(chosen.to(tl.float32) * a[:, None], axis=0), mask=cmask)
    tl.store(part + E_P + cols, tl.sum(probs * a[:, None], axis=0), mask=cmask)
    tl.store(part + 2 * E_P, tl.sum(lse * lse * w * a, axis=0))
    tl.store(part + 2 * E_P + 1, tl.sum(w * a, axis=0))
    tl.store(part + 2 * E_P + 2, tl.sum(a, axis=0))


@triton.jit
def _z_grad(clean, lse, allowed, zw, AXIS: tl.constexpr):  # type: ignore[no-untyped-def]
    """The z loss's gradient with respect to the clean logits along ``AXIS``: ``2 · lse · w ·
    softmax`` over the allowed columns, from each row's ``lse`` and weight ``zw``."""
    soft = tl.where(allowed, tl.exp(clean - tl.expand_dims(lse, AXIS)), 0.0)
    return 2.0 * tl.expand_dims(lse * zw, AXIS) * soft


@triton.jit
def _pick(acc, cols, off, AXIS: tl.constexpr):  # type: ignore[no-untyped-def]
    """``acc[off]``: ``acc`` and its positions ``cols`` along ``AXIS``, the offsets ``off``
    broadcast along it."""
    return tl.sum(tl.where(cols == off, acc, 0.0), axis=AXIS)


@triton.jit
def _block_sums(part_ptr, blocks, P_W: tl.constexpr, BLOCK_B: tl.constexpr):  # type: ignore[no-untyped-def]
    """The blocks' rows of partial sums ``(blocks, P_W)`` added in a fixed order (no
    atomics): ``(P_W,)``."""
    cols = tl.arange(0, P_W)
    acc = tl.zeros((P_W,), dtype=tl.float32)
    for start in range(0, blocks, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B)
        tile = tl.load(
            part_ptr + b[:, None] * P_W + cols[None, :], mask=(b < blocks)[:, None], other=0.0
        )
        acc += tl.sum(tile, axis=0)
    return acc


@triton.jit
def _level_finish(  # type: ignore[no-untyped-def]
    acc, n_f, E: tl.constexpr, E_P: tl.constexpr, P_W: tl.constexpr, SHARED: tl.constexpr,
    HAS_ACT: tl.constexpr,
):  # fmt: skip
    """One routing level's losses from its sums at the head of ``acc (P_W,)`` (the usage
    counts and the probabilities, ``E_P`` each, then the z-loss terms, the counted rows with
    an allowed expert and the counted rows): ``f (E_P,)``, the balance and z losses,
    ``zscale``, each counted token's weight in the z loss, and ``bscale``, in the mean router
    probabilities."""
    cols = tl.arange(0, P_W)
    ecols = tl.arange(0, E_P)
    emask = ecols < E
    count = tl.where(emask, _pick(acc[None, :], cols[None, :], ecols[:, None], 1), 0.0)
    psum = _pick(acc[None, :], cols[None, :], (ecols + E_P)[:, None], 1)
    zsum = tl.sum(tl.where(cols == 2 * E_P, acc, 0.0), axis=0)
    wsum = tl.sum(tl.where(cols == 2 * E_P + 1, acc, 0.0), axis=0)
    asum = tl.sum(tl.where(cols == 2 * E_P + 2, acc, 0.0), axis=0)
    f = count / tl.maximum(tl.sum(count, axis=0), 1.0)
    n1 = tl.maximum(n_f, 1.0)
    if HAS_ACT:
        nb = tl.maximum(asum, 1.0)
        den = tl.maximum(wsum, 1.0)
    else:
        nb = n1
        den = n1 if SHARED else tl.maximum(wsum, 1.0)
    balance = E * tl.sum(tl.where(emask, f * psum, 0.0), axis=0) / nb
    return f, balance, zsum / den, 1.0 / den, 1.0 / nb


@triton.jit
def _finish_kernel(  # type: ignore[no-untyped-def]
    part_ptr, f_ptr, balance_ptr, z_ptr, zscale_ptr, bscale_ptr, blocks, n_f,
    E: tl.constexpr, E_P: tl.constexpr, P_W: tl.constexpr, SHARED: tl.constexpr,
    HAS_ACT: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """One program: the blocks' sums added in order, then :func:`_level_finish`'s values."""
    acc = _block_sums(part_ptr, blocks, P_W, BLOCK_B)
    f, balance, z, zscale, bscale = _level_finish(acc, n_f, E, E_P, P_W, SHARED, HAS_ACT)
    ecols = tl.arange(0, E_P)
    tl.store(f_ptr + ecols, f, mask=ecols < E)
    tl.store(balance_ptr, balance)
    tl.store(z_ptr, z)
    tl.store(zscale_ptr, zscale)
    tl.store(bscale_ptr, bscale)


@triton.jit
def _bwd_kernel(  # type: ignore[no-untyped-def]
    gzg_ptr, zl_ptr, noise_ptr, allowed_ptr, act_ptr, gates_ptr, probs_ptr, chosen_ptr,
    lse_ptr, f_ptr, zscale_ptr, bscale_ptr, gg_ptr, gp_ptr, gb_ptr, gz_ptr,
    gzl_ptr, zg_ptr,
    n, stride_zl, stride_al, stride_gzg,
    ER: tl.constexpr, E: tl.constexpr, R: tl.constexpr, E_P: tl.constexpr,
    R_P: tl.constexpr, L: tl.constexpr,
    HAS_NOISE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GG: tl.constexpr,
    HAS_GP: tl.constexpr, HAS_GB: tl.constexpr, HAS_GZ: tl.constexpr, HAS_ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, E_P)
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    zrow = zl_ptr + rows64[:, None] * stride_zl
    out2 = rows64[:, None] * E + cols[None, :]
    allowed = tl.load(allowed_ptr + rows64[:, None] * stride_al + cols[None, :], mask=m2, other=0)
    allowed = allowed != 0
    gates = tl.load(gates_ptr + out2, mask=m2, other=0.0)
    probs = tl.load(probs_ptr + out2, mask=m2, other=0.0)
    chosen = tl.load(chosen_ptr + out2, mask=m2, other=0) != 0
    # the experts' columns: ∂za = ∂zg · gate, ∂gate = Σ_r ∂zg · za
    rr = tl.arange(0, R_P)
    m3 = rmask[:, None, None] & cmask[None, :, None] & (rr < R)[None, None, :]
    off3 = cols[None, :, None] * R + rr[None, None, :]
    za = tl.load(zrow[:, :, None] + off3, mask=m3, other=0.0)
    gz = tl.load(gzg_ptr + rows64[:, None, None] * stride_gzg + off3, mask=m3, other=0.0)
    g_c = gates.to(za.dtype).to(tl.float32)[:, :, None]
    gza = (gz.to(tl.float32) * g_c).to(za.dtype)
    zg = (za.to(tl.float32) * g_c).to(za.dtype)
    gg = tl.sum(gz.to(tl.float32) * za.to(tl.float32), axis=2)  # (B, E_P)
    if HAS_GG:
        gg += tl.load(gg_ptr + out2, mask=m2, other=0.0).to(tl.float32)
    # the routing: through the probabilities, then the gates
    if HAS_GP:
        gp = tl.load(gp_ptr + out2, mask=m2, other=0.0).to(tl.float32)
    else:
        gp = tl.zeros((BLOCK_N, E_P), dtype=tl.float32)
    if HAS_ACT:  # noqa: SIM108  (a constexpr branch in the kernel)
        a = tl.load(act_ptr + rows64, mask=rmask, other=0) != 0  # (B,) the counted rows
    else:
        a = rmask
    if HAS_GB:
        f = tl.load(f_ptr + cols, mask=cmask, other=0.0)
        bw = tl.where(a, tl.load(bscale_ptr) * E, 0.0)  # (B,) each row's weight · E
        gp += tl.load(gb_ptr).to(tl.float32) * bw[:, None] * f[None, :]
    grad = _topk_grad(probs, gates, chosen, allowed, gg, gp, NORMALIZE, 1)  # ∂L/∂scores
    clean_grad = grad
    if HAS_GZ:
        clean = tl.load(zrow + ER + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + rows64, mask=rmask, other=0.0)
        has = tl.max(allowed.to(tl.int32), axis=1) > 0
        zw = tl.where(has & a, tl.load(zscale_ptr), 0.0)
        clean_grad += tl.load(gz_ptr).to(tl.float32) * _z_grad(clean, lse, allowed, zw, 1)
    grow = gzl_ptr + rows64[:, None] * (ER + L)
    tl.store(grow[:, :, None] + off3, gza, mask=m3)
    tl.store(grow + ER + cols[None, :], clean_grad.to(gza.dtype), mask=m2)
    if HAS_NOISE:
        scale = tl.load(zrow + ER + E + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        eps = tl.load(noise_ptr + rows64[:, None] * E + cols[None, :], mask=m2, other=0.0)
        scale_grad = grad * eps.to(tl.float32) * tl.sigmoid(scale)
        tl.store(grow + ER + E + cols[None, :], scale_grad.to(gza.dtype), mask=m2)
    tl.store(zg_ptr + rows64[:, None, None] * ER + off3, zg, mask=m3)


@triton.jit
def _task_fwd_kernel(  # type: ignore[no-untyped-def]
    za_ptr, tid_ptr, mask_ptr, w_ptr, zg_ptr, gates_ptr, chosen_ptr,
    n, stride_za,
    ER: tl.constexpr, E: tl.constexpr, R: tl.constexpr, E_P: tl.constexpr,
    R_P: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Routing by task: each row's gates are the softmax of its task's weights (zeros
    without ``HAS_W``) over the experts its task owns; then the gated activations."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, E_P)
    cmask = cols < E
    m2 = rmask[:, None] & cmask[None, :]
    tid = tl.load(tid_ptr + rows64, mask=rmask, other=0).to(tl.int64)
    trow = tid[:, None] * E + cols[None, :]  # (B, E_P) into the (t, e) tables
    allowed = tl.load(mask_ptr + trow, mask=m2, other=0) != 0
    if HAS_W:
        scores = tl.load(w_ptr + trow, mask=m2, other=0.0).to(tl.float32)
    else:
        scores = tl.zeros((BLOCK_N, E_P), dtype=tl.float32)
    pad = tl.where(cmask, 0.0, float("-inf"))[None, :]
    filled = tl.where(allowed, scores, _LOWEST) + pad
    ex = tl.exp(filled - tl.max(filled, axis=1)[:, None])
    gates = tl.where(allowed, ex / tl.sum(ex, axis=1)[:, None], 0.0)
    rr = tl.arange(0, R_P)
    m3 = rmask[:, None, None] & cmask[None, :, None] & (rr < R)[None, None, :]
    off3 = cols[None, :, None] * R + rr[None, None, :]
    za = tl.load(za_ptr + rows64[:, None, None] * stride_za + off3, mask=m3, other=0.0)
    zg = (za.to(tl.float32) * gates.to(za.dtype).to(tl.float32)[:, :, None]).to(za.dtype)
    tl.store(zg_ptr + rows64[:, None, None] * ER + off3, zg, mask=m3)
    out2 = rows64[:, None] * E + cols[None, :]
    tl.store(gates_ptr + out2, gates, mask=m2)
    tl.store(chosen_ptr + out2, allowed.to(tl.int8), mask=m2)


@triton.jit
def _gate_bwd_kernel(  # type: ignore[no-untyped-def]
    gz_ptr, za_ptr, gates_ptr, gza_ptr, zg_ptr,
    n, stride_gz, stride_za,
    ER: tl.constexpr, E: tl.constexpr, R: tl.constexpr, E_P: tl.constexpr,
    R_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Fixed gates: ``∂za = ∂zg · gate`` and ``zg = za · gate`` recomputed."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, E_P)
    cmask = cols < E
    gates = tl.load(
        gates_ptr + rows64[:, None] * E + cols[None, :], mask=rmask[:, None] & cmask[None, :],
        other=0.0,
    )  # fmt: skip
    rr = tl.arange(0, R_P)
    m3 = rmask[:, None, None] & cmask[None, :, None] & (rr < R)[None, None, :]
    off3 = cols[None, :, None] * R + rr[None, None, :]
    za = tl.load(za_ptr + rows64[:, None, None] * stride_za + off3, mask=m3, other=0.0)
    gz = tl.load(gz_ptr + rows64[:, None, None] * stride_gz + off3, mask=m3, other=0.0)
    g_c = gates.to(za.dtype).to(tl.float32)[:, :, None]
    out3 = rows64[:, None, None] * ER + off3
    tl.store(gza_ptr + out3, (gz.to(tl.float32) * g_c).to(za.dtype), mask=m3)
    tl.store(zg_ptr + out3, (za.to(tl.float32) * g_c).to(za.dtype), mask=m3)


class GateForward(NamedTuple):
    """What :func:`gate_forward` returns (and :func:`gate_backward` reads): its inputs, then
    its outputs."""

    zl: Tensor  # (n, e·r + l)
    er: int
    allowed: Tensor  # (n|1, e) bool
    noise: Tensor | None  # (n, e)
    normalize: bool
    zg: Tensor  # (n, e·r) gated activations, zl's dtype
    gates: Tensor  # (n, e) float32
    probs: Tensor  # (n, e) float32
    chosen: Tensor  # (n, e) bool
    indices: Tensor  # (n, k) int64
    lse: Tensor  # (n,) float32
    f: Tensor  # (e,) assignment fractions
    balance: Tensor  # () balance loss
    z: Tensor  # () z loss
    zscale: Tensor  # () each counted token's weight in the z loss
    active: Tensor | None  # (n,) bool, the tokens the losses count, or None: all
    bscale: Tensor  # () each counted token's weight in the mean router probabilities

    def record(self) -> GateRecord:
        """What :func:`gate_backward` reads, for a node to keep until its backward: not the
        gated activations ``zg`` (``(n, e·r)``, recomputed there), the indices or the
        losses."""
        return GateRecord(
            self.zl, self.er, self.allowed, self.noise, self.normalize, self.gates, self.probs,
            self.chosen, self.lse, self.f, self.zscale, self.active, self.bscale,
        )  # fmt: skip


class GateRecord(NamedTuple):
    """What :func:`gate_backward` reads of a :class:`GateForward` (:meth:`GateForward.
    record`)."""

    zl: Tensor  # (n, e·r + l)
    er: int
    allowed: Tensor  # (n|1, e) bool
    noise: Tensor | None  # (n, e)
    normalize: bool
    gates: Tensor  # (n, e) float32
    probs: Tensor  # (n, e) float32
    chosen: Tensor  # (n, e) bool
    lse: Tensor  # (n,) float32
    f: Tensor  # (e,)
    zscale: Tensor  # ()
    active: Tensor | None  # (n,) bool or None
    bscale: Tensor  # ()


@functools.cache
def _pow2(x: int) -> int:
    return max(1, triton.next_power_of_2(x))


@functools.cache
def _rows_per_block(e: int, r: int) -> int:
    """Token rows per program: 32, fewer where ``e·r`` (padded to powers of two) is wide, so
    that a program's ``(rows, e, r)`` tile stays within ``_TILE`` elements."""
    return max(1, min(_BLOCK_N, _TILE // (_pow2(e) * _pow2(r))))


def _allowed_arg(allowed: Tensor) -> tuple[Tensor, int]:
    """``allowed (n|1, e)`` as bytes with unit column stride, and its row stride (0 for one
    row shared by every token)."""
    a = allowed.to(torch.uint8) if allowed.dtype != torch.bool else allowed.view(torch.uint8)
    if a.stride(-1) != 1:
        a = a.contiguous()
    return a, 0 if a.shape[0] == 1 else a.stride(0)


def _active_arg(active: Tensor | None, dummy: Tensor) -> Tensor:
    """``active (n,)`` bool as contiguous bytes for the kernels, or ``dummy`` (unread)."""
    if active is None:
        return dummy
    return active.contiguous().view(torch.uint8)


def supports(zl: Tensor, er: int, e: int, k: int) -> bool:
    """Whether the kernels take this routing: ``zl`` of a 16- or 32-bit float dtype, rows
    contiguous, ``e·r`` split evenly, ``k ≤ e`` (and sizes a block of rows fits); the device
    is the caller's choice (CUDA, or the CPU in Triton's interpreter)."""
    return (
        zl.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and zl.dim() == 2
        and zl.stride(1) == 1
        and zl.shape[0] > 0
        and e > 0
        and er % e == 0
        and 0 < k <= min(e, 4)
        and _pow2(e) * _pow2(er // e) <= _TILE
    )


def gate_forward(
    zl: Tensor,
    er: int,
    allowed: Tensor,
    noise: Tensor | None,
    k: int,
    normalize: bool = True,
    active: Tensor | None = None,
) -> GateForward:
    """Route the logit columns of ``zl (n, e·r + l)`` under ``allowed (n|1, e)`` with ``noise
    (n, e)`` (or ``None``) and gate its first ``e·r`` columns, the losses over the ``active
    (n,)`` tokens (``None``: all): the values of
    :func:`~moracl.experts.routers.topk.topk_gate_forward`."""
    n = zl.shape[0]
    e = allowed.shape[-1]
    r = er // e
    e_p, r_p, k_p = _pow2(e), _pow2(r), _pow2(k)
    dev = zl.device
    allowed_u8, stride_al = _allowed_arg(allowed)
    rows = _rows_per_block(e, r)
    blocks = triton.cdiv(n, rows)
    p_w = _pow2(2 * e_p + 3)
    zg = torch.empty(n, er, device=dev, dtype=zl.dtype)
    gates = torch.empty(n, e, device=dev, dtype=torch.float32)
    probs = torch.empty_like(gates)
    chosen = torch.empty(n, e, device=dev, dtype=torch.bool)
    indices = torch.empty(n, k, device=dev, dtype=torch.int64)
    lse = torch.empty(n, device=dev, dtype=torch.float32)
    part = torch.empty(blocks, p_w, device=dev, dtype=torch.float32)
    noise_arg = noise.contiguous() if noise is not None else gates  # unread without noise
    act_arg = _active_arg(active, gates)
    _fwd_kernel[(blocks,)](
        zl, noise_arg, allowed_u8, act_arg, zg, gates, probs, chosen.view(torch.int8), indices,
        lse, part,
        n, zl.stride(0), stride_al,
        ER=er, E=e, R=r, E_P=e_p, R_P=r_p, K=k, K_P=k_p, P_W=p_w,
        HAS_NOISE=noise is not None, NORMALIZE=normalize, HAS_ACT=active is not None,
        BLOCK_N=rows,
    )  # fmt: skip
    f = torch.empty(e, device=dev, dtype=torch.float32)
    balance, z, zscale, bscale = (
        torch.empty((), device=dev, dtype=torch.float32) for _ in range(4)
    )
    _finish_kernel[(1,)](
        part, f, balance, z, zscale, bscale, blocks, float(n),
        E=e, E_P=e_p, P_W=p_w, SHARED=allowed.shape[0] == 1, HAS_ACT=active is not None,
        BLOCK_B=64,
    )  # fmt: skip
    return GateForward(
        zl, er, allowed, noise, normalize, zg, gates, probs, chosen, indices, lse, f, balance, z,
        zscale, active, bscale,
    )  # fmt: skip


def gate_backward(fwd: GateRecord, grad_zg: Tensor, grads: RouteGrads) -> tuple[Tensor, Tensor]:
    """``∂L/∂zl (n, e·r + l)`` and ``zg (n, e·r)`` recomputed from ``∂L/∂zg`` and the routing
    outputs' gradients (``grads.aux``: balance, z), given the forward's record
    (:meth:`GateForward.record`): the values of
    :func:`~moracl.experts.routers.topk.topk_gate_backward`."""
    zl, er, allowed, noise, normalize = fwd.zl, fwd.er, fwd.allowed, fwd.noise, fwd.normalize
    grad_gates, grad_probs = grads.gates, grads.probs
    grad_balance, grad_z = grads.aux
    n, width = zl.shape
    e = allowed.shape[-1]
    r = er // e
    allowed_u8, stride_al = _allowed_arg(allowed)
    gzl = torch.empty(n, width, device=zl.device, dtype=zl.dtype)
    zg = torch.empty(n, er, device=zl.device, dtype=zl.dtype)
    grad_zg = grad_zg if grad_zg.stride(1) == 1 else grad_zg.contiguous()
    dummy = fwd.gates
    gg = grad_gates.contiguous() if grad_gates is not None else dummy
    gp = grad_probs.contiguous() if grad_probs is not None else dummy
    rows = _rows_per_block(e, r)
    _bwd_kernel[(triton.cdiv(n, rows),)](
        grad_zg, zl, noise.contiguous() if noise is not None else dummy, allowed_u8,
        _active_arg(fwd.active, dummy), fwd.gates, fwd.probs, fwd.chosen.view(torch.int8),
        fwd.lse, fwd.f, fwd.zscale, fwd.bscale,
        gg, gp, grad_balance if grad_balance is not None else dummy,
        grad_z if grad_z is not None else dummy, gzl, zg,
        n, zl.stride(0), stride_al, grad_zg.stride(0),
        ER=er, E=e, R=r, E_P=_pow2(e), R_P=_pow2(r), L=width - er,
        HAS_NOISE=noise is not None, NORMALIZE=normalize, HAS_GG=grad_gates is not None,
        HAS_GP=grad_probs is not None, HAS_GB=grad_balance is not None,
        HAS_GZ=grad_z is not None, HAS_ACT=fwd.active is not None, BLOCK_N=rows,
    )  # fmt: skip
    if noise is None and width > er + e:  # a noisy router evaluated: its scales get nothing
        gzl[:, er + e :].zero_()
    return gzl, zg


def supports_task(zl: Tensor, er: int, e: int) -> bool:
    """Whether :func:`task_gate_forward` takes this routing: :func:`supports`' conditions,
    with no logit columns (``zl`` is ``za (n, e·r)``)."""
    return zl.shape[-1] == er and supports(zl, er, e, 1)


def task_gate_forward(
    za: Tensor, er: int, task_ids: Tensor, masks: Tensor, weights: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Routing by task of ``za (n, e·r)``: ``task_ids (n,)`` (checked by the caller),
    ``masks (t, e)`` bool, each task's experts, ``weights (t, e)`` or ``None`` (uniform).

    Returns ``zg (n, e·r)``, ``gates (n, e)`` float32 (a softmax of the task's weights over
    its experts) and ``chosen (n, e)`` (the task's mask), as
    :meth:`~moracl.experts.routers.task.TaskRouter.route` and the gating of
    :meth:`~moracl.experts.gating.Gating.forward`."""
    n = za.shape[0]
    e = masks.shape[-1]
    zg = torch.empty(n, er, device=za.device, dtype=za.dtype)
    gates = torch.empty(n, e, device=za.device, dtype=torch.float32)
    chosen = torch.empty(n, e, device=za.device, dtype=torch.bool)
    m = masks.contiguous().view(torch.uint8)
    w = weights.detach().contiguous() if weights is not None else gates
    rows = _rows_per_block(e, er // e)
    _task_fwd_kernel[(triton.cdiv(n, rows),)](
        za, task_ids.contiguous(), m, w, zg, gates, chosen.view(torch.int8),
        n, za.stride(0),
        ER=er, E=e, R=er // e, E_P=_pow2(e), R_P=_pow2(er // e),
        HAS_W=weights is not None, BLOCK_N=rows,
    )  # fmt: skip
    return zg, gates, chosen


def gate_apply_backward(grad_zg: Tensor, za: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
    """For fixed ``gates (n, e)`` (no gradient): ``∂L/∂za`` from ``∂L/∂zg (n, e·r)``, and
    ``zg`` recomputed, both ``(n, e·r)`` in ``za``'s dtype."""
    n, er = grad_zg.shape
    e = gates.shape[-1]
    grad_zg = grad_zg if grad_zg.stride(-1) == 1 else grad_zg.contiguous()
    gza = torch.empty(n, er, device=za.device, dtype=za.dtype)
    zg = torch.empty_like(gza)
    rows = _rows_per_block(e, er // e)
    _gate_bwd_kernel[(triton.cdiv(n, rows),)](
        grad_zg, za, gates, gza, zg, n, grad_zg.stride(0), za.stride(0),
        ER=er, E=e, R=er // e, E_P=_pow2(e), R_P=_pow2(er // e), BLOCK_N=rows,
    )  # fmt: skip
    return gza, zg
