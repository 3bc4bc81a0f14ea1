"""A base for optimisers that wrap another one and share its parameter groups.

This is timm's ``Lookahead`` pattern: the wrapper's ``param_groups`` *is* the base
optimiser's list (same dicts), so a learning-rate scheduler or ``GradScaler`` pointed at either
object sees and changes the same values, and the wrapper's own per-group options (``sam_rho``,
``lars``, ...) are stored in those dicts and saved with them.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

__all__ = ["OptimizerWrapper"]


class OptimizerWrapper(Optimizer):
    """An optimiser that delegates to ``base_optimizer`` and shares its groups and state.

    Subclasses pass their own per-group ``defaults``; they are added to every existing group
    (unless the group sets them) and to groups added later through :meth:`add_param_group`.
    ``state_dict`` / ``load_state_dict`` are the base optimiser's: wrappers keep no state that
    must survive a checkpoint.
    """

    def __init__(self, base_optimizer: Optimizer, defaults: dict[str, Any]) -> None:
        if not isinstance(base_optimizer, Optimizer):
            name = type(base_optimizer).__name__
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {name}")
        self.base_optimizer = base_optimizer
        self._own_defaults = dict(defaults)
        self._initialised = False
        # Optimizer.__init__ calls add_param_group for every group; while not initialised that
        # only fills in our defaults (the groups already live in the base optimiser).
        super().__init__(base_optimizer.param_groups, dict(defaults))
        self._initialised = True
        self._share()

    def _share(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, **self._own_defaults}

    def check_group(self, group: dict[str, Any]) -> None:
        """Validate this wrapper's options in ``group``; subclasses raise ``ValueError``."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimiser, then fill in this wrapper's defaults."""
        if self._initialised:
            self.base_optimizer.add_param_group(param_group)
        for key, value in self._own_defaults.items():
            param_group.setdefault(key, value)
        self.check_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's ``state_dict`` (groups include this wrapper's options)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimiser and share its (new) group list again."""
        self.base_optimizer.load_state_dict(state_dict)
        self._share()

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer keeps only defaults, state and groups; a wrapper needs its base
        return self.__dict__.copy()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._own_defaults.items())
        inner = "\n".join("    " + line for line in repr(self.base_optimizer).splitlines())
        return f"{type(self).__name__}({opts},\n{inner}\n)"
