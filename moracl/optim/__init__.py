"""Optimisers and schedules for adapter training: LARS, SAM / ASAM, LAMB, LoRA+ groups.

``MoRAOptimizer`` builds named parameter groups from a model and chains a registered base
(``adamw``, ``sgd``, ``lamb``) with optional LARS and SAM; ``MoRAScheduler`` drives every group's
learning rate and SAM's ρ with explicit step counts.
"""

from moracl.optim.groups import GROUP_KINDS, build_param_groups, default_no_decay
from moracl.optim.lamb import Lamb
from moracl.optim.lars import Lars, LarsWrapper, trust_ratio
from moracl.optim.optimizer import (
    BASE_OPTIMIZERS,
    LarsConfig,
    MoRAOptimizer,
    register_base_optimizer,
)
from moracl.optim.sam import SAM, SAMConfig, disable_running_stats
from moracl.optim.scheduler import MoRAScheduler, RhoSchedule, Schedule
from moracl.optim.wrapper import OptimizerWrapper

__all__ = [
    "BASE_OPTIMIZERS",
    "GROUP_KINDS",
    "SAM",
    "Lamb",
    "Lars",
    "LarsConfig",
    "LarsWrapper",
    "MoRAOptimizer",
    "MoRAScheduler",
    "OptimizerWrapper",
    "RhoSchedule",
    "SAMConfig",
    "Schedule",
    "build_param_groups",
    "default_no_decay",
    "disable_running_stats",
    "register_base_optimizer",
    "trust_ratio",
]
