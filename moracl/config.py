"""Typed experiment configs: dataclasses are the source of truth, YAML their serialisation.

``load_config(path, overrides)`` reads a YAML file, applies dotted ``key=value`` overrides,
and builds the dataclass of the file's ``job``; unknown keys are rejected with the valid ones.
Adapter sections are polymorphic on their ``kind`` (see :class:`moracl.AdapterConfig`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from moracl.adapters import AdapterConfig
from moracl.continual.config import RunConfig
from moracl.distributed import DistributedConfig
from moracl.experts.mixture import MixtureConfig
from moracl.registry import Registry

__all__ = [
    "JOBS",
    "DataConfig",
    "FewShotDataConfig",
    "FinetuneConfig",
    "MetaAlgorithm",
    "MetaConfig",
    "MetaLearnConfig",
    "MetaOptimConfig",
    "MetaTestConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "to_dict",
]

T = TypeVar("T")


@dataclass
class TrainConfig:
    """How to train."""

    epochs: int = field(default=3, metadata={"help": "passes over the training set"})
    batch_size: int = field(default=32, metadata={"help": "examples per step"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the adapters"})
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the task head"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, sampling, dropout"})
    max_length: int = field(default=48, metadata={"help": "tokens per text"})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("lr", "head_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class DataConfig:
    """A classification task drawn from a named scenario."""

    scenario: str = field(default="wordnet-categories", metadata={"help": "data source name"})
    categories: list[str] = field(default_factory=list, metadata={"help": "class names"})
    per_class: int = field(default=100, metadata={"help": "training examples per class"})
    test_per_class: int = field(default=50, metadata={"help": "test examples per class"})

    def __post_init__(self) -> None:
        if self.per_class <= 0 or self.test_per_class <= 0:
            raise ValueError(
                f"data.per_class and data.test_per_class must be > 0, "
                f"got {self.per_class!r} and {self.test_per_class!r}"
            )


@dataclass
class FinetuneConfig:
    """``moracl finetune``: adapt a frozen backbone to one classification task."""

    job: str = "finetune"
    backbone: str = field(default="minilm", metadata={"help": "registered backbone name"})
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(kind="mora", rank=8))
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = field(default="out/finetune", metadata={"help": "where the adapter is saved"})


class MetaAlgorithm(str, Enum):
    """The MAML variant of ``moracl meta`` (see :mod:`moracl.meta.maml`)."""

    MAML = "maml"  # second order
    FOMAML = "fomaml"  # first order
    METASGD = "metasgd"  # learned per-entry inner step sizes
    ANIL = "anil"  # only the head adapts in the inner loop


@dataclass
class FewShotDataConfig:
    """N-way K-shot episodes of a few-shot scenario (``scenarios.fewshot.FEWSHOT``)."""

    scenario: str = field(default="wordnet-fewshot", metadata={"help": "few-shot scenario"})
    ways: int = field(default=5, metadata={"help": "N, classes per episode"})
    shots: int = field(default=5, metadata={"help": "K, support examples per class"})
    queries: int = field(default=15, metadata={"help": "Q, query examples per class"})
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "scenario options: class split fractions, seeds, class lists, ..."},
    )

    def __post_init__(self) -> None:
        if self.ways < 2 or self.shots < 1 or self.queries < 1:
            raise ValueError(
                f"need data.ways >= 2, data.shots >= 1 and data.queries >= 1; got "
                f"{self.ways!r}, {self.shots!r}, {self.queries!r}"
            )


@dataclass
class MetaLearnConfig:
    """The meta-training loop."""

    algorithm: MetaAlgorithm = field(
        default=MetaAlgorithm.MAML, metadata={"help": "maml, fomaml, metasgd or anil"}
    )
    inner_lr: float = field(default=0.01, metadata={"help": "inner-loop SGD step size"})
    inner_steps: int = field(default=5, metadata={"help": "inner steps in meta-training"})
    test_inner_steps: int = field(default=10, metadata={"help": "inner steps at meta-test"})
    meta_batch: int = field(default=16, metadata={"help": "tasks per outer step"})
    chunk_size: int | None = field(
        default=None, metadata={"help": "tasks per vmapped chunk (null: all at once)"}
    )
    steps: int = field(default=200, metadata={"help": "outer steps (0: no meta-training)"})
    zero_head: bool = field(
        default=True, metadata={"help": "keep the head's meta-initialisation at zero"}
    )
    val_every: int = field(
        default=25, metadata={"help": "validate every this many steps, keep the best (0: never)"}
    )
    val_episodes: int = field(default=200, metadata={"help": "meta-validation episodes"})

    def __post_init__(self) -> None:
        if not self.inner_lr > 0:
            raise ValueError(f"meta.inner_lr must be > 0, got {self.inner_lr!r}")
        for name in ("inner_steps", "test_inner_steps", "steps", "val_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"meta.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.meta_batch < 1 or self.val_episodes < 2:
            raise ValueError(
                f"need meta.meta_batch >= 1 and meta.val_episodes >= 2; got "
                f"{self.meta_batch!r}, {self.val_episodes!r}"
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"meta.chunk_size must be >= 1 or null, got {self.chunk_size!r}")


@dataclass
class MetaOptimConfig:
    """The outer optimiser, a :class:`moracl.MoRAOptimizer`."""

    base: str = field(default="adamw", metadata={"help": "adamw, sgd or lamb"})
    lr: float = field(default=1e-3, metadata={"help": "outer learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    loraplus_ratio: float = field(default=1.0, metadata={"help": "LoRA+ ratio of lora_b's lr"})
    lars: bool = field(default=False, metadata={"help": "add LARS"})
    sam_rho: float = field(default=0.0, metadata={"help": "SAM radius (0: no SAM)"})

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.weight_decay < 0 or self.sam_rho < 0:
            raise ValueError(
                f"need optim.lr > 0, optim.weight_decay >= 0 and optim.sam_rho >= 0; got "
                f"{self.lr!r}, {self.weight_decay!r}, {self.sam_rho!r}"
            )


@dataclass
class MetaTestConfig:
    """Meta-test on held-out classes: the meta-trained adapters and two baselines."""

    episodes: int = field(default=600, metadata={"help": "test episodes (>= 600 for reports)"})
    seed: int = field(default=2024, metadata={"help": "seeds the test episodes"})
    batch: int = field(default=100, metadata={"help": "episodes per vmapped chunk"})
    finetune_steps: int = field(
        default=50, metadata={"help": "Adam steps of the fresh-adapter baseline per episode"}
    )
    finetune_lr: float = field(default=1e-2, metadata={"help": "its Adam learning rate"})

    def __post_init__(self) -> None:
        if self.episodes < 2 or self.batch < 1 or self.finetune_steps < 0:
            raise ValueError(
                f"need test.episodes >= 2, test.batch >= 1 and test.finetune_steps >= 0; got "
                f"{self.episodes!r}, {self.batch!r}, {self.finetune_steps!r}"
            )
        if not self.finetune_lr > 0:
            raise ValueError(f"test.finetune_lr must be > 0, got {self.finetune_lr!r}")


@dataclass
class MetaConfig:
    """``moracl meta``: meta-train adapters on few-shot tasks, meta-test on held-out classes."""

    job: str = "meta"
    backbone: str = field(
        default="minilm", metadata={"help": "the scenario's backbone: minilm or cnn-fashion"}
    )
    adapter: AdapterConfig | MixtureConfig = field(
        default_factory=lambda: AdapterConfig(kind="lora", rank=8)
    )
    target_modules: list[str] = field(
        default_factory=list, metadata={"help": "adapted layers (empty: the backbone's default)"}
    )
    data: FewShotDataConfig = field(default_factory=FewShotDataConfig)
    meta: MetaLearnConfig = field(default_factory=MetaLearnConfig)
    optim: MetaOptimConfig = field(default_factory=MetaOptimConfig)
    test: MetaTestConfig = field(default_factory=MetaTestConfig)
    seed: int = field(default=0, metadata={"help": "seeds initialisation and task sampling"})
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = field(default="out/meta", metadata={"help": "report, metrics, adapter"})


JOBS: Registry[type] = Registry("job")
JOBS.register("finetune")(FinetuneConfig)
JOBS.register("meta")(MetaConfig)
JOBS.register("run")(RunConfig)


# -- generic dict <-> dataclass ---------------------------------------------------------------


def _fail(where: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{where or 'config'}: expected {expected}, got {value!r}")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if tp is MixtureConfig:
        if isinstance(value, MixtureConfig):
            return value
        if not isinstance(value, Mapping):
            raise _fail(where, "a mapping with 'mixture: true'", value)
        try:
            return MixtureConfig.from_dict(value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
    if isinstance(tp, type) and issubclass(tp, AdapterConfig):
        if isinstance(value, AdapterConfig):
            return value
        if not isinstance(value, Mapping):
            raise _fail(where, "a mapping with a 'kind'", value)
        try:
            return AdapterConfig.from_dict(value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, where=where)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise _fail(where, f"one of {[m.value for m in tp]}", value) from None
    if origin in (list, Sequence, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise _fail(where, "a list", value)
        (item,) = typing.get_args(tp)[:1] or (Any,)
        out = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _fail(where, "a mapping", value)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(where, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _fail(where, "a number", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(where, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(where, "a string", value)
        return value
    return value


def from_dict(cls: type[T], data: Any, *, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys raise ``ValueError``
    naming the valid ones, wrong types name the key, the value and what was expected."""
    if not isinstance(data, Mapping):
        raise _fail(where, f"a mapping for {cls.__name__}", data)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where or 'config'}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A YAML/JSON-ready form of a config dataclass (``from_dict`` inverts it)."""
    if isinstance(obj, (AdapterConfig, MixtureConfig)):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# -- YAML and overrides -----------------------------------------------------------------------


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with dotted ``key=value`` overrides applied (values parsed as YAML)."""
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-3)")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Read ``path`` (YAML), apply ``overrides``, and build the config of its ``job``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no config file {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    job = data.get("job")
    if job is None:
        raise ValueError(f"{p}: missing 'job'; expected one of {JOBS.names()}")
    return from_dict(JOBS.get(job), data)
