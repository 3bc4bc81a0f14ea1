"""MoRAModel: injection, parity with PEFT, saving and loading, merging, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from moracl import AdapterConfig, MoRALayer, MoRAModel
from tests.numerics import assert_close_to_scale

from .conftest import mlp, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# -- parity with PEFT ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_lora_matches_peft(variant: str) -> None:
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    pcfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights=False,
        use_rslora=variant == "rslora",
        use_dora=variant == "dora",
    )
    reference = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    kind = "dora" if variant == "dora" else "lora"
    ours = MoRAModel(
        base,
        AdapterConfig(kind=kind, rank=4, alpha=8, rslora=variant == "rslora"),
        target_modules=targets,
    ).eval()
    ref_params = dict(reference.named_parameters())
    copied = 0
    with torch.no_grad():
        for path, layer in ours.adapted_layers():
            adapter = layer.adapters["default"]
            prefix = f"base_model.model.{path}"
            adapter.lora_A.copy_(ref_params[f"{prefix}.lora_A.default.weight"])
            adapter.lora_B.copy_(ref_params[f"{prefix}.lora_B.default.weight"])
            copied += 2
            if variant == "dora":
                mag = ref_params[f"{prefix}.lora_magnitude_vector.default.weight"]
                adapter.magnitude.copy_(mag * 1.1)  # also check a trained magnitude
                mag.mul_(1.1)
                copied += 1
    assert copied >= 12
    with torch.no_grad():
        expected = _logits(reference)
        got = _logits(ours)
        plain = _logits(base)
    assert (expected - plain).abs().max() > 1e-3  # the adapters really change the output
    assert_close_to_scale(got, expected, 1e-5)  # two float32 paths


# -- injection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "targets", "expected"),
    [
        (tiny_llama, "all-linear", 14),  # 7 projections x 2 layers, lm_head excluded
        (tiny_gpt2, "all-linear", 8),  # Conv1D: c_attn, c_proj, c_fc, mlp.c_proj
        (tiny_bert, ["query", "value"], 4),
        (tiny_bert, r".*\.attention\.self\.(query|key)", 4),
    ],
)
def test_injection_on_transformers(make, targets, expected: int) -> None:  # type: ignore[no-untyped-def]
    base = make()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = MoRAModel(
        base, AdapterConfig(kind="mora", rank=4, compression="sharing"), target_modules=targets
    )
    assert len(list(model.adapted_layers())) == expected
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    # the caller's model is untouched: same module types, same tensors
    assert not any(isinstance(m, MoRALayer) for m in base.modules())
    randomize_adapters(model)
    with torch.no_grad():
        adapted = _logits(model)
        model.merge()
        merged = _logits(model)
        model.unmerge()
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-4)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in state.items())


def test_trainable_parameters_and_print(capsys: pytest.CaptureFixture[str]) -> None:
    base = mlp(24, 40, 12)
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=2))
    trainable, total = model.trainable_parameters()
    assert trainable == 2 * (24 + 40) + 2 * (40 + 12)
    assert total == trainable + sum(p.numel() for p in base.parameters())
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_training_changes_only_adapters() -> None:
    base = mlp()
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=4), modules_to_save=["2"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(32, 24), torch.randn(32, 12)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    fresh = mlp()
    fresh.load_state_dict(base.state_dict())
    torch.testing.assert_close(fresh(x), base(x))  # the caller's model did not train


def test_merge_and_unload_gives_plain_model() -> None:
    base = tiny_llama()
    model = MoRAModel(base, AdapterConfig(kind="dora", rank=4), target_modules="all-linear")
    randomize_adapters(model)
    with torch.no_grad():
        adapted = _logits(model)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, MoRALayer) for m in plain.modules())
        torch.testing.assert_close(_logits(plain), adapted, rtol=0, atol=1e-4)
        torch.testing.assert_close(_logits(model.unload()), _logits(base), rtol=0, atol=0)


# -- saving and loading ------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"kind": "lora", "rslora": True},
        {"kind": "dora"},
        {"kind": "mora", "compression": "rotation"},
        {"kind": "vera", "projection_seed": 5},
    ],
)
def test_save_then_load_is_bit_exact(tmp_path, options: dict) -> None:  # type: ignore[no-untyped-def]
    base = tiny_gpt2()
    model = MoRAModel(base, AdapterConfig(rank=4, **options), target_modules="all-linear")
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_model.safetensors", "checksums.json", "moracl_config.json"]
    again = MoRAModel.from_pretrained(base, tmp_path / "adapter")
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(v, again.adapter_state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(_logits(again), _logits(model))


def test_several_adapters_and_heads_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = mlp()
    model = MoRAModel(
        base, AdapterConfig(kind="lora", rank=2), target_modules=["0"], modules_to_save=["2"]
    )
    model.add_adapter("extra", AdapterConfig(kind="mora", rank=2), target_modules=["0", "2"])
    model.set_adapter(["default", "extra"])
    randomize_adapters(model)
    with torch.no_grad():
        model.model[2].weight.add_(1.0)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "moracl_config.json").read_text())
    assert set(cfg["adapters"]) == {"default", "extra"} and cfg["modules_to_save"] == ["2"]
    again = MoRAModel.from_pretrained(base, tmp_path)
    x = torch.randn(3, 24)
    assert torch.equal(again(x), model(x))


def test_loading_into_a_different_base_names_layer_and_shapes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    MoRAModel(mlp(24, 40, 12), AdapterConfig(kind="lora", rank=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layer '0'.*\(2, 24\).*\(2, 30\)"):
        MoRAModel.from_pretrained(mlp(30, 40, 12), tmp_path)


def test_corrupt_checkpoint_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    MoRAModel(mlp(), AdapterConfig(kind="lora", rank=2)).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        MoRAModel.from_pretrained(mlp(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        MoRAModel.from_pretrained(mlp(), tmp_path / "nowhere")


# -- errors -------------------------------------------------------------------------------


def test_unknown_kind_and_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown adapter kind 'lorra'.*'lora'"):
        AdapterConfig(kind="lorra", rank=4)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['compresion'\].*compression"):
        AdapterConfig(kind="mora", rank=4, compresion="sharing")
    with pytest.raises(ValueError, match="unknown MoRA compression 'zip'"):
        AdapterConfig(kind="mora", compression="zip")


@pytest.mark.parametrize("rank", [0, -3, 2.5])
def test_bad_rank(rank: object) -> None:
    with pytest.raises(ValueError, match=f"rank must be a positive integer, got {rank!r}"):
        AdapterConfig(kind="lora", rank=rank)


def test_target_that_matches_nothing_lists_modules() -> None:
    with pytest.raises(ValueError, match=r"matched no module; linear modules include .*q_proj"):
        MoRAModel(tiny_llama(), AdapterConfig(kind="lora", rank=2), target_modules=["qq_proj"])
    with pytest.raises(ValueError, match="not nn.Linear/Conv1D"):
        MoRAModel(tiny_llama(), AdapterConfig(kind="lora", rank=2), target_modules=["self_attn"])


# -- the declared forward signature ---------------------------------------------------------


def test_forward_declares_the_wrapped_parameters_and_task_ids() -> None:
    import inspect

    base = tiny_gpt2()
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=2), target_modules=["c_attn"])
    declared = list(inspect.signature(model.forward).parameters)
    wrapped = list(inspect.signature(base.forward).parameters)
    assert isinstance(model, MoRAModel) and type(model).__name__ == "MoRAModel"
    assert declared[: len(wrapped) - 1] == wrapped[:-1] and wrapped[-1] == "kwargs"
    assert declared[-2:] == ["task_ids", "kwargs"]
    plain = MoRAModel(mlp(), AdapterConfig(kind="lora", rank=2))
    assert list(inspect.signature(plain.forward).parameters) == ["input", "task_ids"]
    assert type(plain) is not type(model)  # one class per wrapped class
    again = MoRAModel(mlp(), AdapterConfig(kind="lora", rank=4))
    assert type(again) is type(plain)


def test_copies_and_pickles_keep_the_signature_and_outputs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import inspect
    import pickle

    model = MoRAModel(tiny_gpt2(), AdapterConfig(kind="lora", rank=2), target_modules=["c_attn"])
    randomize_adapters(model)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(other) is type(model)
        assert inspect.signature(other.forward) == inspect.signature(model.forward)
        with torch.no_grad():
            assert torch.equal(_logits(other), _logits(model))


def test_compiled_model_matches_eager() -> None:
    model = MoRAModel(mlp(), AdapterConfig(kind="lora", rank=2))
    randomize_adapters(model)
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, mlp], ids=["llama", "gpt2", "mlp"])
def test_adapted_layers_are_named_modules_order_without_entering_adapted_layers(make) -> None:  # type: ignore[no-untyped-def]
    net = make()
    shared = nn.Linear(24, 24)
    net.add_module("tied_a", shared)  # a module registered twice is listed once, at first
    net.add_module("tied_b", shared)
    model = MoRAModel(net, AdapterConfig(kind="lora", rank=2))
    expected = [(n, m) for n, m in model.model.named_modules() if isinstance(m, MoRALayer)]
    got = list(model.adapted_layers())
    assert [(n, id(m)) for n, m in got] == [(n, id(m)) for n, m in expected]
    assert len(got) > 2 and sum(n.startswith("tied_") for n, _ in got) == 1
