"""``moracl finetune``: adapt a frozen backbone to one classification task and report what
the adapters bought: accuracy of the untrained head, of a linear probe on the frozen
features, and of adapters + head, with the trainable share of the backbone.

Every training step is checked before the update (:class:`~moracl.guard.StepGuard`): a
non-finite loss or gradient stops the job with :class:`~moracl.guard.NonFiniteError`, or
(``train.on_nonfinite=skip``) drops the step; skipped steps are counted in
``metrics.json``. Each epoch's mean loss goes to ``logs/train.csv`` (and TensorBoard, when
installed) in ``output_dir``."""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
    all_reduce_sum,
    barrier,
    check_batches,
    init_distributed,
    is_main,
    local_rows,
    world_size,
)
from moracl.files import write_atomic
from moracl.guard import StepGuard, assert_finite, finite_json
from moracl.model import MoRAModel
from moracl.preflight import check_first
from moracl.runlock import exclusive_output_dir

__all__ = ["FinetuneResult", "finetune"]


@dataclass
class EpochLoss:
    """One epoch of a training loop: its mean loss over the steps taken (``None``: all were
    skipped), the loop's step count at its end, the learning rate and the skipped steps."""

    epoch: int
    step: int
    loss: float | None
    lr: float
    skipped: int
    seconds: float


@dataclass
class TrainLog:
    """What a guarded training loop did: steps (taken or skipped), skipped steps, epochs."""

    steps: int = 0
    skipped: int = 0
    epochs: list[EpochLoss] = field(default_factory=list)


@dataclass
class FinetuneResult:
    """Test accuracies (fractions) and cost of one ``finetune`` run; ``skipped_steps``
    counts the training steps (adapters + head, and the linear probe) dropped for a
    non-finite loss or gradient (``train.on_nonfinite=skip``)."""

    untrained_accuracy: float
    probe_accuracy: float
    adapted_accuracy: float
    trainable_parameters: int
    backbone_parameters: int
    seconds: float
    skipped_steps: int = 0

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
        if self.skipped_steps:
            out.append(
                f"{self.skipped_steps} training steps skipped for a non-finite loss or gradient"
            )
        return "\n".join(out)


def _task(config: FinetuneConfig) -> tuple[list[str], Tensor, list[str], Tensor, int]:
    if config.data.scenario != "wordnet-categories":
        raise ValueError(
            f"unknown scenario {config.data.scenario!r} for finetune; expected 'wordnet-categories'"
        )
    from moracl_scenarios.wordnet import wordnet_classification

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
) -> TrainLog:
    """Train ``model``'s trainable parameters with AdamW (heads at ``head_lr``) on ``rows``
    examples in seeded random batches; ``batch(idx)`` gives the model's inputs for the
    examples ``idx (b,)`` and ``labels (rows,)`` their classes. Returns the loop's
    :class:`TrainLog`.

    Every step is checked before the update (``train.on_nonfinite``: a
    :class:`~moracl.guard.NonFiniteError` naming ``desc``, the epoch and the step, or a
    skipped step), and so are the parameters at the end.

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
    guard = StepGuard(tc.on_nonfinite)
    log = TrainLog()
    began = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=not progress or not is_main(), leave=False)
    for epoch in range(tc.epochs):
        order = torch.randperm(rows, generator=gen)
        losses: list[float] = []
        skipped = guard.skipped
        for step, i in enumerate(range(0, rows, tc.batch_size)):
            idx = order[i : i + tc.batch_size]  # the global batch
            mine = idx[local_rows(len(idx))]  # this process's rows of it
            model.train()
            loss = F.cross_entropy(model(**batch(mine)), labels[mine])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            parallel.sync_gradients(len(mine) / len(idx))
            where = f"moracl finetune: {desc}, epoch {epoch}, step {step}"
            # every process decides on the same numbers: the global loss, summed gradients
            checked = loss
            if world_size() > 1:
                checked = all_reduce_sum(loss.detach() * (len(mine) / len(idx)))
            value = guard.check(checked, params, where, named=model.named_parameters)
            if value is not None:
                opt.step()
                losses.append(value)
            bar.update()
            bar.set_postfix(loss="skipped" if value is None else f"{value:.3f}")
        log.epochs.append(_epoch_loss(epoch, guard, losses, skipped, opt, began))
        guard.warn_skipped(
            skipped, len(range(0, rows, tc.batch_size)), f"moracl finetune: {desc}, epoch {epoch}"
        )
    bar.close()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert_finite(trained, f"moracl finetune: {desc}: the parameters after training")
    log.steps, log.skipped = guard.steps, guard.skipped
    return log


def _epoch_loss(
    epoch: int,
    guard: StepGuard,
    losses: list[float],
    skipped: int,
    opt: torch.optim.Optimizer,
    began: float,
) -> EpochLoss:
    """The :class:`EpochLoss` of an epoch that ended now."""
    return EpochLoss(
        epoch=epoch,
        step=guard.steps,
        loss=math.fsum(losses) / len(losses) if losses else None,
        lr=float(opt.param_groups[0]["lr"]),
        skipped=guard.skipped - skipped,
        seconds=time.perf_counter() - began,
    )


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
) -> tuple[float, TrainLog]:
    """The reference: a fresh head trained on the frozen backbone's features (same epochs,
    batch size, learning rate and seed as the head of the adapted model, guarded alike);
    returns its test accuracy and training log."""
    tc = config.train
    train_f = _features(classifier, _batches(tokenizer, train_x, 128, tc.max_length))
    test_f = _features(classifier, test_batches)
    torch.manual_seed(tc.seed)
    head = nn.Linear(train_f.shape[1], int(train_y.max()) + 1)
    params = list(head.parameters())
    opt = torch.optim.AdamW(params, lr=tc.head_lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    guard = StepGuard(tc.on_nonfinite)
    log = TrainLog()
    began = time.perf_counter()
    for epoch in range(tc.epochs):
        order = torch.randperm(len(train_f), generator=gen)
        losses: list[float] = []
        skipped = guard.skipped
        for step, i in enumerate(range(0, len(order), tc.batch_size)):
            idx = order[i : i + tc.batch_size]
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            where = f"moracl finetune: linear probe, epoch {epoch}, step {step}"
            value = guard.check(loss, params, where, named=head.named_parameters)
            if value is not None:
                opt.step()
                losses.append(value)
        log.epochs.append(_epoch_loss(epoch, guard, losses, skipped, opt, began))
        guard.warn_skipped(
            skipped,
            len(range(0, len(order), tc.batch_size)),
            f"moracl finetune: linear probe, epoch {epoch}",
        )
    assert_finite(dict(head.named_parameters()), "moracl finetune: the linear probe's head")
    log.steps, log.skipped = guard.steps, guard.skipped
    with torch.no_grad():
        return (head(test_f).argmax(-1) == test_y).float().mean().item(), log


@check_first  # what moracl validate checks, before the folder is locked or anything runs
@exclusive_output_dir("moracl finetune", results=("metrics.json", "adapter"))
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
    probe_acc, probe_log = _linear_probe(
        classifier, tokenizer, train_x, train_y, test_batches, test_y, config
    )

    torch.manual_seed(config.train.seed)
    model = MoRAModel(
        classifier, config.adapter, target_modules=config.target_modules, modules_to_save=["head"]
    )

    def batch(idx: Tensor) -> dict[str, Tensor]:
        texts = [train_x[j] for j in idx]
        return _batches(tokenizer, texts, len(texts), config.train.max_length)[0]

    train_log = _train(model, len(train_x), batch, train_y, config, "adapters + head", progress)
    adapted = _accuracy(model, test_batches, test_y)
    trainable, _ = model.trainable_parameters()
    result = FinetuneResult(
        untrained,
        probe_acc,
        adapted,
        trainable,
        backbone_params,
        time.perf_counter() - start,
        skipped_steps=train_log.skipped + probe_log.skipped,
    )
    out = Path(config.output_dir)
    if is_main():
        training = {
            name: {"steps": log.steps, "skipped_steps": log.skipped}
            for name, log in (("adapters + head", train_log), ("linear probe", probe_log))
        }
        text = finite_json(
            {"config": to_dict(config), "result": asdict(result), "training": training},
            f"moracl finetune: {out / 'metrics.json'}",
            indent=2,
        )
        _write_logs(out, {"adapters + head": train_log, "linear probe": probe_log})
        model.save_pretrained(out / "adapter")
        write_atomic(out / "metrics.json", text + "\n")
    barrier()
    return result


def _write_logs(out: Path, logs: dict[str, TrainLog]) -> None:
    """Each loop's epochs as rows of ``out/logs/train.csv`` (experience 0), replacing the
    rows of an earlier run in ``out``; TensorBoard too when it is installed."""
    from moracl.report.logs import RunLogger

    tensorboard = importlib.util.find_spec("tensorboard") is not None
    with RunLogger(out, tensorboard=tensorboard, resume_after=-1) as logger:
        for name, log in logs.items():
            for e in log.epochs:
                logger.log_train(
                    name,
                    experience=0,
                    epoch=e.epoch,
                    step=e.step,
                    loss=e.loss,
                    lr=e.lr,
                    seconds=e.seconds,
                )
