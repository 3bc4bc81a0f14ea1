"""Avalanche plugins whose state a run checkpoints: each gives its own state
(:meth:`~StatefulPlugin.state_dict`) and takes it back (:meth:`~StatefulPlugin.load_state_dict`),
so a checkpoint never reaches into a plugin's internals.

A plugin's state is a :class:`PluginState`: named tensors (written to the checkpoint's
safetensors file) and JSON-able values (written to its manifest). A plugin without state
needs none of this: the run skips plugins that are not :class:`StatefulPlugin`.

EWC and LwF keep state for the parameters that train only: Avalanche's EWC saves every
parameter and an importance for each (the frozen backbone's are zeros), and its LwF keeps a
deep copy of the whole model; here the frozen backbone is neither copied nor checkpointed,
and the penalties are the same numbers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from avalanche.models.utils import is_multi_task_module
from avalanche.training.plugins import EWCPlugin, LwFPlugin
from avalanche.training.regularization import LearningWithoutForgetting
from avalanche.training.utils import ParamData
from torch import Tensor, nn

__all__ = [
    "CheckpointedEWCPlugin",
    "CheckpointedLwFPlugin",
    "PluginState",
    "PreviousModel",
    "StatefulPlugin",
    "TrainableLwF",
]


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


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class CheckpointedEWCPlugin(EWCPlugin):  # type: ignore[misc]
    """Avalanche's EWC (``mode="separate"``) over the parameters that train, with a
    checkpointable state: per experience, the parameters saved after it and their importances
    (tensors ``saved.<exp>.<name>`` and ``importance.<exp>.<name>``).

    Avalanche's ``EWCPlugin`` saves every parameter and its importance; a frozen parameter gets
    no gradient, so its importance is zero and its penalty term too. Here only the parameters
    with ``requires_grad`` when an experience ends are saved: the penalty is the same number
    (its loop skips names it has no saved value for), without a copy of the frozen backbone.

    Reads and writes what ``EWCPlugin`` does: ``strategy.model``, ``strategy.clock``,
    ``strategy.loss`` (its penalty).
    """

    state_key = "ewc"

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """Importances and values of the trainable parameters after this experience."""
        exp_counter = strategy.clock.train_exp_counter
        importances = self.compute_importances(
            strategy.model,
            strategy._criterion,
            strategy.optimizer,
            strategy.experience.dataset,
            strategy.device,
            strategy.train_mb_size,
            num_workers=kwargs.get("num_workers", 0),
        )
        self.update_importances(importances, exp_counter)
        self.saved_params[exp_counter] = {
            n: ParamData(n, p.shape, device=p.device, init_tensor=p.data.clone())
            for n, p in _trainable(strategy.model)
        }
        if exp_counter > 0 and not self.keep_importance_data:
            del self.saved_params[exp_counter - 1]

    def compute_importances(
        self,
        model: nn.Module,
        criterion: Any,
        optimizer: Any,
        dataset: Any,
        device: Any,
        batch_size: int,
        num_workers: int = 0,
    ) -> dict[str, ParamData]:
        """Avalanche's importances (mean squared gradient over the experience's mini-batches),
        for the trainable parameters only."""
        from avalanche.models.utils import avalanche_forward

        model.eval()
        params = _trainable(model)
        importances = {n: ParamData(n, p.shape, device=p.device) for n, p in params}
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=getattr(dataset, "collate_fn", None),
            num_workers=num_workers,
        )
        for batch in loader:
            x, y, task_labels = batch[0].to(device), batch[1].to(device), batch[-1]
            optimizer.zero_grad()
            loss = criterion(avalanche_forward(model, x, task_labels), y)
            loss.backward()
            for n, p in params:
                if p.grad is not None:
                    importances[n].data += p.grad.data.clone().pow(2)
        for imp in importances.values():
            imp.data /= float(len(loader))
        model.train()
        return importances

    def state_dict(self) -> PluginState:
        tensors: dict[str, Tensor] = {}
        for kind, store in (("saved", self.saved_params), ("importance", self.importances)):
            for exp, params in store.items():
                for name, value in params.items():
                    tensors[f"{kind}.{exp}.{name}"] = value.data.detach().clone()
        return PluginState(tensors=tensors)

    def load_state_dict(self, state: PluginState, *, strategy: Any, trained: Sequence[Any]) -> None:
        """Take back the saved values and importances, on the device of the parameters they
        belong to. A checkpoint of Avalanche's full state (every parameter) loads too: the
        entries of parameters that are frozen and have zero importance are dropped (their
        penalty term is zero)."""
        saved: defaultdict[int, dict[str, Any]] = defaultdict(dict)
        importances: defaultdict[int, dict[str, Any]] = defaultdict(dict)
        for key, value in state.tensors.items():
            kind, exp, name = ([*key.split(".", 2), "", ""])[:3]
            if kind not in ("saved", "importance") or not exp.isdigit() or not name:
                raise _bad("EWC state tensor", key, "saved.<exp>.<name> or importance.<exp>.<name>")
            store = saved if kind == "saved" else importances
            store[int(exp)][name] = value
        params = dict(strategy.model.named_parameters())
        for number in sorted(set(saved) | set(importances)):
            for name in list(saved[number]):
                p, imp = params.get(name), importances[number].get(name)
                if p is not None and not p.requires_grad and imp is not None and not imp.any():
                    del saved[number][name], importances[number][name]
        device = getattr(strategy, "device", None)
        for store in (saved, importances):
            for entries in store.values():
                for name, value in entries.items():
                    p = params.get(name)
                    where = p.device if p is not None else (device or value.device)
                    entries[name] = ParamData(
                        name, init_tensor=value.clone().to(where), device=where
                    )
        self.saved_params = saved
        self.importances = importances


class PreviousModel:
    """A model as it was when this object was made, without a copy of its frozen parameters:
    the values of its trainable parameters and of its buffers then, which :meth:`__call__`
    swaps into the live model (``torch.func.functional_call``); its frozen parameters are
    shared (the same tensors).

    Args:
        model: the model (kept by reference).

    Raises (from :meth:`__call__`):
        ValueError: the model's parameters are not the ones it had (added or removed), or a
            parameter frozen then has been changed since (its value then is not kept).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        named = dict(model.named_parameters())
        self.names = list(named)
        self.state: dict[str, Tensor] = {
            n: p.detach().clone() for n, p in named.items() if p.requires_grad
        }
        self.state.update({n: b.detach().clone() for n, b in model.named_buffers()})
        self.frozen = {n: (p, p._version) for n, p in named.items() if not p.requires_grad}
        self.training = model.training

    def check(self) -> None:
        """Raise ``ValueError`` unless the live model can stand for the one saved."""
        names = [n for n, _ in self.model.named_parameters()]
        if names != self.names:
            changed = sorted(set(names) ^ set(self.names))
            raise ValueError(
                f"the model's parameters changed since its previous state was kept (added or "
                f"removed: {changed[:5]}); LwF's previous model keeps the model's structure"
            )
        moved = [n for n, (p, version) in self.frozen.items() if p._version != version]
        if moved:
            raise ValueError(
                f"parameters frozen when LwF kept the previous model were changed since: "
                f"{moved[:5]}; their previous values are not kept (freeze parameters for good, "
                f"or unfreeze them before an experience ends)"
            )

    def __call__(self, x: Tensor, task_labels: Any = None) -> Any:
        """The previous model's output on ``x`` (no gradient), as
        ``avalanche_forward(previous_model, x, task_labels)`` gives it."""
        self.check()
        model, mode = self.model, self.model.training
        args = (x, task_labels) if is_multi_task_module(model) else (x,)
        model.train(self.training)
        try:
            with torch.no_grad():
                return torch.func.functional_call(model, self.state, args)
        finally:
            model.train(mode)


class TrainableLwF(LearningWithoutForgetting):  # type: ignore[misc]
    """Avalanche's ``LearningWithoutForgetting`` whose previous model is a
    :class:`PreviousModel` (the trainable values and buffers after the last experience, over
    the live model) instead of a deep copy of the whole model; the loss is the same."""

    prev_model: PreviousModel | None

    def _lwf_penalty(self, out: Tensor, x: Tensor, curr_model: nn.Module) -> Any:
        from avalanche.models.utils import avalanche_forward

        prev = self.prev_model
        if prev is None:
            return 0
        y_prev = prev(x, None)
        if is_multi_task_module(curr_model):  # every head, as Avalanche's LwF
            y_prev = dict(y_prev.items())
            y_curr = dict(avalanche_forward(curr_model, x, None).items())
        else:
            y_prev, y_curr = {0: y_prev}, {0: out}
        dist_loss: Any = 0
        for task_id in y_prev:
            if task_id in self.prev_classes_by_task:
                au = self.prev_classes_by_task[task_id]
                dist_loss += self._distillation_loss(y_curr[task_id], y_prev[task_id], au)
        return dist_loss

    def post_adapt(self, agent: Any, exp: Any) -> None:
        """Keep the model after ``exp`` and add its classes to the previous ones."""
        self.expcount += 1
        self.prev_model = PreviousModel(agent.model)
        for task_id in exp.dataset.targets_task_labels.uniques:
            classes = set(exp.dataset.task_set[task_id].targets.uniques)
            self.prev_classes_by_task[task_id] = self.prev_classes_by_task[task_id] | classes


class CheckpointedLwFPlugin(LwFPlugin):  # type: ignore[misc]
    """Avalanche's LwF over the parameters that train (:class:`TrainableLwF`: no copy of the
    frozen backbone), with a checkpointable state: the experiences seen and the classes of
    each task (values ``expcount`` and ``classes``); the previous model is the restored
    strategy's model (a run checkpoints between experiences, where LwF keeps it).

    Reads and writes what ``LwFPlugin`` does: ``strategy.model``, ``strategy.experience``,
    ``strategy.loss`` (its penalty).
    """

    state_key = "lwf"

    def __init__(self, alpha: float = 1, temperature: float = 2) -> None:
        super().__init__(alpha=alpha, temperature=temperature)
        self.lwf = TrainableLwF(alpha, temperature)

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
        lwf.prev_model = PreviousModel(strategy.model) if count else None
