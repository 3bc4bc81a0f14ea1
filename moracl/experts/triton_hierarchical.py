"""A hierarchical router's routing and gating in a fused node as Triton kernels (CUDA): two
launches forward, one backward, as top-k's (:mod:`moracl.experts.triton_route`, whose
routing helpers both levels share).

Shape legend as :mod:`moracl.experts.routers.hierarchical_gating`: ``n`` tokens, ``g``
groups, ``s`` experts per group, ``e = g·s``, ``r`` rank per expert, ``l_g`` the group
router's logit columns (``g``, or ``2g`` with noise scales), ``l_s`` each group router's
(``s`` or ``2s``); ``zl (n, e·r + l_g + g·l_s)``.

- :func:`gate_forward`: one kernel routes a block of token rows at both levels in registers
  (the groups as a ``(rows, g)`` tile, every group's experts at once as ``(rows, g, s)``),
  takes the levels' product, gates ``za``, and writes the block's sums for the losses (the
  group level's over the counted tokens, each group's over the tokens it serves); a
  one-program kernel adds the blocks' sums in a fixed order and finishes the four losses
  (the expert level's weighted by each group's share of served tokens);
- :func:`gate_backward`: one kernel splits the gates' and probabilities' gradients between
  the levels by the product rule, runs each level's routing backward and writes ``∂L/∂zl``
  whole, with ``zg`` recomputed.

The same values as :func:`~moracl.experts.routers.hierarchical_gating.
hierarchical_gate_forward` and its backward (tested against them).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from moracl.experts.gating import RouteGrads
from moracl.experts.triton_route import (
    _LOWEST,
    _TILE,
    _active_arg,
    _allowed_arg,
    _block_sums,
    _level_finish,
    _lse,
    _pick,
    _pow2,
    _rows_per_block,
    _scores,
    _topk,
    _topk_grad,
    _z_grad,
)

__all__ = [
    "HierarchicalForward",
    "HierarchicalRecord",
    "gate_backward",
    "gate_forward",
    "supports",
]


@triton.jit
def _fwd_kernel(  # type: ignore[no-untyped-def]
    zl_ptr, gnoise_ptr, enoise_ptr, gal_ptr, eal_ptr, act_ptr,
    zg_ptr, gates_ptr, probs_ptr, chosen_ptr, idx_ptr,
    ggates_ptr, gprobs_ptr, gchosen_ptr, glse_ptr,
    egates_ptr, eprobs_ptr, echosen_ptr, else_ptr, part_ptr,
    n, stride_zl, stride_ga, stride_ea,
    ER: tl.constexpr, G: tl.constexpr, S: tl.constexpr, R: tl.constexpr,
    LG: tl.constexpr, LS: tl.constexpr, G_P: tl.constexpr, S_P: tl.constexpr,
    R_P: tl.constexpr, KG: tl.constexpr, KS: tl.constexpr, P_W: tl.constexpr,
    G_NOISE: tl.constexpr, E_NOISE: tl.constexpr, G_NORM: tl.constexpr,
    E_NORM: tl.constexpr, HAS_ACT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (B,)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    zrow = zl_ptr + rows64[:, None] * stride_zl  # (B, 1)
    # the group level: (B, G_P)
    gc = tl.arange(0, G_P)
    gmask = gc < G
    m2 = rmask[:, None] & gmask[None, :]
    gclean = tl.load(zrow + ER + gc[None, :], mask=m2, other=0.0).to(tl.float32)
    gal = tl.load(gal_ptr + rows64[:, None] * stride_ga + gc[None, :], mask=m2, other=0) != 0
    gnoise_at = gnoise_ptr + rows64[:, None] * G + gc[None, :]
    gscores = _scores(gclean, zrow + ER + G + gc[None, :], gnoise_at, m2, G_NOISE)
    gpad = tl.where(gmask, 0.0, float("-inf"))[None, :]
    gfilled = tl.where(gal, gscores, _LOWEST) + gpad
    gprobs, ggates, gchosen, grank = _topk(gfilled, gal, gc[None, :], KG, G_NORM, 1)
    glse, ghas = _lse(gclean, gal, gpad, 1)
    if HAS_ACT:  # noqa: SIM108  (a constexpr branch in the kernel)
        a = tl.load(act_ptr + rows64, mask=rmask, other=0) != 0  # (B,) the counted rows
    else:
        a = rmask
    served = gchosen & a[:, None]  # (B, G_P) the rows each group's losses count
    # the expert level, every group at once: (B, G_P, S_P); padded groups route nothing
    sc = tl.arange(0, S_P)
    smask = sc < S
    m3 = m2[:, :, None] & smask[None, None, :]
    ecol = gc[None, :, None] * S + sc[None, None, :]  # (1, G_P, S_P) the expert's column
    eoff = ER + LG + gc[None, :, None] * LS + sc[None, None, :]  # its logit's column
    eclean = tl.load(zrow[:, :, None] + eoff, mask=m3, other=0.0).to(tl.float32)
    eal = tl.load(eal_ptr + rows64[:, None, None] * stride_ea + ecol, mask=m3, other=0) != 0
    enoise_at = enoise_ptr + rows64[:, None, None] * (G * S) + ecol
    escores = _scores(eclean, zrow[:, :, None] + eoff + S, enoise_at, m3, E_NOISE)
    epad = tl.where(smask, 0.0, float("-inf"))[None, None, :]
    efilled = tl.where(eal, escores, _LOWEST) + epad
    eprobs, egates, echosen, erank = _topk(efilled, eal, sc[None, None, :], KS, E_NORM, 2)
    elog, ehas = _lse(eclean, eal, epad, 2)  # (B, G_P)
    # the levels' product
    gates = ggates[:, :, None] * egates  # (B, G_P, S_P)
    out3 = rows64[:, None, None] * (G * S) + ecol
    tl.store(gates_ptr + out3, gates, mask=m3)
    tl.store(probs_ptr + out3, gprobs[:, :, None] * eprobs, mask=m3)
    tl.store(chosen_ptr + out3, (gchosen[:, :, None] & echosen).to(tl.int8), mask=m3)
    tl.store(egates_ptr + out3, egates, mask=m3)
    tl.store(eprobs_ptr + out3, eprobs, mask=m3)
    tl.store(echosen_ptr + out3, echosen.to(tl.int8), mask=m3)
    out2 = rows64[:, None] * G + gc[None, :]
    tl.store(ggates_ptr + out2, ggates, mask=m2)
    tl.store(gprobs_ptr + out2, gprobs, mask=m2)
    tl.store(gchosen_ptr + out2, gchosen.to(tl.int8), mask=m2)
    tl.store(else_ptr + out2, elog, mask=m2)
    tl.store(glse_ptr + rows64, glse, mask=rmask)
    for i in tl.static_range(KG):  # the chosen groups' chosen experts, in order
        in_group = (grank == i)[:, :, None]
        for j in tl.static_range(KS):
            hit = in_group & (erank == j)
            col = tl.sum(tl.sum(tl.where(hit, ecol, 0), axis=2), axis=1)  # (B,)
            tl.store(idx_ptr + rows64 * (KG * KS) + (i * KS + j), col.to(tl.int64), mask=rmask)
    # the gated activations: the gates as (B, G_P·S_P) columns, each expert's r columns
    c = tl.arange(0, G_P * S_P)
    cg, cs = c // S_P, c % S_P
    cvalid = (cg < G) & (cs < S)
    rr = tl.arange(0, R_P)
    mz = rmask[:, None, None] & cvalid[None, :, None] & (rr < R)[None, None, :]
    offz = (cg * S + cs)[None, :, None] * R + rr[None, None, :]  # (1, G_P·S_P, R_P)
    za = tl.load(zrow[:, :, None] + offz, mask=mz, other=0.0)
    g_c = tl.reshape(gates, (BLOCK_N, G_P * S_P)).to(za.dtype).to(tl.float32)[:, :, None]
    tl.store(
        zg_ptr + rows64[:, None, None] * ER + offz, (za.to(tl.float32) * g_c).to(za.dtype), mask=mz
    )
    # this block's sums: the group level's over the counted rows, each group's over its served
    af = a.to(tl.float32)
    gw = ghas.to(tl.float32) * af
    sv = served.to(tl.float32)  # (B, G_P)
    ew = ehas.to(tl.float32) * sv
    part = part_ptr + pid * P_W
    ec = 2 * G_P + 4  # where the expert level's sums start
    gs = gc[:, None] * S_P + sc[None, :]  # (G_P, S_P)
    m_gs = gmask[:, None] & smask[None, :]
    tl.store(part + gc, tl.sum(gchosen.to(tl.float32) * af[:, None], axis=0), mask=gmask)
    tl.store(part + G_P + gc, tl.sum(gprobs * af[:, None], axis=0), mask=gmask)
    tl.store(part + 2 * G_P, tl.sum(glse * glse * gw, axis=0))
    tl.store(part + 2 * G_P + 1, tl.sum(gw, axis=0))
    tl.store(part + 2 * G_P + 2, tl.sum(af, axis=0))
    counts = tl.sum(echosen.to(tl.float32) * sv[:, :, None], axis=0)  # (G_P, S_P)
    tl.store(part + ec + gs, counts, mask=m_gs)
    tl.store(part + ec + G_P * S_P + gs, tl.sum(eprobs * sv[:, :, None], axis=0), mask=m_gs)
    ez = ec + 2 * G_P * S_P
    tl.store(part + ez + gc, tl.sum(elog * elog * ew, axis=0), mask=gmask)
    tl.store(part + ez + G_P + gc, tl.sum(ew, axis=0), mask=gmask)
    tl.store(part + ez + 2 * G_P + gc, tl.sum(sv, axis=0), mask=gmask)


@triton.jit
def _finish_kernel(  # type: ignore[no-untyped-def]
    part_ptr, losses_ptr, gf_ptr, gscale_ptr, ef_ptr, escale_ptr, share_ptr, blocks, n_f,
    G: tl.constexpr, S: tl.constexpr, G_P: tl.constexpr, S_P: tl.constexpr,
    P_W: tl.constexpr, SHARED: tl.constexpr, HAS_ACT: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """One program: the blocks' sums added in order; the four losses (group balance and z,
    expert balance and z); the group level's ``f (g,)`` and ``(zscale, bscale)``; the expert
    level's ``f (g, s)``, ``zscale (g,)`` and ``bscale (g,)``; each group's share of the
    served tokens ``(g,)``."""
    acc = _block_sums(part_ptr, blocks, P_W, BLOCK_B)
    cols = tl.arange(0, P_W)
    acc2, cols2 = acc[None, :], cols[None, :]
    gc = tl.arange(0, G_P)
    gmask = gc < G
    # the group level: its sums lead, as top-k's
    f, balance, z, zscale, bscale = _level_finish(acc, n_f, G, G_P, P_W, SHARED, HAS_ACT)
    tl.store(losses_ptr, balance)
    tl.store(losses_ptr + 1, z)
    tl.store(gf_ptr + gc, f, mask=gmask)
    tl.store(gscale_ptr, zscale)
    tl.store(gscale_ptr + 1, bscale)
    # each group over the tokens it serves, weighted by its share of them
    sc = tl.arange(0, S_P)
    m_gs = gmask[:, None] & (sc < S)[None, :]
    ec = 2 * G_P + 4
    gs = gc[:, None] * S_P + sc[None, :]
    acc3, cols3 = acc[None, None, :], cols[None, None, :]
    ecount = tl.where(m_gs, _pick(acc3, cols3, (ec + gs)[:, :, None], 2), 0.0)
    epsum = _pick(acc3, cols3, (ec + G_P * S_P + gs)[:, :, None], 2)
    ez = ec + 2 * G_P * S_P
    ezsum = tl.where(gmask, _pick(acc2, cols2, (ez + gc)[:, None], 1), 0.0)  # padding: unset
    ewsum = tl.where(gmask, _pick(acc2, cols2, (ez + G_P + gc)[:, None], 1), 0.0)
    served = tl.where(gmask, _pick(acc2, cols2, (ez + 2 * G_P + gc)[:, None], 1), 0.0)
    ef = ecount / tl.maximum(tl.sum(ecount, axis=1), 1.0)[:, None]  # (G_P, S_P)
    enb = tl.maximum(served, 1.0)
    eden = tl.maximum(ewsum, 1.0)
    share = served / tl.maximum(tl.sum(served, axis=0), 1.0)
    balance = S * tl.sum(tl.where(m_gs, ef * epsum, 0.0), axis=1) / enb  # (G_P,)
    tl.store(losses_ptr + 2, tl.sum(share * balance, axis=0))
    tl.store(losses_ptr + 3, tl.sum(share * ezsum / eden, axis=0))
    tl.store(ef_ptr + gc[:, None] * S + sc[None, :], ef, mask=m_gs)
    tl.store(escale_ptr + gc, 1.0 / eden, mask=gmask)
    tl.store(escale_ptr + G + gc, 1.0 / enb, mask=gmask)
    tl.store(share_ptr + gc, share, mask=gmask)


@triton.jit
def _bwd_kernel(  # type: ignore[no-untyped-def]
    gzg_ptr, zl_ptr, gnoise_ptr, enoise_ptr, gal_ptr, eal_ptr, act_ptr,
    ggates_ptr, gprobs_ptr, gchosen_ptr, glse_ptr,
    egates_ptr, eprobs_ptr, echosen_ptr, else_ptr,
    gf_ptr, gscale_ptr, ef_ptr, escale_ptr, share_ptr,
    dgates_ptr, dprobs_ptr, dloss_ptr, gzl_ptr, zg_ptr,
    n, stride_zl, stride_ga, stride_ea, stride_gzg,
    ER: tl.constexpr, G: tl.constexpr, S: tl.constexpr, R: tl.constexpr,
    LG: tl.constexpr, LS: tl.constexpr, G_P: tl.constexpr, S_P: tl.constexpr,
    R_P: tl.constexpr, G_NOISE: tl.constexpr, E_NOISE: tl.constexpr,
    G_NORM: tl.constexpr, E_NORM: tl.constexpr, HAS_GG: tl.constexpr, HAS_GP: tl.constexpr,
    HAS_GBG: tl.constexpr, HAS_GZG: tl.constexpr, HAS_GBE: tl.constexpr,
    HAS_GZE: tl.constexpr, HAS_ACT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    zrow = zl_ptr + rows64[:, None] * stride_zl
    grow = gzl_ptr + rows64[:, None] * (ER + LG + G * LS)
    gc = tl.arange(0, G_P)
    gmask = gc < G
    m2 = rmask[:, None] & gmask[None, :]
    sc = tl.arange(0, S_P)
    smask = sc < S
    m3 = m2[:, :, None] & smask[None, None, :]
    ecol = gc[None, :, None] * S + sc[None, None, :]
    out2 = rows64[:, None] * G + gc[None, :]
    out3 = rows64[:, None, None] * (G * S) + ecol
    gal = tl.load(gal_ptr + rows64[:, None] * stride_ga + gc[None, :], mask=m2, other=0) != 0
    eal = tl.load(eal_ptr + rows64[:, None, None] * stride_ea + ecol, mask=m3, other=0) != 0
    ggates = tl.load(ggates_ptr + out2, mask=m2, other=0.0)
    gprobs = tl.load(gprobs_ptr + out2, mask=m2, other=0.0)
    gchosen = tl.load(gchosen_ptr + out2, mask=m2, other=0) != 0
    egates = tl.load(egates_ptr + out3, mask=m3, other=0.0)
    eprobs = tl.load(eprobs_ptr + out3, mask=m3, other=0.0)
    echosen = tl.load(echosen_ptr + out3, mask=m3, other=0) != 0
    # the experts' columns: ∂za = ∂zg · gate, ∂gate = Σ_r ∂zg · za
    c = tl.arange(0, G_P * S_P)
    cg, cs = c // S_P, c % S_P
    cvalid = (cg < G) & (cs < S)
    rr = tl.arange(0, R_P)
    mz = rmask[:, None, None] & cvalid[None, :, None] & (rr < R)[None, None, :]
    offz = (cg * S + cs)[None, :, None] * R + rr[None, None, :]
    za = tl.load(zrow[:, :, None] + offz, mask=mz, other=0.0)
    gz = tl.load(gzg_ptr + rows64[:, None, None] * stride_gzg + offz, mask=mz, other=0.0)
    gates = ggates[:, :, None] * egates  # (B, G_P, S_P), as the forward's
    g_c = tl.reshape(gates, (BLOCK_N, G_P * S_P)).to(za.dtype).to(tl.float32)[:, :, None]
    tl.store(grow[:, :, None] + offz, (gz.to(tl.float32) * g_c).to(za.dtype), mask=mz)
    tl.store(
        zg_ptr + rows64[:, None, None] * ER + offz, (za.to(tl.float32) * g_c).to(za.dtype), mask=mz
    )
    dg = tl.reshape(tl.sum(gz.to(tl.float32) * za.to(tl.float32), axis=2), (BLOCK_N, G_P, S_P))
    if HAS_GG:
        dg += tl.load(dgates_ptr + out3, mask=m3, other=0.0).to(tl.float32)
    # the product rule: ∂/∂G = Σ_s ∂/∂gates · H, ∂/∂H = ∂/∂gates · G (and the same for probs)
    dg_group = tl.sum(dg * egates, axis=2)  # (B, G_P)
    dg_experts = dg * ggates[:, :, None]
    if HAS_GP:
        dp = tl.load(dprobs_ptr + out3, mask=m3, other=0.0).to(tl.float32)
        dp_group = tl.sum(dp * eprobs, axis=2)
        dp_experts = dp * gprobs[:, :, None]
    else:
        dp_group = tl.zeros((BLOCK_N, G_P), dtype=tl.float32)
        dp_experts = tl.zeros((BLOCK_N, G_P, S_P), dtype=tl.float32)
    if HAS_ACT:  # noqa: SIM108  (a constexpr branch in the kernel)
        a = tl.load(act_ptr + rows64, mask=rmask, other=0) != 0
    else:
        a = rmask
    served = gchosen & a[:, None]
    # the group level
    if HAS_GBG:
        f = tl.load(gf_ptr + gc, mask=gmask, other=0.0)
        bw = tl.where(a, tl.load(gscale_ptr + 1) * G, 0.0)
        dp_group += tl.load(dloss_ptr).to(tl.float32) * bw[:, None] * f[None, :]
    grad = _topk_grad(gprobs, ggates, gchosen, gal, dg_group, dp_group, G_NORM, 1)
    clean_grad = grad
    if HAS_GZG:
        clean = tl.load(zrow + ER + gc[None, :], mask=m2, other=0.0).to(tl.float32)
        lse = tl.load(glse_ptr + rows64, mask=rmask, other=0.0)
        has = tl.max(gal.to(tl.int32), axis=1) > 0
        zw = tl.where(has & a, tl.load(gscale_ptr), 0.0)
        clean_grad += tl.load(dloss_ptr + 1).to(tl.float32) * _z_grad(clean, lse, gal, zw, 1)
    tl.store(grow + ER + gc[None, :], clean_grad.to(za.dtype), mask=m2)
    if LG > G:  # the noise scales: nothing when the noisy router is evaluated
        if G_NOISE:
            scale = tl.load(zrow + ER + G + gc[None, :], mask=m2, other=0.0).to(tl.float32)
            eps = tl.load(gnoise_ptr + rows64[:, None] * G + gc[None, :], mask=m2, other=0.0)
            scale_grad = grad * eps.to(tl.float32) * tl.sigmoid(scale)
        else:
            scale_grad = tl.zeros((BLOCK_N, G_P), dtype=tl.float32)
        tl.store(grow + ER + G + gc[None, :], scale_grad.to(za.dtype), mask=m2)
    # each group's experts, its losses weighted by its share
    if HAS_GBE:
        m_gs = (gmask[:, None] & smask[None, :])[None, :, :]
        f = tl.load(ef_ptr + ecol, mask=m_gs, other=0.0)  # (1, G_P, S_P)
        w = tl.load(share_ptr + gc, mask=gmask, other=0.0) * tl.load(
            escale_ptr + G + gc, mask=gmask, other=0.0
        )  # (G_P,)
        bw = tl.where(served, w[None, :] * S, 0.0)  # (B, G_P)
        dp_experts += tl.load(dloss_ptr + 2).to(tl.float32) * bw[:, :, None] * f
    grad = _topk_grad(eprobs, egates, echosen, eal, dg_experts, dp_experts, E_NORM, 2)
    clean_grad = grad
    eoff = ER + LG + gc[None, :, None] * LS + sc[None, None, :]
    if HAS_GZE:
        clean = tl.load(zrow[:, :, None] + eoff, mask=m3, other=0.0).to(tl.float32)
        lse = tl.load(else_ptr + out2, mask=m2, other=0.0)  # (B, G_P)
        has = tl.max(eal.to(tl.int32), axis=2) > 0
        w = tl.load(share_ptr + gc, mask=gmask, other=0.0) * tl.load(
            escale_ptr + gc, mask=gmask, other=0.0
        )
        zw = tl.where(has & served, w[None, :], 0.0)
        clean_grad += tl.load(dloss_ptr + 3).to(tl.float32) * _z_grad(clean, lse, eal, zw, 2)
    tl.store(grow[:, :, None] + eoff, clean_grad.to(za.dtype), mask=m3)
    if LS > S:
        if E_NOISE:
            scale = tl.load(zrow[:, :, None] + eoff + S, mask=m3, other=0.0).to(tl.float32)
            eps = tl.load(enoise_ptr + rows64[:, None, None] * (G * S) + ecol, mask=m3, other=0.0)
            scale_grad = grad * eps.to(tl.float32) * tl.sigmoid(scale)
        else:
            scale_grad = tl.zeros((BLOCK_N, G_P, S_P), dtype=tl.float32)
        tl.store(grow[:, :, None] + eoff + S, scale_grad.to(za.dtype), mask=m3)


class HierarchicalForward(NamedTuple):
    """What :func:`gate_forward` returns (and :func:`gate_backward` reads): its inputs, then
    its outputs."""

    zl: Tensor  # (n, e·r + l_g + g·l_s)
    er: int
    group_allowed: Tensor  # (n|1, g) bool
    expert_allowed: Tensor  # (n|1, g, s) bool
    group_noise: Tensor | None  # (n, g)
    expert_noise: Tensor | None  # (n, g, s)
    group_logits: int  # l_g
    settings: tuple[int, bool, int, bool]  # each level's k and normalize: groups, experts
    active: Tensor | None  # (n,) bool, the tokens the losses count, or None: all
    zg: Tensor  # (n, e·r) gated activations, zl's dtype
    gates: Tensor  # (n, e) float32, the levels' product
    probs: Tensor  # (n, e) float32
    chosen: Tensor  # (n, e) bool
    indices: Tensor  # (n, k_g·k_s) int64
    group: tuple[Tensor, Tensor, Tensor, Tensor]  # gates, probs, chosen (n, g); lse (n,)
    experts: tuple[Tensor, Tensor, Tensor, Tensor]  # gates, probs, chosen (n, g, s); lse (n, g)
    losses: Tensor  # (4,) group balance, group z, expert balance, expert z
    stats: tuple[
        Tensor, ...
    ]  # f (g,), (zscale, bscale), f (g, s), (zscale, bscale) (2g,), share (g,)

    @property
    def aux(self) -> tuple[Tensor, ...]:
        """The four losses, in the gating's ``aux_names`` order."""
        return tuple(self.losses.unbind())

    def record(self) -> HierarchicalRecord:
        """What :func:`gate_backward` reads, for a node to keep until its backward: not the
        gated activations ``zg`` (``(n, e·r)``, recomputed there), the levels' product, the
        indices or the losses."""
        return HierarchicalRecord(
            self.zl, self.er, self.group_allowed, self.expert_allowed, self.group_noise,
            self.expert_noise, self.group_logits, self.settings, self.active, self.group,
            self.experts, self.stats,
        )  # fmt: skip


class HierarchicalRecord(NamedTuple):
    """What :func:`gate_backward` reads of a :class:`HierarchicalForward`
    (:meth:`HierarchicalForward.record`)."""

    zl: Tensor
    er: int
    group_allowed: Tensor
    expert_allowed: Tensor
    group_noise: Tensor | None
    expert_noise: Tensor | None
    group_logits: int
    settings: tuple[int, bool, int, bool]
    active: Tensor | None
    group: tuple[Tensor, Tensor, Tensor, Tensor]
    experts: tuple[Tensor, Tensor, Tensor, Tensor]
    stats: tuple[Tensor, ...]


def supports(
    zl: Tensor, er: int, group_allowed: Tensor, expert_allowed: Tensor, lg: int, k: tuple[int, int]
) -> bool:
    """Whether the kernels take this routing: ``zl`` of a 16- or 32-bit float dtype, rows
    contiguous; ``l_g`` of ``g`` or ``2g`` columns, each group's of ``s`` or ``2s``; each
    level's ``k`` at most its width and 4; a block of rows within the kernels' tile."""
    g, s = expert_allowed.shape[-2:]
    e = g * s
    width = zl.shape[-1] - er - lg if zl.dim() == 2 else -1
    return (
        zl.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and zl.dim() == 2
        and zl.stride(1) == 1
        and zl.shape[0] > 0
        and g > 0
        and s > 0
        and group_allowed.shape[-1] == g
        and er % e == 0
        and lg in (g, 2 * g)
        and width in (e, 2 * e)
        and 0 < k[0] <= min(g, 4)
        and 0 < k[1] <= min(s, 4)
        and _pow2(g) * _pow2(s) * _pow2(max(er // e, 1)) <= _TILE
    )


def gate_forward(
    zl: Tensor,
    er: int,
    group_allowed: Tensor,
    expert_allowed: Tensor,
    group_noise: Tensor | None,
    expert_noise: Tensor | None,
    group_logits: int,
    settings: tuple[int, bool, int, bool],
    active: Tensor | None = None,
) -> HierarchicalForward:
    """Route the logit columns of ``zl`` at both levels and gate its first ``e·r`` columns:
    the values of :func:`~moracl.experts.routers.hierarchical_gating.
    hierarchical_gate_forward` (``settings``: the group level's ``k`` and ``normalize``,
    then the expert level's)."""
    n = zl.shape[0]
    g, s = expert_allowed.shape[-2:]
    e, r = g * s, er // (g * s)
    kg, g_norm, ks, e_norm = settings
    g_p, s_p = _pow2(g), _pow2(s)
    dev = zl.device
    new = functools.partial(torch.empty, device=dev, dtype=torch.float32)
    gal, stride_ga = _allowed_arg(group_allowed)
    eal, stride_ea = _allowed_arg(expert_allowed.flatten(-2))
    rows = _rows_per_block(g_p * s_p, r)
    blocks = triton.cdiv(n, rows)
    p_w = _pow2(2 * g_p + 4 + 2 * g_p * s_p + 3 * g_p)
    zg = torch.empty(n, er, device=dev, dtype=zl.dtype)
    gates, probs = new(n, e), new(n, e)
    chosen = torch.empty(n, e, device=dev, dtype=torch.bool)
    indices = torch.empty(n, kg * ks, device=dev, dtype=torch.int64)
    group = (new(n, g), new(n, g), torch.empty(n, g, device=dev, dtype=torch.bool), new(n))
    experts = (
        new(n, g, s),
        new(n, g, s),
        torch.empty(n, g, s, device=dev, dtype=torch.bool),
        new(n, g),
    )
    part = new(blocks, p_w)
    gn = group_noise.contiguous() if group_noise is not None else gates  # unread without noise
    en = expert_noise.contiguous() if expert_noise is not None else gates
    lg = group_logits
    _fwd_kernel[(blocks,)](
        zl, gn, en, gal, eal, _active_arg(active, gates),
        zg, gates, probs, chosen.view(torch.int8), indices,
        group[0], group[1], group[2].view(torch.int8), group[3],
        experts[0], experts[1], experts[2].view(torch.int8), experts[3], part,
        n, zl.stride(0), stride_ga, stride_ea,
        ER=er, G=g, S=s, R=r, LG=lg, LS=(zl.shape[1] - er - lg) // g, G_P=g_p, S_P=s_p,
        R_P=_pow2(r), KG=kg, KS=ks, P_W=p_w,
        G_NOISE=group_noise is not None, E_NOISE=expert_noise is not None,
        G_NORM=g_norm, E_NORM=e_norm, HAS_ACT=active is not None, BLOCK_N=rows,
    )  # fmt: skip
    losses = new(4)
    stats = new(g + 2 + e + 3 * g)
    gf, gscale, ef, escale, share = stats.split([g, 2, e, 2 * g, g])
    _finish_kernel[(1,)](
        part, losses, gf, gscale, ef, escale, share, blocks, float(n),
        G=g, S=s, G_P=g_p, S_P=s_p, P_W=p_w, SHARED=group_allowed.shape[0] == 1,
        HAS_ACT=active is not None, BLOCK_B=64,
    )  # fmt: skip
    return HierarchicalForward(
        zl, er, group_allowed, expert_allowed, group_noise, expert_noise, lg, settings, active,
        zg, gates, probs, chosen, indices, group, experts, losses, (gf, gscale, ef, escale, share),
    )  # fmt: skip


def gate_backward(
    fwd: HierarchicalRecord, grad_zg: Tensor, grads: RouteGrads
) -> tuple[Tensor, Tensor]:
    """``∂L/∂zl`` and ``zg (n, e·r)`` recomputed from ``∂L/∂zg`` and the routing outputs'
    gradients (``grads.aux``: the four losses'), given the forward's record
    (:meth:`HierarchicalForward.record`): the values of
    :func:`~moracl.experts.routers.hierarchical_gating.hierarchical_gate_backward`."""
    zl, er, lg = fwd.zl, fwd.er, fwd.group_logits
    n, width = zl.shape
    g, s = fwd.expert_allowed.shape[-2:]
    r = er // (g * s)
    _, g_norm, _, e_norm = fwd.settings
    gal, stride_ga = _allowed_arg(fwd.group_allowed)
    eal, stride_ea = _allowed_arg(fwd.expert_allowed.flatten(-2))
    gzl = torch.empty(n, width, device=zl.device, dtype=zl.dtype)
    zg = torch.empty(n, er, device=zl.device, dtype=zl.dtype)
    grad_zg = grad_zg if grad_zg.stride(-1) == 1 else grad_zg.contiguous()
    dummy = fwd.group[0]  # a float32 tensor for the pointers the kernel leaves unread
    present = [a is not None for a in grads.aux]
    dloss = torch.stack(
        [a.float() if a is not None else dummy.new_zeros(()) for a in grads.aux]
    ) if any(present) else dummy  # fmt: skip
    gf, gscale, ef, escale, share = fwd.stats
    rows = _rows_per_block(_pow2(g) * _pow2(s), r)
    _bwd_kernel[(triton.cdiv(n, rows),)](
        grad_zg, zl,
        fwd.group_noise.contiguous() if fwd.group_noise is not None else dummy,
        fwd.expert_noise.contiguous() if fwd.expert_noise is not None else dummy,
        gal, eal, _active_arg(fwd.active, dummy),
        fwd.group[0], fwd.group[1], fwd.group[2].view(torch.int8), fwd.group[3],
        fwd.experts[0], fwd.experts[1], fwd.experts[2].view(torch.int8), fwd.experts[3],
        gf, gscale, ef, escale, share,
        grads.gates.contiguous() if grads.gates is not None else dummy,
        grads.probs.contiguous() if grads.probs is not None else dummy,
        dloss, gzl, zg,
        n, zl.stride(0), stride_ga, stride_ea, grad_zg.stride(0),
        ER=er, G=g, S=s, R=r, LG=lg, LS=(width - er - lg) // g, G_P=_pow2(g), S_P=_pow2(s),
        R_P=_pow2(r), G_NOISE=fwd.group_noise is not None,
        E_NOISE=fwd.expert_noise is not None, G_NORM=g_norm, E_NORM=e_norm,
        HAS_GG=grads.gates is not None, HAS_GP=grads.probs is not None,
        HAS_GBG=present[0], HAS_GZG=present[1], HAS_GBE=present[2], HAS_GZE=present[3],
        HAS_ACT=fwd.active is not None, BLOCK_N=rows,
    )  # fmt: skip
    return gzl, zg
