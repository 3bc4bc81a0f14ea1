"""The finetune job (``moracl finetune``): adapt a frozen backbone to one classification task
and report what the adapters bought: accuracy of the untrained head, of a linear probe on the
frozen features, and of adapters + head, with the trainable share of the backbone.

    result = run(load_config("configs/wordnet_finetune.yaml"))
    print(result.table())

Every training step is checked before the update (:func:`moracl.train.fit_classifier`): a
non-finite loss or gradient stops the job with :class:`~moracl.guard.NonFiniteError`, or
(``train.on_nonfinite=skip``) drops the step; skipped steps are counted in
``metrics.json``. Each epoch's mean loss goes to ``logs/train.csv`` (and TensorBoard, when
installed) in ``output_dir``. Under ``torchrun`` the training of adapters + head is
data-parallel and the first process writes.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from moracl.adapters.base import ParamRole, iter_param_roles
from moracl.config import FinetuneConfig, TrainConfig, from_dict, to_dict
from moracl.distributed import barrier, init_distributed, is_main
from moracl.files import write_atomic
from moracl.guard import StepGuard, finite_json
from moracl.model import MoRAModel
from moracl.preflight import check_common
from moracl.runlock import exclusive_output_dir
from moracl.train import TrainLog, fit_classifier

__all__ = [
    "BACKBONES",
    "OUTPUTS",
    "SCENARIOS",
    "FinetuneResult",
    "check",
    "run",
    "train_model",
    "write_logs",
]

#: the scenarios and backbones ``moracl finetune`` knows
SCENARIOS = ("wordnet-categories",)
BACKBONES = ("minilm",)
#: what a finished job leaves in ``output_dir`` (a folder holding one is refused)
OUTPUTS = ("metrics.json", "adapter")


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


def check(config: FinetuneConfig) -> None:
    """Check what only the scenario can tell, reading no data: the scenario and backbone
    names, and the categories (at least 2, distinct, known WordNet categories).

    Raises:
        ValueError: naming the key, the value and what is allowed.
        TypeError: ``config`` is not a :class:`~moracl.config.FinetuneConfig`.
    """
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"expected a FinetuneConfig, got {type(config).__name__}")
    d = config.data
    if d.scenario not in SCENARIOS:
        raise ValueError(
            f"data.scenario={d.scenario!r} is not a finetune scenario; expected one of "
            f"{list(SCENARIOS)}"
        )
    if config.backbone not in BACKBONES:
        raise ValueError(
            f"backbone={config.backbone!r} is not a finetune backbone; expected one of "
            f"{list(BACKBONES)}"
        )
    from moracl_scenarios.wordnet import LEXNAMES

    if len(set(d.categories)) < 2 or len(set(d.categories)) != len(d.categories):
        raise ValueError(
            f"data.categories must name at least 2 distinct classes, got {d.categories!r}"
        )
    unknown = [c for c in d.categories if c not in LEXNAMES]
    if unknown:
        raise ValueError(
            f"data.categories: unknown WordNet categories {unknown}; expected names among "
            f"{list(LEXNAMES)}"
        )


def run(config: FinetuneConfig, *, progress: bool = True) -> FinetuneResult:
    """Check ``config`` (as ``moracl validate`` does), then, with ``output_dir`` locked and
    refused if it holds an earlier job's results, train and save the adapter,
    ``metrics.json`` and ``logs/`` in ``output_dir``.

    Raises:
        ValueError: a problem with the config or the output folder (before any work).
        RunFolderBusyError: another job holds ``output_dir``.
        NonFiniteError: training diverged (nothing is written).
    """
    from_dict(FinetuneConfig, to_dict(config))  # the checks of moracl validate, in its order
    check(config)
    check_common(config)
    return _locked_run(config, progress=progress)


def train_model(
    model: nn.Module,
    inputs: Callable[[Tensor], Mapping[str, Tensor]],
    labels: Tensor,
    train: TrainConfig,
    *,
    name: str = "adapters + head",
    progress: bool = False,
) -> TrainLog:
    """Train ``model``'s trainable parameters with AdamW (``train.lr``; heads, the
    ``modules_to_save``, at ``train.head_lr``) on ``labels (n,)``; ``inputs(idx)`` gives the
    model's keyword inputs for the rows ``idx (b,)``. Data-parallel under ``torchrun``; every
    step guarded by ``train.on_nonfinite`` (:func:`moracl.train.fit_classifier`), messages
    naming ``moracl finetune: {name}``."""
    heads = {id(p) for _, p, role in iter_param_roles(model) if role is ParamRole.HEAD}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in heads], "lr": train.lr},
        {"params": [p for p in params if id(p) in heads], "lr": train.head_lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=train.weight_decay)
    return fit_classifier(
        model,
        lambda idx: model(**inputs(idx)),
        labels,
        optimizer=opt,
        guard=StepGuard(train.on_nonfinite),
        epochs=train.epochs,
        batch_size=train.batch_size,
        seed=train.seed,
        where=f"moracl finetune: {name}",
        data_parallel=True,
        progress=progress,
    )


def write_logs(out: Path, logs: Mapping[str, TrainLog]) -> None:
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
                    seconds=e.finished - log.began,
                )


# -- the job ---------------------------------------------------------------------------------


def _task(config: FinetuneConfig) -> tuple[list[str], Tensor, list[str], Tensor, int]:
    from moracl_scenarios.wordnet import wordnet_classification

    train, test = wordnet_classification(
        config.data.categories,
        per_class=config.data.per_class,
        test_per_class=config.data.test_per_class,
        seed=config.train.seed,
    )
    return (
        list(train["text"][:]),
        torch.tensor(train["label"][:]),
        list(test["text"][:]),
        torch.tensor(test["label"][:]),
        len(config.data.categories),
    )


def _backbone(num_classes: int) -> tuple[nn.Module, Any]:
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
    train: TrainConfig,
) -> tuple[float, TrainLog]:
    """The reference: a fresh head trained on the frozen backbone's features (same epochs,
    batch size, learning rate and seed as the head of the adapted model, guarded alike);
    returns its test accuracy and training log."""
    train_f = _features(classifier, _batches(tokenizer, train_x, 128, train.max_length))
    test_f = _features(classifier, test_batches)  # (n, d)
    torch.manual_seed(train.seed)
    head = nn.Linear(train_f.shape[1], int(train_y.max()) + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=train.head_lr, weight_decay=train.weight_decay)
    log = fit_classifier(
        head,
        lambda idx: head(train_f[idx]),
        train_y,
        optimizer=opt,
        guard=StepGuard(train.on_nonfinite),
        epochs=train.epochs,
        batch_size=train.batch_size,
        seed=train.seed,
        where="moracl finetune: linear probe",
    )
    with torch.no_grad():
        return (head(test_f).argmax(-1) == test_y).float().mean().item(), log


@exclusive_output_dir("moracl finetune", results=OUTPUTS)
def _locked_run(config: FinetuneConfig, *, progress: bool) -> FinetuneResult:
    start = time.perf_counter()
    init_distributed(config.distributed.backend, "cpu")
    tc = config.train
    torch.manual_seed(tc.seed)
    train_x, train_y, test_x, test_y, k = _task(config)
    classifier, tokenizer = _backbone(k)
    encoder = cast(nn.Module, classifier.encoder)
    backbone_params = sum(p.numel() for p in encoder.parameters())
    test_batches = _batches(tokenizer, test_x, 128, tc.max_length)

    untrained = _accuracy(classifier, test_batches, test_y)
    probe_acc, probe_log = _linear_probe(
        classifier, tokenizer, train_x, train_y, test_batches, test_y, tc
    )

    torch.manual_seed(tc.seed)
    model = MoRAModel(
        classifier, config.adapter, target_modules=config.target_modules, modules_to_save=["head"]
    )

    def inputs(idx: Tensor) -> dict[str, Tensor]:
        texts = [train_x[j] for j in idx]
        return _batches(tokenizer, texts, len(texts), tc.max_length)[0]

    train_log = train_model(model, inputs, train_y, tc, progress=progress)
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
        write_logs(out, {"adapters + head": train_log, "linear probe": probe_log})
        model.save_pretrained(out / "adapter")
        write_atomic(out / "metrics.json", text + "\n")
    barrier()
    return result
