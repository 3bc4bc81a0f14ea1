"""PEFT adapter folders both ways, against PEFT itself: folders PEFT writes load with PEFT's
outputs; folders moracl writes in PEFT's format load in ``peft.PeftModel`` with moracl's
outputs; moracl's own folders no longer collide with PEFT's; what cannot be represented is
refused naming the value."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from moracl import AdapterConfig, MixtureConfig, MoRAModel, RouterConfig
from moracl.checkpoint import (
    CONFIG_NAME,
    LEGACY_CONFIG_NAME,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    write_manifest,
)
from moracl.peft_files import load_adapter_folder, peft_vera_projections
from tests.numerics import assert_close_to_scale

from .conftest import mlp, randomize_adapters, tiny_bert, tiny_gpt2

peft = pytest.importorskip("peft")

ATOL = 1e-5  # relative to the outputs' scale (tests.numerics)
#: target layers per model: GPT-2's are Conv1D (fan_in_fan_out), BERT's and the MLP's nn.Linear
TARGETS = {
    "mlp": ["0", "2"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value", "dense"],
}
BUILD = {"mlp": mlp, "gpt2": tiny_gpt2, "bert": tiny_bert}


def _peft_config(kind: str, model: str, **extra: Any) -> Any:
    common: dict[str, Any] = {"target_modules": TARGETS[model], **extra}
    if model == "gpt2":
        common["fan_in_fan_out"] = True
    if kind == "vera":
        return peft.VeraConfig(r=8, **common)
    lora: dict[str, Any] = {"r": 4, "lora_alpha": 8}
    if kind == "rslora":
        lora["use_rslora"] = True
    if kind == "dora":
        lora["use_dora"] = True
    return peft.LoraConfig(**lora, **common)


@torch.no_grad()
def _nonzero(model: nn.Module) -> None:
    """Seeded random values for PEFT's zero-initialised tensors (and the others trained)."""
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if any(k in name for k in ("lora_B", "vera_lambda", "lora_magnitude", "lora_A")):
            shift = 1.0 if "magnitude" in name else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + shift)


def _inputs(model: str) -> Any:
    gen = torch.Generator().manual_seed(2)
    if model == "mlp":
        return (torch.randn(3, 24, generator=gen),), {}
    return (), {"input_ids": torch.randint(0, 101, (2, 7), generator=gen)}


@torch.no_grad()
def _out(model: nn.Module, name: str) -> Tensor:
    args, kwargs = _inputs(name)
    out = model(*args, **kwargs)
    if isinstance(out, Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _peft_folder(tmp: Path, kind: str, name: str, **extra: Any) -> tuple[nn.Module, nn.Module]:
    """``(base, peft model)``: a PEFT adapter with non-zero updates saved into ``tmp``."""
    base = BUILD[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(base), _peft_config(kind, name, **extra))
    wrapped.eval()
    _nonzero(wrapped)
    wrapped.save_pretrained(tmp)
    return base, wrapped


def _load_in_peft(base: nn.Module, folder: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


def _close(a: Tensor, b: Tensor, base: Tensor) -> None:
    assert (a - base).abs().max() > 1e-3  # the adapter changes the output
    assert_close_to_scale(a, b, ATOL)


# -- reading PEFT's folders -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "gpt2", "bert"])
@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "vera"])
def test_peft_folders_load_with_peft_outputs(tmp_path: Path, kind: str, name: str) -> None:
    base, wrapped = _peft_folder(tmp_path, kind, name)
    ours = MoRAModel.from_peft(base, tmp_path).eval()
    assert type(ours.adapter_configs["default"]).__name__ == {
        "lora": "LoRAConfig", "rslora": "LoRAConfig", "dora": "DoRAConfig", "vera": "VeRAConfig"
    }[kind]  # fmt: skip
    _close(_out(ours, name), _out(wrapped, name), _out(base, name))
    again = MoRAModel.from_pretrained(base, tmp_path).eval()  # dispatches to from_peft
    torch.testing.assert_close(_out(again, name), _out(ours, name), rtol=0, atol=0)


def test_vera_projections_are_regenerated_as_peft_draws_them(tmp_path: Path) -> None:
    base, wrapped = _peft_folder(tmp_path, "vera", "gpt2", save_projection=False)
    from safetensors.torch import load_file

    assert not any("vera_A" in k for k in load_file(tmp_path / WEIGHTS_NAME))
    shared = wrapped.base_model
    a, b = peft_vera_projections(8, 128, 96, 0)  # widest: mlp.c_proj (128), tallest: c_attn
    assert torch.equal(a, shared.vera_A["default"]) and torch.equal(b, shared.vera_B["default"])
    ours = MoRAModel.from_peft(base, tmp_path).eval()
    _close(_out(ours, "gpt2"), _out(wrapped, "gpt2"), _out(base, "gpt2"))


def test_modules_to_save_are_read(tmp_path: Path) -> None:
    base, wrapped = _peft_folder(
        tmp_path, "lora", "mlp", target_modules=["0"], modules_to_save=["2"]
    )
    with torch.no_grad():
        wrapped.base_model.model[2].modules_to_save["default"].weight.add_(0.5)
    wrapped.save_pretrained(tmp_path)
    ours = MoRAModel.from_peft(base, tmp_path).eval()
    assert ours.saved_modules == ["2"]
    _close(_out(ours, "mlp"), _out(wrapped, "mlp"), _out(base, "mlp"))


def test_a_uniform_rank_pattern_is_read(tmp_path: Path) -> None:
    base, wrapped = _peft_folder(
        tmp_path, "lora", "mlp", rank_pattern={"0": 2, "2": 2}, alpha_pattern={"0": 6, "2": 6}
    )
    ours = MoRAModel.from_peft(base, tmp_path).eval()
    config = ours.adapter_configs["default"]
    assert (config.rank, config.alpha) == (2, 6.0)  # type: ignore[union-attr]
    _close(_out(ours, "mlp"), _out(wrapped, "mlp"), _out(base, "mlp"))


# -- writing PEFT's format --------------------------------------------------------------------

#: target layers of one input size for moracl's VeRA (PEFT slices one shared projection)
WRITE_TARGETS = {"gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "intermediate.dense"]}


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize(
    "config",
    [
        {"kind": "lora", "alpha": 6.0},
        {"kind": "lora", "alpha": 6.0, "rslora": True},
        {"kind": "dora", "alpha": 6.0},
        {"kind": "vera", "rank": 16},
    ],
    ids=["lora", "rslora", "dora", "vera"],
)
def test_format_peft_loads_in_peft_and_back(tmp_path: Path, config: dict, name: str) -> None:
    base = BUILD[name]()
    options = {"rank": 4, **config}
    model = MoRAModel(base, AdapterConfig(**options), target_modules=WRITE_TARGETS[name]).eval()
    randomize_adapters(model)
    folder = model.save_pretrained(tmp_path / "peft", format="peft")
    assert sorted(p.name for p in folder.iterdir()) == [
        LEGACY_CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME
    ]  # fmt: skip
    expected = _out(model, name)
    _close(_out(_load_in_peft(base, folder), name), expected, _out(base, name))
    back = MoRAModel.from_peft(base, folder).eval()  # moracl -> PEFT -> moracl
    assert_close_to_scale(_out(back, name), expected, ATOL)
    assert back.adapter_configs["default"] == model.adapter_configs["default"]


def test_a_vera_adapter_from_peft_is_written_back_to_peft_only(tmp_path: Path) -> None:
    base, wrapped = _peft_folder(tmp_path / "in", "vera", "gpt2")
    ours = MoRAModel.from_peft(base, tmp_path / "in").eval()
    with pytest.raises(ValueError, match=r"VeRA projections read from a PEFT.*format='peft'"):
        ours.save_pretrained(tmp_path / "own")
    ours.save_pretrained(tmp_path / "out", format="peft")
    again = _load_in_peft(base, tmp_path / "out")
    _close(_out(again, "gpt2"), _out(wrapped, "gpt2"), _out(base, "gpt2"))


def test_modules_to_save_are_written(tmp_path: Path) -> None:
    base = mlp()
    config = AdapterConfig(kind="lora", rank=2)
    model = MoRAModel(base, config, target_modules=["0"], modules_to_save=["2"])
    randomize_adapters(model)
    with torch.no_grad():
        model.model[2].weight.add_(0.5)
    folder = model.save_pretrained(tmp_path, format="peft")
    assert json.loads((folder / LEGACY_CONFIG_NAME).read_text())["modules_to_save"] == ["2"]
    _close(_out(_load_in_peft(base, folder), "mlp"), _out(model, "mlp"), _out(base, "mlp"))


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_a_routed_task_is_written_as_one_lora(tmp_path: Path, name: str) -> None:
    base = BUILD[name]()
    router = RouterConfig(type="task", num_tasks=2)
    config = MixtureConfig(kind="lora", rank=2, experts=3, router=router)
    model = MoRAModel(base, config, target_modules=TARGETS[name]).eval()
    randomize_adapters(model)
    args, kwargs = _inputs(name)
    rows = (args[0] if args else kwargs["input_ids"]).shape[0]
    with torch.no_grad():
        out = model(*args, task_ids=torch.ones(rows, dtype=torch.long), **kwargs)
    expected = out if isinstance(out, Tensor) else out.logits
    folder = model.save_pretrained(tmp_path / "a", format="peft", task_id=1)
    _close(_out(_load_in_peft(base, folder), name), expected, _out(base, name))
    back = MoRAModel.from_peft(base, folder).eval()
    assert_close_to_scale(_out(back, name), expected, ATOL)
    alias = model.export_task_peft(tmp_path / "b", 1)
    for file in (LEGACY_CONFIG_NAME, WEIGHTS_NAME):
        assert (alias / file).read_bytes() == (folder / file).read_bytes()


def test_several_adapters_go_into_peft_subfolders(tmp_path: Path) -> None:
    base = tiny_gpt2()
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=4), target_modules=["c_attn"])
    model.add_adapter("other", AdapterConfig(kind="dora", rank=2), target_modules=["c_proj"])
    randomize_adapters(model)
    model.eval()
    folder = model.save_pretrained(tmp_path, format="peft")
    assert (folder / LEGACY_CONFIG_NAME).is_file() and (folder / "other" / WEIGHTS_NAME).is_file()
    loaded = _load_in_peft(base, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.load_adapter(folder / "other", adapter_name="other")
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        loaded.set_adapter(adapter)
        _close(_out(loaded, "gpt2"), _out(model, "gpt2"), _out(base, "gpt2"))


def test_load_adapter_folder_adds_a_peft_adapter(tmp_path: Path) -> None:
    base, wrapped = _peft_folder(tmp_path / "p", "dora", "gpt2")
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=2), target_modules=["c_attn"])
    load_adapter_folder(model, tmp_path / "p", "second")
    assert model.active_adapters == ("default",)
    model.set_adapter("second")
    _close(_out(model.eval(), "gpt2"), _out(wrapped, "gpt2"), _out(base, "gpt2"))
    mine = MoRAModel(base, AdapterConfig(kind="vera", rank=8), target_modules=["c_fc"])
    randomize_adapters(mine)
    mine.save_pretrained(tmp_path / "m")
    load_adapter_folder(model, tmp_path / "m", "third")
    model.set_adapter("third")
    torch.testing.assert_close(_out(model, "gpt2"), _out(mine.eval(), "gpt2"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="'third' already exists"):
        load_adapter_folder(model, tmp_path / "m", "third")


def test_the_load_adapter_method_takes_a_peft_folder(tmp_path: Path) -> None:
    """PEFT's method name on moracl's model: ``model.load_adapter(peft_dir, name)``."""
    base, wrapped = _peft_folder(tmp_path / "p", "lora", "gpt2")
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=2), target_modules=["c_attn"])
    paths = model.load_adapter(tmp_path / "p", "theirs")
    assert paths == model.adapter_targets["theirs"] and paths
    assert model.active_adapters == ("default",)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".theirs." in n)
    model.set_adapter("theirs")
    _close(_out(model.eval(), "gpt2"), _out(wrapped, "gpt2"), _out(base, "gpt2"))
    with pytest.raises(ValueError, match="saved_name"):
        model.load_adapter(tmp_path / "p", "again", saved_name="default")


# -- moracl's own format ----------------------------------------------------------------------


def test_moracl_folders_do_not_collide_with_peft(tmp_path: Path) -> None:
    base = mlp()
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=2))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "a", format="peft")
    folder = model.save_pretrained(tmp_path / "a")  # over the PEFT folder: its config goes
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS_NAME, MANIFEST_NAME, CONFIG_NAME]
    with pytest.raises(ValueError, match=r"Can't find|adapter_config"):
        _load_in_peft(base, folder)
    model.save_pretrained(folder, format="peft")  # and back: moracl's config goes
    assert not (folder / CONFIG_NAME).exists()


def test_folders_of_earlier_versions_still_load(tmp_path: Path) -> None:
    """An earlier moracl named its config ``adapter_config.json``."""
    base = mlp()
    model = MoRAModel(base, AdapterConfig(kind="mora", rank=4))
    randomize_adapters(model)
    folder = model.save_pretrained(tmp_path)
    (folder / CONFIG_NAME).rename(folder / LEGACY_CONFIG_NAME)
    names = (LEGACY_CONFIG_NAME, WEIGHTS_NAME)
    write_manifest(folder, {n: (folder / n).read_bytes() for n in names})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = MoRAModel.from_pretrained(base, folder)
    torch.testing.assert_close(_out(again, "mlp"), _out(model, "mlp"), rtol=0, atol=0)


# -- refused ----------------------------------------------------------------------------------


def _edit(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((folder / LEGACY_CONFIG_NAME).read_text())
    edit(config)
    (folder / LEGACY_CONFIG_NAME).write_text(json.dumps(config))


def test_an_unknown_peft_type_is_named(tmp_path: Path) -> None:
    base = mlp()
    config = peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"])
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    expected = r"peft_type='IA3' is not supported.*\['LORA', 'VERA', 'ADALORA'\]"
    with pytest.raises(ValueError, match=expected):
        MoRAModel.from_peft(base, tmp_path)
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        MoRAModel.from_pretrained(base, tmp_path)


def test_a_pickled_adapter_is_refused(tmp_path: Path) -> None:
    base = mlp()
    config = peft.LoraConfig(r=2, target_modules=["0"])
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(
        tmp_path, safe_serialization=False
    )
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(ValueError, match=r"adapter_model.bin, a pickle.*never unpickles"):
        MoRAModel.from_peft(base, tmp_path)


def test_rank_patterns_giving_layers_different_ranks_are_refused(tmp_path: Path) -> None:
    base, _ = _peft_folder(tmp_path, "lora", "mlp", rank_pattern={"2": 2})
    with pytest.raises(ValueError, match=r"rank_pattern=\{'2': 2\}.*different \(rank, alpha\)"):
        MoRAModel.from_peft(base, tmp_path)


def test_mismatched_targets_are_named(tmp_path: Path) -> None:
    base, _ = _peft_folder(tmp_path, "lora", "gpt2")
    from transformers import GPT2Config, GPT2LMHeadModel

    shallow = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=101))
    with pytest.raises(ValueError, match=r"adapt layer 'transformer.h.1.attn.c_attn', which the"):
        MoRAModel.from_peft(shallow, tmp_path)
    _edit(tmp_path, lambda c: c.update(target_modules=["c_attn", "c_fc"]))
    with pytest.raises(ValueError, match=r"target_modules=\[.*'c_fc'.*\] selects layers \['tr"):
        MoRAModel.from_peft(base, tmp_path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"bias": "lora_only"}, r"bias='lora_only'.*only bias='none'"),
        ({"layers_to_transform": [0]}, r"layers_to_transform=\[0\] has no moracl equivalent"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' rewrote the base"),
        ({"r": "four"}, r"r must be an integer, got 'four'"),
        ({"lora_alpha": -1}, r"alpha must be"),
    ],
)
def test_options_moracl_cannot_honour_are_named(tmp_path: Path, edit: dict, match: str) -> None:
    base, _ = _peft_folder(tmp_path, "lora", "mlp")
    _edit(tmp_path, lambda c: c.update(edit))
    with pytest.raises(ValueError, match=match):
        MoRAModel.from_peft(base, tmp_path)


def test_tensors_of_other_layers_or_kinds_are_named(tmp_path: Path) -> None:
    base, _ = _peft_folder(tmp_path, "lora", "mlp")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.model.0.lora_embedding_A"] = torch.zeros(2, 3)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"'base_model.model.0.lora_embedding_A' is neither"):
        MoRAModel.from_peft(base, tmp_path)


def test_what_peft_cannot_hold_is_refused_before_writing(tmp_path: Path) -> None:
    base = mlp()
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=2), target_modules=["0"])
    model.add_adapter("m", AdapterConfig(kind="mora", rank=4), target_modules=["2"])
    with pytest.raises(ValueError, match=r"adapter 'm' is a mora adapter, which PEFT cannot"):
        model.save_pretrained(tmp_path / "a", format="peft")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match=r"format must be one of \['moracl', 'peft'\], got 'pef'"):
        model.save_pretrained(tmp_path / "a", format="pef")
    topk = MixtureConfig(kind="lora", rank=2, experts=4, router=RouterConfig(type="topk", k=2))
    mixed = MoRAModel(base, topk, target_modules=["0"])
    with pytest.raises(ValueError, match="mixture of experts adapter, which PEFT cannot"):
        mixed.save_pretrained(tmp_path / "b", format="peft")
    with pytest.raises(ValueError, match="only task-routed mixtures"):
        mixed.save_pretrained(tmp_path / "b", format="peft", task_id=0)
    vera = MoRAModel(base, AdapterConfig(kind="vera", rank=4), target_modules=["0", "2"])
    with pytest.raises(ValueError, match=r"layer '0' \(24 -> 40\) has projections of its own"):
        vera.save_pretrained(tmp_path / "c", format="peft")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_peft_folder_moracl_wrote_is_checksummed(tmp_path: Path) -> None:
    model = MoRAModel(mlp(), AdapterConfig(kind="lora", rank=2))
    folder = model.save_pretrained(tmp_path / "a", format="peft")
    raw = bytearray((folder / WEIGHTS_NAME).read_bytes())
    raw[-1] ^= 1
    (folder / WEIGHTS_NAME).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="changed or corrupted"):
        MoRAModel.from_peft(mlp(), folder)
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        MoRAModel.from_peft(mlp(), folder)
