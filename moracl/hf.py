"""``transformers.Trainer`` for a :class:`~moracl.model.MoRAModel`: adapter-only checkpoints
and sharpness-aware minimisation.

    trainer = MoRATrainer(model=MoRAModel(gpt2, AdapterConfig(rank=8)), args=args,
                          train_dataset=data)
    trainer.train()                      # checkpoint-N/ holds the adapters, not the model

A plain ``transformers.Trainer`` already trains a ``MoRAModel`` with default arguments (its
``forward`` declares the wrapped model's parameters, so unused dataset columns are dropped and
``labels`` found), but it saves any model that is not a ``PreTrainedModel`` as the whole
``state_dict()``: every frozen weight, and for a model with tied embeddings (GPT-2) an error,
because safetensors refuses shared tensors.  :class:`MoRATrainer` saves with
``MoRAModel.save_pretrained`` instead and loads those folders back when resuming and for
``load_best_model_at_end``; it also adds the routers' auxiliary loss
(``MoRAModel.aux_loss``) to the training loss.

:class:`SAMTrainer` runs SAM's two forward/backward passes in each training step (the first
at ``w`` without gradient synchronisation across processes, the second at ``w + ε`` with
BatchNorm statistics frozen) and hands the Trainer an optimiser whose ``step()`` is SAM's
second step; gradient clipping (``max_grad_norm``) applies to the second gradient.
Gradient accumulation and fp16 loss scaling are refused (bf16 needs no scaler).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from moracl.checkpoint import open_adapter
from moracl.guard import NonFiniteError
from moracl.model import MoRAModel
from moracl.optim import SAM, MoRAOptimizer, OptimizerWrapper, SAMConfig, disable_running_stats

__all__ = ["MoRATrainer", "SAMTrainer"]


class MoRATrainer(Trainer):
    """A ``transformers.Trainer`` whose checkpoints hold a ``MoRAModel``'s adapters only.

    Takes the arguments of ``transformers.Trainer``; ``model`` must be a ``MoRAModel``.
    Each ``checkpoint-N`` folder (and ``save_model``'s) is what ``save_pretrained`` writes,
    plus the Trainer's own files (optimiser, scheduler, trainer state, training arguments);
    ``MoRAModel.from_pretrained(base_model, folder)`` loads it.  DeepSpeed and FSDP through
    the Trainer are refused (they shard the model the adapters are read from).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                f"{type(self).__name__} saves adapters from the unsharded model; DeepSpeed and "
                "FSDP through the Trainer are not supported (use moracl's own data parallelism)"
            )
        if self.model is not None:
            self._mora()  # a MoRAModel, or TypeError now rather than at the first save

    def _mora(self, model: nn.Module | None = None) -> MoRAModel:
        """The ``MoRAModel`` under ``model`` (default: the trainer's), unwrapped from DDP."""
        found = self.accelerator.unwrap_model(self.model if model is None else model)
        if not isinstance(found, MoRAModel):
            raise TypeError(f"{type(self).__name__} trains a MoRAModel, got {type(found).__name__}")
        return found

    # -- the loss -------------------------------------------------------------------------
    def training_step(  # type: ignore[override]
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """The Trainer's step, stopped with a :class:`~moracl.guard.NonFiniteError` where its
        loss is not finite: the Trainer would go on (and leave the value out of its logged
        mean), and every later step would train on NaN weights.  The check reads the loss the
        Trainer reads for that filter anyway, so it costs no extra synchronisation."""
        extra = () if num_items_in_batch is None else (num_items_in_batch,)
        loss = super().training_step(model, inputs, *extra)
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteError(
                f"{type(self).__name__}: the training loss is {float(loss.float().mean())} at "
                f"step {self.state.global_step + 1} (epoch {self.state.epoch or 0:.2f}); training "
                "stops here and no checkpoint holds a non-finite value (lower the learning "
                "rate, clip gradients with max_grad_norm, or train in bf16 rather than fp16)"
            )
        return loss

    def compute_loss(  # type: ignore[override]
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, Any]:
        """The Trainer's loss plus, in training, the routers' weighted auxiliary loss of the
        same forward (divided by the accumulation steps where the Trainer will not divide the
        loss itself)."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        mora = self._mora(model)
        if not mora.training or not mora.last_routing:
            return result
        aux = mora.aux_loss()
        if getattr(self, "model_accepts_loss_kwargs", False) and kwargs.get("num_items_in_batch"):
            steps = getattr(self, "current_gradient_accumulation_steps", None)
            aux = aux / (steps or self.args.gradient_accumulation_steps)
        if return_outputs:
            loss, outputs = result
            return loss + aux.to(loss.dtype), outputs
        assert isinstance(result, Tensor)
        return result + aux.to(result.dtype)

    # -- checkpoints ----------------------------------------------------------------------
    def _save(
        self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None
    ) -> None:
        """Write the adapters (``save_pretrained``), the processing class and the training
        arguments into ``output_dir``; ``state_dict`` is not used."""
        out = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        if out is None:
            raise ValueError("no folder to save into: give output_dir")
        os.makedirs(out, exist_ok=True)
        self._mora().save_pretrained(out)
        processing = getattr(self, "processing_class", None)
        if processing is not None:
            processing.save_pretrained(out)
        torch.save(self.args, os.path.join(out, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        """Load the adapters of checkpoint folder ``resume_from_checkpoint``."""
        self._load_adapters(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """Load the adapters of the best checkpoint (``load_best_model_at_end``)."""
        best = self.state.best_model_checkpoint
        if best is None:
            raise ValueError("load_best_model_at_end: the trainer state names no best checkpoint")
        self._load_adapters(best)

    def _load_adapters(self, folder: str, model: nn.Module | None = None) -> None:
        """Copy the adapter tensors saved in ``folder`` into the model (every name, shape and
        dtype checked first)."""
        self._mora(model).load_adapter_tensors(open_adapter(folder).load_tensors())


class SAMTrainer(MoRATrainer):
    """A :class:`MoRATrainer` whose every step is a SAM (or ASAM) step.

    Args:
        *args, **kwargs: those of ``transformers.Trainer``.  An optimiser passed as
            ``optimizers=(opt, scheduler)`` must be a ``MoRAOptimizer`` built with
            ``sam=SAMConfig(...)`` (any base, LARS, LoRA+) or a ``SAM``.
        sam: the SAM settings when the trainer builds the optimiser itself: a
            ``MoRAOptimizer`` over the model's named groups with ``adamw`` as base and the
            arguments' ``learning_rate``, ``weight_decay``, ``adam_beta1``/``adam_beta2`` and
            ``adam_epsilon`` (``args.optim`` is not read).  Default ``SAMConfig()``.
    """

    def __init__(self, *args: Any, sam: SAMConfig | None = None, **kwargs: Any) -> None:
        if sam is not None and not isinstance(sam, SAMConfig):
            raise TypeError(f"sam must be a SAMConfig or None, got {type(sam).__name__}")
        self.sam_config = sam if sam is not None else SAMConfig()
        self._passes: _SAMPasses | None = None
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "SAMTrainer perturbs the weights with each batch's gradient; gradient_"
                f"accumulation_steps must be 1, got {self.args.gradient_accumulation_steps}"
            )
        if self.args.fp16:
            raise ValueError("SAMTrainer does not drive fp16's gradient scaler; use bf16=True")
        if self.optimizer is not None:
            self.optimizer = self._passes = _SAMPasses(self.optimizer)

    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        """The SAM optimiser (see the class docstring), built once."""
        if self.optimizer is None:
            a = self.args
            opt = MoRAOptimizer(
                self._mora(model),
                base="adamw",
                lr=a.learning_rate,
                weight_decay=a.weight_decay,
                sam=self.sam_config,
                betas=(a.adam_beta1, a.adam_beta2),
                eps=a.adam_epsilon,
            )
            self.optimizer = self._passes = _SAMPasses(opt)
        return self.optimizer

    def training_step(  # type: ignore[override]
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """SAM's two passes on ``inputs``: the loss and gradient at ``w`` (no gradient
        synchronisation), the move to ``w + ε``, the gradient at ``w + ε`` (BatchNorm
        statistics frozen); the Trainer's ``optimizer.step()`` then restores ``w`` and steps.
        Returns the first pass's loss."""
        if self._passes is None:
            raise RuntimeError("SAMTrainer.training_step before create_optimizer()")
        extra = () if num_items_in_batch is None else (num_items_in_batch,)
        with self.accelerator.no_sync(model):
            loss = super().training_step(model, inputs, *extra)
        if self._passes.sam.first_step(zero_grad=True):
            with disable_running_stats(model):
                super().training_step(model, inputs, *extra)
        return loss


class _SAMPasses(OptimizerWrapper):
    """The optimiser :class:`SAMTrainer` hands the Trainer: ``step()`` is SAM's second step
    (restore ``w``, let the base optimiser step with the gradient taken at ``w + ε``); the
    first step happens in ``SAMTrainer.training_step``.  Shares the wrapped optimiser's
    groups and state, so schedulers and checkpoints see the usual optimiser."""

    def __init__(self, optimizer: Optimizer) -> None:
        sam = optimizer.sam if isinstance(optimizer, MoRAOptimizer) else optimizer
        if not isinstance(sam, SAM):
            what = (
                "a MoRAOptimizer without SAM"
                if isinstance(optimizer, MoRAOptimizer)
                else type(optimizer).__name__
            )
            raise ValueError(
                "SAMTrainer needs a MoRAOptimizer built with sam=SAMConfig(...) or a SAM "
                f"optimiser, got {what}"
            )
        super().__init__(optimizer, {})
        self.sam = sam

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """SAM's second step (the passes ran in the training step)."""
        if closure is not None:
            raise ValueError("SAMTrainer runs both passes itself; step() takes no closure")
        self.sam.second_step()
