"""Shared helpers for the benchmarks: timing, memory, model construction, tables, and the
record every benchmark's ``--json`` file carries."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "RECORD_KEYS",
    "LlamaShape",
    "Timing",
    "add_caveat_arg",
    "build_llama",
    "command_argv",
    "device_arg",
    "git_commit",
    "machine",
    "markdown_table",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "record",
    "record_meta",
    "sync_device",
    "time_steps",
    "write_record",
]

#: the repository holding this package (when it runs from a checkout)
REPO = Path(__file__).resolve().parents[2]
#: what the record's ``meta`` holds, in order
RECORD_KEYS = ("commit", "date", "machine", "command", "torch", "caveats")
#: paths a benchmark run writes itself, left out of the ``-dirty`` check
_OWN_OUTPUTS = ("moracl/bench/results", "moracl/bench/RESULTS.md")


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


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, *, warmup: int, steps: int) -> Timing:
    """Median wall time of ``step`` in ms over ``steps`` calls after ``warmup``; peak memory
    (CUDA: max allocated during the timed steps; CPU: not measured, 0)."""
    for _ in range(warmup):
        step()
    sync_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync_device(device)
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


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (``--lrs 0`` is an error naming the value)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def device_arg(text: str) -> str:
    """An argparse ``type``: a device this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
    from moracl.preflight import check_device

    try:
        check_device(text, what="device")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_caveat_arg(parser: argparse.ArgumentParser) -> None:
    """``--caveat TEXT`` (repeatable): a caveat of the measurement for the ``--json`` record
    (what the command cannot know, such as "timings on a shared machine")."""
    parser.add_argument(
        "--caveat",
        dest="caveats",
        action="append",
        default=[],
        metavar="TEXT",
        help="a caveat for the --json record (repeatable), e.g. 'timings on a shared machine'",
    )


def bench_parser(
    prog: str, description: str | None, methods: list[str], sizes: list[str]
) -> argparse.ArgumentParser:
    """The options every model benchmark shares: device, size, methods, rank, steps, json,
    caveats."""
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
    add_caveat_arg(parser)
    return parser


def device_and_size(args: Any) -> tuple[torch.device, str]:
    """The device asked for and the size (``h100`` on a GPU, ``cpu`` otherwise by default)."""
    device = torch.device(args.device)
    return device, args.size or ("h100" if device.type == "cuda" else "cpu")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- the record of a measurement --------------------------------------------------------------


def _git(root: Path, *args: str) -> str:
    """``git -C root args`` (read only: no optional locks, so no index refresh is written)."""
    done = subprocess.run(
        ["git", "-C", str(root), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
    )
    return done.stdout


def git_commit(root: str | Path = REPO) -> str:
    """The short hash of the commit checked out in ``root``, with ``-dirty`` when its files
    differ from that commit (tracked changes or untracked files; the benchmark results and
    RESULTS.md, which the benchmarks write, aside); ``"unknown"`` when ``root`` is not the top
    of a git work tree (an installed package) or git is missing. ``$MORACL_BENCH_COMMIT``,
    when set, is returned as it is (a copy of the tree measured elsewhere, without ``.git``)."""
    given = os.environ.get("MORACL_BENCH_COMMIT")
    if given:  # a copy of the tree without its git folder (a remote machine) names it
        return given
    root = Path(root).resolve()
    try:
        if Path(_git(root, "rev-parse", "--show-toplevel").strip()).resolve() != root:
            return "unknown"  # an installed copy inside some other repository
        head = _git(root, "rev-parse", "--short", "HEAD").strip()
        excluded = [f":(exclude){p}" for p in _OWN_OUTPUTS]
        status = _git(root, "status", "--porcelain", "--", ".", *excluded)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if status.strip() else "")


def command_argv(argv: Sequence[str] | None) -> list[str]:
    """The options a benchmark's ``main`` was given (``sys.argv[1:]`` when ``None``)."""
    return list(sys.argv[1:] if argv is None else argv)


def record_meta(
    name: str,
    argv: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    caveats: Sequence[str] = (),
) -> dict[str, Any]:
    """What a benchmark record says about its measurement (keys :data:`RECORD_KEYS`).

    Args:
        name: the benchmark (``moracl bench NAME``).
        argv: its options, as given.
        device: where it measured (:func:`machine` names it).
        caveats: what a reader should keep in mind (the benchmark's own, then the user's).
    """
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {
        "commit": git_commit(),
        "date": date,
        "machine": machine(device),
        "command": shlex.join(["moracl", "bench", name, *argv]),
        "torch": torch.__version__,
        "caveats": [str(c) for c in caveats],
    }


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None`` (JSON's null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def record(name: str, meta: dict[str, Any], results: Any) -> dict[str, Any]:
    """``{"benchmark": name, "meta": meta, "results": results}``, the shape of every
    benchmark's ``--json`` file (non-finite numbers as ``null``)."""
    return {"benchmark": name, "meta": meta, "results": _finite(results)}


def write_record(
    path: str | Path,
    name: str,
    meta: dict[str, Any],
    results: Any,
    *,
    caveats: Sequence[str] = (),
) -> None:
    """Write the record of one measurement to ``path`` (atomically; folders created).

    Args:
        meta: :func:`record_meta`, taken when the measurement began (the commit and date of
            the code that ran).
        caveats: appended to ``meta``'s.
    """
    from moracl.files import write_atomic

    meta = {**meta, "caveats": [*meta["caveats"], *(str(c) for c in caveats)]}
    text = json.dumps(record(name, meta, results), indent=2, allow_nan=False)
    write_atomic(path, text + "\n")
