"""The typed configuration of ``moracl run`` (YAML ``job: run``)."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from moracl import parse_fields
from moracl.adapters.base import AdapterConfig
from moracl.distributed import DistributedConfig
from moracl.early_stopping import EarlyStoppingConfig
from moracl.experts.routers.config import RoutePer
from moracl.guard import OnNonFinite, check_int, check_number, parse_on_nonfinite
from moracl.parse_fields import check_field_types, check_string_keys

__all__ = [
    "DEFAULT_STRATEGIES",
    "MOVED_KEYS",
    "SEED_MAX",
    "STRATEGIES",
    "AutoRouting",
    "BaselinesConfig",
    "ContinualTrainConfig",
    "ExpertsConfig",
    "GaussianRouting",
    "LearnedRouting",
    "RoutePer",
    "RoutingMode",
    "RoutingModeName",
    "RunConfig",
    "ScenarioConfig",
    "Setting",
    "TaskRouting",
    "WithoutTaskLabels",
    "check_routing",
]

#: strategy names a run may list, in the order runs report them (the names of
#: :data:`moracl.continual.strategies.STRATEGY_REGISTRY`)
STRATEGIES = ("moracl", "naive", "ewc", "lwf", "replay", "derpp", "olora", "inflora", "joint")
#: what a run without a ``strategies`` list runs: moracl and the classic references
DEFAULT_STRATEGIES = ("moracl", "naive", "ewc", "lwf", "replay", "joint")


class _Choice(str, Enum):
    """A choice of the config: a ``str`` (YAML strings read as members) that prints as its
    value, so ``f"scenario.setting={setting}"`` gives a valid override."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Setting(_Choice):
    """The continual setting of a stream: which labels test rows carry."""

    TASK = "task"  # task labels at test time: one head per task
    CLASS = "class"  # no task labels; each class in one experience
    DOMAIN = "domain"  # no task labels; every experience has the same classes


#: the largest seed a config takes (seeds go to torch, numpy and Python generators alike)
SEED_MAX = 2**32 - 1


@dataclass
class ScenarioConfig:
    """Which stream to learn (a name registered in ``moracl_scenarios.SCENARIOS``)."""

    name: str = field(default="wordnet-domains", metadata={"help": "registered scenario name"})
    setting: Setting | None = field(
        default=None, metadata={"help": "task, class or domain (None: the scenario's default)"}
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "builder options (sizes, class lists, ...)"}
    )
    val_share: float = field(
        default=0.1,
        metadata={
            "help": "share of each class's training rows of each experience held out for "
            "validation (seeded by train.seed; 0: no validation split)"
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"scenario.name must be a scenario name, got {self.name!r}")
        self.val_share = check_number("scenario.val_share", self.val_share, ge=0, lt=1)
        if self.setting is not None and not isinstance(self.setting, Setting):
            try:
                self.setting = Setting(self.setting)
            except ValueError:
                raise ValueError(
                    f"scenario.setting must be one of {[s.value for s in Setting]} or null "
                    f"(the scenario's default), got {self.setting!r}"
                ) from None
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise ValueError(
                f"scenario.options must map option names to values, got {self.options!r}"
            )


class RoutingModeName(_Choice):
    """The tag of ``experts.routing``: which routing variant a run uses."""

    AUTO = "auto"  # by task with task labels, else as without_task_labels says
    TASK = "task"  # by task id: each task owns its experts
    LEARNED = "learned"  # learned top-k routers
    GAUSSIAN = "gaussian"  # by the experience gaussian task inference picks


class WithoutTaskLabels(_Choice):
    """How ``mode: auto`` routes rows that carry no task label."""

    LEARNED = "learned"  # learned top-k routers (one expert per token)
    GAUSSIAN = "gaussian"  # gaussian task inference


def _choice(enum: type[Enum], key: str, value: object) -> Any:
    """``value`` as a member of ``enum``, or ``ValueError`` naming ``key`` and the choices."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{key} must be one of {[m.value for m in enum]}, got {value!r}") from None


def _check_flag(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")


def _set_number(config: object, key: str, **bounds: float) -> None:
    """Check the number field ``key`` of a frozen ``config`` and store it as a float."""
    object.__setattr__(config, key, check_number(key, getattr(config, key), **bounds))


R = TypeVar("R", bound="RoutingMode")


@dataclass(frozen=True)
class RoutingMode(ABC):
    """How moracl's mixtures route (``experts.routing``): one frozen variant per ``mode``.

    ``RoutingMode(mode="learned", k=2)`` returns a :class:`LearnedRouting`, as
    ``AdapterConfig(kind=...)`` does for adapters; each variant has only the fields it reads,
    so a key of another variant (``k`` under ``mode: auto``) is refused with the valid keys.
    :meth:`resolve` turns a variant into the routing of a run with or without task labels.

    Args:
        mode: the variant (:class:`RoutingModeName`; default ``auto``).
    """

    mode: RoutingModeName = RoutingModeName.AUTO

    _modes: ClassVar[dict[RoutingModeName, type[RoutingMode]]] = {}

    if TYPE_CHECKING:  # the variant's fields, as keywords (the dataclass makes __init__)

        def __init__(self, *, mode: RoutingModeName | str = ..., **fields: Any) -> None: ...

    def __new__(cls, *args: Any, **kwargs: Any) -> RoutingMode:
        if args:
            raise TypeError("RoutingMode takes keyword arguments only")
        if cls is RoutingMode:
            cls = cls.variant(kwargs.get("mode", RoutingModeName.AUTO))
        cls.check_keys(kwargs)
        return super().__new__(cls)

    @classmethod
    def variant(cls, mode: object) -> type[RoutingMode]:
        """The class of routing mode ``mode``; ``ValueError`` listing the modes."""
        name = _choice(RoutingModeName, "mode", mode)
        return cls._modes[name]

    @classmethod
    def check_keys(cls, data: Mapping[str, Any]) -> None:
        """``ValueError`` for keys that are not fields of this mode's config."""
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(data) - set(valid), key=repr)
        if unknown:
            mode = _mode_of(cls)
            what = f"the {mode.value} routing mode" if mode is not None else "a routing mode"
            raise ValueError(f"unknown key(s) {unknown} for {what}; valid keys: {valid}")

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _choice(RoutingModeName, "mode", self.mode))
        expected = _mode_of(type(self))
        if expected is None:
            raise TypeError("RoutingMode is a family: build a variant with RoutingMode(mode=...)")
        if self.mode is not expected:
            raise ValueError(
                f"{type(self).__name__} has mode {expected.value!r}, got {self.mode!r}"
            )

    @abstractmethod
    def resolve(self, *, task_aware: bool) -> TaskRouting | LearnedRouting | GaussianRouting:
        """The routing of a run with (``task_aware``) or without task labels.

        Raises:
            ValueError: this mode cannot route such a run (naming the keys to change).
        """

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutingMode:
        """Build the variant of ``data['mode']`` (default ``auto``) from a plain mapping; an
        unknown mode, a key that is not a field of the variant or a value of the wrong type
        raises ``ValueError`` naming the key."""
        data = check_string_keys(data, "a routing mode")
        sub = cls.variant(data.get("mode", RoutingModeName.AUTO))
        sub.check_keys(data)
        check_field_types(sub, data)
        return sub(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping (Enums as their values) that :meth:`from_dict` turns back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Enum) else value
        return out

    def replace(self: R, **changes: Any) -> R:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _mode_of(cls: type) -> RoutingModeName | None:
    for name, sub in RoutingMode._modes.items():
        if sub is cls:
            return name
    return None


def _register_mode(name: RoutingModeName) -> Callable[[type[R]], type[R]]:
    def deco(cls: type[R]) -> type[R]:
        RoutingMode._modes[name] = cls
        return cls

    return deco


@_register_mode(RoutingModeName.TASK)
@dataclass(frozen=True)
class TaskRouting(RoutingMode):
    """Routing by task id: each task trains its own new experts (a stream with task labels).

    Args:
        reuse_old: a new task may also use the frozen experts of earlier tasks.
        adopt_newer: after each experience an old task may take a newer task's routing when
            its own validation split scores higher with it (backward transfer chosen on
            validation; :mod:`moracl.continual.transfer`).
    """

    mode: RoutingModeName = RoutingModeName.TASK
    reuse_old: bool = True
    adopt_newer: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_flag("reuse_old", self.reuse_old)
        _check_flag("adopt_newer", self.adopt_newer)

    def resolve(self, *, task_aware: bool) -> TaskRouting:
        if not task_aware:
            raise ValueError(
                "experts.routing.mode=task routes each row by its task label, but this stream's "
                "test rows carry none: set experts.routing.mode to auto, learned or gaussian"
            )
        return self


@_register_mode(RoutingModeName.LEARNED)
@dataclass(frozen=True)
class LearnedRouting(RoutingMode):
    """Learned top-k routers, with optional routing supervision and router fine-tuning.

    Args:
        k: experts per token (or per row, ``per: sample``); at most
            ``experts.per_experience`` (top-k routing starts with one experience's experts).
        per: ``token`` (each token routed on its own) or ``sample`` (a row's tokens routed
            together, by the mean of their inputs).
        supervision: without task labels, weight of a loss teaching each router to send a
            row to the experts of its experience (its class's in class-incremental streams;
            the one it was trained or stored in otherwise; 0: none).
        teacher_forcing: train each row through the experts of its experience; the routers
            learn that routing from ``supervision`` alone (needs ``supervision > 0``);
            evaluation routes by the routers.
        balance_epochs: passes of experience-balanced router fine-tuning on the replay
            buffer after each experience (0: none; needs ``experts.replay_size > 0``).
        balance_lr: learning rate of that fine-tuning.
    """

    mode: RoutingModeName = RoutingModeName.LEARNED
    k: int = 1
    per: RoutePer = RoutePer.TOKEN
    supervision: float = 0.0
    teacher_forcing: bool = False
    balance_epochs: int = 0
    balance_lr: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "per", _choice(RoutePer, "per", self.per))
        check_int("k", self.k, gt=0)
        check_int("balance_epochs", self.balance_epochs, ge=0)
        _set_number(self, "supervision", ge=0)
        _set_number(self, "balance_lr", gt=0)
        _check_flag("teacher_forcing", self.teacher_forcing)
        if self.teacher_forcing and not self.supervision:
            raise ValueError(
                "teacher_forcing routes training rows by their experience, so the routers "
                "learn only from experts.routing.supervision: set it > 0 (got 0)"
            )

    def resolve(self, *, task_aware: bool) -> LearnedRouting:
        if task_aware and self.supervision:
            raise ValueError(
                f"experts.routing.supervision={self.supervision} teaches routing without task "
                f"labels; this run has task labels: set it to 0 (or experts.routing.mode=task)"
            )
        if task_aware and self.balance_epochs:
            raise ValueError(
                f"experts.routing.balance_epochs={self.balance_epochs} teaches routing without "
                f"task labels; this run has task labels: set it to 0 (or experts.routing.mode="
                f"task)"
            )
        return self


@_register_mode(RoutingModeName.GAUSSIAN)
@dataclass(frozen=True)
class GaussianRouting(RoutingMode):
    """Gaussian task inference (a stream without task labels): linear discriminant analysis
    over the first adapted layer's input, from running per-(experience, class) statistics of
    every training row, picks a test row's experience, whose experts it runs through; training
    routes each row by its experience.

    Args:
        reuse_old: a new experience may also use the frozen experts of earlier ones.
        shrinkage: covariance shrinkage toward the identity, in ``[0, 1]``.
        adopt_newer: as :class:`TaskRouting`'s, for the experience rows.
    """

    mode: RoutingModeName = RoutingModeName.GAUSSIAN
    reuse_old: bool = True
    shrinkage: float = 0.1
    adopt_newer: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_flag("reuse_old", self.reuse_old)
        _check_flag("adopt_newer", self.adopt_newer)
        _set_number(self, "shrinkage", ge=0, le=1)

    def resolve(self, *, task_aware: bool) -> GaussianRouting:
        if task_aware:
            raise ValueError(
                "experts.routing.mode=gaussian infers the task of rows without task labels, but "
                "this stream's rows carry them: set experts.routing.mode=task, or mode=auto "
                "with without_task_labels=gaussian for a config run in either setting"
            )
        return self


@_register_mode(RoutingModeName.AUTO)
@dataclass(frozen=True)
class AutoRouting(RoutingMode):
    """By task id where rows carry task labels; otherwise as ``without_task_labels`` says
    (learned top-1 routers, or gaussian task inference).

    Args:
        reuse_old: routing by task (or by inferred task): a new experience may also use the
            frozen experts of earlier ones.
        without_task_labels: ``learned`` or ``gaussian`` (see :class:`WithoutTaskLabels`).
        shrinkage: gaussian task inference's covariance shrinkage, in ``[0, 1]``.
        adopt_newer: routing by task (or by inferred task): see :class:`TaskRouting`.
    """

    mode: RoutingModeName = RoutingModeName.AUTO
    reuse_old: bool = True
    without_task_labels: WithoutTaskLabels = WithoutTaskLabels.LEARNED
    shrinkage: float = 0.1
    adopt_newer: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        key = "without_task_labels"
        object.__setattr__(self, key, _choice(WithoutTaskLabels, key, self.without_task_labels))
        _check_flag("reuse_old", self.reuse_old)
        _check_flag("adopt_newer", self.adopt_newer)
        _set_number(self, "shrinkage", ge=0, le=1)

    def resolve(self, *, task_aware: bool) -> TaskRouting | LearnedRouting | GaussianRouting:
        if task_aware:
            return TaskRouting(reuse_old=self.reuse_old, adopt_newer=self.adopt_newer)
        if self.without_task_labels is WithoutTaskLabels.GAUSSIAN:
            return GaussianRouting(
                reuse_old=self.reuse_old, shrinkage=self.shrinkage, adopt_newer=self.adopt_newer
            )
        return LearnedRouting()


#: the flat ``experts`` keys of earlier versions -> where each now lives
MOVED_KEYS = {
    "router": "experts.routing.mode (auto, task, learned or gaussian; topk is now learned)",
    "k": "experts.routing.k (with experts.routing.mode=learned)",
    "route_per": "experts.routing.per (with experts.routing.mode=learned)",
    "route_supervision": "experts.routing.supervision (with experts.routing.mode=learned)",
    "teacher_forcing": "experts.routing.teacher_forcing (with experts.routing.mode=learned)",
    "balance_router_epochs": "experts.routing.balance_epochs (with experts.routing.mode=learned)",
    "balance_router_lr": "experts.routing.balance_lr (with experts.routing.mode=learned)",
    "reuse_old": "experts.routing.reuse_old (modes auto, task and gaussian)",
    "task_inference": "experts.routing.without_task_labels (with experts.routing.mode=auto; "
    "router is now learned), or experts.routing.mode=gaussian",
    "inference_shrinkage": "experts.routing.shrinkage (modes auto and gaussian)",
}


@dataclass
class ExpertsConfig:
    """moracl's mixture: experts per experience, their rank, routing, freezing and replay."""

    per_experience: int = field(default=1, metadata={"help": "experts added per experience"})
    rank: int = field(
        default=0,
        metadata={
            "help": "rank of each expert (0: adapter.rank; alpha scales with it, and with k "
            "for learned routing with k > 1)"
        },
    )
    growth_rank: int = field(
        default=0,
        metadata={
            "help": "rank of the experts grown for each experience after the first (0: "
            "experts.rank; alpha scales alike). With adapter.kind adalora each experience's "
            "rank budget prunes its new experts from this rank to adapter.target_rank per "
            "layer on average, so new experts start small and the budget decides where their "
            "rank goes; must be >= adapter.target_rank. New experts copy the newest ones "
            "(warm start) only at equal ranks: the first grown ones start fresh when it "
            "differs from experts.rank"
        },
    )
    routing: RoutingMode = field(
        default_factory=lambda: AutoRouting(),
        metadata={"help": "how the mixtures route: a mode (auto, task, learned, gaussian)"},
    )
    freeze_heads: bool = field(default=True, metadata={"help": "freeze finished tasks' heads"})
    replay_size: int = field(default=0, metadata={"help": "replay buffer for moracl too (0: none)"})
    balance_head_epochs: int = field(
        default=0,
        metadata={
            "help": "shared head: passes of class-balanced fine-tuning on the replay buffer "
            "after each experience (0: none; needs replay_size > 0)"
        },
    )
    balance_head_lr: float = field(
        default=1e-3, metadata={"help": "learning rate of the balanced head fine-tuning"}
    )

    def __post_init__(self) -> None:
        for name in ("per_experience", "rank", "growth_rank", "replay_size", "balance_head_epochs"):
            check_int(f"experts.{name}", getattr(self, name))
        check_number("experts.balance_head_lr", self.balance_head_lr)
        if self.per_experience <= 0:
            raise ValueError(f"experts.per_experience must be > 0, got {self.per_experience!r}")
        if self.replay_size < 0:
            raise ValueError(f"experts.replay_size must be >= 0, got {self.replay_size!r}")
        if self.balance_head_epochs < 0 or not self.balance_head_lr > 0:
            raise ValueError(
                f"experts.balance_head_epochs must be >= 0 and experts.balance_head_lr > 0, "
                f"got {self.balance_head_epochs!r} and {self.balance_head_lr!r}"
            )
        if self.balance_head_epochs and not self.replay_size:
            raise ValueError(
                f"experts.balance_head_epochs={self.balance_head_epochs} fine-tunes the head on "
                f"the replay buffer: set experts.replay_size > 0 (got 0)"
            )
        if self.rank < 0:
            raise ValueError(f"experts.rank must be >= 0 (0: adapter.rank), got {self.rank!r}")
        if self.growth_rank < 0:
            raise ValueError(
                f"experts.growth_rank must be >= 0 (0: experts.rank), got {self.growth_rank!r}"
            )
        _check_flag("experts.freeze_heads", self.freeze_heads)
        if isinstance(self.routing, Mapping):
            self.routing = RoutingMode.from_dict(self.routing)
        if not isinstance(self.routing, RoutingMode):
            raise ValueError(
                f"experts.routing must be a routing mode (a mapping with a mode among "
                f"{[m.value for m in RoutingModeName]}), got {self.routing!r}"
            )
        r = self.routing
        if isinstance(r, LearnedRouting):
            if r.balance_epochs and not self.replay_size:
                raise ValueError(
                    f"experts.routing.balance_epochs={r.balance_epochs} fine-tunes the routers "
                    f"on the replay buffer: set experts.replay_size > 0 (got 0)"
                )
            if r.k > self.per_experience:
                raise ValueError(
                    f"experts.routing.k={r.k} exceeds experts.per_experience="
                    f"{self.per_experience}: top-k routing starts with the {self.per_experience} "
                    f"expert(s) of the first experience; set experts.routing.k <= "
                    f"{self.per_experience} or add experts per experience"
                )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertsConfig:
        """Build from a plain mapping (the ``experts`` section); a key of earlier versions
        (``k``, ``router``, ``task_inference``, ...) raises ``ValueError`` naming where it
        moved (:data:`MOVED_KEYS`), other unknown keys the valid ones."""
        data = check_string_keys(data, "experts")
        moved = [k for k in MOVED_KEYS if k in data]
        if moved:
            where = "; ".join(f"{k} -> {MOVED_KEYS[k]}" for k in moved)
            raise ValueError(f"key(s) {moved} moved under experts.routing, a routing mode: {where}")
        try:
            return parse_fields.from_dict(cls, data, where="experts")
        except ValueError as e:  # the caller names the section: keep the rest of the path
            message = str(e)
            for prefix in ("experts: ", "experts."):
                message = message.removeprefix(prefix)
            raise ValueError(message) from None


@dataclass
class BaselinesConfig:
    """Hyper-parameters of the classic strategies."""

    ewc_lambda: float = field(default=100.0, metadata={"help": "EWC penalty weight"})
    lwf_alpha: float = field(default=1.0, metadata={"help": "LwF distillation weight"})
    lwf_temperature: float = field(default=2.0, metadata={"help": "LwF temperature"})
    replay_size: int = field(default=200, metadata={"help": "Replay buffer size (examples)"})
    derpp_alpha: float = field(
        default=0.1, metadata={"help": "DER++: weight of the replayed-logits MSE (α)"}
    )
    derpp_beta: float = field(
        default=0.5, metadata={"help": "DER++: weight of the replayed-labels CE (β)"}
    )
    olora_lambda1: float = field(
        default=0.5,
        metadata={"help": "O-LoRA: weight of the orthogonality loss between task LoRAs (λ₁)"},
    )
    olora_lambda2: float = field(
        default=0.0,
        metadata={"help": "O-LoRA: weight of the L2 norm of the new task's LoRA (λ₂)"},
    )
    inflora_rank: int = field(
        default=10, metadata={"help": "InfLoRA: rank of each experience's branch (r)"}
    )
    inflora_threshold: float = field(
        default=0.95,
        metadata={"help": "InfLoRA: energy share of the inputs the stored subspace keeps (ε)"},
    )
    inflora_threshold_end: float = field(
        default=1.0,
        metadata={"help": "InfLoRA: the value ε rises toward, linearly over the stream"},
    )

    def __post_init__(self) -> None:
        check_int("baselines.replay_size", self.replay_size, gt=0)
        check_int("baselines.inflora_rank", self.inflora_rank, gt=0)
        check_number("baselines.inflora_threshold", self.inflora_threshold, gt=0, le=1)
        check_number(
            "baselines.inflora_threshold_end",
            self.inflora_threshold_end,
            ge=self.inflora_threshold,
            le=1,
        )
        check_number("baselines.ewc_lambda", self.ewc_lambda, ge=0)
        check_number("baselines.lwf_alpha", self.lwf_alpha, ge=0)
        check_number("baselines.derpp_alpha", self.derpp_alpha, ge=0)
        check_number("baselines.derpp_beta", self.derpp_beta, ge=0)
        # LwF divides the logits by the temperature: 0 trains through NaN
        check_number("baselines.lwf_temperature", self.lwf_temperature, gt=0)
        check_number("baselines.olora_lambda1", self.olora_lambda1, ge=0)
        check_number("baselines.olora_lambda2", self.olora_lambda2, ge=0)


@dataclass
class ContinualTrainConfig:
    """How each strategy trains on each experience."""

    epochs: int = field(default=2, metadata={"help": "passes over each experience"})
    batch_size: int = field(default=32, metadata={"help": "examples per step"})
    eval_batch_size: int = field(default=256, metadata={"help": "examples per eval step"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of adapters and routers"})
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the heads"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=0, metadata={"help": "seeds data order, init and sampling"})
    on_nonfinite: OnNonFinite = field(
        default=OnNonFinite.STOP,
        metadata={"help": "at a non-finite loss or gradient: stop (an error) or skip the step"},
    )
    early_stopping: EarlyStoppingConfig | None = field(
        default=None,
        metadata={
            "help": "stop each experience's training when its validation metric stops "
            "improving and keep the best epoch's weights (None: train every epoch; epochs is "
            "then the maximum)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_int(f"train.{name}", getattr(self, name), gt=0)
        for name in ("lr", "head_lr"):
            check_number(f"train.{name}", getattr(self, name), gt=0)
        check_number("train.weight_decay", self.weight_decay, ge=0)
        if isinstance(self.seed, int) and self.seed < 0:
            raise ValueError(f"train.seed must be >= 0, got {self.seed!r}")
        check_int("train.seed", self.seed, ge=0, le=SEED_MAX)
        self.on_nonfinite = parse_on_nonfinite(self.on_nonfinite, "train.on_nonfinite")
        if isinstance(self.early_stopping, Mapping):
            self.early_stopping = parse_fields.from_dict(
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
class RunConfig:
    """``moracl run``: moracl and the baselines on one continual stream."""

    job: str = "run"
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    adapter: AdapterConfig = field(
        default_factory=lambda: AdapterConfig(kind="lora", rank=4, alpha=8.0)  # type: ignore[call-arg]
    )
    target_modules: list[str] = field(
        default_factory=list, metadata={"help": "layers to adapt (empty: the encoder's default)"}
    )
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    train: ContinualTrainConfig = field(default_factory=ContinualTrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = field(default="out/run", metadata={"help": "the run folder"})

    def __post_init__(self) -> None:
        if not isinstance(self.strategies, (list, tuple)) or not all(
            isinstance(s, str) for s in self.strategies
        ):
            raise ValueError(
                f"strategies must be distinct names among {list(STRATEGIES)}, "
                f"got {self.strategies!r}"
            )
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise ValueError(
                f"strategies must be distinct names among {list(STRATEGIES)}, "
                f"got {self.strategies!r}"
            )
        if "moracl" in self.strategies:
            for key in ("rank", "growth_rank"):  # each expert's config must build
                rank = getattr(self.experts, key)
                if rank:
                    try:
                        AdapterConfig.from_dict({**self.adapter.to_dict(), "rank": rank})
                    except ValueError as e:
                        raise ValueError(f"experts.{key}={rank} with the adapter: {e}") from None
        if self.train.early_stopping is not None and self.scenario.val_share == 0:
            raise ValueError(
                "train.early_stopping watches each experience's validation split, but "
                "scenario.val_share=0 holds none out: set scenario.val_share > 0 (e.g. 0.1) or "
                "train.early_stopping=null"
            )


def check_routing(config: RunConfig, *, task_aware: bool) -> None:
    """Raise ``ValueError`` where ``experts.routing`` cannot route a run with
    (``task_aware``) or without task labels (see each mode's
    :meth:`~RoutingMode.resolve`); nothing to check without ``moracl`` among the strategies.

    ``moracl validate`` checks this before a run, and the run itself where it builds
    moracl's routers (:func:`moracl.continual.factory.build_model`).
    """
    if "moracl" in config.strategies:
        config.experts.routing.resolve(task_aware=task_aware)
