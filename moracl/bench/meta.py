"""``moracl bench meta``: one meta-training step of MAML, moracl against learn2learn.

    moracl bench meta --device cpu            # or: python -m moracl.bench.meta --device cuda

The step: 32 tasks, each 5-way 1-shot with 15 queries per class (5 support and 75 query
examples), 5 inner SGD steps on the support set, second-order MAML, the mean query loss
backpropagated and one Adam step on the meta-parameters. Both implementations run the same
model object on the same tensors:

- ``learn2learn``: ``l2l.algorithms.MAML`` (``clone`` / ``adapt`` per task, in a Python loop
  over the tasks; ``allow_nograd=True`` for the frozen backbone);
- ``moracl``: :meth:`moracl.meta.MAML.meta_loss`, ``torch.func`` vmapped over the tasks;
  ``--linear-update`` picks how full ``nn.Linear`` weights are updated in its inner loop
  (``auto``, the default: factored where cheaper; ``dense``: per-task weight copies).

Three models: ``mlp``, the MLP of MAML's Omniglot experiments (784-256-128-64-5, ReLU) with
every parameter meta-learned; ``mlp-small``, an MLP over 64 frozen features (64-64-64-5), the
same; and ``adapter``, the 784-256-128-64-5 MLP frozen inside a :class:`moracl.MoRAModel` with
LoRA (rank 8) on its hidden layers and a trained copy of its output layer. The meta-gradients
of the two implementations are checked against each other before timing.

Time is the best (minimum over ``--repeats`` interleaved rounds) of the median of ``--steps``
steps; on CUDA every timed step ends with ``torch.cuda.synchronize`` and nothing in a step
waits on the device. Peak memory is what one step allocates above what was allocated before
it: on CUDA from ``torch.cuda.max_memory_allocated``, on the CPU from the allocation events
of ``torch.profiler`` (a separate, untimed step).
"""

from __future__ import annotations

import itertools
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl.bench.common import (
    add_caveat_arg,
    command_argv,
    device_arg,
    free,
    machine,
    markdown_table,
    nonnegative_int,
    positive_int,
    record_meta,
    time_steps,
    write_record,
)

__all__ = ["MODELS", "Workload", "build_model", "main", "markdown", "parse_args", "run"]

MODELS = ("mlp", "mlp-small", "adapter")
_SHAPES = {
    "mlp": (784, (256, 128, 64)),
    "mlp-small": (64, (64, 64)),
    "adapter": (784, (256, 128, 64)),
}
METHODS = ("learn2learn", "moracl")


@dataclass(frozen=True)
class Workload:
    """The meta-training step that is timed."""

    tasks: int = 32
    ways: int = 5
    shots: int = 1
    queries: int = 15
    inner_steps: int = 5
    inner_lr: float = 0.4
    rank: int = 8


def _mlp(name: str, w: Workload) -> nn.Sequential:
    d_in, hidden = _SHAPES[name]
    dims = (d_in, *hidden)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], w.ways))
    return nn.Sequential(*layers)


def build_model(name: str, w: Workload, device: torch.device) -> nn.Module:
    """A model of :data:`MODELS`, seeded, on ``device``."""
    from moracl import AdapterConfig, MoRAModel

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {list(MODELS)}")
    torch.manual_seed(0)
    base = _mlp(name, w)
    if name != "adapter":
        return base.to(device)
    if name == "adapter":
        head = str(len(base) - 1)
        hidden = [str(i) for i, m in enumerate(base) if isinstance(m, nn.Linear) and str(i) != head]
        model = MoRAModel(
            base,
            AdapterConfig(kind="lora", rank=w.rank),
            target_modules=hidden,
            modules_to_save=[head],
        )
        with torch.no_grad():  # LoRA starts with B = 0; make the adapters matter
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.02)
    return model.to(device)


def _tasks(w: Workload, d_in: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``xs (t, N·K, d)``, ``ys (t, N·K)``, ``xq (t, N·Q, d)``, ``yq (t, N·Q)``."""
    g = torch.Generator().manual_seed(1)
    t, n, k, q = w.tasks, w.ways, w.shots, w.queries
    xs = torch.randn(t, n * k, d_in, generator=g)
    xq = torch.randn(t, n * q, d_in, generator=g)
    ys = torch.arange(n).repeat_interleave(k).expand(t, -1).contiguous()
    yq = torch.arange(n).repeat_interleave(q).expand(t, -1).contiguous()
    return xs.to(device), ys.to(device), xq.to(device), yq.to(device)


def _l2l():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import learn2learn as l2l
    return l2l


def _steps(
    model: nn.Module,
    w: Workload,
    batch: tuple[Tensor, ...],
    chunk_size: int | None,
    linear_update: str = "auto",
) -> dict[str, tuple[Callable[[], Tensor], list[Tensor]]]:
    """``method -> (one meta-training step returning the meta-loss, meta-parameters)``."""
    from moracl.meta import MAML

    maml = MAML(model, inner_lr=w.inner_lr, linear_update=linear_update)
    params: list[Tensor] = [p for p in maml.parameters() if p.requires_grad]
    ref = _l2l().algorithms.MAML(model, lr=w.inner_lr, first_order=False, allow_nograd=True)
    xs, ys, xq, yq = batch
    opts = {m: torch.optim.Adam(params, lr=1e-4) for m in METHODS}

    def ours() -> Tensor:
        loss = maml.meta_loss(batch, inner_steps=w.inner_steps, chunk_size=chunk_size)
        opts["moracl"].zero_grad(set_to_none=True)
        loss.backward()
        opts["moracl"].step()
        return loss.detach()

    def theirs() -> Tensor:
        with maml.meta_mode():  # the same model state: dropout off, plain autograd
            total = xs.new_zeros(())
            for i in range(xs.shape[0]):
                learner = ref.clone()
                for _ in range(w.inner_steps):
                    learner.adapt(F.cross_entropy(learner(xs[i]), ys[i]))
                total = total + F.cross_entropy(learner(xq[i]), yq[i])
            loss = total / xs.shape[0]
        opts["learn2learn"].zero_grad(set_to_none=True)
        loss.backward()
        opts["learn2learn"].step()
        return loss.detach()

    return {"learn2learn": (theirs, params), "moracl": (ours, params)}


def _check_same_gradients(
    steps: dict[str, tuple[Callable[[], Tensor], list[Tensor]]], model: nn.Module
) -> float:
    """Run one step of each method from the same weights and return the largest relative
    difference of their meta-gradients (the weights are restored afterwards)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {}
    for method in METHODS:
        model.load_state_dict(state)
        fn, params = steps[method]
        fn()  # the step ends with Adam, which leaves the gradients in .grad
        grads[method] = [p.grad.detach().clone() for p in params if p.grad is not None]
    model.load_state_dict(state)
    worst = 0.0
    for a, b in zip(grads["learn2learn"], grads["moracl"]):
        scale = float(a.abs().max().clamp(min=1e-12))
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def _peak_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Bytes one call of ``step`` allocates above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)


def run(
    device: str = "cpu",
    *,
    models: tuple[str, ...] = MODELS,
    steps: int = 5,
    warmup: int = 2,
    repeats: int = 3,
    chunk_size: int | None = None,
    linear_update: str = "auto",
    workload: Workload | None = None,
) -> dict[str, Any]:
    """Time both methods on each model; returns ``{"machine", "workload", "rows"}``."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    if min(steps, repeats) < 1 or warmup < 0:
        raise ValueError(
            f"need steps, repeats >= 1 and warmup >= 0; got {steps}, {repeats}, {warmup}"
        )
    w = workload or Workload()
    rows: list[dict[str, Any]] = []
    for name in models:
        batch = _tasks(w, _SHAPES[name][0], dev)
        model = build_model(name, w, dev)
        steps_of = _steps(model, w, batch, chunk_size, linear_update)
        diff = _check_same_gradients(steps_of, model)
        best: dict[str, float] = {}
        for r in range(repeats):  # interleaved rounds; warm-up in the first only
            for method in METHODS:
                t = time_steps(
                    steps_of[method][0], dev, warmup=warmup if r == 0 else 0, steps=steps
                )
                best[method] = min(best.get(method, float("inf")), t.ms)
        for method in METHODS:
            free(dev)
            peak = _peak_bytes(steps_of[method][0], dev)
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "ms": best[method],
                    "speedup": best["learn2learn"] / best[method],
                    "peak_mib": peak / 2**20,
                    "meta_parameters": sum(p.numel() for p in steps_of[method][1]),
                    "max_grad_rel_diff": diff,
                }
            )
        del model, steps_of
        free(dev)
    return {
        "machine": machine(dev),
        "workload": {**w.__dict__, "chunk_size": chunk_size, "linear_update": linear_update},
        "steps": steps,
        "repeats": repeats,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    """One markdown table, headed by the machine and the workload."""
    w = result["workload"]
    head = (
        f"{result['machine']}\n\n"
        f"{w['tasks']} tasks, {w['ways']}-way {w['shots']}-shot, {w['queries']} queries per "
        f"class, {w['inner_steps']} inner steps (second order), Adam outer step; moracl "
        f"linear_update={w.get('linear_update', 'dense')}; best of "
        f"{result['repeats']} rounds of the median of {result['steps']} steps\n"
    )
    table = markdown_table(
        [
            "model",
            "method",
            "ms/step",
            "speed-up over learn2learn",
            "peak MiB",
            "meta-params",
            "grad diff",
        ],
        [
            (
                r["model"],
                r["method"],
                f"{r['ms']:.1f}",
                f"{r['speedup']:.2f}",
                f"{r['peak_mib']:.1f}",
                f"{r['meta_parameters']:,}",
                f"{r['max_grad_rel_diff']:.1e}",
            )
            for r in result["rows"]
        ],
    )
    return head + "\n" + table


def parse_args(argv: list[str] | None = None) -> Any:
    """The checked options of ``moracl bench meta`` (an ``argparse.Namespace``; a bad one:
    argparse's usage and error, exit status 2)."""
    import argparse

    parser = argparse.ArgumentParser(prog="moracl bench meta", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=nonnegative_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--chunk-size", type=positive_int, default=None, help="tasks per vmapped chunk"
    )
    parser.add_argument(
        "--linear-update",
        choices=["auto", "factored", "dense"],
        default="auto",
        help="moracl's inner update of full nn.Linear weights",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    add_caveat_arg(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``moracl bench meta`` / ``python -m moracl.bench.meta``."""
    argv = command_argv(argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = record_meta("meta", argv, device=args.device) if args.json else {}
    try:
        result = run(
            args.device,
            models=tuple(args.models),
            steps=args.steps,
            warmup=args.warmup,
            repeats=args.repeats,
            chunk_size=args.chunk_size,
            linear_update=args.linear_update,
        )
    except ValueError as err:  # options that do not fit together
        print(f"moracl bench meta: error: {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    if args.json is not None:
        notes = [
            "random tasks (Gaussian inputs, fixed labels): a measure of speed and memory, "
            "not of what is learnt",
            *args.caveats,
        ]
        write_record(args.json, "meta", meta, result, caveats=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
