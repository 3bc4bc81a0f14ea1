"""Evaluation of a continual classifier on every test experience: accuracy, mean
cross-entropy and, for mixtures, routing diagnostics; under data parallelism the batches
are dealt to the processes and the sums combined by :func:`sum_over_processes`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from moracl.continual.batches import TensorBatches
from moracl.continual.model import ContinualClassifier
from moracl.continual.strategy import expert_experience
from moracl.distributed import all_reduce_sum, rank, world_size
from moracl.model import MoRAModel

__all__ = ["Evaluation", "evaluate", "sum_over_processes"]


@dataclass
class Evaluation:
    """Accuracy and mean cross-entropy per test experience, with routing diagnostics when
    the model has mixtures."""

    accuracies: list[float]
    expert_usage: list[list[float]]
    task_inference: float | None
    experts_per_token: float | None
    losses: list[float] = field(default_factory=list)


def sum_over_processes(parts: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor of ``parts`` summed over the processes (itself for one process), on the
    CPU, in its own dtype and shape: one all-reduce of the tensors packed as float64 (exact
    for integer counts below 2**53) and one copy to the host."""
    if not parts:
        return {}
    device = next(iter(parts.values())).device
    flat = torch.cat([t.detach().to(device, torch.float64).flatten() for t in parts.values()])
    total = all_reduce_sum(flat).cpu()  # the one host sync
    out: dict[str, Tensor] = {}
    start = 0
    for key, t in parts.items():
        n = t.numel()
        out[key] = total[start : start + n].reshape(t.shape).to(t.dtype)
        start += n
    return out


@torch.no_grad()
def evaluate(
    model: ContinualClassifier, tests: Sequence[tuple[Tensor, Tensor, Tensor]], batch_size: int
) -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` on each test experience ``(x, y, t)``;
    for mixtures also the mean expert usage per experience and, for task-agnostic routing,
    how often a token's top expert was grown for the sample's own experience (task-inference
    accuracy; with ``task_inference``, how often a row's inferred experience is its own).

    The cross-entropy is that of the logits as the model gives them, summed in float64: a
    class the model cannot predict yet (masked with the lowest float) costs about 3.4e38.
    Every sum stays on the model's device until the end (one host sync).

    Under data parallelism the batches (the same as in one process) are dealt to the
    processes in turn and the sums added, so every process returns the one-process result.
    """
    was_training = model.training
    model.eval()
    encoder = model.encoder
    if not isinstance(encoder, MoRAModel):
        raise TypeError(f"expected a MoRAModel encoder, got {type(encoder).__name__}")
    mixtures = list(encoder.mixtures())
    experts = mixtures[0][1].num_experts if mixtures else 0
    device = next(model.parameters()).device
    world, me = world_size(), rank()
    sums: dict[str, Tensor] = {
        "hits": torch.zeros((), dtype=torch.float64, device=device),
        "total": torch.zeros((), dtype=torch.float64, device=device),
        "epts": torch.zeros((), dtype=torch.float64, device=device),
        "epts_n": torch.zeros((), dtype=torch.int64, device=device),
    }
    model.take_inferred()  # clear what an earlier forward left
    for j, (x, y, t) in enumerate(tests):
        correct = torch.zeros((), dtype=torch.int64, device=device)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        usage = torch.zeros(experts, dtype=torch.float32, device=device)
        n_usage = torch.zeros((), dtype=torch.int64, device=device)
        for b, (xb, yb, tb) in enumerate(TensorBatches((x, y, t), batch_size, shuffle=False)):
            if b % world != me:
                continue
            logits = model(xb, tb)
            yb = yb.to(logits.device)
            correct += (logits.argmax(-1) == yb).sum()
            loss += F.cross_entropy(logits.double(), yb, reduction="sum")
            inferred = model.take_inferred()
            if inferred is not None:  # rows routed by their inferred experience
                sums["hits"] += (inferred == j).sum()
                sums["total"] += len(yb)
            for path, mixture in mixtures:
                result = encoder.last_routing.get(path)
                if result is None:
                    continue
                u = result.stats.usage.float()
                usage = u if usage.shape != u.shape else usage + u
                n_usage += 1
                sums["epts"] += result.stats.experts_per_token.double()
                sums["epts_n"] += 1
                if result.indices is not None and not model.route_by_task:
                    owner = expert_experience(mixture).to(result.indices.device)
                    owner = owner[result.indices[:, 0]]
                    sums["hits"] += (owner == j).sum()
                    sums["total"] += owner.numel()
        sums |= {f"correct.{j}": correct, f"loss.{j}": loss}
        sums |= {f"usage.{j}": usage, f"n_usage.{j}": n_usage}
    model.train(was_training)
    total = sum_over_processes(sums)
    usages = []
    for j in range(len(tests)):
        n = int(total[f"n_usage.{j}"])
        usages.append((total[f"usage.{j}"] / max(n, 1)).tolist() if n else [])
    hits, rows = float(total["hits"]), float(total["total"])
    epts_n = int(total["epts_n"])
    return Evaluation(
        accuracies=[int(total[f"correct.{j}"]) / len(y) for j, (_, y, _) in enumerate(tests)],
        expert_usage=usages,
        task_inference=hits / rows if rows else None,
        experts_per_token=float(total["epts"]) / epts_n if epts_n else None,
        losses=[float(total[f"loss.{j}"]) / len(y) for j, (_, y, _) in enumerate(tests)],
    )
