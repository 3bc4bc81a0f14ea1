"""MoRAModel with transformers: Trainer with default arguments, adapter-only checkpoints,
SAMTrainer against a hand-written SAM step, route() + generate(), PEFT's method names."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from moracl import AdapterConfig, MoRAModel  # noqa: E402
from moracl.experts import MixtureConfig, RouterConfig  # noqa: E402
from moracl.hf import MoRATrainer, SAMTrainer  # noqa: E402
from moracl.optim import MoRAOptimizer, SAMConfig  # noqa: E402

from .conftest import randomize_adapters, tiny_llama  # noqa: E402

VOCAB = 101


def gpt2() -> GPT2LMHeadModel:
    """A tiny GPT-2 without dropout; its output embedding is tied to the input one."""
    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval()


def bert_classifier() -> BertForSequenceClassification:
    cfg = BertConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


def lm_rows(n: int = 16, length: int = 8) -> Any:
    """Causal-LM rows with two columns no model reads (a string and an integer)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": ids.tolist(),
            "text": [f"row {i}" for i in range(n)],
            "source": list(range(n)),
        }
    )


def classifier_rows(n: int = 16, length: int = 8) -> Any:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "label": torch.randint(0, 3, (n,), generator=g).tolist(),
            "text": [f"row {i}" for i in range(n)],
            "source": list(range(n)),
        }
    )


def arguments(out: Path, **overrides: Any) -> TrainingArguments:
    """Default TrainingArguments but for a few steps on the CPU without reporting."""
    return TrainingArguments(
        output_dir=str(out),
        max_steps=overrides.pop("max_steps", 3),
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        **overrides,
    )


def make(kind: str) -> tuple[nn.Module, MoRAModel, Any]:
    if kind == "gpt2":
        base: nn.Module = gpt2()
        model = MoRAModel(base, AdapterConfig(kind="lora", rank=4), target_modules=["c_attn"])
        return base, model, lm_rows()
    base = bert_classifier()
    model = MoRAModel(
        base,
        AdapterConfig(kind="lora", rank=4),
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    return base, model, classifier_rows()


def _kwarg_names(model: MoRAModel) -> list[set[str]]:
    """The keyword names of every call of the wrapped model (filled by a hook)."""
    seen: list[set[str]] = []
    model.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(set(kw)), with_kwargs=True)
    return seen


# -- Trainer --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_trainer_with_default_arguments_saves_adapters_only(tmp_path: Path, kind: str) -> None:
    from safetensors import safe_open

    base, model, data = make(kind)
    if kind == "gpt2":
        assert base.lm_head.weight is base.transformer.wte.weight  # tied, as GPT-2 ships
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = _kwarg_names(model)
    trainer = MoRATrainer(model=model, args=arguments(tmp_path), train_dataset=data)
    trainer.train()

    assert seen and all(not names & {"text", "source"} for names in seen)  # columns dropped
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == (name in trained), name  # adapters (and the head) move, nothing else

    folder = tmp_path / "checkpoint-3"
    assert not (folder / "model.safetensors").exists()
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.adapter_state_dict())
    prefixes = ("classifier.",) if kind == "bert" else ()
    assert all(".adapters.default." in k or k.startswith(prefixes) for k in keys)
    again = MoRAModel.from_pretrained(base, folder)
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(again.adapter_state_dict()[k], v), k
    ids = torch.tensor(data["input_ids"][:2])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("sam", [False, True], ids=["MoRATrainer", "SAMTrainer"])
@pytest.mark.parametrize("bad_step", [1, 3])
def test_a_non_finite_loss_stops_training_and_saves_nothing(
    tmp_path: Path, sam: bool, bad_step: int
) -> None:
    from moracl.guard import NonFiniteError

    _, model, data = make("gpt2")
    args = arguments(tmp_path, max_steps=4, save_steps=1)
    if sam:
        trainer: MoRATrainer = SAMTrainer(
            model=model, args=args, train_dataset=data, sam=SAMConfig(rho=0.05)
        )
    else:
        trainer = MoRATrainer(model=model, args=args, train_dataset=data)
    lora_a = next(p for n, p in model.named_parameters() if n.endswith("lora_A"))

    def poison(_module: nn.Module, _args: Any) -> None:  # the weights go bad before this step
        if trainer.state.global_step + 1 == bad_step:
            with torch.no_grad():
                lora_a.fill_(float("nan"))

    model.register_forward_pre_hook(poison)
    with pytest.raises(NonFiniteError, match=f"training loss is nan at step {bad_step} "):
        trainer.train()
    saved = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert saved == [f"checkpoint-{s}" for s in range(1, bad_step)]  # the good steps' only


def test_plain_trainer_trains_and_evaluates_with_default_arguments(tmp_path: Path) -> None:
    """transformers.Trainer itself: the declared forward keeps the model's columns and
    finds ``labels`` (so evaluation has a loss)."""
    _, model, data = make("bert")
    lora_b = model.model.bert.encoder.layer[0].attention.self.query.adapters.default.lora_B
    start = lora_b.detach().clone()
    trainer = Trainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=data)
    trainer.train()
    assert not torch.equal(lora_b, start)
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate(data)
    with torch.no_grad():
        model.eval()
        out = model(input_ids=torch.tensor(data["input_ids"]), labels=torch.tensor(data["label"]))
    assert metrics["eval_loss"] == pytest.approx(out.loss.item(), rel=1e-5)


def test_resumed_training_reaches_the_weights_of_one_run(tmp_path: Path) -> None:
    def args(out: Path, steps: int) -> TrainingArguments:
        return arguments(out, max_steps=steps, lr_scheduler_type="constant", learning_rate=1e-3)

    _, straight, data = make("gpt2")
    MoRATrainer(model=straight, args=args(tmp_path / "a", 4), train_dataset=data).train()
    _, first, _ = make("gpt2")
    MoRATrainer(model=first, args=args(tmp_path / "b", 2), train_dataset=data).train()
    _, resumed, _ = make("gpt2")
    trainer = MoRATrainer(model=resumed, args=args(tmp_path / "b", 4), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for k, v in straight.adapter_state_dict().items():
        torch.testing.assert_close(resumed.adapter_state_dict()[k], v, rtol=0, atol=1e-6)


def test_trainer_refuses_a_model_that_is_not_a_moramodel(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="MoRATrainer trains a MoRAModel, got GPT2LMHeadModel"):
        MoRATrainer(model=gpt2(), args=arguments(tmp_path), train_dataset=lm_rows())


# -- SAM ------------------------------------------------------------------------------------


def test_sam_trainer_step_equals_a_hand_written_sam_step(tmp_path: Path) -> None:
    base = bert_classifier().double()
    model = MoRAModel(
        base,
        AdapterConfig(kind="lora", rank=4),
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    randomize_adapters(model)
    reference = copy.deepcopy(model)
    data = classifier_rows(n=4)
    lr, rho = 0.01, 0.05
    args = arguments(
        tmp_path,
        max_steps=1,
        learning_rate=lr,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        save_strategy="no",
    )
    SAMTrainer(model=model, args=args, train_dataset=data, sam=SAMConfig(rho=rho)).train()

    # by hand: g at w, ε = ρ g / ‖g‖ over all tensors, g' at w + ε, AdamW's step from w with g'
    reference.train()
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    params = [reference.get_parameter(n) for n in names]
    batch = {
        "input_ids": torch.tensor(data["input_ids"]),
        "attention_mask": torch.tensor(data["attention_mask"]),
        "labels": torch.tensor(data["label"]),
    }
    grads = torch.autograd.grad(reference(**batch).loss, params)
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(rho * g / (norm + 1e-12))
    perturbed = torch.autograd.grad(reference(**batch).loss, params)
    with torch.no_grad():
        for p, w, g in zip(params, start, perturbed):
            p.copy_(w)
            p.grad = g
    torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0).step()

    moved = 0.0
    for n, p, w in zip(names, params, start):
        torch.testing.assert_close(model.get_parameter(n), p, rtol=0, atol=1e-12)
        moved = max(moved, (p - w).abs().max().item())
    assert moved > 1e-3  # the step did something


def test_sam_trainer_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    _, model, data = make("gpt2")
    plain = MoRAOptimizer(model, lr=1e-3)
    with pytest.raises(ValueError, match="MoRAOptimizer without SAM"):
        SAMTrainer(
            model=model, args=arguments(tmp_path), train_dataset=data, optimizers=(plain, None)
        )
    accumulate = arguments(tmp_path, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1, got 2"):
        SAMTrainer(model=model, args=accumulate, train_dataset=data)


def test_sam_trainer_takes_a_moraoptimizer_with_sam(tmp_path: Path) -> None:
    _, model, data = make("gpt2")
    randomize_adapters(model)
    opt = MoRAOptimizer(model, base="sgd", lr=0.05, sam=SAMConfig(rho=0.1))
    start = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    trainer = SAMTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=2, save_strategy="no"),
        train_dataset=data,
        optimizers=(opt, None),
    )
    trainer.train()
    assert trainer.optimizer.state_dict() == opt.state_dict()  # shared state
    assert any(not torch.equal(v, start[k]) for k, v in model.adapter_state_dict().items())


# -- route() and generate() -----------------------------------------------------------------


def _routed(base: nn.Module, targets: list[str]) -> MoRAModel:
    router = RouterConfig(type="task", num_tasks=2, task_weights=True)
    cfg = MixtureConfig(kind="lora", rank=2, experts=4, router=router)
    model = MoRAModel(base, cfg, target_modules=targets).eval()
    randomize_adapters(model, scale=0.5)
    return model


@pytest.mark.parametrize("make_base", ["gpt2", "llama"])
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_under_route_equals_the_merged_task_model(make_base: str, beams: int) -> None:
    base = gpt2() if make_base == "gpt2" else tiny_llama()
    targets = ["c_attn", "c_fc"] if make_base == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    model = _routed(base, targets)
    prompts = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    tasks = torch.tensor([1, 0])
    options = {"max_new_tokens": 6, "do_sample": False, "num_beams": beams, "pad_token_id": 0}
    with torch.no_grad():
        with model.route(tasks):
            routed = model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), **options
            )
        logits = [model(input_ids=prompts, task_ids=torch.tensor([t, t])).logits for t in (0, 1)]
        assert (logits[0] - logits[1]).abs().max() > 1e-2  # the tasks differ
        for row, t in enumerate(tasks.tolist()):
            merged = model.merged_task_model(t).eval()
            one = prompts[row : row + 1]
            expected = merged.generate(
                input_ids=one, attention_mask=torch.ones_like(one), **options
            )
            assert torch.equal(routed[row : row + 1], expected), (row, t)


def test_route_sets_forward_task_ids_and_restores_afterwards() -> None:
    model = _routed(gpt2(), ["c_attn"])
    ids = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        explicit = model(input_ids=ids, task_ids=torch.tensor([0, 1])).logits
        with model.route([0, 1]):
            inside = model(input_ids=ids).logits
            assert all(m.context is not None for _, m in model.mixtures())
        torch.testing.assert_close(inside, explicit, rtol=0, atol=0)
        assert all(m.context is None for _, m in model.mixtures())
        with pytest.raises(ValueError, match="the task router routes by task id: pass task_ids"):
            model(input_ids=ids)  # no task ids outside the block: the task router refuses


def test_route_errors_are_clear() -> None:
    model = _routed(gpt2(), ["c_attn"])
    ids = torch.randint(1, VOCAB, (2, 5))
    with (
        pytest.raises(ValueError, match="3 task ids, which do not divide the 2 rows"),
        model.route([0, 1, 1]),
        torch.no_grad(),
    ):
        model(input_ids=ids)
    bad = r"one integer task id per batch row .* shape \(1, 2\)"
    with pytest.raises(ValueError, match=bad), model.route(torch.tensor([[0, 1]])):
        pass
    plain = MoRAModel(gpt2(), AdapterConfig(kind="lora", rank=2), target_modules=["c_attn"])
    with pytest.raises(ValueError, match="route\\(\\) needs an active mixture"), plain.route([0]):
        pass


# -- PEFT's names ---------------------------------------------------------------------------

PEFT_NAMES = [
    "get_base_model",
    "disable_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "load_adapter",
    "set_adapter",
    "print_trainable_parameters",
    "peft_config",
    "active_adapter",
    "active_adapters",
]


def test_peft_names_exist_on_both() -> None:
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"]))
    ours = MoRAModel(gpt2(), AdapterConfig(kind="lora", rank=2), target_modules=["c_attn"])
    for name in PEFT_NAMES:
        assert hasattr(theirs, name) and hasattr(ours, name), name
    assert ours.active_adapter == theirs.active_adapter == "default"
    assert list(ours.peft_config) == list(theirs.peft_config) == ["default"]


def test_peft_names_behave() -> None:
    base = gpt2()
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=2), target_modules=["c_attn"])
    randomize_adapters(model)
    ids = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        plain = base(input_ids=ids).logits
        assert model.get_base_model() is model.model
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
        model.merge_adapter()
        assert all(layer.merged for _, layer in model.adapted_layers())
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        assert not any(layer.merged for _, layer in model.adapted_layers())
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=0, atol=1e-6)
    assert model.peft_config == model.adapter_configs
    model.peft_config.clear()  # a copy
    assert list(model.adapter_configs) == ["default"]


def test_load_adapter_adds_a_saved_adapter_under_a_new_name(tmp_path: Path) -> None:
    base = gpt2()
    saved = MoRAModel(base, AdapterConfig(kind="lora", rank=2), target_modules=["c_attn"])
    randomize_adapters(saved)
    saved.save_pretrained(tmp_path / "a")
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=4), target_modules=["c_fc"])
    paths = model.load_adapter(tmp_path / "a", "second")
    assert paths == saved.adapter_targets["default"]
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".second." in n)
    ids = torch.randint(1, VOCAB, (2, 5))
    model.set_adapter("second")
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, saved(input_ids=ids).logits, rtol=0, atol=0
        )
    with pytest.raises(ValueError, match="adapter 'second' already exists"):
        model.load_adapter(tmp_path / "a", "second")
    model.save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match=r"holds adapters \['default', 'second'\]; pick one"):
        model.load_adapter(tmp_path / "two", "third")
    model.load_adapter(tmp_path / "two", "third", saved_name="second")
    with pytest.raises(ValueError, match="has no adapter 'nope'"):
        model.load_adapter(tmp_path / "two", "fourth", saved_name="nope")


def test_load_adapter_refuses_modules_to_save(tmp_path: Path) -> None:
    _, model, _ = make("bert")
    model.save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\]"):
        model.load_adapter(tmp_path / "head", "other")


def test_missing_attribute_names_the_wrapper_and_a_close_name() -> None:
    model = MoRAModel(gpt2(), AdapterConfig(kind="lora", rank=2), target_modules=["c_attn"])
    with pytest.raises(AttributeError) as err:
        model.export_peft
    assert str(err.value) == (
        "'MoRAModel' object (wrapping GPT2LMHeadModel) has no attribute 'export_peft'; "
        "did you mean 'export_task_peft'?"
    )
    with pytest.raises(AttributeError) as err:
        model.qqqqqq
    assert str(err.value) == (
        "'MoRAModel' object (wrapping GPT2LMHeadModel) has no attribute 'qqqqqq'"
    )
    assert model.config is model.model.config  # the wrapped model's attributes still come through
