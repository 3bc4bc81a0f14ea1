"""moracl.meta: the MAML family against learn2learn and a sequential loop; episode sampling."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl import AdapterConfig, MoRAModel
from moracl.adapters.fused import plain_autograd
from moracl.meta import ANIL, MAML, EpisodeSampler, MetaSGD, split_classes

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import learn2learn as l2l

D_IN, HIDDEN, WAYS = 5, 8, 3


def make_model(targets: str | list[str] = "all-linear", dropout: float = 0.1) -> MoRAModel:
    """A float64 MLP with LoRA (randomised, so B != 0) and a trained head copy ``"2"``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, WAYS)).double()
    model = MoRAModel(
        base,
        AdapterConfig(kind="lora", rank=2, dropout=dropout),
        target_modules=targets,
        modules_to_save=["2"],
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    return model


MODELS = {"lora-all": "all-linear", "lora-body-plain-head": ["0"]}


def make_tasks(t: int = 3, n_s: int = 6, n_q: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(t, n_s, D_IN, generator=g, dtype=torch.float64)
    xq = torch.randn(t, n_q, D_IN, generator=g, dtype=torch.float64)
    ys = torch.randint(0, WAYS, (t, n_s), generator=g)
    yq = torch.randint(0, WAYS, (t, n_q), generator=g)
    return xs, ys, xq, yq


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sequential_meta_loss(maml: MAML, tasks: tuple[Tensor, ...], steps: int) -> Tensor:
    """The reference: moracl's clone/adapt loop, one task at a time."""
    xs, ys, xq, yq = tasks
    losses = []
    for i in range(xs.shape[0]):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(xs[i]), ys[i]))
        losses.append(F.cross_entropy(learner(xq[i]), yq[i]))
    return torch.stack(losses).mean()


def assert_grads_close(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-10)


# -- functional model ---------------------------------------------------------------------
@pytest.mark.parametrize("targets", MODELS.values(), ids=MODELS.keys())
def test_functional_forward_matches_module(targets: str | list[str]) -> None:
    model = make_model(targets)
    maml = MAML(model, inner_lr=0.4)
    x = make_tasks()[0][0]
    with maml.meta_mode():
        expected = model(x)
    torch.testing.assert_close(maml.functional_forward(maml.meta_parameters(), x), expected)
    assert model.training  # modes restored (a fresh module trains)


def test_models_on_the_fused_path_meta_learn_with_plain_autograd() -> None:
    torch.manual_seed(0)
    fused, plain = make_model(dropout=0.0), make_model(dropout=0.1)
    plain.load_state_dict(fused.state_dict())
    batch = (
        torch.randn(2, 6, D_IN, dtype=torch.float64),
        torch.randint(0, WAYS, (2, 6)),
        torch.randn(2, 6, D_IN, dtype=torch.float64),
        torch.randint(0, WAYS, (2, 6)),
    )
    grads = []
    for model in (fused, plain):
        maml = MAML(model, inner_lr=0.4)
        loss = maml.meta_loss(batch, inner_steps=2)
        grads.append(torch.autograd.grad(loss, list(maml.meta_parameters().values())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_fused_lora_backward_is_differentiable_as_plain_autograd() -> None:
    """A gradient penalty through the fused LoRA node (leaf weights, ``create_graph=True``)
    gives plain autograd's second-order gradients."""
    model = make_model(dropout=0.0).train()
    x = torch.randn(4, D_IN, dtype=torch.float64, requires_grad=True)
    params = trainable(model)

    def penalty_grads() -> tuple[Tensor, ...]:
        out = model(x).square().sum()
        grads = torch.autograd.grad(out, [x, *params], create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), params)

    seen, stack = set(), [model(x).grad_fn]
    while stack:  # the graph's nodes: the layers took their fused nodes
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
    assert "_LoRALinearBackward" in {type(fn).__name__ for fn in seen}
    fused = penalty_grads()
    with plain_autograd():
        plain = penalty_grads()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_fused_mora_backward_refuses_to_be_differentiated_on_leaf_weights() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, HIDDEN)).double()
    model = MoRAModel(base, AdapterConfig(kind="mora", rank=2)).train()
    x = torch.randn(4, D_IN, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        g.sum().backward()


def test_meta_mode_switches_dropout_off_and_restores_modes() -> None:
    model = make_model()
    model.eval()
    maml = MAML(model, inner_lr=0.4)
    x = make_tasks()[0][0]
    a, b = maml(x), maml(x)
    torch.testing.assert_close(a, b)  # dropout off: deterministic
    assert not any(m.training for m in model.modules())


# -- against learn2learn ------------------------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("targets", MODELS.values(), ids=MODELS.keys())
def test_maml_meta_gradients_match_learn2learn(targets: str | list[str], first_order: bool) -> None:
    tasks = make_tasks()
    xs, ys, xq, yq = tasks
    steps = 2
    model = make_model(targets)
    maml = MAML(model, inner_lr=0.4, first_order=first_order)
    ours = torch.autograd.grad(sequential_meta_loss(maml, tasks, steps), trainable(model))
    vmapped = torch.autograd.grad(maml.meta_loss(tasks, inner_steps=steps), trainable(model))

    ref = l2l.algorithms.MAML(model, lr=0.4, first_order=first_order, allow_nograd=True)
    losses = []
    with maml.meta_mode():
        for i in range(xs.shape[0]):
            learner = ref.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(xs[i]), ys[i]))
            losses.append(F.cross_entropy(learner(xq[i]), yq[i]))
    theirs = torch.autograd.grad(torch.stack(losses).mean(), trainable(model))
    assert any(g.abs().sum() > 0 for g in theirs)
    assert_grads_close(ours, theirs)
    assert_grads_close(vmapped, theirs)


def test_metasgd_equals_maml_at_init_and_rate_gradients_are_exact() -> None:
    """learn2learn's MetaSGD cannot skip frozen parameters, so the reference is MAML (same
    rates) and the closed form ``∂L_q/∂α = -g_s ⊙ ∂L_q/∂p'`` for one inner step."""
    tasks = make_tasks(t=1)
    xs, ys, xq, yq = tasks
    model = make_model()
    msgd, maml = MetaSGD(model, inner_lr=0.3), MAML(model, inner_lr=0.3)
    loss = msgd.meta_loss(tasks, inner_steps=1)
    rates = [r for r in msgd.step_sizes().values() if isinstance(r, Tensor)]
    mine = torch.autograd.grad(loss, trainable(model) + rates)
    ref_loss = maml.meta_loss(tasks, inner_steps=1)
    torch.testing.assert_close(loss, ref_loss)
    n_meta = len(trainable(model))
    assert_grads_close(mine[:n_meta], torch.autograd.grad(ref_loss, trainable(model)))

    params = maml.meta_parameters()
    g_s = torch.autograd.grad(
        F.cross_entropy(maml.functional_forward(params, xs[0]), ys[0]), list(params.values())
    )
    adapted = {n: (p - 0.3 * g).detach().requires_grad_() for (n, p), g in zip(params.items(), g_s)}
    g_q = torch.autograd.grad(
        F.cross_entropy(maml.functional_forward(adapted, xq[0]), yq[0]), list(adapted.values())
    )
    assert_grads_close(mine[n_meta:], tuple(-a * b for a, b in zip(g_s, g_q)))


# -- vmapped meta_loss against the sequential loop ---------------------------------------------
ALGORITHMS = {
    "maml": lambda m: MAML(m, inner_lr=0.4),
    "fomaml": lambda m: MAML(m, inner_lr=0.4, first_order=True),
    "metasgd": lambda m: MetaSGD(m, inner_lr=0.4),
    "anil": lambda m: ANIL(m, inner_lr=0.4),
}


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("make", ALGORITHMS.values(), ids=ALGORITHMS.keys())
def test_meta_loss_matches_sequential_loop(make, chunk_size: int | None) -> None:  # type: ignore[no-untyped-def]
    model = make_model()
    maml = make(model)
    tasks = make_tasks()
    params = [p for p in maml.parameters() if p.requires_grad]
    seq = sequential_meta_loss(maml, tasks, steps=3)
    vm = maml.meta_loss(tasks, inner_steps=3, chunk_size=chunk_size)
    torch.testing.assert_close(vm, seq, rtol=1e-10, atol=1e-12)
    assert_grads_close(torch.autograd.grad(vm, params), torch.autograd.grad(seq, params))


def test_metasgd_learned_rates_get_gradients() -> None:
    model = make_model()
    maml = MetaSGD(model, inner_lr=0.4, first_order=True)
    assert len(maml.lrs) == len(trainable(model))
    lrs = list(maml.lrs.values())
    assert set(map(id, lrs)) <= {id(p) for p in maml.parameters()}  # outer optimiser sees them
    maml.meta_loss(make_tasks(), inner_steps=2).backward()
    for lr in lrs:
        assert lr.grad is not None and lr.grad.abs().sum() > 0
    torch.optim.SGD([p for p in maml.parameters() if p.requires_grad], lr=0.1).step()
    assert any(not torch.all(lr == 0.4) for lr in lrs)


def test_anil_adapts_only_the_head() -> None:
    model = make_model()
    maml = ANIL(model, inner_lr=0.4)
    assert set(maml.inner_names) == {"model.2.base_layer.weight", "model.2.base_layer.bias"}
    xs, ys, xq, yq = make_tasks()
    learner = maml.clone()
    before = dict(learner.params)
    learner.adapt(F.cross_entropy(learner(xs[0]), ys[0]))
    for n, p in learner.params.items():
        if n in maml.inner_names:
            assert not torch.equal(p, before[n])
        else:
            assert p is before[n]
    # the frozen-in-the-inner-loop adapters are still meta-trained
    loss = F.cross_entropy(learner(xq[0]), yq[0])
    grads = torch.autograd.grad(loss, [before[n] for n in maml.meta_names])
    assert all(g.abs().sum() > 0 for g in grads)


def test_anil_needs_a_head() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, WAYS))
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=2, dropout=0.1))
    with pytest.raises(ValueError, match="HEAD"):
        ANIL(model, inner_lr=0.1)


def test_frozen_backbone_is_shared_not_copied() -> None:
    model = make_model()
    maml = MAML(model, inner_lr=0.4)
    learner = maml.clone()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(learner.params)
    assert all(learner.params[n] is p for n, p in maml.meta_parameters().items())


def test_batchnorm_policy() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Linear(HIDDEN, WAYS))
    model = MoRAModel(
        base.double(), AdapterConfig(kind="lora", rank=2, dropout=0.1), modules_to_save=["2"]
    )
    with pytest.raises(ValueError, match="'train'"):
        MAML(model, inner_lr=0.1, batchnorm="train")
    maml = MAML(model, inner_lr=0.1)
    bn = model.model.get_submodule("1")
    stats = bn.running_mean.clone()
    maml.meta_loss(make_tasks(), inner_steps=2).backward()
    torch.testing.assert_close(bn.running_mean, stats)  # eval mode: statistics untouched
    assert bn.training


# -- full-weight linears: factored inner updates -------------------------------------------
class TwiceApplied(nn.Module):
    """A linear layer applied twice per forward (shared weights): never factored."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = (
            nn.Linear(D_IN, HIDDEN),
            nn.Linear(HIDDEN, HIDDEN),
            nn.Linear(HIDDEN, WAYS),
        )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


def make_mlp() -> nn.Module:
    """A float64 MLP with every parameter meta-learned (no adapters)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D_IN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, WAYS),
    ).double()


def l2l_meta_grads(
    model: nn.Module, tasks: tuple[Tensor, ...], steps: int, first_order: bool
) -> tuple[Tensor, ...]:
    xs, ys, xq, yq = tasks
    ref = l2l.algorithms.MAML(model, lr=0.4, first_order=first_order, allow_nograd=True)
    losses = []
    for i in range(xs.shape[0]):
        learner = ref.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(xs[i]), ys[i]))
        losses.append(F.cross_entropy(learner(xq[i]), yq[i]))
    return torch.autograd.grad(torch.stack(losses).mean(), trainable(model))


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("update", ["dense", "factored"])
def test_full_weight_mlp_meta_gradients_match_learn2learn(
    update: str, first_order: bool, chunk_size: int | None
) -> None:
    model = make_mlp()
    tasks = make_tasks()
    maml = MAML(model, inner_lr=0.4, first_order=first_order, linear_update=update)
    factored = maml.factored_linears(maml.meta_parameters(), tasks[0], inner_steps=3)
    expected = {"dense": set(), "factored": {"0.weight", "2.weight", "4.weight"}}[update]
    assert set(factored.modules) == expected
    loss = maml.meta_loss(tasks, inner_steps=3, chunk_size=chunk_size)
    torch.testing.assert_close(
        loss, sequential_meta_loss(maml, tasks, steps=3), rtol=1e-10, atol=1e-12
    )
    ours = torch.autograd.grad(loss, trainable(model))
    assert_grads_close(ours, l2l_meta_grads(model, tasks, 3, first_order))


def test_auto_factors_only_the_layers_where_it_is_cheaper() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, WAYS)
    )
    maml = MAML(model, inner_lr=0.4)
    xs = torch.randn(2, 3, 64)
    # rank k·r = 2 steps · 3 rows = 6: 6·96 < 64·32, 6·40 < 32·8, but 6·11 >= 8·3
    assert set(maml.factored_linears(maml.meta_parameters(), xs, inner_steps=2).modules) == {
        "0.weight",
        "2.weight",
    }
    # 5 steps: rank 15, 15·96 < 64·32 but 15·40 >= 32·8
    assert set(maml.factored_linears(maml.meta_parameters(), xs, inner_steps=5).modules) == {
        "0.weight"
    }
    assert (
        not MAML(model, 0.4, linear_update="dense")
        .factored_linears(maml.meta_parameters(), xs, 2)
        .modules
    )


def test_factored_updates_over_token_dimensions_shared_layers_and_metasgd() -> None:
    """Inputs (t, n, tokens, d); a layer called twice per forward stays dense; Meta-SGD's
    per-entry rates keep every layer dense. All match the sequential clone/adapt loop."""
    g = torch.Generator().manual_seed(2)
    xs, xq = (
        torch.randn(3, 4, 2, D_IN, generator=g, dtype=torch.float64),
        torch.randn(3, 5, 2, D_IN, generator=g, dtype=torch.float64),
    )
    ys, yq = (
        torch.randint(0, WAYS, (3, 4, 2), generator=g),
        torch.randint(0, WAYS, (3, 5, 2), generator=g),
    )

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, WAYS), y.reshape(-1))

    torch.manual_seed(0)
    cases = [
        (MAML(make_mlp(), 0.4, linear_update="factored"), {"0.weight", "2.weight", "4.weight"}),
        (
            MAML(TwiceApplied().double(), 0.4, linear_update="factored"),
            {"inp.weight", "out.weight"},
        ),
        (MetaSGD(make_mlp(), 0.4, linear_update="factored"), set()),
    ]
    for maml, factored in cases:
        rows = maml.factored_linears(maml.meta_parameters(), xs, inner_steps=2)
        assert set(rows.modules) == factored and all(r == 8 for r in rows.rows.values())
        params = [p for p in maml.parameters() if p.requires_grad]
        vm = maml.meta_loss((xs, ys, xq, yq), inner_steps=2, loss_fn=loss_fn)
        losses = []
        for i in range(3):
            learner = maml.clone()
            for _ in range(2):
                learner.adapt(loss_fn(learner(xs[i]), ys[i]))
            losses.append(loss_fn(learner(xq[i]), yq[i]))
        seq = torch.stack(losses).mean()
        torch.testing.assert_close(vm, seq, rtol=1e-10, atol=1e-12)
        assert_grads_close(torch.autograd.grad(vm, params), torch.autograd.grad(seq, params))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inner_lr": 0.0}, "inner_lr"),
        ({"inner_lr": -1.0}, "inner_lr"),
        ({"inner_lr": 0.1, "linear_update": "lowrank"}, "'lowrank'.*'factored'"),
    ],
)
def test_maml_argument_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MAML(make_model(), **kwargs)


def test_meta_loss_argument_errors() -> None:
    maml = MAML(make_model(), inner_lr=0.4)
    xs, ys, xq, yq = make_tasks()
    with pytest.raises(ValueError, match="inner_steps"):
        maml.meta_loss((xs, ys, xq, yq), inner_steps=-1)
    with pytest.raises(ValueError, match="chunk_size"):
        maml.meta_loss((xs, ys, xq, yq), chunk_size=0)
    with pytest.raises(ValueError, match=r"\[3, 3, 2, 3\]"):
        maml.meta_loss((xs, ys, xq[:2], yq))


# -- episodes -----------------------------------------------------------------------------
def make_dataset(classes: int = 10, per_class: int = 7) -> tuple[Tensor, Tensor]:
    labels = torch.arange(classes).repeat_interleave(per_class)
    # feature 0 carries the original label so tests can check the remapping
    features = torch.randn(labels.numel(), 2, 3)
    features[:, 0, 0] = labels.double()
    return features, labels


def test_split_classes_disjoint_and_seeded() -> None:
    _, labels = make_dataset()
    s1 = split_classes(labels, (0.6, 0.2, 0.2), generator=torch.Generator().manual_seed(3))
    s2 = split_classes(labels, (0.6, 0.2, 0.2), generator=torch.Generator().manual_seed(3))
    assert s1 == s2
    assert (len(s1.train), len(s1.val), len(s1.test)) == (6, 2, 2)
    assert set(s1.train) | set(s1.val) | set(s1.test) == set(range(10))
    assert not set(s1.train) & set(s1.val) and not set(s1.train) & set(s1.test)
    assert not set(s1.val) & set(s1.test)


def test_episode_shapes_labels_and_classes() -> None:
    features, labels = make_dataset()
    splits = split_classes(labels, generator=torch.Generator().manual_seed(0))
    sampler = EpisodeSampler(features, labels, splits.train, ways=4, shots=2, queries=3)
    ep = sampler.sample(torch.Generator().manual_seed(1))
    assert ep.xs.shape == (8, 2, 3) and ep.ys.shape == (8,)
    assert ep.xq.shape == (12, 2, 3) and ep.yq.shape == (12,)
    assert ep.ys.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ep.yq.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    orig_s, orig_q = ep.xs[:, 0, 0].long(), ep.xq[:, 0, 0].long()
    assert set(orig_s.tolist()) <= set(splits.train)
    for j in range(4):  # one original class per episode label, same in support and query
        cls = set(orig_s[ep.ys == j].tolist())
        assert len(cls) == 1 and cls == set(orig_q[ep.yq == j].tolist())
    assert len(set(orig_s.tolist())) == 4
    # support and query never share an example
    xs_rows = {tuple(r.flatten().tolist()) for r in ep.xs}
    assert not xs_rows & {tuple(r.flatten().tolist()) for r in ep.xq}


def test_episode_batch_and_seed() -> None:
    features, labels = make_dataset()
    sampler = EpisodeSampler(features, labels, range(10), ways=3, shots=1, queries=2)
    b1 = sampler.sample_batch(5, torch.Generator().manual_seed(7))
    b2 = sampler.sample_batch(5, torch.Generator().manual_seed(7))
    b3 = sampler.sample_batch(5, torch.Generator().manual_seed(8))
    assert b1.xs.shape == (5, 3, 2, 3) and b1.ys.shape == (5, 3)
    assert b1.xq.shape == (5, 6, 2, 3) and b1.yq.shape == (5, 6)
    for a, b in zip(b1, b2):
        assert torch.equal(a, b)
    assert not torch.equal(b1.xs, b3.xs)


def test_episode_errors_name_the_numbers() -> None:
    features, labels = make_dataset(classes=5, per_class=4)
    with pytest.raises(ValueError, match="ways=6 .* 5 classes"):
        EpisodeSampler(features, labels, range(5), ways=6, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"class 0 has 4 examples.*3 \+ 2 = 5"):
        EpisodeSampler(features, labels, range(5), ways=2, shots=3, queries=2)
    with pytest.raises(ValueError, match="fractions"):
        split_classes(labels, (0.5, 0.2, 0.2))


def test_episodes_feed_meta_loss() -> None:
    _, labels = make_dataset(classes=6, per_class=6)
    x = torch.randn(labels.numel(), D_IN, dtype=torch.float64)
    sampler = EpisodeSampler(x, labels, range(6), ways=WAYS, shots=2, queries=2)
    batch = sampler.sample_batch(4, torch.Generator().manual_seed(0))
    maml = MAML(make_model(), inner_lr=0.4)
    loss = maml.meta_loss(batch, inner_steps=1)
    torch.testing.assert_close(loss, sequential_meta_loss(maml, tuple(batch), steps=1))


def test_second_order_terms_matter_and_zero_steps_is_the_plain_loss() -> None:
    tasks = make_tasks()
    model = make_model()
    params = trainable(model)
    so = torch.autograd.grad(MAML(model, 0.4).meta_loss(tasks, inner_steps=2), params)
    fo = torch.autograd.grad(MAML(model, 0.4, True).meta_loss(tasks, inner_steps=2), params)
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(so, fo))
    maml = MAML(model, 0.4)
    xq, yq = tasks[2], tasks[3]
    with maml.meta_mode():
        plain = torch.stack([F.cross_entropy(model(x), y) for x, y in zip(xq, yq)]).mean()
    torch.testing.assert_close(maml.meta_loss(tasks, inner_steps=0), plain)
