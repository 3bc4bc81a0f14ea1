"""The typed configuration of ``moracl run`` (YAML ``job: run``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moracl.adapters.base import AdapterConfig
from moracl.distributed import DistributedConfig
from moracl.guard import OnNonFinite, check_int, check_number, parse_on_nonfinite

__all__ = [
    "SEED_MAX",
    "SETTINGS",
    "STRATEGIES",
    "BaselinesConfig",
    "ContinualTrainConfig",
    "ExpertsConfig",
    "RunConfig",
    "ScenarioConfig",
    "check_routing",
    "router_kind",
]

#: strategy names a run may list, in the order runs report them
STRATEGIES = ("moracl", "naive", "ewc", "lwf", "replay", "joint")
#: the continual settings a scenario may have (``moracl_scenarios.streams.Setting``'s values)
SETTINGS = ("task", "class", "domain")
#: the largest seed a config takes (seeds go to torch, numpy and Python generators alike)
SEED_MAX = 2**32 - 1


@dataclass
class ScenarioConfig:
    """Which stream to learn (a name registered in ``moracl_scenarios.SCENARIOS``)."""

    name: str = field(default="wordnet-domains", metadata={"help": "registered scenario name"})
    setting: str | None = field(
        default=None, metadata={"help": "task, class or domain (None: the scenario's default)"}
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "builder options (sizes, class lists, ...)"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"scenario.name must be a scenario name, got {self.name!r}")
        if self.setting is not None and self.setting not in SETTINGS:
            raise ValueError(
                f"scenario.setting must be one of {list(SETTINGS)} or null (the scenario's "
                f"default), got {self.setting!r}"
            )
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise ValueError(
                f"scenario.options must map option names to values, got {self.options!r}"
            )


@dataclass
class ExpertsConfig:
    """moracl's mixture: experts per experience, routing, freezing."""

    per_experience: int = field(default=1, metadata={"help": "experts added per experience"})
    router: str = field(
        default="auto", metadata={"help": "auto (task ids -> task, else topk), task or topk"}
    )
    k: int = field(default=1, metadata={"help": "experts per token for topk routing"})
    route_per: str = field(
        default="token",
        metadata={
            "help": "topk routing: token (each token routed on its own) or sample (a row's "
            "tokens routed together, by the mean of their inputs)"
        },
    )
    rank: int = field(
        default=0,
        metadata={
            "help": "rank of each expert (0: adapter.rank; alpha scales with it, and with k "
            "for top-k routing with k > 1)"
        },
    )
    reuse_old: bool = field(
        default=True, metadata={"help": "task routing: new tasks may use frozen old experts"}
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
    balance_router_epochs: int = field(
        default=0,
        metadata={
            "help": "task-agnostic routing: passes of experience-balanced router fine-tuning "
            "on the replay buffer after each experience (0: none; needs replay_size > 0)"
        },
    )
    balance_router_lr: float = field(
        default=1e-2, metadata={"help": "learning rate of the balanced router fine-tuning"}
    )
    teacher_forcing: bool = field(
        default=False,
        metadata={
            "help": "without task labels: train each row through the experts of its "
            "experience; the routers learn that routing from route_supervision alone "
            "(needs route_supervision > 0); evaluation routes by the routers"
        },
    )
    route_supervision: float = field(
        default=0.0,
        metadata={
            "help": "without task labels: weight of a loss teaching each router to send a "
            "row to the experts of its experience (its class's in class-incremental streams; "
            "the one it was trained or stored in otherwise; 0: none)"
        },
    )
    task_inference: str = field(
        default="router",
        metadata={
            "help": "without task labels (class- and domain-incremental streams), how a test "
            "row's experts are chosen: router (learned routers) or gaussian (the experts of "
            "the experience inferred by linear discriminant analysis over what the first "
            "adapted layer reads, from running class statistics of every training row; "
            "training routes each row by its experience); unused where rows carry task labels"
        },
    )
    inference_shrinkage: float = field(
        default=0.1,
        metadata={"help": "gaussian task inference: covariance shrinkage toward the identity"},
    )

    def learned_routing(self) -> list[str]:
        """The keys set here that configure learned routers (none at their defaults)."""
        learned = {
            "router": self.router != "auto",
            "route_per": self.route_per != "token",
            "route_supervision": self.route_supervision > 0,
            "teacher_forcing": self.teacher_forcing,
            "balance_router_epochs": self.balance_router_epochs > 0,
        }
        return [k for k, v in learned.items() if v]

    def __post_init__(self) -> None:
        # types and finiteness first; the ranges below keep their own messages
        ints = ("per_experience", "k", "rank", "replay_size")
        for name in (*ints, "balance_head_epochs", "balance_router_epochs"):
            check_int(f"experts.{name}", getattr(self, name))
        for name in ("balance_head_lr", "balance_router_lr", "inference_shrinkage"):
            check_number(f"experts.{name}", getattr(self, name))
        if self.per_experience <= 0 or self.k <= 0:
            raise ValueError(
                f"experts.per_experience and experts.k must be > 0, got "
                f"{self.per_experience!r} and {self.k!r}"
            )
        if self.router not in ("auto", "task", "topk"):
            raise ValueError(
                f"experts.router must be one of ['auto', 'task', 'topk'], got {self.router!r}"
            )
        if self.route_per not in ("token", "sample"):
            raise ValueError(
                f"experts.route_per must be one of ['token', 'sample'], got {self.route_per!r}"
            )
        if self.replay_size < 0:
            raise ValueError(f"experts.replay_size must be >= 0, got {self.replay_size!r}")
        if self.balance_head_epochs < 0 or not self.balance_head_lr > 0:
            raise ValueError(
                f"experts.balance_head_epochs must be >= 0 and experts.balance_head_lr > 0, "
                f"got {self.balance_head_epochs!r} and {self.balance_head_lr!r}"
            )
        if self.balance_router_epochs < 0 or not self.balance_router_lr > 0:
            raise ValueError(
                f"experts.balance_router_epochs must be >= 0 and experts.balance_router_lr > 0, "
                f"got {self.balance_router_epochs!r} and {self.balance_router_lr!r}"
            )
        if self.balance_router_epochs and not self.replay_size:
            raise ValueError(
                f"experts.balance_router_epochs={self.balance_router_epochs} fine-tunes the "
                f"routers on the replay buffer: set experts.replay_size > 0 (got 0)"
            )
        if self.balance_head_epochs and not self.replay_size:
            raise ValueError(
                f"experts.balance_head_epochs={self.balance_head_epochs} fine-tunes the head on "
                f"the replay buffer: set experts.replay_size > 0 (got 0)"
            )
        if self.rank < 0:
            raise ValueError(f"experts.rank must be >= 0 (0: adapter.rank), got {self.rank!r}")
        if not self.route_supervision >= 0 or self.route_supervision == float("inf"):
            raise ValueError(
                f"experts.route_supervision must be a finite number >= 0, "
                f"got {self.route_supervision!r}"
            )
        if self.task_inference not in ("router", "gaussian"):
            raise ValueError(
                f"experts.task_inference must be one of ['router', 'gaussian'], got "
                f"{self.task_inference!r}"
            )
        if not 0 <= self.inference_shrinkage <= 1:
            raise ValueError(
                f"experts.inference_shrinkage must be in [0, 1], got {self.inference_shrinkage!r}"
            )
        for name in ("reuse_old", "freeze_heads", "teacher_forcing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"experts.{name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.teacher_forcing and not self.route_supervision:
            raise ValueError(
                "experts.teacher_forcing routes training rows by their class's experience, so "
                "the routers learn only from experts.route_supervision: set it > 0 (got 0)"
            )


@dataclass
class BaselinesConfig:
    """Hyper-parameters of the classic strategies."""

    ewc_lambda: float = field(default=100.0, metadata={"help": "EWC penalty weight"})
    lwf_alpha: float = field(default=1.0, metadata={"help": "LwF distillation weight"})
    lwf_temperature: float = field(default=2.0, metadata={"help": "LwF temperature"})
    replay_size: int = field(default=200, metadata={"help": "Replay buffer size (examples)"})

    def __post_init__(self) -> None:
        check_int("baselines.replay_size", self.replay_size, gt=0)
        check_number("baselines.ewc_lambda", self.ewc_lambda, ge=0)
        check_number("baselines.lwf_alpha", self.lwf_alpha, ge=0)
        # LwF divides the logits by the temperature: 0 trains through NaN
        check_number("baselines.lwf_temperature", self.lwf_temperature, gt=0)


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
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
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


def check_routing(config: RunConfig, *, task_aware: bool) -> None:
    """Raise ``ValueError`` for an ``experts`` section that moracl's strategy cannot route in a
    run with (``task_aware``) or without task labels; nothing to check without ``moracl``
    among the strategies.

    The rules, checked by ``moracl validate`` before a run and by the run itself where it
    builds moracl's routers (:func:`moracl.continual.run.build_model`):

    - gaussian task inference (without task labels) leaves no learned router: none of the
      learned-routing keys (:meth:`ExpertsConfig.learned_routing`) may be set;
    - ``route_per`` applies to top-k routing only, not to routing by task id;
    - top-k routing picks among the experts of one experience at first: ``k`` may not
      exceed ``per_experience``;
    - with task labels the run routes by task: ``route_supervision`` and
      ``balance_router_epochs`` teach routing without task labels and are refused.
    """
    if "moracl" not in config.strategies:
        return
    e = config.experts
    if e.task_inference == "gaussian" and not task_aware:
        learned = e.learned_routing()
        if learned:
            raise ValueError(
                f"experts.task_inference='gaussian' routes test rows by the inferred experience, "
                f"with no learned router: leave experts.{', experts.'.join(learned)} at the "
                f"default or set experts.task_inference=router"
            )
    router_kind(config, task_aware=task_aware)
    if task_aware and e.route_supervision:
        raise ValueError(
            f"experts.route_supervision={e.route_supervision} teaches routing without task "
            f"labels; this run has task labels and routes by task: set it to 0"
        )
    if task_aware and e.balance_router_epochs:
        raise ValueError(
            f"experts.balance_router_epochs={e.balance_router_epochs} teaches routing without "
            f"task labels; this run has task labels and routes by task: set it to 0"
        )


def router_kind(config: RunConfig, *, task_aware: bool) -> str:
    """``"task"`` or ``"topk"``: how moracl's routers route in a run with (``task_aware``) or
    without task labels (``experts.router=auto``: by task id with task labels or gaussian
    task inference, else top-k).

    Raises:
        ValueError: ``experts.route_per`` set for routing by task id, or top-k routing with
            ``experts.k`` above ``experts.per_experience`` (top-k routing starts with the
            experts of the first experience).
    """
    e = config.experts
    kind = e.router
    if kind == "auto":
        kind = "task" if task_aware or e.task_inference == "gaussian" else "topk"
    if kind == "task" and e.route_per != "token":
        raise ValueError(
            f"experts.route_per={e.route_per!r} applies to topk routing; this run routes by "
            f"task id (experts.router={e.router!r} with {'task' if task_aware else 'no task'} "
            f"labels)"
        )
    if kind == "topk" and e.k > e.per_experience:
        raise ValueError(
            f"experts.k={e.k} exceeds experts.per_experience={e.per_experience}: top-k routing "
            f"starts with the {e.per_experience} expert(s) of the first experience; set "
            f"experts.k <= {e.per_experience} or add experts per experience"
        )
    return kind
