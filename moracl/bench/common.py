"""Shared helpers for the benchmarks: timing, memory, model construction, tables."""

from __future__ import annotations

import gc
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LlamaShape",
    "Timing",
    "build_llama",
    "device_arg",
    "machine",
    "markdown_table",
    "nonnegative_int",
    "positive_int",
    "time_steps",
]


@dataclass(frozen=True)
class LlamaShape:
    """A Llama-style model built from a config with random weights (nothing downloaded)."""

    hidden: int = 2048
    layers: int = 8
    intermediate: int = 5632
    heads: int = 16
    vocab: int = 32000
    batch: int = 8
    seq: int = 1024

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_llama(
    shape: LlamaShape, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """``LlamaForCausalLM`` from a config, frozen, in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        vocab_size=shape.vocab,
        max_position_embeddings=max(2048, shape.seq),
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model: nn.Module = LlamaForCausalLM(cfg)
    model = model.to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class Timing:
    ms: float
    peak_bytes: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, *, warmup: int, steps: int) -> Timing:
    """Median wall time of ``step`` in ms over ``steps`` calls after ``warmup``; peak memory
    (CUDA: max allocated during the timed steps; CPU: not measured, 0)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return Timing(statistics.median(times), peak)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> str:
    """One line naming the machine a table was measured on (the GPU for a CUDA device, else
    the CPU and torch's thread count), with the torch and Python versions."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()}, {torch.get_num_threads()} torch threads"
    return f"{name}; torch {torch.__version__}; Python {platform.python_version()}"


def _int(text: str, low: int) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (``--steps 0`` is an error naming the value)."""
    return _int(text, 1)


def nonnegative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0."""
    return _int(text, 0)


def device_arg(text: str) -> str:
    """An argparse ``type``: a device this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
    import argparse

    from moracl.preflight import check_device

    try:
        check_device(text, what="device")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def bench_parser(prog: str, description: str | None, methods: list[str], sizes: list[str]):  # type: ignore[no-untyped-def]
    """The options every model benchmark shares: device, size, methods, rank, steps, json."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--size", choices=sizes, default=None, help="default: h100 on a GPU")
    parser.add_argument("--methods", nargs="+", default=None, choices=methods)
    parser.add_argument("--rank", type=positive_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--warmup", type=nonnegative_int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def device_and_size(args: Any) -> tuple[torch.device, str]:
    """The device asked for and the size (``h100`` on a GPU, ``cpu`` otherwise by default)."""
    device = torch.device(args.device)
    return device, args.size or ("h100" if device.type == "cuda" else "cpu")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
