"""The typed configuration of ``moracl run`` (YAML ``job: run``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moracl.adapters.base import AdapterConfig
from moracl.distributed import DistributedConfig

__all__ = [
    "STRATEGIES",
    "BaselinesConfig",
    "ContinualTrainConfig",
    "ExpertsConfig",
    "RunConfig",
    "ScenarioConfig",
]

#: strategy names a run may list, in the order runs report them
STRATEGIES = ("moracl", "naive", "ewc", "lwf", "replay", "joint")


@dataclass
class ScenarioConfig:
    """Which stream to learn (a name registered in ``scenarios.SCENARIOS``)."""

    name: str = field(default="wordnet-domains", metadata={"help": "registered scenario name"})
    setting: str | None = field(
        default=None, metadata={"help": "task, class or domain (None: the scenario's default)"}
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "builder options (sizes, class lists, ...)"}
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
        if self.replay_size <= 0:
            raise ValueError(f"baselines.replay_size must be > 0, got {self.replay_size!r}")


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

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("lr", "head_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)!r}")
        if self.seed < 0:
            raise ValueError(f"train.seed must be >= 0, got {self.seed!r}")


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
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise ValueError(
                f"strategies must be distinct names among {list(STRATEGIES)}, "
                f"got {self.strategies!r}"
            )
