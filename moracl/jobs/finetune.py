"""The finetune job (``moracl finetune``): adapt a frozen backbone to one classification task
and report what the adapters bought: accuracy of the untrained head, of a linear probe on the
frozen features, and of adapters + head, with the trainable share of the backbone.

    result = run(load_config("configs/wordnet_finetune.yaml"))
    print(result.table())

Model selection reads validation data only. ``data.val_share`` of each class's training
examples (a stratified draw seeded by ``train.seed``) is held out as the validation split;
the linear probe and adapters + head train on the rest. After each epoch both are scored on
the validation split (``logs/validation_epochs.csv``) and, with ``train.early_stopping``,
training stops once the validation metric stops improving and the best epoch's weights are
put back before the final evaluation and before the adapter is saved. The test examples are
a separate draw, read once, for the final numbers; ``run(config, evaluate_test=False)`` (a
run for model selection) never builds them.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl.adapters.adalora import AdaLoRAConfig, RankBudgetHooks
from moracl.adapters.base import ParamRole, iter_param_roles
from moracl.adapters.delta_lora import DeltaLoRAUpdater
from moracl.config import FinetuneConfig, TrainConfig, from_dict, to_dict
from moracl.continual.splits import stratified_split
from moracl.distributed import barrier, init_distributed, is_main
from moracl.early_stopping import EarlyStopping, snapshot_state, trainable_state
from moracl.files import write_atomic
from moracl.guard import StepGuard, finite_json
from moracl.model import MoRAModel
from moracl.preflight import check_common
from moracl.quant import nf4_torchao, quantize_base
from moracl.runlock import exclusive_output_dir
from moracl.train import EpochRecord, TrainLog, fit_classifier

__all__ = [
    "BACKBONES",
    "OUTPUTS",
    "SCENARIOS",
    "FinetuneData",
    "FinetuneResult",
    "check",
    "load_data",
    "run",
    "train_model",
    "trainable_state",
    "write_logs",
]

#: the scenarios and backbones ``moracl finetune`` knows
SCENARIOS = ("wordnet-categories",)
BACKBONES = ("minilm",)
#: what a finished job leaves in ``output_dir`` (a folder holding one is refused)
OUTPUTS = ("metrics.json", "adapter")
#: the two training loops, as logs and ``metrics.json`` name them
ADAPTED, PROBE = "adapters + head", "linear probe"


def _percent(value: float | None, missing: str) -> str:
    return missing if value is None else f"{100 * value:.1f} %"


@dataclass
class FinetuneResult:
    """Accuracies (fractions) and cost of one ``finetune`` run.

    Attributes:
        untrained_accuracy, probe_accuracy, adapted_accuracy: test accuracies of the
            untrained head, the linear probe and adapters + head (``None``: the test split
            was not evaluated, ``evaluated_test`` false).
        validation_accuracy, probe_validation_accuracy, untrained_validation_accuracy: the
            same on the validation split, at the weights kept (``None``: ``data.val_share``
            is 0).
        skipped_steps: training steps (adapters + head, and the linear probe) dropped for a
            non-finite loss or gradient (``train.on_nonfinite=skip``).
        early_stopping: per loop (``"adapters + head"``, ``"linear probe"``), what early
            stopping did (:meth:`~moracl.early_stopping.EarlyStopping.summary` and the
            metric); empty without ``train.early_stopping``.
    """

    untrained_accuracy: float | None
    probe_accuracy: float | None
    adapted_accuracy: float | None
    trainable_parameters: int
    backbone_parameters: int
    seconds: float
    skipped_steps: int = 0
    validation_accuracy: float | None = None
    probe_validation_accuracy: float | None = None
    untrained_validation_accuracy: float | None = None
    evaluated_test: bool = True
    early_stopping: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def trainable_share(self) -> float:
        return self.trainable_parameters / self.backbone_parameters

    def table(self) -> str:
        """The accuracies as a markdown table (validation and test columns) and the cost."""
        rows = [
            ("untrained head (chance level)", self.untrained_validation_accuracy,
             self.untrained_accuracy),
            ("linear probe on the frozen backbone", self.probe_validation_accuracy,
             self.probe_accuracy),
            (ADAPTED, self.validation_accuracy, self.adapted_accuracy),
        ]  # fmt: skip
        out = ["| model | validation accuracy | test accuracy |", "|---|---|---|"]
        out += [
            f"| {name} | {_percent(val, 'no split')} | {_percent(test, 'not evaluated')} |"
            for name, val, test in rows
        ]
        out.append(
            f"\ntrainable: {self.trainable_parameters:,} of {self.backbone_parameters:,} "
            f"backbone parameters ({100 * self.trainable_share:.2f} %), {self.seconds:.0f} s"
        )
        for name, s in self.early_stopping.items():
            out.append(
                f"{name}: early stopping kept epoch {s['best_epoch']} (0-based) of the "
                f"{s['epochs_run']} run ({s['metric']} {s['best_value']:.4f})"
            )
        if not self.evaluated_test:
            out.append("the test split was not evaluated (a run for model selection)")
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
    if config.quantize_base is not None:
        nf4_torchao()  # ImportError naming the install command


def run(
    config: FinetuneConfig, *, progress: bool = True, evaluate_test: bool = True
) -> FinetuneResult:
    """Check ``config`` (as ``moracl validate`` does), then, with ``output_dir`` locked and
    refused if it holds an earlier job's results, train and save the adapter,
    ``metrics.json`` and ``logs/`` in ``output_dir``.

    ``evaluate_test=False`` is a run for model selection: the test examples are never built
    or read, the test accuracies are ``None`` and ``metrics.json`` says so.

    Raises:
        ValueError: a problem with the config or the output folder (before any work).
        RunFolderBusyError: another job holds ``output_dir``.
        NonFiniteError: training diverged (nothing is written).
    """
    from_dict(FinetuneConfig, to_dict(config))  # the checks of moracl validate, in its order
    check(config)
    check_common(config)
    if not isinstance(evaluate_test, bool):
        raise ValueError(f"evaluate_test={evaluate_test!r}; expected True or False")
    return _locked_run(config, progress=progress, evaluate_test=evaluate_test)


def train_model(
    model: nn.Module,
    inputs: Callable[[Tensor], Mapping[str, Tensor]],
    labels: Tensor,
    train: TrainConfig,
    *,
    name: str = ADAPTED,
    progress: bool = False,
    after_epoch: Callable[[EpochRecord], bool] | None = None,
) -> TrainLog:
    """Train ``model``'s trainable parameters with AdamW (``train.lr``; heads, the
    ``modules_to_save``, at ``train.head_lr``) on ``labels (n,)``; ``inputs(idx)`` gives the
    model's keyword inputs for the rows ``idx (b,)``. Data-parallel under ``torchrun``; every
    step guarded by ``train.on_nonfinite`` (:func:`moracl.train.fit_classifier`), messages
    naming ``moracl finetune: {name}``. ``after_epoch(record)`` runs after each epoch;
    ``True`` stops training (early stopping). Delta-LoRA adapters move their frozen weights
    after every optimiser step (:class:`~moracl.adapters.delta_lora.DeltaLoRAUpdater`);
    AdaLoRA adapters add their orthogonality loss and allocate their rank budget over the run's
    steps (:class:`~moracl.adapters.adalora.RankBudgetHooks`)."""
    heads = {id(p) for _, p, role in iter_param_roles(model) if role is ParamRole.HEAD}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in heads], "lr": train.lr},
        {"params": [p for p in params if id(p) in heads], "lr": train.head_lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=train.weight_decay)
    updater = DeltaLoRAUpdater.attach(model, opt)  # None without Delta-LoRA adapters
    steps = train.epochs * -(-len(labels) // train.batch_size)
    budget = RankBudgetHooks.attach(model, opt, total_steps=steps)  # None without AdaLoRA

    def logits(idx: Tensor) -> Tensor:
        out: Tensor = model(**inputs(idx))
        if budget is not None:
            budget.regularize()  # AdaLoRA's orthogonality loss joins this step's gradients
        return out

    try:
        return fit_classifier(
            model,
            logits,
            labels,
            optimizer=opt,
            guard=StepGuard(train.on_nonfinite),
            epochs=train.epochs,
            batch_size=train.batch_size,
            seed=train.seed,
            where=f"moracl finetune: {name}",
            data_parallel=True,
            progress=progress,
            after_epoch=after_epoch,
        )
    finally:
        if updater is not None:
            updater.remove()
        if budget is not None:
            budget.remove()


def write_logs(
    out: Path,
    logs: Mapping[str, TrainLog],
    stoppers: Mapping[str, EarlyStopping] | None = None,
) -> None:
    """Each loop's epochs as rows of ``out/logs/train.csv`` (experience 0), replacing the
    rows of an earlier run in ``out``; TensorBoard too when it is installed. ``stoppers``:
    each loop's validation loss and accuracy per epoch (``logs/validation_epochs.csv``) and,
    for a loop under an early-stopping rule, its outcome (``logs/early_stopping.csv``)."""
    from moracl.continual.metrics import StoppingRecord
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
        for name, stopper in (stoppers or {}).items():
            for epoch, loss, acc in stopper.history:
                logger.log_validation_epoch(
                    name, experience=0, epoch=epoch, loss=loss, accuracy=acc
                )
            if stopper.config is not None and stopper.history:
                summary = stopper.summary()
                logger.log_early_stopping(
                    name,
                    StoppingRecord(
                        experience=0,
                        best_epoch=summary["best_epoch"],
                        epochs_run=summary["epochs_run"],
                        stopped_early=summary["stopped_early"],
                        metric=stopper.config.metric.value,
                        best_value=summary["best_value"],
                    ),
                )


# -- data ------------------------------------------------------------------------------------


@dataclass
class FinetuneData:
    """The examples of one finetune job: texts and labels ``(n,)`` of the training part,
    of the validation split carved from the training examples (empty when
    ``data.val_share`` is 0) and of the test split (``None``: not built)."""

    train_texts: list[str]
    train_labels: Tensor
    val_texts: list[str]
    val_labels: Tensor
    test_texts: list[str] | None
    test_labels: Tensor | None
    num_classes: int


def _train_examples(config: FinetuneConfig) -> tuple[list[str], Tensor]:
    """The training examples (validation split included); the test examples are drawn
    beside them, as for :func:`_test_examples`, but not built."""
    from moracl_scenarios.wordnet import wordnet_classification

    train, _ = wordnet_classification(
        config.data.categories,
        per_class=config.data.per_class,
        test_per_class=config.data.test_per_class,
        seed=config.train.seed,
        build_test=False,
    )
    return list(train["text"][:]), torch.tensor(train["label"][:])


def _test_examples(config: FinetuneConfig) -> tuple[list[str], Tensor]:
    """The test examples: a draw disjoint from the training examples."""
    from moracl_scenarios.wordnet import wordnet_classification

    _, test = wordnet_classification(
        config.data.categories,
        per_class=config.data.per_class,
        test_per_class=config.data.test_per_class,
        seed=config.train.seed,
    )
    return list(test["text"][:]), torch.tensor(test["label"][:])


def load_data(config: FinetuneConfig, *, evaluate_test: bool = True) -> FinetuneData:
    """The job's examples: the training examples split by class into training and
    validation parts (``data.val_share`` of each class's examples, rounded half up, at
    most all but one; drawn with ``train.seed``, see
    :func:`moracl.continual.splits.stratified_split`), and the test examples unless
    ``evaluate_test`` is false. The training and validation parts are the same either way."""
    texts, labels = _train_examples(config)
    keep, val = stratified_split(labels, config.data.val_share, config.train.seed)
    test_x, test_y = _test_examples(config) if evaluate_test else (None, None)
    return FinetuneData(
        train_texts=[texts[i] for i in keep.tolist()],
        train_labels=labels[keep],
        val_texts=[texts[i] for i in val.tolist()],
        val_labels=labels[val],
        test_texts=test_x,
        test_labels=test_y,
        num_classes=len(config.data.categories),
    )


# -- the job ---------------------------------------------------------------------------------


def _backbone(num_classes: int) -> tuple[nn.Module, Any]:
    from moracl.backbones import SentenceClassifier, load_minilm

    encoder, tokenizer = load_minilm()
    return SentenceClassifier(encoder, num_classes), tokenizer


def _batches(
    tokenizer: Any, texts: list[str], size: int, max_length: int
) -> list[dict[str, Tensor]]:
    from moracl.backbones import encode_texts

    return [
        encode_texts(tokenizer, texts[i : i + size], max_length=max_length)
        for i in range(0, len(texts), size)
    ]


@torch.no_grad()
def _scores(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``logits (n, c)`` against ``labels (n,)``."""
    loss = F.cross_entropy(logits.double(), labels).item()
    return loss, (logits.argmax(-1) == labels).double().mean().item()


@torch.no_grad()
def _logits(model: nn.Module, batches: list[dict[str, Tensor]]) -> Tensor:
    model.eval()
    return torch.cat([model(**b) for b in batches])  # (n, c)


@torch.no_grad()
def _features(classifier: nn.Module, batches: list[dict[str, Tensor]]) -> Tensor:
    classifier.eval()
    embed = cast(Any, classifier).embed
    return torch.cat([embed(**b) for b in batches])  # (n, d)


def _watch(
    model: nn.Module, logits: Callable[[], Tensor], labels: Tensor, stopper: EarlyStopping
) -> Callable[[EpochRecord], bool]:
    """The ``after_epoch`` of a loop: the validation loss and accuracy of ``logits() (n, c)``
    against ``labels (n,)`` fed to ``stopper`` with ``model``'s trainable state (and the
    frozen-weight updates of Delta-LoRA adapters and the rank masks of AdaLoRA ones)."""

    def after_epoch(record: EpochRecord) -> bool:
        loss, acc = _scores(logits(), labels)
        return stopper.update(record.epoch, val_loss=loss, val_acc=acc, state=snapshot_state(model))

    return after_epoch


class _Split(NamedTuple):
    """An evaluation split: the encoded texts in batches, and their labels ``(n,)``."""

    batches: list[dict[str, Tensor]]
    labels: Tensor


@dataclass
class _Probe:
    """The linear probe's outcome: validation and test accuracy, log, early stopping."""

    val_accuracy: float | None
    test_accuracy: float | None
    log: TrainLog
    stopper: EarlyStopping


def _linear_probe(
    train_f: Tensor,
    train_y: Tensor,
    val: tuple[Tensor, Tensor] | None,
    test: tuple[Tensor, Tensor] | None,
    train: TrainConfig,
) -> _Probe:
    """The reference: a fresh head trained on the frozen backbone's features ``(n, d)``
    (same epochs, batch size, learning rate, seed and early stopping as the head of the
    adapted model, guarded alike), scored on the validation and test features."""
    torch.manual_seed(train.seed)
    head = nn.Linear(train_f.shape[1], int(train_y.max()) + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=train.head_lr, weight_decay=train.weight_decay)
    stopper = EarlyStopping(train.early_stopping)

    @torch.no_grad()
    def logits(features: Tensor) -> Tensor:
        head.eval()
        return head(features)  # (n, d) -> (n, c)

    log = fit_classifier(
        head,
        lambda idx: head(train_f[idx]),
        train_y,
        optimizer=opt,
        guard=StepGuard(train.on_nonfinite),
        epochs=train.epochs,
        batch_size=train.batch_size,
        seed=train.seed,
        where=f"moracl finetune: {PROBE}",
        after_epoch=None if val is None else _watch(head, lambda: logits(val[0]), val[1], stopper),
    )
    stopper.restore(head)
    val_acc, test_acc = (None if s is None else _scores(logits(s[0]), s[1])[1] for s in (val, test))
    return _Probe(val_acc, test_acc, log, stopper)


def _stopping_summary(stopper: EarlyStopping) -> dict[str, Any] | None:
    if stopper.config is None or not stopper.history:
        return None
    return {**stopper.summary(), "metric": stopper.config.metric.value}


@exclusive_output_dir("moracl finetune", results=OUTPUTS)
def _locked_run(config: FinetuneConfig, *, progress: bool, evaluate_test: bool) -> FinetuneResult:
    start = time.perf_counter()
    init_distributed(config.distributed.backend, "cpu")
    tc = config.train
    torch.manual_seed(tc.seed)
    data = load_data(config, evaluate_test=evaluate_test)
    classifier, tokenizer = _backbone(data.num_classes)
    if config.quantize_base is not None:  # QLoRA: every linear layer of the encoder in NF4
        classifier = quantize_base(classifier, exclude_modules=["head"])
    encoder = cast(nn.Module, classifier.encoder)
    backbone_params = sum(p.numel() for p in encoder.parameters())

    def split(texts: list[str], labels: Tensor) -> _Split:
        return _Split(_batches(tokenizer, texts, 128, tc.max_length), labels)

    val = split(data.val_texts, data.val_labels) if data.val_texts else None
    test = None
    if data.test_texts is not None and data.test_labels is not None:
        test = split(data.test_texts, data.test_labels)

    def accuracy(model: nn.Module, split: _Split | None) -> float | None:
        return None if split is None else _scores(_logits(model, split.batches), split.labels)[1]

    def features(split: _Split | None) -> tuple[Tensor, Tensor] | None:
        return None if split is None else (_features(classifier, split.batches), split.labels)

    untrained_val, untrained = accuracy(classifier, val), accuracy(classifier, test)
    train_f = _features(classifier, split(data.train_texts, data.train_labels).batches)  # (n, d)
    probe = _linear_probe(train_f, data.train_labels, features(val), features(test), tc)

    torch.manual_seed(tc.seed)
    adapter = config.adapter
    if isinstance(adapter, AdaLoRAConfig) and adapter.total_step is None:
        steps = tc.epochs * -(-len(data.train_labels) // tc.batch_size)
        adapter = replace(adapter, total_step=steps)  # recorded in the saved folders
    model = MoRAModel(
        classifier, adapter, target_modules=config.target_modules, modules_to_save=["head"]
    )

    def inputs(idx: Tensor) -> dict[str, Tensor]:
        texts = [data.train_texts[j] for j in idx]
        return _batches(tokenizer, texts, len(texts), tc.max_length)[0]

    stopper = EarlyStopping(tc.early_stopping)
    watch = None
    if val is not None:
        watch = _watch(model, lambda: _logits(model, val.batches), val.labels, stopper)
    train_log = train_model(
        model, inputs, data.train_labels, tc, progress=progress, after_epoch=watch
    )
    stopper.restore(model)  # the best epoch's weights, before evaluation and saving
    summaries = {ADAPTED: _stopping_summary(stopper), PROBE: _stopping_summary(probe.stopper)}
    trainable, _ = model.trainable_parameters()
    result = FinetuneResult(
        untrained_accuracy=untrained,
        probe_accuracy=probe.test_accuracy,
        adapted_accuracy=accuracy(model, test),
        trainable_parameters=trainable,
        backbone_parameters=backbone_params,
        seconds=time.perf_counter() - start,
        skipped_steps=train_log.skipped + probe.log.skipped,
        validation_accuracy=accuracy(model, val),
        probe_validation_accuracy=probe.val_accuracy,
        untrained_validation_accuracy=untrained_val,
        evaluated_test=evaluate_test,
        early_stopping={k: v for k, v in summaries.items() if v is not None},
    )
    out = Path(config.output_dir)
    if is_main():
        logs = {ADAPTED: train_log, PROBE: probe.log}
        stoppers = {ADAPTED: stopper, PROBE: probe.stopper}
        text = finite_json(
            {
                "config": to_dict(config),
                "result": asdict(result),
                "test_split": "evaluated" if evaluate_test else "not evaluated",
                "examples": {
                    "train": len(data.train_labels),
                    "validation": len(data.val_labels),
                    "test": None if data.test_labels is None else len(data.test_labels),
                },
                "training": {
                    name: {
                        "steps": log.steps,
                        "skipped_steps": log.skipped,
                        "epochs_run": len(log.epochs),
                        "validation": [
                            {"epoch": e, "loss": loss, "accuracy": acc}
                            for e, loss, acc in stoppers[name].history
                        ],
                    }
                    for name, log in logs.items()
                },
            },
            f"moracl finetune: {out / 'metrics.json'}",
            indent=2,
        )
        write_logs(out, logs, stoppers)
        model.save_pretrained(out / "adapter")
        write_atomic(out / "metrics.json", text + "\n")
    barrier()
    return result
