"""Early stopping under an AdaLoRA rank budget: the finetune loop's best-epoch snapshot puts
back the rank masks with the weights, so the restored model is the best epoch's model (outputs
equal to a deep copy taken at that epoch), whether that epoch came before the budget's final
allocation or after it; ``save_pretrained`` then keeps the restored mask's triplets."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from moracl import MoRAModel
from moracl.adapters import AdaLoRA, AdapterConfig
from moracl.config import TrainConfig, from_dict
from moracl.early_stopping import EarlyStopping, EarlyStoppingConfig
from moracl.jobs.finetune import _watch, train_model
from moracl.train import EpochRecord

EPOCHS, BATCH, N = 4, 8, 64  # 8 optimiser steps per epoch, 32 in all
TFINAL = 12  # the final allocation at step 32 - 12 = 20, in epoch 2 (steps 16..23)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(x)))


def _adapters(model: nn.Module) -> dict[str, AdaLoRA]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRA)}


def _train(best: int) -> tuple[MoRAModel, MoRAModel, MoRAModel, EarlyStopping]:
    """Train under early stopping whose validation metric is best after epoch ``best``;
    returns ``(restored model, deep copy taken after epoch best, copy after the last epoch,
    the stopper)``."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(N, 16, generator=gen)
    labels = torch.randint(0, 4, (N,), generator=gen)
    torch.manual_seed(0)
    config = AdapterConfig(
        kind="adalora", rank=6, target_rank=2, alpha=8.0, tinit=2, tfinal=TFINAL, delta_t=2
    )
    model = MoRAModel(Classifier(), config, target_modules=["body", "head"])
    train = from_dict(TrainConfig, {"epochs": EPOCHS, "batch_size": BATCH, "lr": 2e-2})
    stopper = EarlyStopping(EarlyStoppingConfig(patience=EPOCHS))
    val_labels = torch.arange(4)
    seen: list[int] = []

    def val_logits() -> Tensor:  # confident and right after epoch ``best`` only
        sharp = 5.0 if seen[-1] == best else 0.5
        return torch.eye(4) * sharp  # (n, c)

    watch = _watch(model, val_logits, val_labels, stopper)
    copies: dict[int, MoRAModel] = {}

    def after_epoch(record: EpochRecord) -> bool:
        seen.append(record.epoch)
        copies[record.epoch] = copy.deepcopy(model)  # the reference: the whole model
        return watch(record)

    train_model(model, lambda idx: {"x": data[idx]}, labels, train, after_epoch=after_epoch)
    assert seen == list(range(EPOCHS)) and stopper.best_epoch == best
    stopper.restore(model)
    return model, copies[best], copies[EPOCHS - 1], stopper


@torch.no_grad()
def _outputs(model: nn.Module) -> Tensor:
    model.eval()
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(3))
    return model(x)  # (20, 4)


def _masks(model: nn.Module) -> dict[str, list[bool]]:
    return {n: a.rank_mask.tolist() for n, a in _adapters(model).items()}


@pytest.mark.parametrize("best", [1, 2], ids=["before-final-allocation", "after-final-allocation"])
def test_restore_gives_the_best_epochs_model_and_its_rank_masks(tmp_path: Path, best: int) -> None:
    restored, reference, last, _ = _train(best)
    final_masks = _masks(last)
    assert any(not all(m) for m in final_masks.values())  # the budget pruned by the end
    assert _masks(restored) == _masks(reference)
    if best == 1:  # the best epoch trained every triplet; the end of the run did not
        assert all(all(m) for m in _masks(reference).values())
        assert _masks(restored) != final_masks
    else:
        assert _masks(reference) == final_masks
    assert not torch.equal(_outputs(last), _outputs(reference))  # restoring changes something
    assert torch.equal(_outputs(restored), _outputs(reference))
    for n, a in _adapters(restored).items():
        b = _adapters(reference)[n]
        for k in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(a, k), getattr(b, k)), (n, k)

    # what save_pretrained keeps after the restore: the restored mask's triplets
    restored.save_pretrained(tmp_path)
    config = MoRAModel.from_pretrained(Classifier(), tmp_path).adapter_configs["default"]
    kept = {n.split(".")[1]: sum(m) for n, m in _masks(reference).items()}  # model.<layer>...
    assert config.rank_pattern == kept  # type: ignore[union-attr]
    base = copy.deepcopy(restored).unload()
    loaded = MoRAModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(_outputs(loaded), _outputs(reference), rtol=0, atol=1e-6)
