"""The adaptive-computation rows of ``moracl bench experts``.

The block is a mixture MLP of the benchmark's sizes, ``x + down(gelu(up(norm(x))))`` with
``up`` (``hidden -> intermediate``) and ``down`` frozen linear layers each under a top-2-of-8
LoRA mixture, repeated under :class:`~moracl.experts.act.AdaptiveComputation` with
``max_steps = 4`` on every token of the benchmark's batch.  The halting unit's weights are
random (``N(0, 3²/d)``, seed 0) and its bias is set, by bisection on the timed batch's
halting logits at inference, so that the tokens' mean number of steps ``N`` is about 2
(:data:`TARGET_STEPS`); every row builds the same block.

Rows: a training step (forward, backward, AdamW on the experts, routers and halting unit) with
the ``masked`` loop (every token through 4 steps) and with the ``token`` loop (each step on
the still-running tokens only), and a forward at inference with each.  ``mean_steps`` is the
tokens' mean ``N`` in the row's last timed call; ``x_steps`` (on the ``token`` rows) is the
row's time over the ``masked`` row's time scaled by ``mean_steps / 4`` — 1.0 when the cost
follows the steps computed exactly.  The ACT rows never run under ``torch.compile``; the
training rows always run eagerly, and with ``--graphs`` the inference rows replay CUDA
graphs: the fixed-step forward as one graph, the early exit as one graph per step size
(``AdaptiveComputation(cuda_graphs=True)``: the block and the bookkeeping of a step in one
replay, one host synchronisation per step to read the running count).  The mixtures'
auxiliary losses are not added (no model wrapper collects them here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moracl.bench.common import LlamaShape, markdown_table
from moracl.experts.act import AdaptiveComputation

__all__ = [
    "ACT_METHODS",
    "MAX_STEPS",
    "TARGET_STEPS",
    "MixtureMLP",
    "act_markdown",
    "add_ratios",
    "build_act",
    "make_act_step",
]

#: the ACT rows: (method, training?, loop)
_ROWS = {
    "act-train-fixed4": (True, "masked"),
    "act-train-exit": (True, "token"),
    "act-infer-fixed4": (False, "masked"),
    "act-infer-exit": (False, "token"),
}
ACT_METHODS = list(_ROWS)
MAX_STEPS = 4
#: the tokens' mean number of steps the halting bias is set for
TARGET_STEPS = 2.0


class MixtureMLP(nn.Module):
    """``x + down(gelu(up(norm(x))))``: ``x (n, d)``, ``up`` ``d -> f`` and ``down`` ``f -> d``
    frozen linear layers each under a top-2-of-8 LoRA mixture (rank ``rank``).  Every token's
    output depends on that token alone (routing per token), so the ``token`` loop applies."""

    def __init__(self, hidden: int, intermediate: int, rank: int) -> None:
        super().__init__()
        from moracl.adapters.base import AdapterConfig
        from moracl.experts.mixture import ExpertGroup, MixtureConfig
        from moracl.experts.routers.config import RouterConfig
        from moracl.layer import MoRALinear

        lora = {"kind": "lora", "rank": rank, "alpha": 2.0 * rank}  # as the other mixture rows
        config = MixtureConfig(
            router=RouterConfig(type="topk", k=2),
            groups=(ExpertGroup(AdapterConfig.from_dict(lora), 8),),
        )
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.up = MoRALinear(nn.Linear(hidden, intermediate, bias=False))
        self.down = MoRALinear(nn.Linear(intermediate, hidden, bias=False))
        for layer in (self.up, self.down):
            layer.add_adapter("default", config)
            layer.set_active(["default"])
            with torch.no_grad():  # non-zero experts, so that the mixtures change the states
                for name, p in layer.adapters.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.up(self.norm(x)))  # (n, f)
        out: torch.Tensor = x + self.down(h)  # (n, d)
        return out


def build_act(
    shape: LlamaShape, rank: int, device: torch.device, dtype: torch.dtype, x: torch.Tensor
) -> tuple[AdaptiveComputation, float]:
    """The benchmark's ACT module on ``device`` (frozen layers in ``dtype``) and its tokens'
    mean steps at inference on ``x (n, d)``, the halting bias bisected for
    :data:`TARGET_STEPS`."""
    torch.manual_seed(0)
    block = MixtureMLP(shape.hidden, shape.intermediate, rank)
    act = AdaptiveComputation(block, features=shape.hidden, max_steps=MAX_STEPS)
    with torch.no_grad():
        act.act_halt.weight.normal_(0, 3.0 / shape.hidden**0.5)
    for layer in (block.up, block.down):
        layer.base_layer.to(dtype)
    act.to(device).eval()
    with torch.no_grad(), _autocast(device):
        s, logits = x, []
        for _ in range(MAX_STEPS):  # the states do not depend on the halting bias
            s = block(s)
            logits.append((s.float() @ act.act_halt.weight.float().t()).squeeze(-1))  # (n,)
        z = torch.stack(logits)  # (k, n): w · s_k
        low, high = -20.0, 20.0
        for _ in range(30):  # the mean steps fall as the bias rises
            bias = (low + high) / 2
            if _steps(z + bias, act.epsilon).mean() > TARGET_STEPS:
                low = bias
            else:
                high = bias
        act.act_halt.bias.fill_(bias)
        mean = float(act(x).steps.float().mean())
    return act, mean


def _steps(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``N (n,)`` for halting logits ``z (k, n)``: the first step whose cumulative halting
    probability exceeds ``1 − epsilon`` (the last step at the latest)."""
    h = torch.sigmoid(z)
    h[-1] = 1.0
    over = h.cumsum(0) > 1 - epsilon  # (k, n)
    return over.float().argmax(0).float() + 1


def _autocast(device: torch.device, cache: bool = True) -> torch.autocast:
    """bf16 autocast on CUDA (as the benchmark's other rows), off elsewhere."""
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=cache
    )


def make_act_step(
    method: str,
    shape: LlamaShape,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    graphs: bool = False,
) -> tuple[Callable[[], None], list[nn.Parameter], Callable[[], float]]:
    """One timed call of the ACT row ``method``, its trainable parameters, and a function
    giving the tokens' mean steps in the last call.  ``graphs`` (CUDA, inference rows): the
    fixed-step forward as one CUDA graph, and the early exit's steps as one graph per
    bucket of running tokens (``cuda_graphs=True``)."""
    training, loop = _ROWS[method]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.tokens, shape.hidden, generator=gen).to(device)  # (n, d)
    act, _ = build_act(shape, rank, device, dtype, x)
    act.train(training)
    params = [p for p in act.parameters() if p.requires_grad]
    if graphs and not training:
        replay, mean = _graphed_inference(act, x, loop)
        return replay, params, mean
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda, foreach=not cuda)
    last: list[torch.Tensor] = []

    def step() -> None:
        if training:
            with _autocast(device):
                res = act(x, loop=loop)
                loss = res.output.float().square().mean() + res.ponder_cost
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), _autocast(device):
                res = act(x, loop=loop)
        last[:] = [res.steps.detach()]

    def mean_steps() -> float:
        return float(last[0].float().mean()) if last else float("nan")

    return step, params, mean_steps


def _graphed_inference(
    act: AdaptiveComputation, x: torch.Tensor, loop: str
) -> tuple[Callable[[], None], Callable[[], float]]:
    from moracl.cuda_graphs import GraphedStep

    last: list[torch.Tensor] = []
    if loop == "masked":

        def fixed(t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), _autocast(t.device, cache=False):
                res = act(t, loop="masked")
                return torch.cat([res.output.float(), res.steps.float()[:, None]], dim=-1)

        graphed = GraphedStep(fixed, x, warmup=2)

        def step() -> None:
            last[:] = [graphed(x)[:, -1]]

    else:
        act._inference.graphs = True  # as AdaptiveComputation(..., cuda_graphs=True)

        def step() -> None:
            with torch.no_grad(), _autocast(x.device):
                last[:] = [act(x, loop="token").steps]

    def mean_steps() -> float:
        return float(last[0].float().mean()) if last else float("nan")

    return step, mean_steps


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set ``x_steps`` on every ACT row of ``rows``: for a ``token`` row its time over the
    ``masked`` row's time × ``mean_steps / 4`` (``None`` without that row, and on the
    ``masked`` rows)."""
    ms = {r["method"]: float(r["ms"]) for r in rows}
    for r in rows:
        if r["method"] not in _ROWS:
            continue
        fixed = r["method"].replace("-exit", "-fixed4")
        exits = r["method"].endswith("-exit") and fixed in ms
        r["x_steps"] = (
            float(r["ms"]) / (ms[fixed] * float(r["mean_steps"]) / MAX_STEPS) if exits else None
        )


def act_markdown(rows: list[dict[str, Any]]) -> str:
    """The ACT rows' table (empty when ``rows`` has none)."""
    table = [
        [
            r["method"],
            f"{r['ms']:.1f}",
            f"{r['mean_steps']:.2f}",
            "—" if r["x_steps"] is None else f"{r['x_steps']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['peak_gib']:.2f}",
            f"{r['trainable']:,}",
        ]
        for r in rows
        if r["method"] in _ROWS
    ]
    if not table:
        return ""
    head = (
        f"Adaptive computation (a top-2-of-8 mixture MLP under a halting unit, at most "
        f"{MAX_STEPS} steps; training eager): `x_steps` = ms / (fixed-4 ms × mean steps / "
        f"{MAX_STEPS})"
    )
    header = ["method", "ms", "mean steps", "x_steps", "tokens/s", "peak GiB", "trainable"]
    return f"{head}\n\n{markdown_table(header, table)}"
