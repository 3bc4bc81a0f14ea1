"""moracl inside other libraries' loops: an Avalanche script in its usual form, learn2learn's
MAML on a MoRAModel, and moracl's learner on what learn2learn and Hugging Face users pass."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from avalanche.training.templates.base import PositionalArgumentsDeprecatedWarning
from torch import Tensor, nn

from moracl import AdapterConfig, MixtureConfig, MoRAModel
from moracl.continual import ContinualClassifier, FastTemplate, GrowthConfig, MoRAStrategy
from moracl.continual.strategy import materialize
from moracl.experts import TopKRouterConfig
from moracl.meta import MAML, split_task

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import learn2learn as l2l


# -- Avalanche ------------------------------------------------------------------------------
def _benchmark() -> Any:
    from moracl_scenarios.streams import tensor_benchmark

    g = torch.Generator().manual_seed(0)

    def part(classes: tuple[int, int], n: int) -> tuple[Tensor, Tensor]:
        y = torch.tensor(classes).repeat(n // 2)
        centres = 3 * F.one_hot(y, 6).float()  # one direction per class
        return 0.5 * torch.randn(n, 6, generator=g) + centres, y

    return tensor_benchmark(
        [part((0, 1), 24), part((2, 3), 24)], [part((0, 1), 10), part((2, 3), 10)]
    )


def _classifier(bench: Any) -> ContinualClassifier:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16))
    mixture = MixtureConfig(
        kind="lora", rank=2, experts=1, router=TopKRouterConfig(k=1, noise=False)
    )
    encoder = MoRAModel(base, mixture, target_modules=["0", "2"])
    classes = [e.classes_in_this_experience for e in bench.train_stream]
    return ContinualClassifier(encoder, 16, classes, multi_head=False)


def _experts(model: ContinualClassifier) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".banks." in n}


def test_an_avalanche_script_in_its_usual_form_grows_and_reports_accuracy(capsys) -> None:  # type: ignore[no-untyped-def]
    bench = _benchmark()
    model = _classifier(bench)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    # positional, as in Avalanche's examples: Avalanche maps them (and warns, as for Naive)
    with pytest.warns(PositionalArgumentsDeprecatedWarning):
        strategy = MoRAStrategy(
            model,
            optimizer,
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=8,
            train_epochs=3,
            eval_mb_size=16,
            device="cpu",
        )
    assert strategy.growth == GrowthConfig(
        adapter=AdapterConfig(kind="lora", rank=2), experts=1
    )  # as the model started: one LoRA expert of rank 2 per experience
    before: dict[str, Tensor] = {}
    results: dict[str, Any] = {}
    for i, exp in enumerate(bench.train_stream):
        before = _experts(model)
        strategy.train(exp)
        results = strategy.eval(bench.test_stream)
        for _, mixture in model.encoder.mixtures():  # type: ignore[operator]
            assert mixture.num_experts == i + 1
    assert "Top1_Acc_Epoch" in capsys.readouterr().out  # Avalanche's interactive logger
    # the experts of experience 0 are frozen and kept exactly; experience 1's trained
    after = _experts(model)
    old = [n for n in after if ".banks.0." in n]
    new = [n for n in after if ".banks.1." in n]
    assert old and new and set(before) == set(old)
    params = dict(model.named_parameters())
    for n in old:
        assert not params[n].requires_grad and torch.equal(before[n], after[n]), n
    assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in new if "B" in n)
    # the optimiser passed trains on, with the new experts in it
    assert strategy.optimizer is optimizer
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(params[n]) in held for n in new)
    # the default evaluator's stream accuracy is the model's accuracy on the test stream
    model.eval()
    right = total = 0
    with torch.no_grad():
        for exp in bench.test_stream:
            x, y, t = materialize(exp.dataset)
            right += int((model(x, t).argmax(-1) == y).sum())
            total += len(y)
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert accuracy == pytest.approx(right / total)
    assert results["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001"] > 0.5  # it learned
    assert "Loss_Stream/eval_phase/test_stream/Task000" in results


def test_moracl_runs_keep_their_quiet_evaluator() -> None:
    from moracl.continual.config import RunConfig
    from moracl.continual.strategies import build_strategy

    bench = _benchmark()
    mine = FastTemplate(
        model=_classifier(bench), optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    )
    names = {type(m).__name__ for m in mine.evaluator.metrics}
    assert {"StreamAccuracy", "StreamLoss"} <= names  # Avalanche's default evaluator
    for name in ("naive", "moracl"):
        run = build_strategy(name, RunConfig(), _classifier(bench), torch.device("cpu"))
        assert run.evaluator.metrics == [] and run.evaluator.loggers == []


def test_wrong_models_and_optimizers_are_refused_with_what_to_pass() -> None:
    bench = _benchmark()
    model = _classifier(bench)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    bare = model.encoder
    with pytest.raises(TypeError, match=r"ContinualClassifier, got a MoRAModel; build one: "):
        MoRAStrategy(model=bare, optimizer=sgd)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got Linear; build one: ContinualClassifier\(MoRAModel"):
        MoRAStrategy(model=nn.Linear(6, 4), optimizer=sgd)  # type: ignore[arg-type]
    plain = ContinualClassifier(nn.Linear(6, 16), 16, [[0, 1], [2, 3]], multi_head=False)
    with pytest.raises(TypeError, match="got a Linear encoder"):
        MoRAStrategy(model=plain, optimizer=sgd)
    single = MoRAModel(nn.Sequential(nn.Linear(6, 16)), AdapterConfig(kind="lora", rank=2))
    one = ContinualClassifier(single, 16, [[0, 1], [2, 3]], multi_head=False)
    with pytest.raises(ValueError, match="has none: build it with a MixtureConfig adapter"):
        MoRAStrategy(model=one, optimizer=sgd)
    with pytest.raises(TypeError, match=r"needs an optimizer: pass a torch optimizer"):
        MoRAStrategy(model=model)
    with pytest.raises(ValueError, match="an optimizer or an optimizer_factory, not both"):
        MoRAStrategy(model=model, optimizer=sgd, optimizer_factory=lambda m: sgd)
    with pytest.raises(TypeError, match=r"got function \(a function building one goes to"):
        MoRAStrategy(model=model, optimizer=lambda m: sgd)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="growth must be a GrowthConfig or None, got dict"):
        MoRAStrategy(model=model, optimizer=sgd, growth={"experts": 2})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="FastTemplate needs an optimizer"):
        FastTemplate(model=model)


# -- learn2learn ----------------------------------------------------------------------------
def _meta_model(kind: str) -> MoRAModel:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    model = MoRAModel(base, AdapterConfig(kind=kind, rank=4), target_modules=["0", "2"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    return model


def _fused_nodes(out: Tensor) -> set[str]:
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return {n for n in names if n.startswith("_") and "Linear" in n}


@pytest.mark.parametrize("kind", ["lora", "mora"])
def test_learn2learn_second_order_maml_gives_moracls_meta_gradients(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(6, 6, generator=g).double(), torch.randn(9, 6, generator=g).double()
    ys, yq = torch.arange(6) % 3, torch.arange(9) % 3
    model = _meta_model(kind)
    assert _fused_nodes(model(xs))  # trained as usual, the layers take their fused nodes
    reference = copy.deepcopy(model)

    maml = l2l.algorithms.MAML(model, lr=0.3, first_order=False, allow_nograd=True)
    learner = maml.clone()  # no plain_autograd(): the fused nodes step aside by themselves
    for _ in range(2):
        learner.adapt(F.cross_entropy(learner(xs), ys))
    F.cross_entropy(learner(xq), yq).backward()

    ours = MAML(reference, inner_lr=0.3)
    ours.meta_loss((xs[None], ys[None], xq[None], yq[None]), inner_steps=2).backward()
    pairs = [
        (n, p.grad, q.grad)
        for (n, p), q in zip(model.named_parameters(), reference.parameters())
        if p.requires_grad
    ]
    assert pairs
    for name, theirs, mine in pairs:
        assert theirs is not None and mine is not None and float(mine.abs().max()) > 0
        torch.testing.assert_close(theirs, mine, rtol=1e-6, atol=1e-12, msg=name)
    # first order differs: the second-order terms were there
    first = copy.deepcopy(reference)
    first.zero_grad()
    MAML(first, inner_lr=0.3, first_order=True).meta_loss(
        (xs[None], ys[None], xq[None], yq[None]), inner_steps=2
    ).backward()
    assert any(
        not torch.allclose(p.grad, q.grad)
        for p, q in zip(first.parameters(), reference.parameters())
        if p.grad is not None
    )


def _taskset(ways: int, per_class: int) -> Any:
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(8).repeat_interleave(per_class)
    data = torch.randn(labels.numel(), 6, generator=g).double() + labels[:, None].double()
    dataset = l2l.data.MetaDataset(torch.utils.data.TensorDataset(data, labels))
    transforms = [
        l2l.data.transforms.NWays(dataset, ways),
        l2l.data.transforms.KShots(dataset, per_class),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
    ]
    return l2l.data.TaskDataset(dataset, transforms, num_tasks=20)


def test_meta_loss_takes_a_learn2learn_task_split_as_partition_task_splits_it() -> None:
    from learn2learn.data.utils import partition_task

    taskset = _taskset(ways=3, per_class=5)
    maml = MAML(_meta_model("lora"), inner_lr=0.3)
    task = taskset.sample()
    assert isinstance(task, list) and len(task) == 2
    x, y = task
    (xs, ys), (xq, yq) = partition_task(x, y, shots=2)
    expected = maml.meta_loss((xs[None], ys[None], xq[None], yq[None]), inner_steps=2)
    for given in (task, tuple(task)):
        got = maml.meta_loss(given, inner_steps=2, shots=2)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    episode = split_task(x, y, shots=2)
    assert torch.equal(episode.xs, xs) and torch.equal(episode.yq, yq)
    with pytest.raises(ValueError, match="pass shots=K"):
        maml.meta_loss(task)
    with pytest.raises(ValueError, match="shots splits a task"):
        maml.meta_loss((xs[None], ys[None], xq[None], yq[None]), shots=2)
    with pytest.raises(ValueError, match=r"more than 5\) in every class"):
        maml.meta_loss(task, shots=5)


def test_the_learner_takes_a_hugging_face_models_attention_mask() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=101,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    bert = BertForSequenceClassification(cfg).double()
    model = MoRAModel(
        bert,
        AdapterConfig(kind="lora", rank=2),
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    ids = torch.randint(1, 101, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[:2, 4:] = 0  # two padded rows
    y = torch.tensor([0, 1, 2, 1])
    maml = MAML(model, inner_lr=0.5)
    learner = maml.clone()
    learner.adapt(F.cross_entropy(learner(ids, attention_mask=mask).logits, y))
    adapted = learner(input_ids=ids, attention_mask=mask).logits  # (4, 3)

    # the reference: one SGD step on a copy, by plain autograd
    ref = copy.deepcopy(model).eval()
    trained = [p for p in ref.parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        F.cross_entropy(ref(input_ids=ids, attention_mask=mask).logits, y), trained
    )
    with torch.no_grad():
        for p, gp in zip(trained, grads):
            p -= 0.5 * gp
        expected = ref(input_ids=ids, attention_mask=mask).logits
        unmasked = ref(input_ids=ids).logits
    torch.testing.assert_close(adapted, expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(unmasked[:2], expected[:2])  # the mask was applied


def test_learn2learn_second_order_maml_on_a_mixture_equals_plain_autograd() -> None:
    """A learn2learn clone of a mixture of LoRA experts steps around the fused routed node by
    itself: its meta-gradients equal those computed entirely in plain autograd."""
    from moracl.adapters.fused import plain_autograd
    from moracl.experts import ExpertGroup

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    config = MixtureConfig(
        groups=(ExpertGroup(AdapterConfig(kind="lora", rank=2), 4),),
        router=TopKRouterConfig(k=2, noise=False),  # deterministic routing
    )
    model = MoRAModel(base, config, target_modules=["0"]).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(6, 6, generator=g).double(), torch.randn(9, 6, generator=g).double()
    ys, yq = torch.arange(6) % 3, torch.arange(9) % 3

    def meta_step(m: MoRAModel) -> None:
        learner = l2l.algorithms.MAML(m, lr=0.3, first_order=False, allow_nograd=True).clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(xs), ys))
        F.cross_entropy(learner(xq), yq).backward()

    meta_step(model)
    with plain_autograd():
        meta_step(reference)
    pairs = [
        (n, p.grad, q.grad)
        for (n, p), q in zip(model.named_parameters(), reference.parameters())
        if p.requires_grad
    ]
    assert pairs and all(mine is not None and mine.abs().max() > 0 for _, mine, _ in pairs)
    for name, mine, theirs in pairs:
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12, msg=name)
