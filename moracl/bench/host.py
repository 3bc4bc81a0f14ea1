"""``moracl bench host``: host time per adapted layer, forward and backward, for each
adapter kind and router, where the GPU cannot hide it.

An eager training step of a mixture is bound by the host (Python and kernel launches), not
the GPU: the whole-step tables of ``moracl bench experts`` show it only as ratios that move
by up to 20 % between runs. This benchmark measures the host's part alone. Seven square
linear layers, named as the Llama projections so that every method wraps all seven, run in
sequence on ``--tokens`` tokens (64: a few microseconds of GPU work a layer, so the wall
time is the host's). A method's time per layer is its stack's time less the frozen stack's
(``floor``), over seven: the minimum over ``--repeats`` rounds of ``--iters`` calls, as the
host's noise only adds. ``forward`` runs under autograd with the output dropped; ``fwd+bwd``
is a training step's forward (with the routers' auxiliary losses in the loss) and backward,
without the optimiser. On CUDA the routing runs its Triton kernels, on the CPU its closed
form, and the CPU's figures include its own compute of the layers (on one thread by
default, ``--threads``): compare devices through ``× LoRA`` only.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from moracl.bench import adapters, experts
from moracl.bench.common import (
    PROJECTIONS,
    add_caveat_arg,
    command_argv,
    device_arg,
    free,
    machine,
    markdown_table,
    positive_int,
    record_meta,
    sync_device,
    write_record,
)

__all__ = ["METHODS", "Stack", "adapted_projections", "main", "markdown", "parse_args", "run"]

METHODS = [
    "floor",
    "moracl-lora",
    "moracl-dora",
    "moracl-mora-sharing",
    "moracl-mora-rotation",
    "peft-lora",
    "top2-of-8",
    "top2-of-8-per-sample",
    "dynamic",
    "task",
    "hierarchical-2x4",
    "mora-top2-of-8",
]
_LAYERS = len(PROJECTIONS)


class Stack(nn.Module):
    """``x (b, t, d) -> (b, t, d)`` through seven frozen ``d × d`` linear layers in turn,
    named as the Llama projections (``layers.q_proj``, ...)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({n: nn.Linear(hidden, hidden, bias=False) for n in PROJECTIONS})
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x


def _wrapped(method: str, hidden: int, rank: int, device: torch.device) -> nn.Module:
    """The frozen stack wrapped by ``method`` (the adapter or expert benchmark's wrapping),
    every one of its seven layers adapted."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = Stack(hidden).to(device=device, dtype=dtype)
    if method in adapters.METHODS:
        model = adapters._wrap(method, base, rank)
    else:
        model = experts._wrap(method, base, rank)
    model = model.to(device).train()
    adapted = adapted_projections(model)
    if adapted != (0 if method == "floor" else _LAYERS):
        raise ValueError(
            f"method {method!r} adapted {adapted} of the stack's {_LAYERS} layers; expected all"
        )
    return model


def adapted_projections(model: nn.Module) -> int:
    """How many of the stack's projections ``model`` has replaced by an adapted layer (a
    module of another type than ``nn.Linear`` under a projection's name)."""
    return sum(
        1
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in PROJECTIONS and type(module) is not nn.Linear
    )


def _step_fns(
    method: str, model: nn.Module, x: torch.Tensor, task_ids: torch.Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(forward, forward + backward)`` of ``model`` on ``x`` under the benchmarks' autocast
    (bf16 on CUDA)."""
    device = x.device
    extra = {"task_ids": task_ids} if method == "task" else {}
    aux = getattr(model, "aux_loss", None) if method in experts.METHODS else None
    params = list(model.parameters())  # as an optimiser holds them: no module walk a step

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward() -> None:
        with autocast():
            model(x, **extra)

    def forward_backward() -> None:
        with autocast():
            loss = cast(torch.Tensor, model(x, **extra)).float().square().mean()
            if aux is not None:
                loss = loss + aux()
        loss.backward()
        x.grad = None
        for p in params:
            p.grad = None

    return forward, forward_backward


def _host_us(fn: Callable[[], None], device: torch.device, iters: int, repeats: int) -> float:
    """The fastest of ``repeats`` rounds of ``iters`` calls of ``fn``, in µs a call."""
    for _ in range(3):
        fn()
    best = math.inf
    for _ in range(repeats):
        sync_device(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync_device(device)
        best = min(best, (time.perf_counter() - start) / iters)
    return best * 1e6


def run(
    methods: list[str],
    *,
    hidden: int,
    tokens: int,
    rank: int,
    iters: int,
    repeats: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """One row per method: µs per call of the whole stack (``forward_us``, ``step_us``) and
    per adapted layer over the frozen stack (``forward_layer_us``, ``step_layer_us``), and
    ``x_lora``, the step's time per layer over ``moracl-lora``'s."""
    batch = 4 if tokens % 4 == 0 else 1  # rows for the per-sample router
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(batch, tokens // batch, hidden, generator=gen).to(device, dtype)
    x.requires_grad_(True)
    task_ids = (torch.arange(batch) % 4).to(device)
    wanted = ["floor", *[m for m in methods if m != "floor"]]
    rows: list[dict[str, Any]] = []
    for method in wanted:
        free(device)
        model = _wrapped(method, hidden, rank, device)
        forward, step = _step_fns(method, model, x, task_ids)
        rows.append(
            {
                "method": method,
                "forward_us": _host_us(forward, device, iters, repeats),
                "step_us": _host_us(step, device, iters, repeats),
            }
        )
        del model, forward, step
    floor = rows[0]
    for r in rows:
        r["forward_layer_us"] = (r["forward_us"] - floor["forward_us"]) / _LAYERS
        r["step_layer_us"] = (r["step_us"] - floor["step_us"]) / _LAYERS
    lora = next((r for r in rows if r["method"] == "moracl-lora"), None)
    for r in rows:
        ok = lora is not None and lora["step_layer_us"] > 0 and r["method"] != "floor"
        r["x_lora"] = r["step_layer_us"] / lora["step_layer_us"] if ok and lora else None
    return [r for r in rows if r["method"] in methods]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked options of ``moracl bench host`` (a bad one: argparse's usage and error,
    exit status 2)."""
    parser = argparse.ArgumentParser(prog="moracl bench host", description=__doc__)
    parser.add_argument(
        "--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument(
        "--hidden", type=positive_int, default=None, help="default: 2048 on CUDA, 256 on CPU"
    )
    parser.add_argument("--tokens", type=positive_int, default=64)
    parser.add_argument("--rank", type=positive_int, default=16)
    parser.add_argument("--iters", type=positive_int, default=200)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads on the CPU (default 1: the host's one Python thread; more "
        "threads make the CPU's own compute, and so the figures, vary from run to run)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    add_caveat_arg(parser)
    args: argparse.Namespace = parser.parse_args(argv)
    if args.hidden is not None and args.hidden % 8:
        parser.error(f"--hidden must be a multiple of 8 (MoRA's compressions), got {args.hidden}")
    return args


def markdown(result: dict[str, Any], machine_line: str | None = None) -> str:
    """The benchmark's table from its ``--json`` results."""
    rows = [
        [
            r["method"],
            f"{r['forward_layer_us']:.0f}",
            f"{r['step_layer_us']:.0f}",
            "—" if r["x_lora"] is None else f"{r['x_lora']:.2f}",
            f"{r['forward_us']:.0f}",
            f"{r['step_us']:.0f}",
        ]
        for r in result["results"]
    ]
    head = (
        f"### host time per layer, {result['device_type']}: hidden {result['hidden']}, "
        f"{result['tokens']} tokens, r={result['rank']}, 7 layers"
    )
    table = markdown_table(
        [
            "method",
            "forward µs/layer",
            "fwd+bwd µs/layer",
            "× LoRA",
            "stack forward µs",
            "stack fwd+bwd µs",
        ],
        rows,
    )
    return f"{head}\n{machine_line}\n\n{table}" if machine_line else f"{head}\n\n{table}"


def main(argv: list[str] | None = None) -> int:
    argv = command_argv(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    hidden = args.hidden or (2048 if device.type == "cuda" else 256)
    methods = args.methods or [m for m in METHODS if m != "peft-lora" or adapters._has_peft()]
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        meta = record_meta("host", argv, device=device) if args.json else {}
        rows = run(
            methods,
            hidden=hidden,
            tokens=args.tokens,
            rank=args.rank,
            iters=args.iters,
            repeats=args.repeats,
            device=device,
        )
        line = machine(device)
    finally:
        torch.set_num_threads(threads)
    result = {
        "device_type": device.type,
        "hidden": hidden,
        "tokens": args.tokens,
        "rank": args.rank,
        "device": line,
        "results": rows,
    }
    print("\n" + markdown(result, line))
    if args.json:
        notes = [
            f"fastest of {args.repeats} rounds of {args.iters} calls per method, after 3 "
            "warm-up calls; methods one after another in one process",
            *args.caveats,
        ]
        write_record(args.json, "host", meta, result, caveats=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
