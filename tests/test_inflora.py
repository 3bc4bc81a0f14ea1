"""InfLoRA: the designed down-projections and the stored subspace against direct float64 SVDs
of the inputs, the branches' freezing through a stream, the run's checkpoint and resume, and
the config's fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("avalanche")

from avalanche.core import SupervisedPlugin

from moracl.config import from_dict
from moracl.continual.batches import materialize
from moracl.continual.config import BaselinesConfig, RunConfig
from moracl.continual.inflora import (
    DESIGNED_SCALE,
    InfLoRAPlugin,
    InfLoRAStrategy,
    branch_name,
    inflora_classifier,
    layer_second_moments,
)
from moracl.continual.inflora_subspace import (
    design_rows,
    energy_threshold,
    grow_basis,
    second_moment,
)
from moracl.continual.model import ContinualClassifier
from moracl.continual.stateful import PluginState
from moracl.continual.strategy import FastTemplate
from moracl.experts.per_sample import token_mask
from moracl.model import MoRAModel
from tests.offline_data import needs_fashion_mnist

F64 = torch.float64


def _inputs(d: int, n: int, seed: int) -> Tensor:
    """``(d, n)`` inputs with a decaying spectrum (distinct singular values)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    scales = torch.logspace(0, -2, d, dtype=F64)
    return q @ (scales[:, None] * torch.randn(d, n, generator=g, dtype=F64))


def _orthonormal(d: int, k: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))
    return q


# -- the subspace arithmetic against direct SVDs ---------------------------------------------


@pytest.mark.parametrize("k", [0, 3])
def test_the_designed_rows_are_the_top_directions_of_the_projected_inputs(k: int) -> None:
    d, r = 12, 4
    r_in = _inputs(d, 40, seed=1)  # (d, n)
    m = _orthonormal(d, k, seed=2)  # (d, k)
    a = design_rows(second_moment(r_in.T), m, r)  # (r, d)
    # InfLoRA's claim: the rows lie in the orthogonal complement of the stored subspace
    assert torch.linalg.matrix_norm(a @ m) <= 1e-10
    assert torch.allclose(a @ a.T, torch.eye(r, dtype=F64), atol=1e-10, rtol=0)
    # they span the top-r left singular vectors of the projected inputs Ĥ = (I - M Mᵀ) R
    projected = r_in - m @ (m.T @ r_in)
    u, _, _ = torch.linalg.svd(projected, full_matrices=False)
    reference = u[:, :r] @ u[:, :r].T
    assert torch.allclose(a.T @ a, reference, atol=1e-10, rtol=0)


def test_the_designed_rows_depend_on_the_subspace_alone_not_on_signs() -> None:
    """An eigenvector's sign is arbitrary (LAPACK builds differ): each row is the top
    direction with its largest entry positive, the same for a basis given with flipped or
    reordered columns, or inputs of the opposite sign (the same second moment)."""
    d, r = 12, 4
    r_in = _inputs(d, 40, seed=1)
    m = _orthonormal(d, 3, seed=2)
    a = design_rows(second_moment(r_in.T), m, r)
    top = a.abs().argmax(1)
    assert (a.gather(1, top[:, None]) > 0).all()
    for basis, inputs in (
        (-m, r_in),
        (m[:, [2, 0, 1]], r_in),
        (m * torch.tensor([1, -1, 1]), -r_in),
    ):
        other = design_rows(second_moment(inputs.T), basis.to(F64), r)
        torch.testing.assert_close(other, a, rtol=0, atol=1e-10)


def test_rows_beyond_the_complement_are_zero_and_still_orthogonal() -> None:
    d = 6
    m = _orthonormal(d, 4, seed=3)
    a = design_rows(second_moment(_inputs(d, 10, seed=4).T), m, 5)
    assert torch.linalg.matrix_norm(a @ m) <= 1e-10
    assert a[2:].abs().max() == 0 and torch.allclose(
        a[:2] @ a[:2].T, torch.eye(2, dtype=F64), atol=1e-10, rtol=0
    )


def _gpm_reference(r_in: Tensor, m: Tensor, threshold: float) -> Tensor:
    """GPM's update written out (Saha et al. 2021, Eq. 9): SVD of the projected inputs, then
    add directions one at a time until the captured energy reaches the threshold."""
    total = (r_in**2).sum()
    projected = r_in - m @ (m.T @ r_in)
    u, s, _ = torch.linalg.svd(projected, full_matrices=False)
    captured = total - (projected**2).sum()
    j = 0
    while captured / total < threshold:
        captured = captured + s[j] ** 2
        j += 1
    return torch.cat([m, u[:, :j]], dim=1)


@pytest.mark.parametrize("threshold", [0.3, 0.8, 0.97, 0.9999])
@pytest.mark.parametrize("k", [0, 2])
def test_the_basis_grows_as_a_direct_svd_of_the_projected_inputs_says(
    threshold: float, k: int
) -> None:
    d = 10
    r_in = _inputs(d, 30, seed=5)
    m = _orthonormal(d, k, seed=6)
    grown = grow_basis(second_moment(r_in.T), m, threshold)
    expected = _gpm_reference(r_in, m, threshold)
    assert grown.shape == expected.shape  # the same k chosen by the energy criterion
    assert torch.equal(grown[:, :k], m)  # the stored directions stay as they were
    assert torch.allclose(grown.T @ grown, torch.eye(grown.shape[1], dtype=F64), atol=1e-10)
    assert torch.allclose(grown @ grown.T, expected @ expected.T, atol=1e-10, rtol=0)


def test_the_thresholds_choice_of_k_differs_across_thresholds() -> None:
    r_in = _inputs(10, 30, seed=5)
    sizes = [
        grow_basis(second_moment(r_in.T), torch.zeros(10, 0, dtype=F64), t).shape[1]
        for t in (0.3, 0.8, 0.97, 0.9999)
    ]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4


def test_a_basis_that_captures_enough_or_inputs_of_no_energy_leave_it_unchanged() -> None:
    d = 8
    r_in = _inputs(d, 20, seed=7)
    first = grow_basis(second_moment(r_in.T), torch.zeros(d, 0, dtype=F64), 0.9)
    assert torch.equal(grow_basis(second_moment(r_in.T), first, 0.9), first)
    assert torch.equal(grow_basis(torch.zeros(d, d, dtype=F64), first, 0.9), first)
    # a threshold of 1 keeps the span of the inputs, not the directions of no energy
    low_rank = _inputs(d, 3, seed=8)
    assert grow_basis(second_moment(low_rank.T), torch.zeros(d, 0, dtype=F64), 1.0).shape[1] == 3


def test_the_threshold_rises_linearly_from_start_toward_end() -> None:
    values = [energy_threshold(t, 5, 0.95, 1.0) for t in range(5)]
    assert values == pytest.approx([0.95, 0.96, 0.97, 0.98, 0.99], abs=1e-15)
    with pytest.raises(ValueError, match=r"task must be in \[0, 4\], got 5"):
        energy_threshold(5, 5, 0.95, 1.0)


def test_bad_arguments_are_refused_with_their_values() -> None:
    cov = torch.eye(4, dtype=F64)
    with pytest.raises(ValueError, match=r"threshold must be a finite number in \(0, 1\], got 1.5"):
        grow_basis(cov, torch.zeros(4, 0, dtype=F64), 1.5)
    with pytest.raises(ValueError, match=r"basis must be \(d, k\) with d=4"):
        design_rows(cov, torch.zeros(3, 1, dtype=F64), 2)
    with pytest.raises(ValueError, match=r"cov must be a square \(d, d\) matrix"):
        design_rows(torch.zeros(4, 3, dtype=F64), torch.zeros(4, 0, dtype=F64), 2)
    with pytest.raises(ValueError, match=r"rank must be > 0, got 0"):
        design_rows(cov, torch.zeros(4, 0, dtype=F64), 0)


# -- reading the layers' inputs ---------------------------------------------------------------


class _Encoder(nn.Module):
    """``x (b, 6) -> (b, 8)``; token inputs ``(b, t, 7)`` carry a padding mask last."""

    feature_dim = 8
    default_targets = ("fc1", "fc2")

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:  # (b, t, 6 + 1): tokens and their mask, mean over the real tokens
            h, mask = x[..., :-1], x[..., -1]
            with token_mask(mask):
                out = self.fc2(torch.relu(self.fc1(h)))  # (b, t, 8)
            return (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out: Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def test_second_moments_are_those_of_every_layers_inputs_real_tokens_only() -> None:
    torch.manual_seed(0)
    base = _Encoder().requires_grad_(False)
    model = inflora_classifier(
        base, [[0, 1], [2, 3]], targets=["fc1", "fc2"], rank=2, multi_head=False
    )
    encoder = model.encoder
    assert isinstance(encoder, MoRAModel)
    x = torch.randn(5, 3, 6)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]]).float()
    got = layer_second_moments(encoder, torch.cat([x, mask[..., None]], -1), batch_size=2)
    real = x.reshape(-1, 6)[mask.reshape(-1) != 0].double()  # (tokens, 6)
    hidden = torch.relu(base.fc1(real.float())).double()
    assert torch.allclose(got["fc1"], real.T @ real, atol=1e-10, rtol=0)
    # (the hidden rows are float32: the layer and this reference round them differently)
    assert torch.allclose(got["fc2"], hidden.T @ hidden, atol=1e-5, rtol=0)


# -- the strategy through a stream -------------------------------------------------------------


def _stream() -> list[Any]:
    from moracl_scenarios.streams import tensor_benchmark

    g = torch.Generator().manual_seed(0)

    def part(classes: tuple[int, int], shift: float, n: int = 32) -> tuple[Tensor, Tensor]:
        y = torch.tensor(classes).repeat(n // 2)
        x = torch.randn(n, 6, generator=g) * 0.3 + y[:, None] * 0.5
        x[:, int(shift)] += 2.0  # each experience's inputs lean on their own direction
        return x, y

    train = [part((0, 1), 0), part((2, 3), 3), part((4, 5), 5)]
    bench = tensor_benchmark(train, [part((0, 1), 0, 4)] * 3)
    return list(bench.train_stream)


class _Spy(SupervisedPlugin):  # type: ignore[misc]
    """Keeps the model's state and the optimised parameters as each experience starts
    training (after InfLoRA designed it) and the InfLoRA bases at that point."""

    def __init__(self, inflora: InfLoRAPlugin) -> None:
        super().__init__()
        self.inflora = inflora
        self.started: list[dict[str, Tensor]] = []
        self.optimised: list[set[int]] = []
        self.bases: list[dict[str, Tensor]] = []

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.started.append({k: v.clone() for k, v in strategy.model.state_dict().items()})
        self.optimised.append({id(p) for g in strategy.optimizer.param_groups for p in g["params"]})
        self.bases.append(dict(self.inflora.bases))


def _strategy(rank: int = 2) -> tuple[InfLoRAStrategy, InfLoRAPlugin, _Spy]:
    torch.manual_seed(0)
    model = inflora_classifier(
        _Encoder().requires_grad_(False),
        [[0, 1], [2, 3], [4, 5]],
        targets=["fc1", "fc2"],
        rank=rank,
        multi_head=False,
    )
    inflora = InfLoRAPlugin(threshold=0.9, threshold_end=1.0, batch_size=16)
    spy = _Spy(inflora)
    strategy = InfLoRAStrategy(
        model=model,
        optimizer_factory=lambda m: torch.optim.AdamW(
            [p for p in m.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0
        ),
        train_mb_size=8,
        train_epochs=2,
        plugins=[inflora, spy],
        loader_seed=1,
    )
    return strategy, inflora, spy


def _branch(state: dict[str, Tensor], t: int) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if f".adapters.{branch_name(t)}." in k}


def test_each_experience_trains_its_own_b_over_a_fixed_designed_a() -> None:
    exps = _stream()
    strategy, inflora, spy = _strategy()
    model = strategy.model
    for i, exp in enumerate(exps):
        torch.manual_seed(10 + i)
        strategy.train(exp)
        final = model.state_dict()
        began = spy.started[i]
        for t in range(len(exps)):
            mine = _branch(final, t)
            assert mine
            if t < i:  # earlier branches: bit-identical through this experience
                assert all(v.equal(began[k]) for k, v in mine.items()), (i, t)
            elif t == i:  # A fixed while B trains (from zero)
                for k, v in mine.items():
                    if k.endswith("lora_A"):
                        assert v.equal(began[k]) and v.abs().sum() > 0, k
                    else:
                        assert began[k].abs().max() == 0 and v.abs().max() > 0, k
            else:  # not designed yet: zero, inactive
                assert all(v.abs().max() == 0 for v in mine.values())
        # the optimiser covers exactly this experience's B's (and the head)
        encoder = model.encoder
        assert isinstance(encoder, MoRAModel)
        trained_b = {
            id(layer.adapter(branch_name(i)).get_parameter("lora_B"))
            for _, layer in encoder.adapted_layers()
        }
        adapters = {id(p) for n, p in encoder.named_parameters() if ".adapters." in n}
        assert spy.optimised[i] & adapters == trained_b
        assert encoder.active_adapters == tuple(branch_name(t) for t in range(i + 1))
        # the loss spans this experience's classes: the shared head's other rows stay as they were
        others = torch.ones(6, dtype=torch.bool)
        others[[2 * i, 2 * i + 1]] = False
        for key in ("heads.0.weight", "heads.0.bias"):
            assert final[key][others].equal(began[key][others]), (i, key)
            assert not final[key][~others].equal(began[key][~others]), (i, key)
    assert inflora.designed == 3
    # each A (float32 on the model) lies in the complement of the basis stored before it
    encoder = model.encoder
    assert isinstance(encoder, MoRAModel)
    for i in (1, 2):
        for path, layer in encoder.adapted_layers():
            a = layer.adapter(branch_name(i)).get_parameter("lora_A").double()
            m = spy.bases[i][path]
            assert m.shape[1] > 0
            assert torch.linalg.matrix_norm(a @ m) <= 1e-6 * torch.linalg.matrix_norm(a)


def test_the_designed_a_is_design_rows_of_the_experiences_inputs() -> None:
    exps = _stream()
    strategy, inflora, _ = _strategy()
    strategy.train(exps[0])
    encoder = strategy.model.encoder
    assert isinstance(encoder, MoRAModel)
    bases = dict(inflora.bases)
    x, _, _ = materialize(exps[1].dataset)
    moments = layer_second_moments(encoder, x, batch_size=7)
    strategy.train(exps[1])
    for path, layer in encoder.adapted_layers():
        a = layer.adapter(branch_name(1)).get_parameter("lora_A")
        expected = design_rows(moments[path], bases[path], a.shape[0]).float()
        assert torch.allclose(a, expected, atol=1e-5), path
        assert layer.adapter(branch_name(1)).scaling == pytest.approx(DESIGNED_SCALE)


def test_the_plugin_state_restores_a_strategy_that_trains_on_identically() -> None:
    exps = _stream()
    original, inflora, _ = _strategy()
    for i in (0, 1):
        torch.manual_seed(10 + i)
        original.train(exps[i])
    state = inflora.state_dict()
    assert state.values == {"designed": 2}
    assert sorted(state.tensors) == ["basis.fc1", "basis.fc2"]
    restored, again, _ = _strategy()
    restored.model.load_state_dict(original.model.state_dict())
    copy = PluginState({k: v.clone() for k, v in state.tensors.items()}, dict(state.values))
    again.load_state_dict(copy, strategy=restored, trained=exps[:2])
    assert restored.model.encoder.active_adapters == ("task0", "task1")
    for s in (original, restored):
        torch.manual_seed(12)
        s.train(exps[2])
    for (name, a), (_, b) in zip(
        original.model.state_dict().items(), restored.model.state_dict().items(), strict=True
    ):
        assert a.equal(b), name
    with pytest.raises(ValueError, match=r"InfLoRA state tensor 'basis.fc9'"):
        again.load_state_dict(
            PluginState({"basis.fc9": torch.zeros(2, 1)}, {"designed": 1}),
            strategy=restored,
            trained=exps[:1],
        )
    with pytest.raises(ValueError, match=r"inflora.designed=-1"):
        again.load_state_dict(PluginState({}, {"designed": -1}), strategy=restored, trained=[])


def test_a_rank_that_does_not_fit_or_a_foreign_model_is_refused() -> None:
    with pytest.raises(ValueError, match="rank"):
        inflora_classifier(_Encoder(), [[0]], targets=["fc2"], rank=20, multi_head=False)
    plain = ContinualClassifier(nn.Linear(6, 8), 8, [[0, 1]], multi_head=False)
    strategy = FastTemplate(
        model=plain,
        optimizer_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        train_mb_size=8,
        plugins=[InfLoRAPlugin()],
    )
    with pytest.raises(TypeError, match="InfLoRA trains a ContinualClassifier built by"):
        strategy.train(_stream()[0])


# -- the config -------------------------------------------------------------------------------


def test_the_defaults_are_the_papers_and_bad_values_are_named() -> None:
    b = BaselinesConfig()
    assert (b.inflora_rank, b.inflora_threshold, b.inflora_threshold_end) == (10, 0.95, 1.0)
    for field, value, message in [
        ("inflora_rank", 0, r"baselines.inflora_rank must be > 0, got 0"),
        ("inflora_threshold", 0, r"baselines.inflora_threshold must be a finite number in"),
        ("inflora_threshold", 1.2, r"baselines.inflora_threshold must .*got 1.2"),
        (
            "inflora_threshold_end",
            0.9,
            r"baselines.inflora_threshold_end must .* in \[0.95, 1\], got 0.9",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            BaselinesConfig(**{field: value})


def test_moracl_validate_accepts_the_strategy_and_its_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moracl.cli import main

    config = Path(__file__).parents[1] / "configs" / "split_fashion.yaml"
    fields = ["baselines.inflora_rank=4", "baselines.inflora_threshold=0.98"]
    assert main(["validate", str(config), "strategies=[inflora]", *fields]) == 0
    assert "valid RunConfig" in capsys.readouterr().out
    assert main(["validate", str(config), "baselines.inflora_threshold_end=0.5"]) == 2
    assert "baselines.inflora_threshold_end" in capsys.readouterr().err


# -- the run: checkpoint and resume -----------------------------------------------------------


def _run_config(out: Path) -> RunConfig:
    data = {
        "job": "run",
        "scenario": {
            "name": "split-fashion",
            "setting": "class",
            "options": {"experiences": 5, "per_class": 20, "test_per_class": 10},
        },
        "strategies": ["inflora"],
        "baselines": {"inflora_rank": 4},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-2, "head_lr": 1e-2},
        "output_dir": str(out),
    }
    return from_dict(RunConfig, data)


@needs_fashion_mnist
@pytest.mark.slow
def test_a_run_interrupted_after_experience_1_resumes_bit_identically(tmp_path: Path) -> None:
    from moracl.continual.checkpoint import load_checkpoint
    from moracl.jobs.continual import run as run_continual

    full = run_continual(_run_config(tmp_path / "full"), progress=False)
    out = tmp_path / "part"
    run_continual(_run_config(out), progress=False, stop_after=1)
    part = load_checkpoint(out)
    assert part.experience == 1
    assert part.state["inflora"]["plugins"]["inflora"] == {"designed": 2}
    assert any(k.startswith("plugins.inflora.basis.") for k in part.tensors["inflora"])
    resumed = run_continual(_run_config(out), progress=False, resume=True)
    assert resumed.strategies["inflora"].matrix == full.strategies["inflora"].matrix
    a, b = load_checkpoint(tmp_path / "full").tensors, load_checkpoint(out).tensors
    assert sorted(a["inflora"]) == sorted(b["inflora"])
    assert all(a["inflora"][k].equal(b["inflora"][k]) for k in a["inflora"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["label"] for s in metrics["strategies"]] == ["InfLoRA"]
