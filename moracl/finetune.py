"""``moracl finetune``: adapt a frozen backbone to one classification task and report what
the adapters bought: accuracy of the untrained head, of a linear probe on the frozen
features, and of adapters + head, with the trainable share of the backbone."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from moracl.adapters.base import ParamRole, iter_param_roles
from moracl.config import FinetuneConfig, to_dict
from moracl.distributed import (
    DataParallel,
    barrier,
    check_batches,
    init_distributed,
    is_main,
    local_rows,
    world_size,
)
from moracl.model import MoRAModel

__all__ = ["FinetuneResult", "finetune"]


@dataclass
class FinetuneResult:
    """Test accuracies (fractions) and cost of one ``finetune`` run."""

    untrained_accuracy: float
    probe_accuracy: float
    adapted_accuracy: float
    trainable_parameters: int
    backbone_parameters: int
    seconds: float

    @property
    def trainable_share(self) -> float:
        return self.trainable_parameters / self.backbone_parameters

    def table(self) -> str:
        rows = [
            ("untrained head (chance level)", self.untrained_accuracy),
            ("linear probe on the frozen backbone", self.probe_accuracy),
            ("adapters + head", self.adapted_accuracy),
        ]
        out = ["| model | test accuracy |", "|---|---|"]
        out += [f"| {name} | {100 * acc:.1f} % |" for name, acc in rows]
        out.append(
            f"\ntrainable: {self.trainable_parameters:,} of {self.backbone_parameters:,} "
            f"backbone parameters ({100 * self.trainable_share:.2f} %), {self.seconds:.0f} s"
        )
        return "\n".join(out)


def _task(config: FinetuneConfig) -> tuple[list[str], Tensor, list[str], Tensor, int]:
    if config.data.scenario != "wordnet-categories":
        raise ValueError(
            f"unknown scenario {config.data.scenario!r} for finetune; expected 'wordnet-categories'"
        )
    from scenarios.wordnet import wordnet_classification

    train, test = wordnet_classification(
        config.data.categories,
        per_class=config.data.per_class,
        test_per_class=config.data.test_per_class,
        seed=config.train.seed,
    )
    k = len(config.data.categories)
    return (
        list(train["text"][:]),
        torch.tensor(train["label"][:]),
        list(test["text"][:]),
        torch.tensor(test["label"][:]),
        k,
    )


def _backbone(name: str, num_classes: int) -> tuple[nn.Module, Any]:
    if name != "minilm":
        raise ValueError(f"unknown backbone {name!r}; expected one of ['minilm']")
    from moracl.backbones import SentenceClassifier, load_minilm

    encoder, tokenizer = load_minilm()
    return SentenceClassifier(encoder, num_classes), tokenizer


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list[dict[str, Tensor]], labels: Tensor) -> float:
    model.eval()
    preds = torch.cat([model(**b).argmax(-1) for b in batches])
    return (preds == labels).float().mean().item()


def _batches(
    tokenizer: Any, texts: list[str], size: int, max_length: int
) -> list[dict[str, Tensor]]:
    from moracl.backbones import encode_texts

    return [
        encode_texts(tokenizer, texts[i : i + size], max_length=max_length)
        for i in range(0, len(texts), size)
    ]


def _train(
    model: nn.Module,
    rows: int,
    batch: Callable[[Tensor], dict[str, Tensor]],
    labels: Tensor,
    config: FinetuneConfig,
    desc: str,
    progress: bool,
) -> None:
    """Train ``model``'s trainable parameters with AdamW (heads at ``head_lr``) on ``rows``
    examples in seeded random batches; ``batch(idx)`` gives the model's inputs for the
    examples ``idx (b,)`` and ``labels (rows,)`` their classes.

    Under ``torchrun`` each global batch is split across the processes (contiguous rows) and
    the gradients are summed weighted by each process's share (:mod:`moracl.distributed`),
    so every process ends with the weights one process would reach on the same batches.
    """
    tc = config.train
    check_batches(rows, tc.batch_size, world_size(), "moracl finetune")
    parallel = DataParallel(model)
    heads = {id(p) for _, p, role in iter_param_roles(model) if role is ParamRole.HEAD}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in heads], "lr": tc.lr},
        {"params": [p for p in params if id(p) in heads], "lr": tc.head_lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    steps = tc.epochs * -(-rows // tc.batch_size)
    bar = tqdm(total=steps, desc=desc, disable=not progress or not is_main(), leave=False)
    for _ in range(tc.epochs):
        order = torch.randperm(rows, generator=gen)
        for i in range(0, rows, tc.batch_size):
            idx = order[i : i + tc.batch_size]  # the global batch
            mine = idx[local_rows(len(idx))]  # this process's rows of it
            model.train()
            loss = F.cross_entropy(model(**batch(mine)), labels[mine])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            parallel.sync_gradients(len(mine) / len(idx))
            opt.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()


@torch.no_grad()
def _features(classifier: nn.Module, batches: list[dict[str, Tensor]]) -> Tensor:
    classifier.eval()
    embed = cast(Any, classifier).embed
    return torch.cat([embed(**b) for b in batches])  # (n, d)


def _linear_probe(
    classifier: nn.Module,
    tokenizer: Any,
    train_x: list[str],
    train_y: Tensor,
    test_batches: list[dict[str, Tensor]],
    test_y: Tensor,
    config: FinetuneConfig,
) -> float:
    """The reference: a fresh head trained on the frozen backbone's features (same epochs,
    batch size, learning rate and seed as the head of the adapted model)."""
    tc = config.train
    train_f = _features(classifier, _batches(tokenizer, train_x, 128, tc.max_length))
    test_f = _features(classifier, test_batches)
    torch.manual_seed(tc.seed)
    head = nn.Linear(train_f.shape[1], int(train_y.max()) + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=tc.head_lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    for _ in range(tc.epochs):
        order = torch.randperm(len(train_f), generator=gen)
        for i in range(0, len(order), tc.batch_size):
            idx = order[i : i + tc.batch_size]
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (head(test_f).argmax(-1) == test_y).float().mean().item()


def finetune(config: FinetuneConfig, *, progress: bool = True) -> FinetuneResult:
    """Run the job of ``config``; saves the adapter and ``metrics.json`` in ``output_dir``
    (under ``torchrun`` the training is data-parallel and the first process writes)."""
    start = time.perf_counter()
    init_distributed(config.distributed.backend, "cpu")
    torch.manual_seed(config.train.seed)
    train_x, train_y, test_x, test_y, k = _task(config)
    classifier, tokenizer = _backbone(config.backbone, k)
    encoder = cast(nn.Module, classifier.encoder)
    backbone_params = sum(p.numel() for p in encoder.parameters())
    test_batches = _batches(tokenizer, test_x, 128, config.train.max_length)

    untrained = _accuracy(classifier, test_batches, test_y)
    probe_acc = _linear_probe(classifier, tokenizer, train_x, train_y, test_batches, test_y, config)

    torch.manual_seed(config.train.seed)
    model = MoRAModel(
        classifier, config.adapter, target_modules=config.target_modules, modules_to_save=["head"]
    )

    def batch(idx: Tensor) -> dict[str, Tensor]:
        texts = [train_x[j] for j in idx]
        return _batches(tokenizer, texts, len(texts), config.train.max_length)[0]

    _train(model, len(train_x), batch, train_y, config, "adapters + head", progress)
    adapted = _accuracy(model, test_batches, test_y)
    trainable, _ = model.trainable_parameters()
    result = FinetuneResult(
        untrained, probe_acc, adapted, trainable, backbone_params, time.perf_counter() - start
    )
    out = Path(config.output_dir)
    if is_main():
        model.save_pretrained(out / "adapter")
        (out / "metrics.json").write_text(
            json.dumps({"config": to_dict(config), "result": asdict(result)}, indent=2) + "\n"
        )
    barrier()
    return result
