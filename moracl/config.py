"""Typed experiment configs: dataclasses are the source of truth, YAML their serialisation.

``load_config(path, overrides)`` reads a YAML file, applies dotted ``key=value`` overrides,
and builds the dataclass of the file's ``job``; unknown keys are rejected with the valid ones.
Adapter sections are polymorphic on their ``kind`` (see :class:`moracl.AdapterConfig`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moracl.adapters import AdapterConfig
from moracl.continual.config import SEED_MAX, RoutingMode, RoutingModeName, RunConfig
from moracl.distributed import DistributedConfig
from moracl.early_stopping import EarlyStoppingConfig
from moracl.experts.mixture import MixtureConfig
from moracl.experts.routers.config import RouterConfig, RouterType
from moracl.guard import OnNonFinite, check_int, check_number, parse_on_nonfinite
from moracl.meta.config import MetaAlgorithm, MetaLearnConfig, MetaOptimConfig, MetaTestConfig
from moracl.parse_fields import from_dict, parse_value, to_dict
from moracl.quant import BaseQuantization
from moracl.registry import Registry

__all__ = [
    "JOBS",
    "SEED_MAX",
    "TAGGED_FAMILIES",
    "ConfigDumper",
    "ConfigLoader",
    "ConfigNote",
    "DataConfig",
    "EarlyStoppingConfig",
    "FewShotDataConfig",
    "FinetuneConfig",
    "MetaAlgorithm",
    "MetaConfig",
    "MetaLearnConfig",
    "MetaOptimConfig",
    "MetaTestConfig",
    "TaggedFamily",
    "TrainConfig",
    "apply_overrides",
    "check_seed",
    "dump_yaml",
    "from_dict",
    "load_config",
    "parse_yaml",
    "to_dict",
]

T = TypeVar("T")


def check_seed(name: str, value: Any) -> int:
    """``value`` if it is an integer seed in ``[0, SEED_MAX]``; else ``ValueError`` naming
    ``name``."""
    return check_int(name, value, ge=0, le=SEED_MAX)


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
    on_nonfinite: OnNonFinite = field(
        default=OnNonFinite.STOP,
        metadata={"help": "at a non-finite loss or gradient: stop (an error) or skip the step"},
    )
    early_stopping: EarlyStoppingConfig | None = field(
        default=None,
        metadata={
            "help": "stop training when the validation metric stops improving and keep the "
            "best epoch's weights (null: train every epoch; epochs is then the maximum)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            check_int(f"train.{name}", getattr(self, name), gt=0)
        for name in ("lr", "head_lr"):
            check_number(f"train.{name}", getattr(self, name), gt=0)
        check_number("train.weight_decay", self.weight_decay, ge=0)
        check_seed("train.seed", self.seed)
        self.on_nonfinite = parse_on_nonfinite(self.on_nonfinite, "train.on_nonfinite")
        if isinstance(self.early_stopping, Mapping):
            self.early_stopping = from_dict(
                EarlyStoppingConfig, self.early_stopping, where="train.early_stopping"
            )
        if self.early_stopping is not None and not isinstance(
            self.early_stopping, EarlyStoppingConfig
        ):
            raise ValueError(
                f"train.early_stopping must be null or a mapping of patience, metric and "
                f"min_delta, got {self.early_stopping!r}"
            )


@dataclass
class DataConfig:
    """A classification task drawn from a named scenario."""

    scenario: str = field(default="wordnet-categories", metadata={"help": "data source name"})
    categories: list[str] = field(default_factory=list, metadata={"help": "class names"})
    per_class: int = field(default=100, metadata={"help": "training examples per class"})
    test_per_class: int = field(default=50, metadata={"help": "test examples per class"})
    val_share: float = field(
        default=0.1,
        metadata={
            "help": "share of each class's training examples held out for validation "
            "(seeded by train.seed; 0: no validation split)"
        },
    )

    def __post_init__(self) -> None:
        check_int("data.per_class", self.per_class, gt=0)
        check_int("data.test_per_class", self.test_per_class, gt=0)
        if not isinstance(self.scenario, str):
            raise ValueError(f"data.scenario must be a scenario name, got {self.scenario!r}")
        self.val_share = check_number("data.val_share", self.val_share, ge=0, lt=1)
        if self.val_share > 0 and self.per_class < 2:
            raise ValueError(
                f"data.val_share={self.val_share:g} needs data.per_class >= 2 (every class "
                f"keeps a training example), got data.per_class={self.per_class}; raise "
                f"data.per_class or set data.val_share=0"
            )


@dataclass
class FinetuneConfig:
    """``moracl finetune``: adapt a frozen backbone to one classification task."""

    job: str = "finetune"
    backbone: str = field(default="minilm", metadata={"help": "registered backbone name"})
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(kind="mora", rank=8))
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    quantize_base: BaseQuantization | None = field(
        default=None,
        metadata={
            "help": "store the frozen backbone's linear layers in 4-bit (nf4: QLoRA, needs "
            "torchao); null: full precision"
        },
    )
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = field(default="out/finetune", metadata={"help": "where the adapter is saved"})

    def __post_init__(self) -> None:
        if self.quantize_base is not None:
            self.quantize_base = BaseQuantization.parse(self.quantize_base)
        if (
            isinstance(self.train, TrainConfig)
            and isinstance(self.data, DataConfig)
            and self.train.early_stopping is not None
            and self.data.val_share == 0
        ):
            raise ValueError(
                "train.early_stopping watches the validation split, but data.val_share=0 "
                "holds none out: set data.val_share > 0 (e.g. 0.1) or train.early_stopping=null"
            )


@dataclass
class FewShotDataConfig:
    """N-way K-shot episodes of a few-shot scenario (``moracl_scenarios.fewshot.FEWSHOT``)."""

    scenario: str = field(default="wordnet-fewshot", metadata={"help": "few-shot scenario"})
    ways: int = field(default=5, metadata={"help": "N, classes per episode"})
    shots: int = field(default=5, metadata={"help": "K, support examples per class"})
    queries: int = field(default=15, metadata={"help": "Q, query examples per class"})
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "scenario options: class split fractions, seeds, class lists, ..."},
    )

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "queries"):
            check_int(f"data.{name}", getattr(self, name))
        if self.ways < 2 or self.shots < 1 or self.queries < 1:
            raise ValueError(
                f"need data.ways >= 2, data.shots >= 1 and data.queries >= 1; got "
                f"{self.ways!r}, {self.shots!r}, {self.queries!r}"
            )
        if not isinstance(self.options, Mapping) or not all(
            isinstance(k, str) for k in self.options
        ):
            raise ValueError(f"data.options must map option names to values, got {self.options!r}")


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

    def __post_init__(self) -> None:
        check_seed("seed", self.seed)


JOBS: Registry[type] = Registry("job")
JOBS.register("finetune")(FinetuneConfig)
JOBS.register("meta")(MetaConfig)
JOBS.register("run")(RunConfig)


# -- generic dict <-> dataclass ---------------------------------------------------------------


# -- YAML and overrides -----------------------------------------------------------------------

# YAML 1.1 (PyYAML) reads ``1e-1``, ``1E5``, ``-2e3`` and ``.5e1`` as strings: a float needs a
# dot and a signed exponent there. Configs read them as YAML 1.2 and every user does: numbers.
_FLOAT_1_2 = re.compile(
    r"""^[-+]?(?:
        [0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+   # 1e5, 1.5E-3, -2e3
      | \.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?          # .5, .5e1, -.5
    )$""",
    re.X,
)


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats (``1e-1``, ``1E5``, ``-2e3``, ``.5e1``) and
    duplicate keys refused; used wherever configs and overrides are parsed."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
            if duplicate:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        return super().construct_mapping(node, deep=deep)


class ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes strings :class:`ConfigLoader` would read as numbers."""


for _cls in (ConfigLoader, ConfigDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{e.problem or e.context}{where}"
    return " ".join(str(e).split())


def parse_yaml(text: str, what: str) -> Any:
    """``text`` parsed with :class:`ConfigLoader`; ``ValueError`` naming ``what`` and the
    problem's line and column if it is not valid YAML."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        raise ValueError(f"{what} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ValueError(f"{what} is not a config: nested too deeply") from None


def dump_yaml(data: Any) -> str:
    """``data`` as YAML that :func:`parse_yaml` reads back unchanged."""
    return yaml.dump(data, Dumper=ConfigDumper, sort_keys=False)


class ConfigNote(UserWarning):
    """A change an override made besides the one it names: the keys of a config section that
    the section's new kind (``adapter.kind=lora``, ``experts.routing.mode=task``) does not
    have, dropped. The ``moracl`` command prints it as one ``moracl: note:`` line."""


@dataclass(frozen=True)
class TaggedFamily:
    """A config family whose variant a tag field picks (``AdapterConfig`` by ``kind``).

    Args:
        tag: the field naming the variant.
        variant: the variant's class for a tag value (``ValueError`` for an unknown one).
        default: the tag's value when a section leaves it out.
    """

    tag: str
    variant: Callable[[Any], type]
    default: Any


def _adapter_variant(kind: Any) -> type:
    return type(AdapterConfig(kind=kind))  # the kind's config class, with its defaults


#: the tagged config families: changing a section's tag by an override drops its keys that the
#: new variant lacks (:func:`apply_overrides`)
TAGGED_FAMILIES: dict[type, TaggedFamily] = {
    AdapterConfig: TaggedFamily("kind", _adapter_variant, "lora"),
    RouterConfig: TaggedFamily("type", RouterConfig.variant, RouterType.TOPK.value),
    RoutingMode: TaggedFamily("mode", RoutingMode.variant, RoutingModeName.AUTO.value),
}


def _family(tp: Any) -> TaggedFamily | None:
    if isinstance(tp, type):
        for base in tp.__mro__:
            if base in TAGGED_FAMILIES:
                return TAGGED_FAMILIES[base]
    return None


def _pick(tp: Any, node: Any) -> Any:
    """The member of annotation ``tp`` that ``node`` parses as (``tp`` unless a union)."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return tp
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(members) == 1:
        return members[0]
    for member in members:  # in the order the parser tries them
        try:
            parse_value(member, node)
        except (ValueError, TypeError):
            continue
        return member
    return None


def _section_type(root: type, data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The declared type of the section of ``data`` at ``path`` (a dataclass or a tagged
    family), following the variants ``data`` picks; ``None`` when the schema does not say."""
    tp: Any = root
    node: Any = data
    for part in path:
        family = _family(tp)
        if family is not None:
            try:
                tp = family.variant(node.get(family.tag, family.default))
            except ValueError:
                return None
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        hint = _field_hints(tp).get(part)
        node = node.get(part) if isinstance(node, Mapping) else None
        if hint is None or not isinstance(node, Mapping):
            return None
        tp = _pick(hint, node)
    return tp


def _field_hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _dropped_by_tag(
    root: type,
    data: Mapping[str, Any],
    path: tuple[str, ...],
    value: Any,
    kept: set[tuple[str, ...]],
) -> list[str]:
    """The keys of the section at ``path[:-1]`` that setting its tag ``path[-1]`` to ``value``
    leaves without a field: keys of the current variant that the new one lacks, except
    those the overrides set (``kept`` holds their paths; they are still checked)."""
    section, tag = path[:-1], path[-1]
    tp = _section_type(root, data, section)
    family = _family(tp)
    node: Any = data
    for part in section:
        node = node.get(part) if isinstance(node, Mapping) else None
    if family is None or family.tag != tag or not isinstance(node, Mapping):
        return []
    try:
        old = family.variant(node.get(tag, family.default))
        new = family.variant(value)
    except ValueError:  # an unknown kind: the parser names the valid ones
        return []
    old_fields = {f.name for f in dataclasses.fields(old)}
    new_fields = {f.name for f in dataclasses.fields(new)}
    return [
        key
        for key in node
        if key in old_fields
        and key not in new_fields
        and not any(p[: len(section) + 1] == (*section, key) for p in kept)
    ]


@dataclass(frozen=True)
class _Override:
    text: str
    path: tuple[str, ...]
    value: Any = None
    delete: bool = False


def _parse_override(item: str) -> _Override:
    if not isinstance(item, str):
        raise ValueError(f"an override must be a string key=value or ~key, got {item!r}")
    delete = item.startswith("~")
    key, sep, raw = item.removeprefix("~").partition("=")
    if delete and sep:
        raise ValueError(f"override {item!r}: ~key deletes a key and takes no value")
    if (not delete and not sep) or not key:
        raise ValueError(
            f"override {item!r} is not of the form key=value (e.g. train.lr=1e-3) or ~key "
            f"(e.g. ~adapter.compression, deleting a key)"
        )
    parts = tuple(key.split("."))
    if not all(parts):
        raise ValueError(f"override {item!r}: {key!r} has an empty part; expected a.b.c")
    if delete:
        return _Override(item, parts, delete=True)
    return _Override(item, parts, parse_yaml(raw, f"the value of override {item!r}"))


def _delete(data: dict[str, Any], op: _Override) -> None:
    node: Any = data
    for depth, part in enumerate(op.path):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(op.path[:depth]) or "the top level"
            keys = sorted(node) if isinstance(node, dict) else []
            raise ValueError(
                f"override {op.text!r}: the config has no key {'.'.join(op.path)!r} to delete "
                f"(keys at {where}: {keys})"
            )
        if depth == len(op.path) - 1:
            del node[part]
        else:
            node = node[part]


def _schema(data: Mapping[str, Any]) -> type | None:
    job = data.get("job")
    return JOBS.get(job) if isinstance(job, str) and job in JOBS.names() else None


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with overrides applied, in order; ``data`` is left unchanged.

    ``key=value`` sets a dotted key (the value parsed as YAML by :class:`ConfigLoader`);
    ``~key`` deletes one (``ValueError`` naming it when the config has no such key). When
    ``data`` names a registered ``job``, setting the tag of a tagged section
    (:data:`TAGGED_FAMILIES`: ``adapter.kind=lora``, ``experts.routing.mode=task``, a router's
    ``type``) drops that section's keys the new variant does not have, with a
    :class:`ConfigNote` warning naming them; keys the same overrides set are kept, so the
    parser still checks them (a typo still fails)."""
    out: dict[str, Any] = copy.deepcopy(dict(data))
    ops = [_parse_override(item) for item in overrides]
    kept = {op.path for op in ops if not op.delete}
    job = next((op.value for op in reversed(ops) if op.path == ("job",) and not op.delete), None)
    root = _schema({"job": job} if job is not None else out)
    for op in ops:
        if op.delete:
            _delete(out, op)
            continue
        node = out
        for p in op.path[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {op.text!r}: {p!r} is not a section")
            node = child
        if root is not None:
            dropped = _dropped_by_tag(root, out, op.path, op.value, kept)
            for key in dropped:
                del node[key]
            if dropped:
                section = ".".join(op.path[:-1])
                names = ", ".join(f"{section}.{k}" for k in dropped)
                what = f"{op.path[-1]} {op.value!r} has no such key" + ("s" if dropped[1:] else "")
                warnings.warn(f"{op.text}: dropped {names} ({what})", ConfigNote, stacklevel=2)
        node[op.path[-1]] = op.value
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Read ``path`` (YAML), apply ``overrides``, and build the config of its ``job``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid YAML (with the line and column), an unknown job or key, or a
            value of the wrong type or out of range (naming the key, the value and what is
            allowed).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no config file {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{p} is not a UTF-8 text file") from None
    data = parse_yaml(text, str(p))
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    job = data.get("job")
    if job is None:
        raise ValueError(f"{p}: missing 'job'; expected one of {JOBS.names()}")
    if not isinstance(job, str):
        raise ValueError(f"{p}: job must be one of {JOBS.names()}, got {job!r}")
    return from_dict(JOBS.get(job), data)
