"""QLoRA (:mod:`moracl.quant`): a frozen base stored in NF4 under every adapter kind.

References: torchao's own dequantisation (``NF4Tensor.get_original_weight()``) for the stored
weights, and a float model whose weights *are* those dequantised weights for the outputs and
gradients of the adapted model (equal up to float rounding); the error against the original
full-precision weights is measured too, as the number the docs quote.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from moracl import AdapterConfig, MoRAModel
from moracl.adapters.base import ADAPTERS
from moracl.config import FinetuneConfig, from_dict, load_config
from moracl.experts.mixture import MixtureConfig
from moracl.layer import MoRALayer
from moracl.quant import (
    BaseQuantization,
    dequantize_base,
    is_nf4,
    nf4_footprint,
    nf4_torchao,
    quantize_base,
)
from tests.conftest import randomize_adapters, tiny_gpt2

if importlib.util.find_spec("torchao") is None:
    pytest.skip("needs torchao (pip install 'moracl[quant]')", allow_module_level=True)
NF4Tensor, to_nf4 = nf4_torchao().NF4Tensor, nf4_torchao().to_nf4

SCALER = 4  # scales per int8 block: small enough for the tiny layers below


def mlp() -> nn.Module:
    """Three float layers of 64·128, 128·128 and 128·64 weights (multiples of 64 · 4)."""
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 64)
    )


def kind_configs() -> list[AdapterConfig | MixtureConfig]:
    """Every registered kind at its defaults, and a top-2 mixture of LoRA experts."""
    out: list[AdapterConfig | MixtureConfig] = [
        AdapterConfig(kind=k) for k in sorted(ADAPTERS.names())
    ]
    out.append(MixtureConfig(kind="lora", rank=4, experts=4, router={"type": "topk", "k": 2}))
    return out


def _id(config: AdapterConfig | MixtureConfig) -> str:
    return f"mixture-{config.kind}" if isinstance(config, MixtureConfig) else config.kind


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# -- the stored weights -----------------------------------------------------------------------
def test_the_stored_weights_are_torchaos_nf4_and_dequantise_exactly() -> None:
    base = mlp()
    q = quantize_base(base, scaler_block_size=SCALER)
    for path in ("0", "2", "4"):
        w = base.get_submodule(path).weight
        stored = q.get_submodule(path).weight
        assert isinstance(stored, NF4Tensor) and not stored.requires_grad
        assert (stored.block_size, stored.scaler_block_size) == (64, SCALER)
        reference = to_nf4(w.detach(), 64, SCALER).get_original_weight()
        assert torch.equal(stored.get_original_weight(), reference)
        assert torch.equal(dequantize_base(q).get_submodule(path).weight, reference)
        assert q.get_submodule(path).bias is base.get_submodule(path).bias  # shared, unchanged
    foot = nf4_footprint(q)
    assert foot.layers == 3 and foot.weights == 64 * 128 * 2 + 128 * 128
    # 4-bit codes, one int8 scale per 64 weights, one float per 4 scales
    assert foot.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * SCALER))
    assert foot.dense_bytes == 4 * foot.weights


def test_quantisation_error_against_the_full_precision_weights() -> None:
    """The number the docs quote: NF4 (64/256) keeps a Kaiming-uniform weight to a relative
    error of about 0.09, and a layer's output inherits about that much."""
    layer = nn.Linear(512, 512)
    q = quantize_base(nn.Sequential(layer)).get_submodule("0")
    w, wq = layer.weight.detach(), q.weight.get_original_weight()
    rel = (torch.linalg.norm(wq - w) / torch.linalg.norm(w)).item()
    assert 0.07 < rel < 0.11
    x = torch.randn(256, 512)
    out_rel = (torch.linalg.norm(q(x) - layer(x)) / torch.linalg.norm(layer(x))).item()
    assert 0.05 < out_rel < 0.11


def test_gpt2_conv1d_layers_become_linear_with_the_transposed_weight() -> None:
    gpt = tiny_gpt2()
    q = quantize_base(gpt, scaler_block_size=SCALER)
    conv = gpt.get_submodule("transformer.h.0.attn.c_attn")  # Conv1D stores (i × o)
    lin = q.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (32, 96)
    ref = to_nf4(conv.weight.detach().t().contiguous(), 64, SCALER).get_original_weight()
    assert torch.equal(lin.weight.get_original_weight(), ref)
    assert not is_nf4(q.get_submodule("lm_head").weight)  # the output layer stays float
    ids = torch.randint(0, 101, (2, 7))
    assert torch.allclose(q(ids).logits, dequantize_base(q)(ids).logits, atol=1e-5)


# -- adapters on the NF4 base -----------------------------------------------------------------
@pytest.mark.parametrize("config", kind_configs(), ids=_id)
def test_every_kind_trains_on_nf4_as_on_the_dequantised_float_base(
    config: AdapterConfig | MixtureConfig,
) -> None:
    """Forward, input gradient and adapter gradients of the adapted NF4 model against the same
    adapters on the float model whose weights are the dequantised ones: equal to rounding."""
    base = mlp()
    q = quantize_base(base, scaler_block_size=SCALER)
    ref = dequantize_base(q)
    assert not any(is_nf4(p) for p in ref.parameters())
    targets = ["0", "4"]  # "2" stays quantised and unadapted
    torch.manual_seed(1)
    model = MoRAModel(q, config, target_modules=targets).train()
    randomize_adapters(model, 0.1)
    torch.manual_seed(1)
    plain = MoRAModel(ref, config, target_modules=targets).train()
    plain.load_adapter_tensors(model.adapter_state_dict())
    x = torch.randn(6, 64)
    outs, grads = [], []
    for m in (model, plain):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(2)  # the same router noise and dropout masks
        y = m(xi)
        (y.square().sum() + y.sum()).backward()
        outs.append(y.detach())
        grads.append({"input": xi.grad, **{n: p.grad for n, p in _trainable(m).items()}})
    assert outs[0].abs().max() > 0.1
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 1
    for name, g in grads[0].items():
        assert g is not None and g.abs().max() > 0, name
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-5, msg=name)
    for _, layer in model.adapted_layers():
        assert is_nf4(layer.base_layer.weight)  # still 4-bit after training


def test_the_backward_keeps_no_dense_copy_of_the_frozen_weight() -> None:
    """Memory: what autograd saves for the backward holds the NF4 weights, never a dense
    ``(o × i)`` copy of them (LoRA, whose fused node would otherwise save the weight)."""
    q = quantize_base(mlp(), scaler_block_size=SCALER)
    model = MoRAModel(q, AdapterConfig(kind="lora", rank=4), target_modules=["0", "2", "4"])
    weights = {(128, 64), (128, 128), (64, 128)}
    saved: list[Tensor] = []

    def keep(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    x = torch.randn(3, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = model(x)
    y.sum().backward()
    assert x.grad is not None
    nf4 = [t for t in saved if is_nf4(t)]
    dense = [t for t in saved if not is_nf4(t) and tuple(t.shape) in weights]
    assert len(nf4) == 3 and dense == []


# -- save, load, merge --------------------------------------------------------------------------
def test_save_load_and_merge_round_trip(tmp_path: Path) -> None:
    base = mlp()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    objects = {n: p for n, p in base.named_parameters()}
    q = quantize_base(base, scaler_block_size=SCALER)
    model = MoRAModel(q, AdapterConfig(kind="dora", rank=4), target_modules=["0", "4"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(5, 64)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    y = model(x).detach()
    model.save_pretrained(tmp_path / "adapter")
    saved = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert saved < 64 * 128 * 4  # the adapters only, not the base

    again = MoRAModel.from_pretrained(
        quantize_base(base, scaler_block_size=SCALER), tmp_path / "adapter"
    )
    assert torch.equal(again.eval()(x), y)

    merged = model.merge_and_unload()
    assert not any(is_nf4(p) for p in merged.parameters())  # ordinary float weights
    assert not any(isinstance(m, MoRALayer) for m in merged.modules())
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    model.unmerge()
    assert torch.equal(model(x), y)
    # the user's model: same parameter objects and values, never quantised
    for n, p in base.named_parameters():
        assert p is objects[n] and torch.equal(p, before[n]) and not is_nf4(p)


# -- checks and errors ---------------------------------------------------------------------------
def test_bad_input_is_refused_with_the_value_named() -> None:
    with pytest.raises(ValueError, match=r"block_size must be even .* got 3"):
        quantize_base(mlp(), block_size=3)
    with pytest.raises(ValueError, match=r"scaler_block_size must be > 0, got 0"):
        quantize_base(mlp(), scaler_block_size=0)
    with pytest.raises(ValueError, match=r"multiple of block_size · scaler_block_size = 16384"):
        quantize_base(mlp())  # QLoRA's 64 · 256 does not divide the tiny layers
    odd = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 3))
    with pytest.raises(ValueError, match=r"\['1 \(128 -> 3: 384 weights\)'\]"):
        quantize_base(odd, scaler_block_size=SCALER)
    quantize_base(odd, scaler_block_size=SCALER, exclude_modules=["1"])  # left out: fine
    bad = mlp()
    with torch.no_grad():
        bad[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '2': its weight holds non-finite values"):
        quantize_base(bad, scaler_block_size=SCALER)
    adapted = MoRAModel(mlp(), AdapterConfig(kind="lora", rank=2))
    with pytest.raises(TypeError, match=r"MoRAModel\(quantize_base\(model\), config\)"):
        quantize_base(adapted)


def test_a_quantised_model_is_quantised_once() -> None:
    q = quantize_base(mlp(), scaler_block_size=SCALER)
    twice = quantize_base(q, scaler_block_size=SCALER)
    for path in ("0", "2", "4"):
        assert twice.get_submodule(path).weight is q.get_submodule(path).weight


# -- the job key ---------------------------------------------------------------------------------
def test_the_finetune_key_and_validate(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from moracl.cli import main
    from moracl.jobs import finetune

    yaml = Path(__file__).resolve().parents[1] / "configs" / "wordnet_finetune.yaml"
    config = load_config(yaml, ["quantize_base=nf4"])
    assert isinstance(config, FinetuneConfig)
    assert config.quantize_base is BaseQuantization.NF4
    assert from_dict(FinetuneConfig, {}).quantize_base is None
    with pytest.raises(ValueError, match=r"quantize_base: expected one of \['nf4'\], got 'int4'"):
        from_dict(FinetuneConfig, {"quantize_base": "int4"})
    with pytest.raises(ValueError, match=r"quantize_base must be one of \['nf4'\] or null"):
        FinetuneConfig(quantize_base="int4")  # type: ignore[arg-type]
    assert main(["validate", str(yaml), "quantize_base=nf4"]) == 0
    assert "valid FinetuneConfig" in capsys.readouterr().out
    # without torchao: validate names the install command
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ImportError, match=r"quantize_base=nf4 needs torchao: pip install torchao"):
        finetune.check(config)
    finetune.check(load_config(yaml))  # type: ignore[arg-type]  # no quantisation, no torchao
    assert main(["validate", str(yaml), "quantize_base=nf4"]) != 0
    assert "pip install torchao" in capsys.readouterr().err


class WideEncoder(nn.Module):
    """Embeddings and a residual ``value(query(h))`` block of width 128 (16384 weights per
    layer: QLoRA's block sizes fit): ``(b, n) -> (b, n, 128)``."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(hidden_size=128)
        self.embed = nn.Embedding(vocab + 1, 128)
        self.query, self.value = nn.Linear(128, 128), nn.Linear(128, 128)
        self.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Any:
        from types import SimpleNamespace

        h = self.embed(input_ids)  # (b, n, d)
        return SimpleNamespace(last_hidden_state=h + torch.tanh(self.value(self.query(h))))


def test_the_finetune_job_trains_on_an_nf4_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``moracl finetune ... quantize_base=nf4`` on a toy task: the encoder's layers are NF4
    while the adapters train, the head stays float, and the saved adapter loads back onto a
    quantised encoder with the job's validation accuracy."""
    pytest.importorskip("datasets", reason="needs the PyPI package 'datasets'")
    import moracl_scenarios.wordnet as wordnet

    from moracl.backbones import SentenceClassifier
    from moracl.jobs import finetune
    from tests.test_finetune_validation import VOCAB, ToyTokenizer, glosses, toy_config

    table = glosses()
    monkeypatch.setattr(wordnet, "load_wordnet_glosses", lambda *a, **k: table)
    built: list[nn.Module] = []

    def backbone(num_classes: int) -> tuple[nn.Module, Any]:
        torch.manual_seed(3)
        built.append(SentenceClassifier(WideEncoder(VOCAB), num_classes))
        return built[-1], ToyTokenizer()

    monkeypatch.setattr(finetune, "_backbone", backbone)
    seen: list[nn.Module] = []
    real = finetune.train_model

    def spy(model: nn.Module, *args: Any, **kw: Any) -> Any:
        seen.append(model)
        return real(model, *args, **kw)

    monkeypatch.setattr(finetune, "train_model", spy)
    config = toy_config(tmp_path / "out", epochs=3)
    config.quantize_base = BaseQuantization.NF4
    result = finetune.run(config, progress=False)
    (model,) = seen
    assert isinstance(model, MoRAModel)
    for path in ("encoder.query", "encoder.value"):
        assert is_nf4(model.model.get_submodule(path).base_layer.weight)
    assert not is_nf4(model.model.get_submodule("head").weight)
    assert not any(is_nf4(p) for p in built[0].parameters())  # the job's own copy was made
    assert result.validation_accuracy is not None and result.validation_accuracy > 0.5
    again = MoRAModel.from_pretrained(
        quantize_base(built[0], exclude_modules=["head"]), tmp_path / "out" / "adapter"
    )
    x = {"input_ids": torch.randint(1, VOCAB, (4, 5)), "attention_mask": torch.ones(4, 5)}
    assert torch.equal(again.eval()(**x), model.eval()(**x))


# -- the benchmark and CUDA ----------------------------------------------------------------------
@pytest.mark.slow
def test_bench_adapters_runs_qlora_beside_lora_on_the_cpu() -> None:
    from moracl.bench.adapters import METHODS, run

    assert METHODS.index("moracl-qlora") == METHODS.index("moracl-lora") + 1
    rows = run("cpu", ["moracl-lora", "moracl-qlora"], 4, 1, 0, torch.device("cpu"))
    lora, qlora = rows
    assert qlora["method"] == "moracl-qlora" and qlora["trainable"] == lora["trainable"] > 0
    assert qlora["ms"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_nf4_base_matches_the_dequantised_base() -> None:
    """Under bf16 autocast the NF4 base is as close to a float32 run on the dequantised
    weights as a bf16 run on those same weights is: the two bf16 paths round in a different
    order (elementwise they differ by a few bf16 ulps), so each is held to the float32 truth."""
    base = mlp().to("cuda", torch.bfloat16)
    q = quantize_base(base, scaler_block_size=SCALER)
    assert q.get_submodule("0").weight.device.type == "cuda"
    ref = dequantize_base(q)
    config = AdapterConfig(kind="lora", rank=4)
    model = MoRAModel(q, config)
    randomize_adapters(model, 0.1)
    plain = MoRAModel(ref, config)
    plain.load_adapter_tensors(model.adapter_state_dict())
    exact = MoRAModel(copy.deepcopy(ref).float(), config)
    exact.load_adapter_tensors({k: v.float() for k, v in model.adapter_state_dict().items()})
    x = torch.randn(8, 64, device="cuda")
    outs = []
    for m, bf16 in ((model, True), (plain, True), (exact, False)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            y = m(x)
        y.float().square().sum().backward()
        outs.append((y.float(), {n: p.grad.float() for n, p in _trainable(m).items()}))
    (y_q, g_q), (y_d, g_d), (y_32, g_32) = outs

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert err(y_q, y_32) <= 2 * err(y_d, y_32) + 1e-3
    for n, g in g_32.items():
        assert err(g_q[n], g) <= 2 * err(g_d[n], g) + 1e-3, n


def test_a_task_routed_mixture_merges_a_task_on_an_nf4_base() -> None:
    """``merged_task_model(t)`` on an NF4 base: a float model equal to the routed forward."""
    torch.manual_seed(0)
    config = MixtureConfig(kind="lora", rank=4, experts=4, router={"type": "task", "num_tasks": 2})
    model = MoRAModel(quantize_base(mlp(), scaler_block_size=SCALER), config)
    randomize_adapters(model)
    x = torch.randn(5, 64)
    for t in (0, 1):
        merged = model.merged_task_model(t)
        assert not any(is_nf4(p) for p in merged.parameters())
        routed = model(x, task_ids=torch.full((5,), t))
        scale = routed.abs().max()  # outputs up to ~50: rounding grows with them
        assert (merged(x) - routed).abs().max() <= 1e-5 * scale
