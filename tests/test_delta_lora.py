"""Delta-LoRA: the frozen weight moves by λ times each step's change of ``s · B A`` (from
``start_step`` on), the caller's model never changes, save/load/merge, finetune's loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from moracl import AdapterConfig, MoRAModel
from moracl.adapters.delta_lora import (
    DeltaLoRA,
    DeltaLoRAConfig,
    DeltaLoRAUpdater,
    delta_lora_buffers,
)
from moracl.config import TrainConfig
from moracl.jobs.finetune import train_model

from .conftest import mlp, randomize_adapters

LAMBDA = 0.7


def _model(start_step: int = 0, dtype: torch.dtype = torch.float64) -> MoRAModel:
    cfg = AdapterConfig(kind="delta_lora", rank=3, alpha=5.0, update_ratio=LAMBDA,
                        start_step=start_step)  # fmt: skip
    model = MoRAModel(mlp().to(dtype), cfg)
    randomize_adapters(model)
    return model


def _adapters(model: nn.Module) -> list[DeltaLoRA]:
    return [m for m in model.modules() if isinstance(m, DeltaLoRA)]


def _products(model: nn.Module) -> list[Tensor]:
    """``s · B A`` of every Delta-LoRA adapter (copies)."""
    return [(a.lora_B @ a.lora_A).detach() * a.scaling for a in _adapters(model)]


def _step(model: MoRAModel, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(6, 24, dtype=torch.float64)
    model(x).square().sum().backward()
    opt.step()
    opt.zero_grad()


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)


def test_one_step_moves_the_base_by_lambda_times_the_change_of_sBA() -> None:
    model = _model()
    opt = _optimizer(model)
    with DeltaLoRAUpdater(model, opt):
        for _ in range(3):
            before, d_before = _products(model), [a.base_delta.clone() for a in _adapters(model)]
            _step(model, opt)
            after = _products(model)
            for a, p0, p1, d0 in zip(_adapters(model), before, after, d_before):
                assert (p1 - p0).abs().max() > 1e-3  # the step really moved B A
                torch.testing.assert_close(
                    a.base_delta - d0, LAMBDA * (p1 - p0), rtol=0, atol=1e-12
                )
    # and the layer computes with the moved weight: x (W + D)ᵀ + b + s x Aᵀ Bᵀ
    x = torch.randn(5, 24, dtype=torch.float64)
    layer = model.model.get_submodule("0")
    a = layer.adapters["default"]
    ref = x @ (layer.weight + a.base_delta + a.scaling * a.lora_B @ a.lora_A).T + layer.bias
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.delta(x), x @ a.delta_weight().T, rtol=0, atol=1e-12)


def test_the_base_stays_until_start_step() -> None:
    model = _model(start_step=2)
    opt = _optimizer(model)
    updater = DeltaLoRAUpdater(model, opt)
    for step in (1, 2):
        before = _products(model)
        _step(model, opt)
        assert all(not torch.equal(p, q) for p, q in zip(before, _products(model)))
        assert all(int(a.steps) == step for a in _adapters(model))
        assert all(torch.count_nonzero(a.base_delta) == 0 for a in _adapters(model))
    before = _products(model)
    _step(model, opt)  # step 3: the first that moves W, by this step's change only
    for a, p0, p1 in zip(_adapters(model), before, _products(model)):
        torch.testing.assert_close(a.base_delta, LAMBDA * (p1 - p0), rtol=0, atol=1e-12)
    updater.remove()
    frozen = [a.base_delta.clone() for a in _adapters(model)]
    _step(model, opt)  # hooks removed: W no longer moves
    assert all(torch.equal(a.base_delta, d) for a, d in zip(_adapters(model), frozen))


def test_the_callers_model_is_never_modified() -> None:
    net = mlp().double()
    original = {k: v.clone() for k, v in net.state_dict().items()}
    model = MoRAModel(net, AdapterConfig(kind="delta_lora", rank=3, start_step=0))
    shared = {p: layer.base_layer.weight for p, layer in model.adapted_layers()}
    opt = _optimizer(model)
    with DeltaLoRAUpdater(model, opt):
        for _ in range(4):
            _step(model, opt)
    assert all(a.base_delta.abs().max() > 0 for a in _adapters(model))
    for k, v in net.state_dict().items():
        assert torch.equal(v, original[k]), k
    for path, layer in model.adapted_layers():  # the layer still holds the shared tensor
        assert layer.base_layer.weight is shared[path]
    x = torch.randn(4, 24, dtype=torch.float64)
    plain = model.unload()
    torch.testing.assert_close(plain(x), net(x), rtol=0, atol=0)


def test_save_load_and_merge_round_trip(tmp_path: Path) -> None:
    net = mlp().double()
    model = MoRAModel(net, AdapterConfig(kind="delta_lora", rank=3, start_step=1))
    opt = _optimizer(model)
    with DeltaLoRAUpdater(model, opt):
        for _ in range(3):
            _step(model, opt)
    x = torch.randn(7, 24, dtype=torch.float64)
    expected = model(x)
    assert not torch.allclose(expected, net(x))

    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, rtol=0, atol=1e-12)
    model.unmerge()

    model.save_pretrained(tmp_path)
    loaded = MoRAModel.from_pretrained(net, tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    for mine, theirs in zip(_adapters(model), _adapters(loaded)):
        assert torch.equal(mine.base_delta, theirs.base_delta)
        assert int(theirs.steps) == 3
    with pytest.raises(ValueError, match="delta_lora adapter, which PEFT cannot represent"):
        model.save_pretrained(tmp_path / "peft", format="peft")


def test_training_resumes_exactly_after_a_reload(tmp_path: Path) -> None:
    net = mlp().double()
    model = MoRAModel(net, AdapterConfig(kind="delta_lora", rank=3, start_step=2))
    opt = _optimizer(model)
    with DeltaLoRAUpdater(model, opt):
        _step(model, opt)
    model.save_pretrained(tmp_path)
    loaded = MoRAModel.from_pretrained(net, tmp_path)
    for m in (model, loaded):  # the same next steps on both (fresh SGD: no optimiser state)
        sgd = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(1)
        with DeltaLoRAUpdater(m, sgd):
            for _ in range(2):
                _step(m, sgd)
    for mine, theirs in zip(_adapters(model), _adapters(loaded)):
        assert int(theirs.steps) == 3
        assert theirs.base_delta.abs().max() > 0  # step 3 passed start_step=2 on both
        torch.testing.assert_close(theirs.base_delta, mine.base_delta, rtol=0, atol=0)


def test_finetune_training_moves_the_base_and_snapshots_it() -> None:
    net = mlp(d_out=3)
    model = MoRAModel(net, AdapterConfig(kind="delta_lora", rank=2, start_step=1))
    data = torch.randn(32, 24)
    labels = torch.randint(0, 3, (32,))
    train = TrainConfig(epochs=2, batch_size=8, lr=1e-2)
    log = train_model(model, lambda idx: {"input": data[idx]}, labels, train)
    assert log.steps == 8
    assert all(int(a.steps) == 8 and a.base_delta.abs().max() > 0 for a in _adapters(model))
    buffers = delta_lora_buffers(model)
    assert set(buffers) == {
        f"model.{p}.adapters.default.{n}" for p in ("0", "2") for n in ("base_delta", "steps")
    }
    assert set(buffers) <= set(model.state_dict())
    # the hooks are off once training returns
    opt = _optimizer(model)
    before = [a.base_delta.clone() for a in _adapters(model)]
    model(data).sum().backward()
    opt.step()
    assert all(torch.equal(a.base_delta, d) for a, d in zip(_adapters(model), before))


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="without dropout.*got dropout=0.1"):
        AdapterConfig(kind="delta_lora", dropout=0.1)
    with pytest.raises(ValueError, match="update_ratio must be a finite number >= 0, got -1"):
        DeltaLoRAConfig(update_ratio=-1.0)
    with pytest.raises(ValueError, match="start_step must be an integer >= 0, got 1.5"):
        DeltaLoRAConfig(start_step=1.5)  # type: ignore[arg-type]
    lora = MoRAModel(mlp(), AdapterConfig(kind="lora"))
    opt = _optimizer(lora)
    assert DeltaLoRAUpdater.attach(lora, opt) is None
    with pytest.raises(ValueError, match="no Delta-LoRA adapter"):
        DeltaLoRAUpdater(lora, opt)
    model = _model()
    with pytest.raises(ValueError, match="none of the 2 Delta-LoRA adapters has A or B"):
        DeltaLoRAUpdater(model, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    cfg = AdapterConfig.from_dict({"kind": "delta_lora", "update_ratio": 2, "start_step": 7})
    assert isinstance(cfg, DeltaLoRAConfig) and AdapterConfig.from_dict(cfg.to_dict()) == cfg
