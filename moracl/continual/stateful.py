"""Avalanche plugins whose state a run checkpoints: each gives its own state
(:meth:`~StatefulPlugin.state_dict`) and takes it back (:meth:`~StatefulPlugin.load_state_dict`),
so a checkpoint never reaches into a plugin's internals.

A plugin's state is a :class:`PluginState`: named tensors (written to the checkpoint's
safetensors file) and JSON-able values (written to its manifest). A plugin without state
needs none of this: the run skips plugins that are not :class:`StatefulPlugin`.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from avalanche.training.plugins import EWCPlugin, LwFPlugin
from torch import Tensor

__all__ = ["CheckpointedEWCPlugin", "CheckpointedLwFPlugin", "PluginState", "StatefulPlugin"]


@dataclass
class PluginState:
    """A plugin's checkpointed state: named ``tensors`` and JSON-able ``values``."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class StatefulPlugin(Protocol):
    """A plugin a run checkpoints, under its ``state_key`` (unique within a strategy)."""

    state_key: str

    def state_dict(self) -> PluginState:
        """The plugin's state after the experiences trained so far."""
        ...

    def load_state_dict(self, state: PluginState, *, strategy: Any, trained: Sequence[Any]) -> None:
        """Take back ``state``; ``strategy`` holds the restored model and ``trained`` the
        experiences it was trained on, in order."""
        ...


def _bad(what: str, value: object, expected: str) -> ValueError:
    return ValueError(f"{what}={value!r}; expected {expected}")


class CheckpointedEWCPlugin(EWCPlugin):  # type: ignore[misc]
    """Avalanche's EWC (``mode="separate"``) with a checkpointable state: per experience, the
    parameters saved after it and their importances (tensors ``saved.<exp>.<name>`` and
    ``importance.<exp>.<name>``).

    Reads and writes what ``EWCPlugin`` does: ``strategy.model``, ``strategy.clock``,
    ``strategy.loss`` (its penalty).
    """

    state_key = "ewc"

    def state_dict(self) -> PluginState:
        tensors: dict[str, Tensor] = {}
        for kind, store in (("saved", self.saved_params), ("importance", self.importances)):
            for exp, params in store.items():
                for name, value in params.items():
                    tensors[f"{kind}.{exp}.{name}"] = value.data.detach().clone()
        return PluginState(tensors=tensors)

    def load_state_dict(self, state: PluginState, *, strategy: Any, trained: Sequence[Any]) -> None:
        from avalanche.training.utils import ParamData

        saved: defaultdict[int, dict[str, Any]] = defaultdict(dict)
        importances: defaultdict[int, dict[str, Any]] = defaultdict(dict)
        for key, value in state.tensors.items():
            kind, exp, name = ([*key.split(".", 2), "", ""])[:3]
            if kind not in ("saved", "importance") or not exp.isdigit() or not name:
                raise _bad("EWC state tensor", key, "saved.<exp>.<name> or importance.<exp>.<name>")
            store = saved if kind == "saved" else importances
            store[int(exp)][name] = ParamData(name, init_tensor=value.clone())
        self.saved_params = saved
        self.importances = importances


class CheckpointedLwFPlugin(LwFPlugin):  # type: ignore[misc]
    """Avalanche's LwF with a checkpointable state: the experiences seen and the classes of
    each task (values ``expcount`` and ``classes``); the previous model is the restored
    strategy's model (a run checkpoints between experiences, where LwF copies it).

    Reads and writes what ``LwFPlugin`` does: ``strategy.model``, ``strategy.experience``,
    ``strategy.loss`` (its penalty).
    """

    state_key = "lwf"

    def state_dict(self) -> PluginState:
        lwf = self.lwf
        classes = {str(k): sorted(int(c) for c in v) for k, v in lwf.prev_classes_by_task.items()}
        return PluginState(values={"expcount": int(lwf.expcount), "classes": classes})

    def load_state_dict(self, state: PluginState, *, strategy: Any, trained: Sequence[Any]) -> None:
        count = state.values.get("expcount")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise _bad("lwf.expcount", count, "an integer >= 0")
        classes = state.values.get("classes")
        if not isinstance(classes, dict) or not all(
            str(k).isdigit() and isinstance(v, list) and all(isinstance(c, int) for c in v)
            for k, v in classes.items()
        ):
            raise _bad("lwf.classes", classes, "a mapping of task ids to lists of class ids")
        lwf = self.lwf
        lwf.expcount = count
        lwf.prev_classes_by_task = defaultdict(set, {int(k): set(v) for k, v in classes.items()})
        lwf.prev_model = copy.deepcopy(strategy.model) if count else None
