"""``snapshot_state`` (what early stopping keeps of the best epoch, in finetune and continual
runs): the trainable parameters plus the buffers training changes.  Reference: a deep copy of
the model taken at the epoch restored; the trainable parameters alone do not give it back
for Delta-LoRA (its frozen weight moved) or AdaLoRA (its masks changed)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from moracl import MoRAModel
from moracl.adapters import AdapterConfig
from moracl.adapters.delta_lora import DeltaLoRAUpdater
from moracl.early_stopping import (
    EarlyStopping,
    EarlyStoppingConfig,
    snapshot_state,
    trainable_state,
)


def _model(config: AdapterConfig) -> MoRAModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return MoRAModel(net, config, target_modules=["0", "2"])


@torch.no_grad()
def _out(model: nn.Module) -> Tensor:
    model.eval()
    y = model(torch.randn(10, 16, generator=torch.Generator().manual_seed(5)))
    model.train()
    return y


def _train_steps(model: MoRAModel, steps: int, opt: torch.optim.Optimizer) -> None:
    gen = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_the_snapshot_holds_adalora_masks() -> None:
    model = _model(AdapterConfig(kind="adalora", rank=4, target_rank=2))
    masks = {k for k in snapshot_state(model) if k.endswith("rank_mask")}
    assert len(masks) == 2 and not masks & set(trainable_state(model))


def test_restoring_the_snapshot_gives_the_epochs_delta_lora_model() -> None:
    model = _model(AdapterConfig(kind="delta_lora", rank=4, start_step=0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    DeltaLoRAUpdater(model, opt)
    _train_steps(model, 3, opt)
    reference = copy.deepcopy(model)
    both = {
        "snapshot": EarlyStopping(EarlyStoppingConfig(patience=5)),
        "trainable": EarlyStopping(EarlyStoppingConfig(patience=5)),
    }
    both["snapshot"].update(0, val_loss=0.1, val_acc=1.0, state=snapshot_state(model))
    both["trainable"].update(0, val_loss=0.1, val_acc=1.0, state=trainable_state(model))
    assert set(snapshot_state(model)) > set(trainable_state(model))
    _train_steps(model, 3, opt)
    for stopper in both.values():
        stopper.update(1, val_loss=0.5, val_acc=0.0, state={})
    partial = copy.deepcopy(model)
    both["trainable"].restore(partial)
    both["snapshot"].restore(model)
    assert torch.equal(_out(model), _out(reference))
    assert not torch.allclose(_out(partial), _out(reference))  # the base moved without it
