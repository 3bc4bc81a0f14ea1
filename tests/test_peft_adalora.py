"""PEFT AdaLoRA folders both ways, against PEFT itself: a folder PEFT's ``AdaLoraModel`` saved
after its final rank allocation (pruned layers, ``rank_pattern``) loads in moracl with PEFT's
outputs; an AdaLoRA adapter moracl trained (or loaded pruned) written in PEFT's format loads in
``peft.PeftModel`` with moracl's outputs; what cannot be honoured is refused naming it."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moracl import AdapterConfig, MoRAModel, MoRAScheduler
from moracl.adapters import AdaLoRA, AdaLoRAConfig, RankAllocator, orth_loss
from moracl.checkpoint import LEGACY_CONFIG_NAME, WEIGHTS_NAME

from .conftest import mlp, tiny_gpt2

peft = pytest.importorskip("peft")

ATOL = 1e-5
T, TINIT, TFINAL = 10, 1, 3
TARGETS = {"mlp": ["0", "2"], "gpt2": ["c_attn", "c_proj"]}
BUILD = {"mlp": mlp, "gpt2": tiny_gpt2}


def _inputs(name: str, seed: int = 2) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return {"input": torch.randn(6, 24, generator=gen)}
    return {"input_ids": torch.randint(0, 101, (2, 7), generator=gen)}


def _call(model: nn.Module, name: str, seed: int = 2) -> Tensor:
    out = model(*_inputs(name, seed).values())
    return out if isinstance(out, Tensor) else out.logits


def _loss(model: nn.Module, name: str, step: int) -> Tensor:
    return _call(model, name, seed=100 + step).pow(2).mean()


@torch.no_grad()
def _out(model: nn.Module, name: str) -> Tensor:
    model.eval()
    return _call(model, name)


@torch.no_grad()
def _randomize(model: nn.Module, keys: tuple[str, ...] = ("lora_A", "lora_B", "lora_E")) -> None:
    """Seeded values of a trained size for every AdaLoRA tensor (short runs barely move them)."""
    gen = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if any(k in n for k in keys):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _close(a: Tensor, b: Tensor, base: Tensor) -> None:
    assert (a - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def _peft_trained(name: str, folder: Path) -> tuple[nn.Module, Any]:
    """``(base, peft model)``: PEFT's AdaLoRA trained through its final allocation, its
    tensors then given trained-size values, saved into ``folder``."""
    torch.manual_seed(0)
    base = BUILD[name]()
    config = peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=6, tinit=TINIT, tfinal=TFINAL, total_step=T,
        target_modules=TARGETS[name], fan_in_fan_out=name == "gpt2",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(base), config)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=5e-2)
    for step in range(T):
        _loss(wrapped, name, step).backward()
        opt.step()
        wrapped.base_model.update_and_allocate(step)
        opt.zero_grad()
    _randomize(wrapped)
    wrapped.base_model.rankallocator.mask_using_rank_pattern(
        wrapped.base_model.model, wrapped.peft_config["default"].rank_pattern
    )
    wrapped.save_pretrained(folder)
    return base, wrapped.eval()


def _load_in_peft(base: nn.Module, folder: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


def _adapters(model: MoRAModel) -> dict[str, AdaLoRA]:
    return {p: layer.adapters["default"] for p, layer in model.adapted_layers()}  # type: ignore[misc]


# -- reading PEFT's folders -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_a_pruned_peft_adalora_folder_loads_with_peft_outputs(tmp_path: Path, name: str) -> None:
    base, wrapped = _peft_trained(name, tmp_path)
    written = json.loads((tmp_path / LEGACY_CONFIG_NAME).read_text())
    kept = {k[: -len(".lora_E")]: sum(v) for k, v in written["rank_pattern"].items()}
    assert any(k < 4 for k in kept.values())  # the budget pruned some layer
    ours = MoRAModel.from_peft(base, tmp_path).eval()
    config = ours.adapter_configs["default"]
    assert isinstance(config, AdaLoRAConfig)
    assert (config.rank, config.target_rank, config.alpha) == (4, 2, 6.0)
    assert (config.tinit, config.tfinal) == (TINIT, TFINAL)
    assert config.rank_pattern == kept
    for path, adapter in _adapters(ours).items():
        assert adapter.rank == kept[path] and bool(adapter.rank_mask.all())
        assert adapter.scaling == 6.0 / (4 + 1e-5)  # PEFT keeps ranknum = init_r
    _close(_out(ours, name), _out(wrapped, name), _out(base, name))
    # and back to PEFT: the same folder content, PEFT's outputs
    ours.save_pretrained(tmp_path / "again", format="peft")
    _close(
        _out(_load_in_peft(base, tmp_path / "again"), name), _out(wrapped, name), _out(base, name)
    )


def test_a_folder_saved_before_any_allocation_keeps_the_initial_rank(tmp_path: Path) -> None:
    base = mlp()
    config = peft.AdaLoraConfig(init_r=3, target_r=2, total_step=T, target_modules=["0", "2"])
    wrapped = peft.get_peft_model(copy.deepcopy(base), config)
    _randomize(wrapped)
    wrapped.save_pretrained(tmp_path)
    ours = MoRAModel.from_peft(base, tmp_path)
    assert ours.adapter_configs["default"].rank_pattern is None  # type: ignore[union-attr]
    assert all(a.rank == 3 for a in _adapters(ours).values())
    _close(_out(ours, "mlp"), _out(wrapped.eval(), "mlp"), _out(base, "mlp"))


def test_ranknum_of_older_peft_versions_is_read_when_it_is_init_r(tmp_path: Path) -> None:
    base, wrapped = _peft_trained("mlp", tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    for path in TARGETS["mlp"]:
        tensors[f"base_model.model.{path}.ranknum"] = torch.tensor([4.0])
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    ours = MoRAModel.from_peft(base, tmp_path)
    _close(_out(ours, "mlp"), _out(wrapped, "mlp"), _out(base, "mlp"))
    tensors["base_model.model.2.ranknum"] = torch.tensor([2.0])
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"'base_model.model.2.ranknum' is \[2.0\].*init_r = 4"):
        MoRAModel.from_peft(base, tmp_path)


def _edit(folder: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((folder / LEGACY_CONFIG_NAME).read_text())
    change(config)
    (folder / LEGACY_CONFIG_NAME).write_text(json.dumps(config))


def _set_pattern(key: str, value: Any) -> Callable[[dict], None]:
    return lambda c: c["rank_pattern"].update({key: value})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set_pattern("0.lora_E", [True, False]), r"rank_pattern\['0.lora_E'\]=.*init_r=4"),
        (_set_pattern("1.lora_E", [True] * 4), r"key '1.lora_E' names no adapted layer"),
        (lambda c: c.update(rank_pattern=[1]), r"rank_pattern must be an object"),
        (lambda c: c.update(target_r=5), r"target_rank"),
        (lambda c: c.update(lora_alpha=0), r"alpha"),
        (lambda c: c.update(init_r="four"), r"init_r must be an integer, got 'four'"),
        (lambda c: c.update(use_rslora=True), r"use_rslora=True has no moracl equivalent"),
        (lambda c: c.update(alpha_pattern={"0": 2}), r"alpha_pattern=.* has no moracl"),
    ],
    ids=["mask-length", "unknown-layer", "not-a-mapping", "target_r", "alpha", "init_r",
         "rslora", "alpha_pattern"],
)  # fmt: skip
def test_what_moracl_cannot_honour_is_named(
    tmp_path: Path, edit: Callable[[dict], None], match: str
) -> None:
    base, _ = _peft_trained("mlp", tmp_path)
    _edit(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        MoRAModel.from_peft(base, tmp_path)


def test_a_pruned_layers_tensors_must_match_the_pattern(tmp_path: Path) -> None:
    base, _ = _peft_trained("mlp", tmp_path)
    _edit(tmp_path, lambda c: c["rank_pattern"].update({"0.lora_E": [True] * 4}))
    with pytest.raises(ValueError, match=r"'0.adapters.default.lora_A' has shape"):
        MoRAModel.from_peft(base, tmp_path)


# -- writing PEFT's format --------------------------------------------------------------------


def _moracl_trained(name: str) -> tuple[nn.Module, MoRAModel]:
    """moracl's AdaLoRA trained through its final allocation (``rank_mask`` set), then given
    trained-size values."""
    torch.manual_seed(0)
    base = BUILD[name]()
    config = AdapterConfig(
        kind="adalora", rank=4, target_rank=2, alpha=6.0, tinit=TINIT, tfinal=TFINAL, total_step=T
    )
    model = MoRAModel(base, config, target_modules=TARGETS[name])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    sched = MoRAScheduler(opt, total_steps=T, rank_allocator=RankAllocator(model))  # T: config
    for step in range(T):
        (_loss(model, name, step) + orth_loss(model)).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    _randomize(model)
    return base, model.eval()


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_format_peft_writes_adalora_that_peft_loads(tmp_path: Path, name: str) -> None:
    base, model = _moracl_trained(name)
    adapters = _adapters(model)
    assert any(not bool(a.rank_mask.all()) for a in adapters.values())  # pruned by the budget
    folder = model.save_pretrained(tmp_path / "peft", format="peft")
    written = json.loads((folder / LEGACY_CONFIG_NAME).read_text())
    assert written["peft_type"] == "ADALORA" and written["total_step"] == T
    assert written["rank_pattern"] == {
        f"{p}.lora_E": a.rank_mask.tolist() for p, a in adapters.items()
    }
    expected = _out(model, name)
    theirs = _load_in_peft(base, folder)
    for path, a in adapters.items():  # PEFT resized each layer to the kept triplets
        layer = theirs.base_model.model.get_submodule(path)
        assert layer.lora_E["default"].shape == (int(a.rank_mask.sum()), 1)
    _close(_out(theirs, name), expected, _out(base, name))
    back = MoRAModel.from_peft(base, folder).eval()  # moracl -> PEFT -> moracl
    torch.testing.assert_close(_out(back, name), expected, rtol=0, atol=ATOL)
    config = model.adapter_configs["default"]
    assert isinstance(config, AdaLoRAConfig)
    assert back.adapter_configs["default"] == config.saved(adapters)


def test_a_pruned_moracl_folder_is_written_to_peft(tmp_path: Path) -> None:
    base, model = _moracl_trained("mlp")
    model.save_pretrained(tmp_path / "own")  # moracl's format: each layer at its kept rank
    pruned = MoRAModel.from_pretrained(base, tmp_path / "own").eval()
    assert all(bool(a.rank_mask.all()) for a in _adapters(pruned).values())
    pruned.save_pretrained(tmp_path / "peft", format="peft")
    written = json.loads((tmp_path / "peft" / LEGACY_CONFIG_NAME).read_text())
    for path, a in _adapters(pruned).items():
        mask = written["rank_pattern"][f"{path}.lora_E"]
        assert len(mask) == 4 and sum(mask) == a.rank
    _close(
        _out(_load_in_peft(base, tmp_path / "peft"), "mlp"), _out(model, "mlp"), _out(base, "mlp")
    )


def test_without_a_recorded_run_length_peft_gets_its_least_total_step(tmp_path: Path) -> None:
    """A config without ``total_step`` writes the least PEFT accepts, ``tinit + tfinal + 1``;
    an allocator then needs ``total_steps`` and names both ways of giving it."""
    torch.manual_seed(0)
    base = mlp()
    config = AdapterConfig(kind="adalora", rank=4, target_rank=2, tinit=TINIT, tfinal=TFINAL)
    model = MoRAModel(base, config, target_modules=TARGETS["mlp"])
    with pytest.raises(ValueError, match="give total_steps=, or set total_step"):
        RankAllocator(model)
    assert RankAllocator(model, total_steps=T).total_steps == T
    model.save_pretrained(tmp_path, format="peft")
    written = json.loads((tmp_path / LEGACY_CONFIG_NAME).read_text())
    assert written["total_step"] == TINIT + TFINAL + 1
    with pytest.raises(ValueError, match="total_step"):  # no step left for the budget to fall
        AdapterConfig(kind="adalora", rank=4, target_rank=2, tinit=2, tfinal=3, total_step=5)
