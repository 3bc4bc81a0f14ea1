"""Profile one training step of a method from the adapter benchmark: the top kernels by time.

``python -m moracl.bench.profile --method moracl-lora --size h100``
"""

from __future__ import annotations

import argparse

import torch

from moracl.bench.adapters import METHODS, SIZES, _step_fn, _wrap
from moracl.bench.common import build_llama


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moracl bench profile", description=__doc__)
    parser.add_argument("--method", choices=METHODS, default="moracl-lora")
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = SIZES[args.size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq)).to(device)
    base = build_llama(shape, device, dtype)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)  # type: ignore[operator]
    embeds.requires_grad_(True)
    step, _ = _step_fn(_wrap(args.method, base, args.rank).train(), embeds, ids, dtype, device)
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
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
