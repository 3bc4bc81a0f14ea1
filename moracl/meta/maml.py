"""The MAML family over the trainable (adapter and head) parameters of a frozen model.

Everything is functional: the model is run with :func:`torch.func.functional_call` over a
dict ``name -> tensor`` of its trainable parameters (names as in ``model.named_parameters()``);
the frozen backbone is shared by every task and never copied, and no module's parameters are
ever written to.

- :class:`MAML`: second-order MAML (Finn et al. 2017), or first-order with ``first_order=True``.
- :class:`MetaSGD`: MAML with a learned inner learning rate per parameter entry (Li et al.
  2017); the rates are parameters of the ``MetaSGD`` module, so the outer optimiser trains them.
- :class:`ANIL`: only the head (``ParamRole.HEAD``, i.e. ``modules_to_save``) adapts in the
  inner loop (Raghu et al. 2020); the rest is fixed during adaptation but meta-trained.

Two ways to run it::

    learner = maml.clone()            # learn2learn style, one task at a time
    learner.adapt(loss_fn(learner(xs), ys))
    query_loss = loss_fn(learner(xq), yq)

    meta_loss = maml.meta_loss((xs, ys, xq, yq), inner_steps=5)   # vmapped over tasks
    meta_loss = maml.meta_loss(taskset.sample(), inner_steps=5, shots=1)  # a learn2learn task

The learner takes whatever the model takes (``learner(input_ids, attention_mask=mask)`` for
a Hugging Face model). learn2learn's own ``l2l.algorithms.MAML`` works on a ``MoRAModel``
too, second order included (with ``allow_nograd=True``, since the backbone is frozen): the
fused adapter nodes step aside for its cloned, computed weights
(:func:`moracl.adapters.fused.fused_enabled`).

Shapes: ``t`` tasks, ``n_s`` / ``n_q`` support / query examples, ``...`` an example's features.

Full-weight linear layers. Where a plain ``nn.Linear`` weight adapts in the inner loop,
:meth:`MAML.meta_loss` by default keeps its per-task update in factored form (``ΔW = Dᵀ H``
with one row per support example and inner step) instead of a per-task copy of the weight;
the shared weight then serves every task in one matmul. Same values and meta-gradients, less
memory traffic: see :mod:`moracl.meta.lowrank` and ``linear_update``.

The fused adapter path. Adapted layers train a single LoRA or MoRA adapter through fused
``autograd.Function`` nodes (``moracl.adapters.fused``) whose backward is not differentiable
and which ``torch.func`` cannot transform. MAML runs the model inside
:func:`moracl.adapters.fused.plain_autograd` (plain, fully differentiable autograd), in
training mode with every ``nn.Dropout`` and batch-norm layer in eval mode (see ``batchnorm``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from moracl.adapters.base import ParamRole, iter_param_roles
from moracl.adapters.fused import plain_autograd
from moracl.layer import MoRALayer
from moracl.meta.lowrank import FactoredLinears, LinearUpdate, linear_candidates
from moracl.meta.taskdata import split_task

__all__ = [
    "ANIL",
    "MAML",
    "BatchNormPolicy",
    "Learner",
    "LinearUpdate",
    "LossFn",
    "MetaSGD",
    "TaskBatch",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(outputs, targets) -> scalar``, e.g. :func:`torch.nn.functional.cross_entropy`."""

TaskBatch = Sequence[Tensor]
"""``(xs (t, n_s, ...), ys (t, n_s), xq (t, n_q, ...), yq (t, n_q))``."""

BatchNormPolicy = str
"""How batch-norm layers run during meta-learning; only ``"eval"`` is supported."""

_BATCHNORM_POLICIES = ("eval",)
_BN = (nn.modules.batchnorm._BatchNorm,)


class MAML(nn.Module):
    """MAML over the trainable parameters of ``model`` (adapters and ``modules_to_save``).

    Args:
        model: usually a :class:`moracl.MoRAModel`; the parameters with ``requires_grad``
            are meta-learned, the others form the shared frozen backbone.
        inner_lr: the inner-loop SGD step size (``> 0``); :class:`MetaSGD` uses it as the
            initial value of its learned rates.
        first_order: drop the second-order terms (the inner gradients are detached).
        linear_update: how :meth:`meta_loss` updates adapted ``nn.Linear`` weights in the
            inner loop (:class:`moracl.meta.lowrank.LinearUpdate`): ``"auto"`` keeps the
            per-task update ``−lr·Σ δᵀh`` in factored form where that is cheaper than a
            per-task weight copy. The result is the same; only speed and memory differ.
        batchnorm: ``"eval"``: batch-norm layers use their running statistics and never
            update them (the frozen backbone's BN stays frozen). Nothing else is supported.

    ``maml.parameters()`` includes the model's, so one outer optimiser over
    ``[p for p in maml.parameters() if p.requires_grad]`` trains everything meta-learned.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        first_order: bool = False,
        *,
        batchnorm: BatchNormPolicy = "eval",
        linear_update: LinearUpdate | str = LinearUpdate.AUTO,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAML wraps an nn.Module, got {type(model).__name__}")
        if not float(inner_lr) > 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}")
        if batchnorm not in _BATCHNORM_POLICIES:
            raise ValueError(
                f"batchnorm policy {batchnorm!r} is not supported; use one of "
                f"{list(_BATCHNORM_POLICIES)} (the frozen backbone runs batch norm in eval mode)"
            )
        try:
            self.linear_update = LinearUpdate(linear_update)
        except ValueError:
            raise ValueError(
                f"linear_update {linear_update!r} is not one of {[u.value for u in LinearUpdate]}"
            ) from None
        self.module = model
        self.inner_lr = float(inner_lr)
        self.first_order = bool(first_order)
        self.batchnorm = batchnorm
        self.meta_names: tuple[str, ...] = tuple(
            n for n, p in model.named_parameters() if p.requires_grad
        )
        if not self.meta_names:
            raise ValueError("the model has no trainable parameters to meta-learn")
        self.inner_names: tuple[str, ...] = self._select_inner(model)
        if not self.inner_names:
            raise ValueError(f"{type(self).__name__} found no parameters to adapt")
        self._check_not_merged()

    # -- which parameters, how fast ---------------------------------------------------------
    def _select_inner(self, model: nn.Module) -> tuple[str, ...]:
        """The names adapted in the inner loop: every meta-learned parameter."""
        return self.meta_names

    def step_sizes(self) -> dict[str, Tensor | float]:
        """Inner-loop step size per adapted parameter name (a float, or a tensor shaped like
        the parameter for :class:`MetaSGD`)."""
        return dict.fromkeys(self.inner_names, self.inner_lr)

    def meta_parameters(self) -> dict[str, Tensor]:
        """``name -> parameter`` for every meta-learned parameter of the model."""
        params = dict(self.module.named_parameters())
        return {n: params[n] for n in self.meta_names}

    # -- modes --------------------------------------------------------------------------------
    @contextmanager
    def meta_mode(self) -> Iterator[None]:
        """Training mode with dropout and batch norm in eval mode; restored on exit."""
        before = [(m, m.training) for m in self.module.modules()]
        try:
            self.module.train(True)
            for m in self.module.modules():
                if isinstance(m, (nn.Dropout, *_BN)):
                    m.eval()
            with plain_autograd():
                yield
        finally:
            for m, mode in before:
                m.training = mode

    def _check_not_merged(self) -> None:
        for path, layer in self.module.named_modules():
            if isinstance(layer, MoRALayer) and layer.merged:
                raise ValueError(f"layer {path!r} is merged; unmerge() it before MAML")

    # -- the functional model ---------------------------------------------------------------
    def functional_forward(self, params: dict[str, Tensor], *args: Any, **kwargs: Any) -> Any:
        """The model on ``*args, **kwargs`` (``x``, or ``input_ids, attention_mask=...``) with
        ``params`` in place of its trainable parameters, in :meth:`meta_mode`."""
        with self.meta_mode():
            return functional_call(self.module, params, args, kwargs)

    def inner_step(
        self,
        params: dict[str, Tensor],
        grads: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """One SGD step on the adapted names: ``p - lr · g`` (a new dict; ``params`` kept)."""
        lrs = self.step_sizes()
        new = dict(params)
        for n, g in grads.items():
            new[n] = params[n] - lrs[n] * g
        return new

    def factored_linears(
        self, params: dict[str, Tensor], xs: Tensor, inner_steps: int
    ) -> FactoredLinears:
        """The adapted ``nn.Linear`` layers whose inner updates :meth:`meta_loss` keeps in
        factored form, with the rows ``r`` of their input on one task's support set
        ``xs (t, n_s, ...)`` (found by one untimed forward of the first task, which leaves the
        random number generators as they were)."""
        if self.linear_update is LinearUpdate.AUTO and xs.device.type == "cuda":
            # a GPU copies weights at memory bandwidth: on an H100 the dense update measured
            # 35.9 ms against 48.5 ms factored (784-input MLP, moracl/bench/RESULTS.md)
            return FactoredLinears({}, {})
        found = linear_candidates(
            self.module,
            self.inner_names,
            self.step_sizes(),
            self.linear_update,
            max_rank=inner_steps * xs.shape[1] if xs.shape[0] else 0,
        )
        if not found:
            return FactoredLinears({}, {})
        probe = FactoredLinears(found, {})
        devices = [xs.device] if xs.device.type == "cuda" else []
        with probe.hooked(), torch.random.fork_rng(devices=devices):
            rows = probe.input_rows(lambda x: self.functional_forward(params, x), xs[0])
        keep = {
            n: m
            for n, m in found.items()
            if n in rows
            and (
                self.linear_update is LinearUpdate.FACTORED
                or inner_steps * rows[n] * (m.in_features + m.out_features)
                < m.in_features * m.out_features
            )
        }
        return FactoredLinears(keep, {n: rows[n] for n in keep})

    # -- learn2learn-style API --------------------------------------------------------------
    def clone(self) -> Learner:
        """A light learner starting at the current meta-parameters (in the autograd graph)."""
        return Learner(self, self.meta_parameters())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model on ``*args, **kwargs`` with its current (meta-)parameters, in meta
        mode."""
        with self.meta_mode():
            return self.module(*args, **kwargs)

    # -- batched over tasks ---------------------------------------------------------------
    def meta_loss(
        self,
        task_batch: TaskBatch,
        inner_steps: int = 1,
        loss_fn: LossFn = F.cross_entropy,
        *,
        chunk_size: int | None = None,
        shots: int | None = None,
    ) -> Tensor:
        """The mean query loss over tasks after ``inner_steps`` adaptation steps per task.

        Args:
            task_batch: ``(xs (t, n_s, ...), ys (t, n_s), xq (t, n_q, ...), yq (t, n_q))``; or
                one learn2learn task ``[x (n, ...), y (n,)]`` (``taskset.sample()``, a list or
                a tuple), split with ``shots`` as ``partition_task`` splits it
                (:func:`~moracl.meta.taskdata.split_task`).
            inner_steps: SGD steps on each task's support set (``>= 0``).
            loss_fn: ``loss_fn(outputs, targets) -> scalar``, applied per task.
            chunk_size: tasks per vmapped chunk (``None``: all at once).
            shots: for a ``[x, y]`` task: support examples per class (the rest are queries).
        Returns: a scalar; ``backward()`` gives the meta-gradients.
        """
        if len(task_batch) == 2:
            if shots is None:
                raise ValueError(
                    "a task [x, y] (learn2learn's taskset.sample()) is split into support and "
                    "query sets by class: pass shots=K, the support examples per class (the "
                    "rest are queries, as in learn2learn.data.utils.partition_task)"
                )
            episode = split_task(task_batch[0], task_batch[1], shots=shots)
            task_batch = [t.unsqueeze(0) for t in episode]  # one task: (1, ...)
        elif shots is not None:
            raise ValueError(
                f"shots splits a task [x, y]; (xs, ys, xq, yq) is split already (got shots="
                f"{shots!r} with a sequence of {len(task_batch)})"
            )
        if len(task_batch) != 4:
            raise ValueError(
                f"task_batch must be (xs, ys, xq, yq) or a task [x, y], got a sequence of "
                f"{len(task_batch)}"
            )
        xs, ys, xq, yq = task_batch
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        tasks = {xs.shape[0], ys.shape[0], xq.shape[0], yq.shape[0]}
        if len(tasks) != 1:
            raise ValueError(
                "task_batch tensors disagree on the number of tasks: "
                f"{[xs.shape[0], ys.shape[0], xq.shape[0], yq.shape[0]]}"
            )
        params = self.meta_parameters()
        factored = self.factored_linears(params, xs, inner_steps)
        dense_names = tuple(n for n in self.inner_names if n not in factored.modules)
        first_order = self.first_order
        lrs = self.step_sizes()

        def task_loss(
            params: dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
        ) -> Tensor:
            fast = params
            factors: dict[
                str, tuple[Tensor, Tensor]
            ] = {}  # name -> (H (k·r, d_in), D (k·r, d_out))
            for _ in range(inner_steps):
                frozen, applied = fast, factors

                def support_loss(
                    inner: dict[str, Tensor],
                    probes: dict[str, Tensor],
                    frozen: dict[str, Tensor] = frozen,
                    applied: dict[str, tuple[Tensor, Tensor]] = applied,
                ) -> tuple[Tensor, dict[str, Tensor]]:
                    with factored.use(applied, probes) as inputs:
                        out = self.functional_forward({**frozen, **inner}, xs)
                    return loss_fn(out, ys), inputs

                probes = {  # zeros (r, d_out); their gradients are the δ
                    n: xs.new_zeros(factored.rows[n], m.out_features)
                    for n, m in factored.modules.items()
                }
                (g, deltas), inputs = grad(support_loss, argnums=(0, 1), has_aux=True)(
                    {n: fast[n] for n in dense_names}, probes
                )
                if first_order:
                    g = {n: v.detach() for n, v in g.items()}
                    deltas = {n: v.detach() for n, v in deltas.items()}
                    inputs = {n: v.detach() for n, v in inputs.items()}
                fast = self.inner_step(fast, g)
                # the weight gradient δᵀh, kept as factors: ΔW += (−lr·δ)ᵀ h
                factors = {
                    n: _append(factors.get(n), inputs[n], -lrs[n] * deltas[n]) for n in deltas
                }
            with factored.use(factors):
                return loss_fn(self.functional_forward(fast, xq), yq)

        # randomness="different": a noisy router draws its own noise for every task
        with factored.hooked():
            losses = vmap(
                task_loss,
                in_dims=(None, 0, 0, 0, 0),
                chunk_size=chunk_size,
                randomness="different",
            )(params, xs, ys, xq, yq)  # (t,)
        return losses.mean()

    def extra_repr(self) -> str:
        return (
            f"inner_lr={self.inner_lr}, first_order={self.first_order}, "
            f"batchnorm={self.batchnorm!r}, linear_update={self.linear_update.value!r}, "
            f"adapted={len(self.inner_names)}/{len(self.meta_names)} tensors"
        )


class MetaSGD(MAML):
    """MAML with a learned inner step size per parameter entry, initialised to ``inner_lr``.

    The rates live in :attr:`lrs` (an ``nn.ParameterDict``; parameter names with ``.``
    replaced by ``/``), so ``metasgd.parameters()`` hands them to the outer optimiser.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float,
        first_order: bool = False,
        *,
        batchnorm: BatchNormPolicy = "eval",
        linear_update: LinearUpdate | str = LinearUpdate.AUTO,
    ) -> None:
        # the learned rates are per entry, so its linear updates are never factored
        super().__init__(
            model, inner_lr, first_order, batchnorm=batchnorm, linear_update=linear_update
        )
        params = self.meta_parameters()
        self.lrs = nn.ParameterDict(
            {
                _key(n): nn.Parameter(torch.full_like(params[n], self.inner_lr))
                for n in self.inner_names
            }
        )

    def step_sizes(self) -> dict[str, Tensor | float]:
        return {n: self.lrs[_key(n)] for n in self.inner_names}


class ANIL(MAML):
    """Almost No Inner Loop: only the head (``ParamRole.HEAD`` parameters, the trained copies
    of ``modules_to_save``) adapts per task; the adapters are meta-trained in the outer loop."""

    def _select_inner(self, model: nn.Module) -> tuple[str, ...]:
        heads = {n for n, p, role in iter_param_roles(model) if role is ParamRole.HEAD}
        if not heads:
            raise ValueError(
                "ANIL adapts the head only, but the model has no ParamRole.HEAD parameters; "
                "wrap it with MoRAModel(..., modules_to_save=['<head>'])"
            )
        return tuple(n for n in self.meta_names if n in heads)


class Learner:
    """One task's adapted parameters: a dict of tensors in the autograd graph of the
    meta-parameters, and the shared model run functionally over them.

    Made by :meth:`MAML.clone`; ``adapt`` returns nothing and replaces :attr:`params`.
    """

    def __init__(self, maml: MAML, params: dict[str, Tensor]) -> None:
        self.maml = maml
        self.params = dict(params)

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> None:
        """One differentiable SGD step on ``loss`` (a scalar computed with this learner)."""
        if loss.dim() != 0:
            raise ValueError(f"adapt() takes a scalar loss, got shape {tuple(loss.shape)}")
        fo = self.maml.first_order if first_order is None else first_order
        names = self.maml.inner_names
        grads = torch.autograd.grad(
            loss, [self.params[n] for n in names], create_graph=not fo, allow_unused=True
        )
        g = {n: torch.zeros_like(self.params[n]) if v is None else v for n, v in zip(names, grads)}
        self.params = self.maml.inner_step(self.params, g)

    def clone(self) -> Learner:
        """A learner continuing from this one's adapted parameters."""
        return Learner(self.maml, self.params)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model on ``*args, **kwargs`` (``x (n, ...)``, or a Hugging Face model's
        ``input_ids, attention_mask=...``) with the adapted parameters."""
        return self.maml.functional_forward(self.params, *args, **kwargs)


def _append(factors: tuple[Tensor, Tensor] | None, h: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """``(H, D)`` with the rows ``h (r, d_in)`` and ``d (r, d_out)`` appended."""
    if factors is None:
        return h, d
    return torch.cat([factors[0], h]), torch.cat([factors[1], d])  # (k·r + r, ·)


def _key(name: str) -> str:
    return name.replace(".", "/")
