"""``moracl bench distributed``: data-parallel scaling of the experts benchmark's training step
(Llama-style model, top-2 of 8 LoRA experts on every projection, AdamW) on 1 and N GPUs of
one host, in tokens per second.

    moracl bench distributed                 # on a 2-GPU host: 1 and 2 processes, a table
    moracl bench distributed --nproc 1 2 4   # more process counts
    moracl bench distributed --device cpu --size tiny   # gloo smoke test on CPUs

Each process keeps the experts benchmark's batch (weak scaling: the global batch grows with
the processes) and runs forward, backward, the gradient all-reduce of the adapters and
routers (:class:`moracl.distributed.DataParallel`) and the optimiser step. The command starts
one ``torchrun`` per process count (``--worker`` is the per-process entry point) and prints
tokens/s and the scaling over one process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import torch

from moracl.bench.adapters import SIZES
from moracl.bench.common import (
    LlamaShape,
    add_caveat_arg,
    build_llama,
    command_argv,
    device_arg,
    machine,
    markdown_table,
    nonnegative_int,
    positive_int,
    record_meta,
    time_steps,
    write_record,
)

__all__ = ["SHAPES", "main", "markdown", "parse_args"]

SHAPES = {
    **SIZES,
    "tiny": LlamaShape(hidden=64, layers=2, intermediate=128, heads=4, vocab=256, batch=2, seq=32),
}


def _worker(args: argparse.Namespace) -> int:
    """One process of a ``torchrun`` launch: time the step, rank 0 writes ``--out``."""
    from moracl.bench.experts import _wrap
    from moracl.distributed import DataParallel, init_distributed, shutdown

    env = init_distributed("auto", args.device)
    try:
        shape = SHAPES[args.size]
        device = env.device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gen = torch.Generator().manual_seed(env.rank)  # each process its own rows
        ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)
        base = build_llama(shape, device, dtype)
        with torch.no_grad():
            embeds = cast(Any, base).get_input_embeddings()(ids)
        model = _wrap("top2-of-8", base, args.rank).train()
        parallel = DataParallel(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
        aux = cast(Any, model).aux_loss

        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = model(inputs_embeds=embeds, labels=ids).loss + aux()
            loss.backward()
            parallel.sync_gradients()  # equal shares
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = time_steps(step, device, warmup=args.warmup, steps=args.steps)
        if env.is_main:
            result = {
                "processes": env.world_size,
                "ms": t.ms,
                "tokens_per_s": env.world_size * shape.tokens / (t.ms / 1e3),
                "peak_gib": t.peak_bytes / 2**30,
                "trainable": sum(p.numel() for p in params),
                "device": machine(device),
            }
            Path(args.out).write_text(json.dumps(result))
    finally:
        shutdown()
    return 0


def _launch(nproc: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "moracl.bench.distributed", "--worker",
        "--device", args.device, "--size", args.size, "--rank", str(args.rank),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ)
    if nproc == 1:  # torchrun's WORLD_SIZE=1 keeps the one-process path: no group at all
        env.pop("WORLD_SIZE", None)
    subprocess.run(cmd, check=True, env=env)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked options of ``moracl bench distributed`` (a bad one: argparse's usage and
    error, exit status 2)."""
    parser = argparse.ArgumentParser(
        prog="moracl bench distributed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--size", choices=sorted(SHAPES), default=None, help="default: h100 on GPUs, tiny on CPUs"
    )
    parser.add_argument("--nproc", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--rank", type=positive_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--warmup", type=nonnegative_int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    add_caveat_arg(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args: argparse.Namespace = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("h100" if cuda else "tiny")
    if args.worker:
        return args
    if cuda:
        have = torch.cuda.device_count()
        if max(args.nproc) > have:
            parser.error(f"--nproc {max(args.nproc)} needs as many GPUs; this host has {have}")
    elif args.size != "tiny":
        parser.error(
            f"--size {args.size} is the GPU benchmark; on CPUs run the gloo smoke test "
            f"(--device cpu --size tiny)"
        )
    return args


def markdown(result: dict[str, Any], machine_line: str | None = None) -> str:
    """The benchmark's table from its ``--json`` results: a heading naming the size, shape,
    rank and batch (and the machine, when ``machine_line`` is given), then one row per process
    count with tokens/s and the scaling over the first row's."""
    rows_in = result["results"]
    base = rows_in[0]["tokens_per_s"] / rows_in[0]["processes"]
    shape = result["shape"]
    head = (
        f"### distributed, top2-of-8, size {result['size']}: {shape}, r={result['rank']}, "
        f"per-process batch {result['batch']}"
    )
    rows = [
        [
            r["processes"],
            f"{r['ms']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s'] / base:.2f}",
            f"{r['tokens_per_s'] / base / r['processes']:.0%}",
            f"{r['peak_gib']:.2f}",
        ]
        for r in rows_in
    ]
    table = markdown_table(
        ["processes", "ms/step", "tokens/s", "scaling", "efficiency", "peak GiB"], rows
    )
    return f"{head}\n{machine_line}\n\n{table}" if machine_line else f"{head}\n\n{table}"


def main(argv: list[str] | None = None) -> int:
    argv = command_argv(argv)
    args = parse_args(argv)
    if args.worker:
        return _worker(args)
    meta = record_meta("distributed", argv, device=args.device) if args.json else {}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nproc:
            results.append(_launch(n, args, Path(tmp) / f"n{n}.json"))
    shape = SHAPES[args.size]
    result = {
        "size": args.size,
        "shape": str(shape),
        "rank": args.rank,
        "batch": f"{shape.batch}x{shape.seq}",
        "results": results,
    }
    print("\n" + markdown(result, results[0]["device"]))
    if args.json:
        notes = [
            f"median of {args.steps} steps after {args.warmup} warm-up steps, timed by the "
            "first process; weak scaling (each process keeps the batch)"
        ]
        if not args.device.startswith("cuda"):
            notes.append("gloo on CPU processes: a smoke test of the GPU benchmark")
        notes += args.caveats
        write_record(args.json, "distributed", meta, result, caveats=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
