"""The library's meta-learning settings: the MAML variant (:class:`MetaAlgorithm`), the
meta-training loop (:class:`MetaLearnConfig`), the outer optimiser (:class:`MetaOptimConfig`)
and the meta-test (:class:`MetaTestConfig`). Each checks its values when built, naming the key
as a config file spells it (``meta.inner_lr``, ``optim.lr``, ``test.episodes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from moracl.continual.config import SEED_MAX
from moracl.guard import OnNonFinite, check_int, check_number, parse_on_nonfinite
from moracl.optim.optimizer import BASE_OPTIMIZERS

__all__ = ["MetaAlgorithm", "MetaLearnConfig", "MetaOptimConfig", "MetaTestConfig"]


class MetaAlgorithm(str, Enum):
    """The MAML variant of ``moracl meta`` (see :mod:`moracl.meta.maml`)."""

    MAML = "maml"  # second order
    FOMAML = "fomaml"  # first order
    METASGD = "metasgd"  # learned per-entry inner step sizes
    ANIL = "anil"  # only the head adapts in the inner loop


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
    on_nonfinite: OnNonFinite = field(
        default=OnNonFinite.STOP,
        metadata={
            "help": "at a non-finite meta-loss or gradient: stop (an error) or skip the step"
        },
    )

    def __post_init__(self) -> None:
        try:
            self.algorithm = MetaAlgorithm(self.algorithm)
        except ValueError:
            raise ValueError(
                f"meta.algorithm must be one of {[m.value for m in MetaAlgorithm]}, "
                f"got {self.algorithm!r}"
            ) from None
        check_number("meta.inner_lr", self.inner_lr, gt=0)
        for name in ("inner_steps", "test_inner_steps", "steps", "val_every"):
            check_int(f"meta.{name}", getattr(self, name), ge=0)
        check_int("meta.meta_batch", self.meta_batch, ge=1)
        check_int("meta.val_episodes", self.val_episodes, ge=2)
        if self.chunk_size is not None:
            check_int("meta.chunk_size (or null)", self.chunk_size, ge=1)
        if not isinstance(self.zero_head, bool):
            raise ValueError(f"meta.zero_head must be true or false, got {self.zero_head!r}")
        self.on_nonfinite = parse_on_nonfinite(self.on_nonfinite, "meta.on_nonfinite")


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
        if not isinstance(self.base, str) or self.base not in BASE_OPTIMIZERS:
            raise ValueError(
                f"optim.base must be one of {BASE_OPTIMIZERS.names()}, got {self.base!r}"
            )
        check_number("optim.lr", self.lr, gt=0)
        check_number("optim.weight_decay", self.weight_decay, ge=0)
        check_number("optim.loraplus_ratio", self.loraplus_ratio, gt=0)
        check_number("optim.sam_rho", self.sam_rho, ge=0)
        if not isinstance(self.lars, bool):
            raise ValueError(f"optim.lars must be true or false, got {self.lars!r}")


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
        check_int("test.episodes", self.episodes, ge=2)
        check_int("test.batch", self.batch, ge=1)
        check_int("test.finetune_steps", self.finetune_steps, ge=0)
        check_number("test.finetune_lr", self.finetune_lr, gt=0)
        check_int("test.seed", self.seed, ge=0, le=SEED_MAX)
