"""Step time of every ``MoRAOptimizer`` configuration against ``torch.optim.AdamW(foreach=True)``.

    python -m moracl.bench.optim --device cpu --params-size small --json out/optim.json

Two measurements, printed as one markdown table:

* **optimiser step** on LoRA-shaped adapter parameters (``A: r × d`` and ``B: d × r`` for four
  projections per layer) with fixed random gradients: each configuration's ``step()`` (SAM:
  ``first_step`` + ``second_step``, without the passes) against AdamW(foreach) on the same
  tensors, and LARS against its own base (target: ≤ 1.10×);
* **training step** of a small adapter model (frozen linear layers + LoRA): SAM's two-pass
  ``step(closure)`` against a plain forward/backward/step (target: ≤ 2.05×), next to the floor
  of two forward/backward passes and one step without SAM's own arithmetic.

Configurations are timed interleaved, ``--repeats`` times, and the best (minimum) time per step
is reported, as ``timeit`` does: on a shared machine the other timings measure the neighbours.
On CUDA the timing uses events between ``synchronize`` calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl.adapters.base import ParamRole
from moracl.bench.common import (
    add_caveat_arg,
    command_argv,
    device_arg,
    positive_int,
    record_meta,
    write_record,
)
from moracl.optim import LarsConfig, MoRAOptimizer, SAMConfig

__all__ = ["main", "markdown", "parse_args", "run"]

# (layers, d, rank): four adapted projections per layer
PARAM_SIZES: dict[str, tuple[int, int, int]] = {"small": (12, 768, 8), "large": (32, 4096, 16)}
# (layers, d, rank, batch) of the end-to-end model
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {
    "small": (4, 256, 8, 64),
    "large": (8, 1024, 16, 256),
}


class _LoRA(nn.Module):
    def __init__(self, d: int, rank: int, device: torch.device) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, d, device=device) / d**0.5)
        self.B = nn.Parameter(torch.zeros(d, rank, device=device))

    def param_roles(self) -> dict[str, ParamRole]:
        return {"A": ParamRole.A, "B": ParamRole.B}

    def forward(self, x: Tensor) -> Tensor:  # x: (b, d) -> (b, r) -> (b, d)
        return x @ self.A.T @ self.B.T


class _Adapters(nn.Module):
    """Just the adapter parameters of a ``layers``-deep model (no forward)."""

    def __init__(self, layers: int, d: int, rank: int, device: torch.device) -> None:
        super().__init__()
        self.lora = nn.ModuleList(_LoRA(d, rank, device) for _ in range(4 * layers))


class _AdapterMLP(nn.Module):
    """Frozen ``d × d`` linear layers, each with a LoRA update, and a trainable head."""

    def __init__(self, layers: int, d: int, rank: int, device: torch.device) -> None:
        super().__init__()
        self.base = nn.ModuleList(nn.Linear(d, d, device=device) for _ in range(layers))
        self.base.requires_grad_(False)
        self.lora = nn.ModuleList(_LoRA(d, rank, device) for _ in range(layers))
        self.head = nn.Linear(d, 10, device=device)

    def forward(self, x: Tensor) -> Tensor:  # x: (b, d) -> (b, 10)
        for base, lora in zip(self.base, self.lora):
            x = F.gelu(base(x) + lora(x))
        return self.head(x)


@dataclass(frozen=True)
class _Config:
    name: str
    base: str
    lars: bool = False
    sam: SAMConfig | None = None

    def build(self, module: nn.Module) -> MoRAOptimizer:
        return MoRAOptimizer(
            module,
            base=self.base,
            lr=1e-4,
            weight_decay=0.0,  # as the reference; see _optimizer_rows
            loraplus_ratio=16,
            lars=LarsConfig() if self.lars else False,
            sam=self.sam,
        )


CONFIGS: tuple[_Config, ...] = (
    _Config("adamw", "adamw"),
    _Config("adamw + lars", "adamw", lars=True),
    _Config("sgd", "sgd"),
    _Config("sgd + lars", "sgd", lars=True),
    _Config("lamb", "lamb"),
    _Config("lamb + lars", "lamb", lars=True),
    _Config("adamw + sam", "adamw", sam=SAMConfig(rho=0.05)),
    _Config("adamw + asam", "adamw", sam=SAMConfig(rho=0.5, adaptive=True)),
    _Config("adamw + lars + sam", "adamw", lars=True, sam=SAMConfig(rho=0.05)),
)


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any], steps: int) -> float:
        """Milliseconds per call of ``fn`` over ``steps`` calls."""
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / steps
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / steps


def _interleaved(
    fns: dict[str, Callable[[], Any]], timer: _Timer, steps: int, repeats: int, warmup: int
) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timer(fn, steps))
    return {name: min(v) for name, v in samples.items()}


def _optimizer_rows(
    size: str, device: torch.device, steps: int, repeats: int
) -> tuple[list[dict[str, Any]], int]:
    layers, d, rank = PARAM_SIZES[size]
    module = _Adapters(layers, d, rank, device)
    params = list(module.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    # The gradients stay fixed across steps.  LARS rescales them in place (as apex's LARC), so
    # repeated steps drive them to its fixed point ‖g‖ = η‖w‖; with weight decay β > η they
    # would instead shrink into subnormal floats, which are slow on CPUs.  Hence no decay.
    ref = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)
    fns: dict[str, Callable[[], Any]] = {"torch AdamW(foreach)": ref.step}
    for cfg in CONFIGS:
        opt = cfg.build(module)
        if cfg.sam is None:
            fns[cfg.name] = opt.step
        else:

            def sam_step(opt: MoRAOptimizer = opt) -> None:
                opt.first_step(zero_grad=False)
                opt.second_step()

            fns[cfg.name] = sam_step
    ms = _interleaved(fns, _Timer(device), steps, repeats, warmup=3)
    adamw = ms["torch AdamW(foreach)"]
    rows = [
        {
            "configuration": "torch AdamW(foreach) [reference]",
            "ms": adamw,
            "vs_adamw": 1.0,
            "vs_base": None,
            "vs_plain": None,
        }
    ]
    for cfg in CONFIGS:
        base_name = cfg.name.replace(" + lars", "") if cfg.lars else None
        rows.append(
            {
                "configuration": f"step: {cfg.name}",
                "ms": ms[cfg.name],
                "vs_adamw": ms[cfg.name] / adamw,
                "vs_base": ms[cfg.name] / ms[base_name] if base_name in ms else None,
                "vs_plain": None,
            }
        )
    return rows, sum(p.numel() for p in params)


def _training_rows(
    size: str, device: torch.device, steps: int, repeats: int
) -> list[dict[str, Any]]:
    layers, d, rank, batch = MODEL_SIZES[size]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, d, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    model = _AdapterMLP(layers, d, rank, device)
    plain = MoRAOptimizer(model, base="adamw", lr=1e-4, loraplus_ratio=16)
    sam = MoRAOptimizer(model, base="adamw", lr=1e-4, loraplus_ratio=16, sam=SAMConfig())

    def closure() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def plain_step() -> None:
        plain.zero_grad()
        closure()
        plain.step()

    def two_passes() -> None:  # SAM's work without its own arithmetic
        plain.zero_grad()
        closure()
        plain.zero_grad()
        closure()
        plain.step()

    fns: dict[str, Callable[[], Any]] = {
        "plain": plain_step,
        "sam": lambda: sam.step(closure),
        "two_passes": two_passes,
    }
    ms = _interleaved(fns, _Timer(device), steps, repeats, warmup=3)
    what = f"train: {layers}×Linear({d}) + LoRA r={rank}, batch {batch}"
    rows = [
        (f"{what}, adamw", ms["plain"]),
        (f"{what}, adamw + sam (closure)", ms["sam"]),
        (f"{what}, two fwd/bwd + adamw step, no perturbation [floor]", ms["two_passes"]),
    ]
    return [
        {
            "configuration": name,
            "ms": v,
            "vs_adamw": None,
            "vs_base": None,
            "vs_plain": v / ms["plain"],
        }
        for name, v in rows
    ]


def run(
    device: str = "cpu", steps: int | None = None, params_size: str = "small", repeats: int = 5
) -> dict[str, Any]:
    """Run both measurements; returns ``{"device", "params_size", "n_params", "rows"}``."""
    if params_size not in PARAM_SIZES:
        valid = list(PARAM_SIZES)
        raise ValueError(f"unknown params size {params_size!r}; expected one of {valid}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    if steps is None:
        steps = 50 if dev.type == "cuda" else (10 if params_size == "small" else 2)
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps!r}")
    if repeats <= 0:
        raise ValueError(f"repeats must be > 0, got {repeats!r}")
    torch.manual_seed(0)
    opt_rows, n_params = _optimizer_rows(params_size, dev, steps, repeats)
    train_rows = _training_rows(params_size, dev, steps, repeats)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {
        "device": name,
        "params_size": params_size,
        "n_params": n_params,
        "steps": steps,
        "repeats": repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": opt_rows + train_rows,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table with a one-line header."""
    lines = [
        f"device: {result['device']} · params: {result['params_size']} "
        f"({result['n_params'] / 1e6:.2f} M adapter parameters) · torch {result['torch']} · "
        f"{result['threads']} threads · best of {result['repeats']} × {result['steps']} steps",
        "",
        "| configuration | ms/step | vs AdamW(foreach) | vs base | vs plain step |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['configuration']} | {row['ms']:.3f} | {_fmt(row['vs_adamw'], '.2f')} | "
            f"{_fmt(row['vs_base'], '.2f')} | {_fmt(row['vs_plain'], '.2f')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked options of ``moracl bench optim`` (a bad one: argparse's usage and error,
    exit status 2)."""
    parser = argparse.ArgumentParser(prog="moracl bench optim", description=__doc__.split("\n")[0])
    parser.add_argument("--device", type=device_arg, choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="steps per timing (default: by device and size)",
    )
    parser.add_argument("--params-size", choices=sorted(PARAM_SIZES), default="small")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timings per configuration")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    add_caveat_arg(parser)
    args: argparse.Namespace = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``moracl bench optim`` / ``python -m moracl.bench.optim``."""
    argv = command_argv(argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = record_meta("optim", argv, device=args.device) if args.json else {}
    try:
        result = run(args.device, args.steps, args.params_size, args.repeats)
    except ValueError as err:  # options that do not fit together
        print(f"moracl bench optim: error: {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    if args.json is not None:
        notes = [
            f"best (minimum) of {result['repeats']} interleaved rounds per configuration: "
            "the least each step took, not its typical time",
            *args.caveats,
        ]
        write_record(args.json, "optim", meta, result, caveats=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
