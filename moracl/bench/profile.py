"""Profile one training step of a benchmark method: the top kernels by time.

``python -m moracl.bench.profile --method moracl-lora --size h100`` (the adapter benchmark),
``python -m moracl.bench.profile --bench experts --method top2-of-8 --size h100``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from moracl.bench import adapters, experts
from moracl.bench.adapters import SIZES
from moracl.bench.common import build_llama, device_arg, positive_int


def _adapter_step(method: str, size: str, rank: int, device: torch.device) -> Callable[[], None]:
    shape = SIZES[size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq)).to(device)
    base = build_llama(shape, device, dtype)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)  # type: ignore[operator]
    embeds.requires_grad_(True)
    model = adapters._wrap(method, base, rank).train()
    step, _ = adapters._step_fn(model, embeds, ids, dtype, device)
    return step


def _experts_step(method: str, size: str, rank: int, device: torch.device) -> Callable[[], None]:
    shape = SIZES[size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq)).to(device)
    task_ids = (torch.arange(shape.batch) % 4).to(device)
    step, _ = experts.make_step(method, shape, rank, device, dtype, ids, task_ids)
    return step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked options of ``moracl bench profile`` (a bad one: argparse's usage and
    error, exit status 2)."""
    parser = argparse.ArgumentParser(prog="moracl bench profile", description=__doc__)
    parser.add_argument("--bench", choices=["adapters", "experts"], default="adapters")
    parser.add_argument("--method", default="moracl-lora")
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument(
        "--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--rank", type=positive_int, default=16)
    parser.add_argument("--rows", type=positive_int, default=25)
    args: argparse.Namespace = parser.parse_args(argv)
    methods = adapters.METHODS if args.bench == "adapters" else experts.METHODS
    if args.method not in methods:
        parser.error(f"--method {args.method!r} is not one of {args.bench}' methods: {methods}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    build = _adapter_step if args.bench == "adapters" else _experts_step
    step = build(args.method, args.size, args.rank, device)
    for _ in range(3):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
