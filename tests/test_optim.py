"""moracl.optim: LARS, LAMB, SAM / ASAM and MoRAOptimizer against references.

References are float64 hand computations (SAM's perturb-then-step, the LARS ratio), per-tensor
Python loops (LARS with momentum, LAMB) and torch's own optimisers; every configuration of
base × LARS × SAM also runs Rosenbrock and a tiny adapter model.
"""

from __future__ import annotations

import copy
import io
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl.adapters.base import ParamRole
from moracl.optim import (
    BASE_OPTIMIZERS,
    SAM,
    Lamb,
    Lars,
    LarsConfig,
    LarsWrapper,
    MoRAOptimizer,
    MoRAScheduler,
    SAMConfig,
    build_param_groups,
    disable_running_stats,
    trust_ratio,
)

# -- tiny models ------------------------------------------------------------------------------


class TinyLoRA(nn.Module):
    """LoRA-like factors: ``A (r × i)`` random, ``B (o × r)`` zero, tagged with roles."""

    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, d_in) / d_in**0.5)
        self.B = nn.Parameter(torch.zeros(d_out, rank))

    def param_roles(self) -> dict[str, ParamRole]:
        return {"A": ParamRole.A, "B": ParamRole.B}

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.A.T @ self.B.T  # (b, i) -> (b, r) -> (b, o)


class TinyRouter(nn.Module):
    def __init__(self, d: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d) * 0.1)

    def param_roles(self) -> dict[str, ParamRole]:
        return {"weight": ParamRole.ROUTER}


class TinyAdapterModel(nn.Module):
    """Frozen linear base + LoRA, a LayerNorm and a trainable head (untagged: "other")."""

    def __init__(self, d: int = 12, rank: int = 4, d_out: int = 3, router: bool = False) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.lora = TinyLoRA(d, d, rank)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, d_out)
        self.router = TinyRouter(d, 2) if router else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.base(x) + self.lora(x)
        return self.head(torch.tanh(self.norm(h)))


def regression_data(n: int = 64, d: int = 12, d_out: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    y = torch.tanh(x @ torch.randn(d, d_out, generator=g) / d**0.5)
    return x, y


# -- configurations ---------------------------------------------------------------------------

BASES = ["adamw", "sgd", "lamb"]
SAMS: dict[str, SAMConfig | None] = {
    "plain": None,
    "sam": SAMConfig(rho=1e-3),
    "asam": SAMConfig(rho=1e-3, adaptive=True),
}
CONFIGS = [(b, lars, s) for b in BASES for lars in (False, True) for s in SAMS]


def config_id(cfg: tuple[str, bool, str]) -> str:
    base, lars, sam = cfg
    return f"{base}{'+lars' if lars else ''}+{sam}"


# Rosenbrock settings per (base, lars): learning rate, steps, base kwargs.
ROSENBROCK: dict[tuple[str, bool], tuple[float, int, dict]] = {
    ("adamw", False): (0.4, 800, {"betas": (0.9, 0.99)}),
    ("adamw", True): (0.1, 500, {}),
    ("sgd", False): (1.2e-3, 800, {"momentum": 0.95}),
    ("sgd", True): (1.0, 500, {}),
    ("lamb", False): (0.02, 500, {"trust_bounds": (1.0, 10.0)}),  # φ keeps w ≈ 0 moving
    ("lamb", True): (0.1, 500, {}),
}


def rosenbrock(w: Tensor) -> Tensor:
    x, y = w[0, 0], w[0, 1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_rosenbrock_reaches_minimum(cfg: tuple[str, bool, str]) -> None:
    base, lars, sam = cfg
    lr, steps, kwargs = ROSENBROCK[(base, lars)]
    w = nn.Parameter(torch.tensor([[-1.5, 1.5]]))  # 2-d, so LARS / LAMB adapt it
    opt = MoRAOptimizer(
        [w],
        base=base,
        lr=lr,
        lars=LarsConfig(trust_coeff=0.02) if lars else False,
        sam=SAMS[sam],
        **kwargs,
    )
    sched = MoRAScheduler(opt, total_steps=steps, schedule="cosine", rho_schedule="lr")

    def closure() -> Tensor:
        loss = rosenbrock(w)
        loss.backward()
        return loss

    start = rosenbrock(w).item()
    for _ in range(steps):
        opt.step(closure)
        sched.step()
    assert start == pytest.approx(62.5)
    assert torch.linalg.vector_norm(w.detach() - 1.0).item() < 0.1
    assert rosenbrock(w).item() < 1e-2


TINY_LR: dict[tuple[str, bool], float] = {
    ("adamw", False): 2e-2,
    ("adamw", True): 2e-2,
    ("sgd", False): 0.5,
    ("sgd", True): 0.5,
    ("lamb", False): 2e-2,
    ("lamb", True): 2e-2,
}


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_tiny_adapter_model_trains(cfg: tuple[str, bool, str]) -> None:
    base, lars, sam = cfg
    model = TinyAdapterModel()
    x, y = regression_data()
    opt = MoRAOptimizer(
        model,
        base=base,
        lr=TINY_LR[(base, lars)],
        weight_decay=1e-4,
        loraplus_ratio=4,
        lars=LarsConfig(trust_coeff=0.02) if lars else False,
        sam=None if SAMS[sam] is None else SAMConfig(rho=0.02, adaptive=SAMS[sam].adaptive),
    )

    def closure() -> Tensor:
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(59):
        last = opt.step(closure)
    assert first is not None and last is not None
    assert last.item() < 0.5 * first.item()
    assert model.lora.B.abs().sum().item() > 0  # the zero-initialised B moved


# -- SAM and ASAM against a float64 hand computation ------------------------------------------


def _problem() -> tuple[Tensor, Tensor, Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = torch.randn(32, generator=g, dtype=torch.float64)
    w1 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    w2 = torch.randn(3, generator=g, dtype=torch.float64)

    def loss_fn(a: Tensor, b: Tensor) -> Tensor:
        return ((torch.tanh(x @ a) @ b - y) ** 2).mean()

    return x, y, w1, w2, loss_fn


def _grads(loss_fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor) -> list[Tensor]:
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    return list(torch.autograd.grad(loss_fn(a, b), [a, b]))


def _sam_reference(
    w: list[Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    rho: float,
    adaptive: bool,
    eta: float,
) -> list[Tensor]:
    """The gradient at ``w + ε`` for SAM / ASAM, computed by hand."""
    g = _grads(loss_fn, *w)
    t = [(wi.abs() + eta) if adaptive else torch.ones_like(wi) for wi in w]
    norm = math.sqrt(sum(float(((ti * gi) ** 2).sum()) for ti, gi in zip(t, g)))
    eps = [rho * ti * ti * gi / norm for ti, gi in zip(t, g)]
    return _grads(loss_fn, *[wi + ei for wi, ei in zip(w, eps)])


@pytest.mark.parametrize(
    ("adaptive", "eta"), [(False, 0.0), (True, 0.0), (True, 0.01)], ids=["sam", "asam", "asam-eta"]
)
@pytest.mark.parametrize("api", ["closure", "two_step"])
def test_sam_step_matches_hand_computation(adaptive: bool, eta: float, api: str) -> None:
    _, _, w1, w2, loss_fn = _problem()
    rho, lr = 0.3, 0.05
    g2 = _sam_reference([w1, w2], loss_fn, rho, adaptive, eta)
    expected = [w1 - lr * g2[0], w2 - lr * g2[1]]

    p1, p2 = nn.Parameter(w1.clone()), nn.Parameter(w2.clone())
    # two groups: the perturbation's norm is global over both
    opt = SAM(
        torch.optim.SGD([{"params": [p1]}, {"params": [p2]}], lr=lr),
        rho=rho,
        adaptive=adaptive,
        eta=eta,
    )

    def closure() -> Tensor:
        loss = loss_fn(p1, p2)
        loss.backward()
        return loss

    if api == "closure":
        loss = opt.step(closure)
    else:
        loss = closure()
        assert opt.first_step(zero_grad=True)
        closure()
        assert opt.second_step()
    assert loss.item() == pytest.approx(loss_fn(w1, w2).item(), abs=1e-12)
    torch.testing.assert_close(p1.detach(), expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(p2.detach(), expected[1], atol=1e-6, rtol=0)
    # float64 makes it much tighter than 1e-6
    assert (p1.detach() - expected[0]).abs().max().item() < 1e-12


def test_sam_over_adamw_steps_from_the_original_point() -> None:
    _, _, w1, w2, loss_fn = _problem()
    rho, lr = 0.1, 0.01
    g2 = _sam_reference([w1, w2], loss_fn, rho, False, 0.0)
    r1, r2 = nn.Parameter(w1.clone()), nn.Parameter(w2.clone())
    ref = torch.optim.AdamW([r1, r2], lr=lr, weight_decay=0.1)
    r1.grad, r2.grad = g2
    ref.step()

    p1, p2 = nn.Parameter(w1.clone()), nn.Parameter(w2.clone())
    opt = MoRAOptimizer([p1, p2], base="adamw", lr=lr, weight_decay=0.1, sam=SAMConfig(rho=rho))

    def closure() -> Tensor:
        loss = loss_fn(p1, p2)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(p1.detach(), r1.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(p2.detach(), r2.detach(), atol=1e-12, rtol=0)


def test_sam_rho_per_group_and_zero_rho_is_plain_step() -> None:
    _, _, w1, w2, loss_fn = _problem()
    p1, p2 = nn.Parameter(w1.clone()), nn.Parameter(w2.clone())
    base = torch.optim.SGD([{"params": [p1], "sam_rho": 0.0}, {"params": [p2]}], lr=0.1)
    opt = SAM(base, rho=0.2)

    def closure() -> Tensor:
        loss = loss_fn(p1, p2)
        loss.backward()
        return loss

    g = _grads(loss_fn, w1, w2)
    norm = torch.sqrt((g[0] ** 2).sum() + (g[1] ** 2).sum())
    g2 = _grads(loss_fn, w1, w2 + 0.2 * g[1] / norm)  # only p2 is perturbed
    opt.step(closure)
    torch.testing.assert_close(p1.detach(), w1 - 0.1 * g2[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(p2.detach(), w2 - 0.1 * g2[1], atol=1e-12, rtol=0)


def test_sam_api_misuse_raises() -> None:
    p = nn.Parameter(torch.ones(2, 2))
    opt = SAM(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    p.grad = torch.ones_like(p)
    opt.first_step(zero_grad=False)
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    plain = MoRAOptimizer([p], base="sgd", lr=0.1)
    with pytest.raises(RuntimeError, match="SAMConfig"):
        plain.first_step()


# -- SAM under mixed precision, BatchNorm and DDP ---------------------------------------------


def test_sam_under_bf16_autocast_matches_manual_steps() -> None:
    x, y = regression_data()
    model = TinyAdapterModel()
    with torch.no_grad():
        model.lora.B.normal_(0, 0.1)
    ref = copy.deepcopy(model)
    rho, lr = 0.05, 0.1

    def loss_of(m: nn.Module) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        return F.mse_loss(out.float(), y)

    opt = MoRAOptimizer(model, base="sgd", lr=lr, momentum=0.0, sam=SAMConfig(rho=rho))

    def closure() -> Tensor:
        loss = loss_of(model)
        loss.backward()
        return loss

    opt.step(closure)

    # manual: fp32 weights, bf16 forward, perturb by ρ g / ‖g‖, gradient there, step from w
    params = [p for p in ref.parameters() if p.requires_grad]
    loss_of(ref).backward()
    g = [p.grad.clone() for p in params]
    norm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g))
    originals = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(gi * (rho / norm).float())
            p.grad = None
    loss_of(ref).backward()
    with torch.no_grad():
        for p, w0 in zip(params, originals):
            p.copy_(w0 - lr * p.grad)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def _fp16_setup() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    x, y = regression_data()
    model = TinyAdapterModel()
    with torch.no_grad():
        model.lora.B.normal_(0, 0.1)

    def loss_of(m: nn.Module) -> Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            out = m(x)
        return F.mse_loss(out.float(), y)

    return model, loss_of


def _assert_same_step(model: nn.Module, ref: nn.Module, start: list[Tensor]) -> None:
    """``model`` and ``ref`` took the same step from ``start``, to fp16's rounding of the
    update: the scaled and unscaled fp16 backwards round differently (by the CPU's fp16
    kernels and thread count), so each parameter's difference is held to 2⁻⁷ of its
    update's size, and the update must be real (frozen parameters stay as they were)."""
    for a, b, b0 in zip(model.parameters(), ref.parameters(), start):
        if not b.requires_grad:  # frozen: untouched on both sides
            assert torch.equal(a, b0) and torch.equal(b, b0)
            continue
        update = (b - b0).abs().max()
        assert update > 1e-4
        assert (a - b).abs().max() <= 2**-7 * update


def test_sam_with_grad_scaler_matches_unscaled_step() -> None:
    model, loss_of = _fp16_setup()
    ref = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    cfg = {"base": "sgd", "lr": 0.1, "momentum": 0.0, "sam": SAMConfig(rho=0.05)}
    opt, ref_opt = MoRAOptimizer(model, **cfg), MoRAOptimizer(ref, **cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def scaled_closure() -> Tensor:
        loss = loss_of(model)
        scaler.scale(loss).backward()
        return loss

    def closure() -> Tensor:
        loss = loss_of(ref)
        loss.backward()
        return loss

    opt.step(scaled_closure, grad_scaler=scaler)
    scaler.update()
    ref_opt.step(closure)
    assert scaler.get_scale() == 2.0**12  # no inf: scale kept
    _assert_same_step(model, ref, start)


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_sam_with_grad_scaler_skips_on_inf(bad_pass: int) -> None:
    model, loss_of = _fp16_setup()
    before = copy.deepcopy(model.state_dict())
    opt = MoRAOptimizer(model, base="adamw", lr=0.1, sam=SAMConfig(rho=0.05))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    calls = []

    def closure() -> Tensor:
        calls.append(1)
        loss = loss_of(model)
        if len(calls) == bad_pass:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        return loss

    opt.step(closure, grad_scaler=scaler)
    scaler.update()
    assert len(calls) == (1 if bad_pass == 1 else 2)  # inf first pass: no second pass
    assert scaler.get_scale() == 2.0**11  # backed off
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no step, perturbation undone
    assert not opt.state  # AdamW never stepped


def test_sam_two_step_api_with_grad_scaler() -> None:
    model, loss_of = _fp16_setup()
    ref = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt = MoRAOptimizer(model, base="sgd", lr=0.1, momentum=0.0, sam=SAMConfig(rho=0.05))
    ref_opt = MoRAOptimizer(ref, base="sgd", lr=0.1, momentum=0.0, sam=SAMConfig(rho=0.05))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(model)).backward()
    assert opt.first_step(grad_scaler=scaler)
    scaler.scale(loss_of(model)).backward()
    assert opt.second_step(grad_scaler=scaler)
    scaler.update()

    def closure() -> Tensor:
        loss = loss_of(ref)
        loss.backward()
        return loss

    ref_opt.step(closure)
    _assert_same_step(model, ref, start)


def test_grad_scaler_without_sam() -> None:
    model, loss_of = _fp16_setup()
    ref = copy.deepcopy(model)
    opt = MoRAOptimizer(model, base="adamw", lr=0.01)
    ref_opt = MoRAOptimizer(ref, base="adamw", lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def closure() -> Tensor:
        loss = loss_of(model)
        scaler.scale(loss).backward()
        return loss

    def ref_closure() -> Tensor:
        loss = loss_of(ref)
        loss.backward()
        return loss

    opt.step(closure, grad_scaler=scaler)
    scaler.update()
    ref_opt.step(ref_closure)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


class BNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lora = TinyLoRA(6, 6, 2)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bn(x + self.lora(x)))


def test_sam_updates_batchnorm_statistics_in_first_pass_only() -> None:
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    model = BNModel().train()
    with torch.no_grad():
        model.lora.B.normal_()
    ref = copy.deepcopy(model)
    ref(x)  # one forward at the original weights
    opt = MoRAOptimizer(model, base="sgd", lr=0.1, sam=SAMConfig(rho=0.5))

    def closure() -> Tensor:
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert model.bn.num_batches_tracked.item() == 1
    assert torch.equal(model.bn.running_mean, ref.bn.running_mean)
    assert torch.equal(model.bn.running_var, ref.bn.running_var)
    # the second pass still normalises with batch statistics and the flag is restored
    assert model.bn.track_running_stats
    with disable_running_stats(model):
        model(x)
    assert model.bn.num_batches_tracked.item() == 1


def test_sam_first_pass_runs_without_ddp_gradient_sync() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("gloo backend not available")
    x, y = regression_data()
    model = TinyAdapterModel()
    plain = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "gloo", init_method=f"file://{Path(tmp) / 'store'}", rank=0, world_size=1
        )
        try:
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = MoRAOptimizer(ddp, base="adamw", lr=0.01, sam=SAMConfig(rho=0.05))
            synced = []

            def closure() -> Tensor:
                synced.append(ddp.require_backward_grad_sync)
                loss = F.mse_loss(ddp(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        finally:
            dist.destroy_process_group()
    assert synced == [False, True]
    ref_opt = MoRAOptimizer(plain, base="adamw", lr=0.01, sam=SAMConfig(rho=0.05))

    def ref_closure() -> Tensor:
        loss = F.mse_loss(plain(x), y)
        loss.backward()
        return loss

    ref_opt.step(ref_closure)
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# -- LARS --------------------------------------------------------------------------------------


def test_trust_ratio_formula_on_a_hand_made_tensor() -> None:
    w = torch.tensor([5.0, 0.0, 2.0], dtype=torch.float64)  # ‖w‖ per tensor
    g = torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64)  # ‖g‖ per tensor
    r = trust_ratio(w, g, trust_coeff=0.001, weight_decay=0.01, eps=1e-8)
    assert r[0].item() == pytest.approx(0.001 * 5.0 / (1.0 + 0.01 * 5.0 + 1e-8), rel=1e-14)
    assert r[1].item() == 1.0  # ‖w‖ = 0: plain step
    assert r[2].item() == 1.0  # ‖g‖ = 0
    clipped = trust_ratio(w, g, trust_coeff=10.0, weight_decay=0.0, clip_lr=0.5)
    assert clipped[0].item() == 1.0  # min(ratio / lr, 1)


def test_lars_step_closed_form_and_excluded_bias() -> None:
    weight = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64))  # ‖w‖ = 5
    bias = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    gw = torch.tensor([[0.6, 0.0], [0.0, 0.8]], dtype=torch.float64)  # ‖g‖ = 1
    gb = torch.tensor([0.5, 0.5], dtype=torch.float64)
    weight.grad, bias.grad = gw.clone(), gb.clone()
    lr, eta, beta = 0.7, 0.01, 0.1
    opt = Lars([weight, bias], lr=lr, momentum=0.0, weight_decay=beta, trust_coeff=eta)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    opt.step()
    ratio = eta * 5.0 / (1.0 + beta * 5.0 + 1e-8)
    torch.testing.assert_close(
        weight.detach(), w0 - lr * ratio * (gw + beta * w0), atol=1e-15, rtol=0
    )
    torch.testing.assert_close(bias.detach(), b0 - lr * (gb + beta * b0), atol=1e-15, rtol=0)
    assert torch.equal(weight.grad, gw)  # gradients are not modified


def _lars_reference_step(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    wd: float,
    eta: float,
    nesterov: bool,
) -> None:
    """timm's per-tensor LARS loop, for comparison."""
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g + wd * p
        if p.ndim > 1:
            wn, gn = p.norm(), g.norm()
            ratio = eta * wn / (gn + wd * wn + 1e-8) if wn > 0 and gn > 0 else 1.0
            d = d * ratio
        if bufs[i] is None:
            bufs[i] = d.clone()
        else:
            bufs[i] = momentum * bufs[i] + d
        d = d + momentum * bufs[i] if nesterov else bufs[i]
        p.sub_(lr * d)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_per_tensor_loop(nesterov: bool) -> None:
    shapes = [(4, 3), (3,), (2, 5), (5, 2, 2), (6,)]
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    params.append(nn.Parameter(torch.zeros(3, 2, dtype=torch.float64)))  # zero-initialised
    ref = [p.detach().clone() for p in params]
    kw = {"lr": 0.5, "momentum": 0.9, "wd": 0.05, "eta": 0.02, "nesterov": nesterov}
    opt = Lars(params, lr=0.5, momentum=0.9, weight_decay=0.05, trust_coeff=0.02, nesterov=nesterov)
    bufs: list[Tensor | None] = [None] * len(params)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        _lars_reference_step(ref, grads, bufs, **kw)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, atol=1e-12, rtol=0)


def test_lars_wrapper_over_sgd_is_lars_with_decoupled_decay() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    g = torch.tensor([[0.0, 2.0]], dtype=torch.float64)  # ‖g‖ = 2
    w.grad, b.grad = g.clone(), torch.tensor([0.25], dtype=torch.float64)
    opt = LarsWrapper(torch.optim.SGD([w, b], lr=0.1, weight_decay=0.01), trust_coeff=0.5)
    opt.step()
    ratio = 0.5 * 5.0 / (2.0 + 0.01 * 5.0 + 1e-8)
    expected = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    expected = expected - 0.1 * (ratio * g + 0.01 * expected)
    torch.testing.assert_close(w.detach(), expected, atol=1e-15, rtol=0)
    assert b.item() == pytest.approx(1.0 - 0.1 * (0.25 + 0.01 * 1.0), abs=1e-15)  # excluded
    assert w.grad is not None
    torch.testing.assert_close(w.grad, ratio * g)  # rescaled in place, as apex's LARC does


@pytest.mark.parametrize("base", BASES)
def test_zero_initialised_b_moves_on_first_step_with_lars(base: str) -> None:
    model = TinyAdapterModel()
    x, y = regression_data()
    opt = MoRAOptimizer(model, base=base, lr=0.1, lars=True)
    F.mse_loss(model(x), y).backward()
    grad_b = model.lora.B.grad.clone()
    assert model.lora.B.abs().sum() == 0 and grad_b.abs().sum() > 0
    opt.step()
    assert model.lora.B.abs().sum() > 0
    if base == "sgd":  # ‖B‖ = 0: ratio 1, the plain first SGD step
        torch.testing.assert_close(model.lora.B.detach(), -0.1 * grad_b)


def test_lars_plain_sgd_on_zero_b() -> None:
    b = nn.Parameter(torch.zeros(3, 2))
    b.grad = torch.ones(3, 2)
    Lars([b], lr=0.5, momentum=0.9).step()
    assert torch.equal(b.detach(), torch.full((3, 2), -0.5))


# -- LAMB --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bounds", [(0.0, math.inf), (0.5, 2.0)])
def test_lamb_matches_per_tensor_loop(bounds: tuple[float, float]) -> None:
    shapes = [(4, 3), (3,), (2, 5)]
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    params.append(nn.Parameter(torch.zeros(2, 2, dtype=torch.float64)))
    ref = [p.detach().clone() for p in params]
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.99), 1e-6, 0.1
    opt = Lamb(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, trust_bounds=bounds)
    m = [torch.zeros_like(p) for p in ref]
    v = [torch.zeros_like(p) for p in ref]
    for t in range(1, 4):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (p, g) in enumerate(zip(ref, grads)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps) + wd * p
            ratio = 1.0
            phi = min(max(p.norm().item(), bounds[0]), bounds[1])
            if p.ndim > 1 and phi > 0 and u.norm() > 0:
                ratio = phi / u.norm().item()
            p.sub_(lr * ratio * u)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, atol=1e-12, rtol=0)


# -- MoRAOptimizer: groups, registry, validation, state ---------------------------------------


def test_loraplus_groups_and_weight_decay_exclusions() -> None:
    model = TinyAdapterModel(router=True)
    opt = MoRAOptimizer(
        model,
        base="adamw",
        lr=2e-4,
        weight_decay=0.05,
        loraplus_ratio=16,
        lr_scales={"router": 0.5},
    )
    names = [g["name"] for g in opt.param_groups]
    assert names == ["lora_a", "lora_b", "router", "other", "other_no_decay"]
    assert opt.group("lora_a")["lr"] == pytest.approx(2e-4)
    assert opt.group("lora_b")["lr"] == pytest.approx(16 * 2e-4)
    assert opt.group("router")["lr"] == pytest.approx(1e-4)
    assert opt.group("lora_a")["params"] == [model.lora.A]
    assert opt.group("lora_b")["params"] == [model.lora.B]
    assert opt.group("other")["params"] == [model.head.weight]
    assert opt.group("other")["weight_decay"] == 0.05
    no_decay = opt.group("other_no_decay")
    assert no_decay["weight_decay"] == 0.0 and not no_decay["lars"]
    assert {id(p) for p in no_decay["params"]} == {
        id(model.norm.weight),
        id(model.norm.bias),
        id(model.head.bias),
    }
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # each trainable parameter exactly once
    with pytest.raises(KeyError, match="expert"):
        opt.group("expert")


def test_magnitude_and_scale_roles_are_not_decayed() -> None:
    class Dora(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.magnitude = nn.Parameter(torch.ones(4, 1))  # 2-d, still excluded by role
            self.square = nn.Parameter(torch.zeros(3, 3))

        def param_roles(self) -> dict[str, ParamRole]:
            return {"magnitude": ParamRole.MAGNITUDE, "square": ParamRole.SQUARE}

    groups = build_param_groups(Dora(), lr=1.0, weight_decay=0.1)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [
        ("expert", 0.1),
        ("expert_no_decay", 0.0),
    ]


def test_explicit_groups_are_used_as_given_and_not_mutated() -> None:
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    groups = [{"params": [a], "lr": 0.5, "name": "mine"}, {"params": [b]}]
    snapshot = copy.deepcopy(groups)
    opt = MoRAOptimizer(groups, base="sgd", lr=0.1, lars=True, sam=SAMConfig())
    assert [g["name"] for g in opt.param_groups] == ["mine", "group1"]
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
    assert groups[0].keys() == snapshot[0].keys() and groups[1].keys() == snapshot[1].keys()


def test_base_registry() -> None:
    assert BASE_OPTIMIZERS.names() == ["adamw", "lamb", "sgd"]
    w = nn.Parameter(torch.ones(2, 2))
    assert isinstance(MoRAOptimizer([w], base="sgd", lars=True).base_optimizer, Lars)
    assert isinstance(MoRAOptimizer([w], base="adamw", lars=True).base_optimizer, LarsWrapper)
    assert isinstance(MoRAOptimizer([w], base="lamb").base_optimizer, Lamb)
    sam = MoRAOptimizer([w], base="adamw", sam=SAMConfig())
    assert isinstance(sam.base_optimizer, SAM)
    inner = sam.base_optimizer.base_optimizer
    assert isinstance(inner, torch.optim.AdamW)
    assert sam.param_groups is inner.param_groups  # one shared list
    sam.param_groups[0]["lr"] = 0.123
    assert inner.param_groups[0]["lr"] == 0.123


@pytest.mark.parametrize(
    ("make", "shown"),
    [
        (lambda p: MoRAOptimizer([p], lr=-1e-3), "-0.001"),
        (lambda p: MoRAOptimizer([p], base="adamx"), "adamx"),
        (lambda p: MoRAOptimizer(TinyAdapterModel(), loraplus_ratio=0), "0"),
        (lambda p: MoRAOptimizer(TinyAdapterModel(), loraplus_ratio=-2.5), "-2.5"),
        (lambda p: MoRAOptimizer([p], sam=SAMConfig(rho=-0.05)), "-0.05"),
        (lambda p: SAMConfig(rho=-0.5), "-0.5"),
        (lambda p: SAM(torch.optim.SGD([p], lr=0.1), rho=-0.25), "-0.25"),
        (lambda p: Lars([p], lr=-0.5), "-0.5"),
        (lambda p: Lamb([p], lr=-0.75), "-0.75"),
        (lambda p: Lamb([p], trust_bounds=(2.0, 1.0)), "(2.0, 1.0)"),
        (lambda p: LarsConfig(trust_coeff=-3.0), "-3.0"),
        (lambda p: MoRAOptimizer(TinyAdapterModel(), lr_scales={"routr": 2.0}), "routr"),
        (lambda p: MoRAOptimizer([p], loraplus_ratio=4), "loraplus_ratio=4"),
        (lambda p: build_param_groups(TinyAdapterModel(), lr=1.0, loraplus_ratio=-1), "-1"),
    ],
)
def test_invalid_arguments_raise_naming_the_value(
    make: Callable[[Tensor], object], shown: str
) -> None:
    p = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError) as err:
        make(p)
    assert shown in str(err.value)


@pytest.mark.parametrize(
    "cfg", [("adamw", True, "sam"), ("sgd", True, "asam"), ("lamb", False, "sam")], ids=config_id
)
def test_state_dict_round_trip_continues_identically(cfg: tuple[str, bool, str]) -> None:
    base, lars, sam = cfg
    x, y = regression_data()

    def make(model: nn.Module) -> MoRAOptimizer:
        return MoRAOptimizer(
            model, base=base, lr=0.01, lars=lars, sam=SAMS[sam], loraplus_ratio=4, weight_decay=0.01
        )

    def train(model: nn.Module, opt: MoRAOptimizer, steps: int) -> None:
        def closure() -> Tensor:
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(steps):
            opt.step(closure)

    model = TinyAdapterModel()
    opt = make(model)
    train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 3)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    torch.manual_seed(123)
    resumed = TinyAdapterModel()
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    train(resumed, opt2, 3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_deepcopy_keeps_the_chain() -> None:
    model = TinyAdapterModel()
    opt = MoRAOptimizer(model, base="adamw", lars=True, sam=SAMConfig())
    copied = copy.deepcopy({"model": model, "opt": opt})
    model2, opt2 = copied["model"], copied["opt"]
    assert isinstance(opt2.base_optimizer, SAM) and opt2.sam is opt2.base_optimizer
    assert opt2.param_groups is opt2.base_optimizer.base_optimizer.param_groups
    assert opt2.group("lora_a")["params"][0] is model2.lora.A


# -- the guarded step and epoch (moracl.train) --------------------------------------------------


def _regression(seed: int = 0) -> tuple[nn.Linear, Tensor, Tensor]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    return nn.Linear(4, 3), torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)


def test_guarded_epoch_equals_a_plain_loop_without_the_skipped_step() -> None:
    """``on_nonfinite=skip``: the loop's weights are those of a plain AdamW loop that never
    took the poisoned step; the record counts and averages the steps taken."""
    import warnings

    from moracl.guard import StepGuard
    from moracl.train import guarded_epoch

    model, x, y = _regression()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    batches = [torch.arange(i, i + 4) for i in range(0, 12, 4)]

    def step(idx: Tensor) -> Tensor:
        xb = x[idx].clone()
        if int(idx[0]) == 4:  # the second batch's inputs are NaN
            xb[0, 0] = math.nan
        loss = F.cross_entropy(model(xb), y[idx])
        loss.backward()
        return loss

    guard = StepGuard("skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = guarded_epoch(
            step, batches, optimizer=opt, params=list(model.parameters()), guard=guard,
            where="toy, epoch 0", named=model.named_parameters,
        )  # fmt: skip
    assert any("skipped 1 of 3 steps" in str(w.message) for w in caught)
    ref, _, _ = _regression()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    losses = []
    for idx in (batches[0], batches[2]):
        loss = F.cross_entropy(ref(x[idx]), y[idx])
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        losses.append(float(loss.detach()))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert (record.steps, record.skipped, record.step) == (3, 1, 3)
    assert [s for s, _ in record.step_losses] == [1, 3]
    assert record.loss == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert record.lr == 0.1


def test_guarded_epoch_stops_naming_the_step() -> None:
    from moracl.guard import NonFiniteError, StepGuard
    from moracl.train import guarded_epoch

    model, x, y = _regression()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(idx: Tensor) -> Tensor:
        loss = F.cross_entropy(model(x[idx]), y[idx]) * (math.inf if int(idx[0]) else 1.0)
        loss.backward()
        return loss

    with pytest.raises(NonFiniteError, match=r"^toy, epoch 2, step 1: the training loss is inf"):
        guarded_epoch(
            step, [torch.arange(0, 6), torch.arange(6, 12)], optimizer=opt,
            params=list(model.parameters()), guard=StepGuard("stop"), where="toy, epoch 2",
        )  # fmt: skip
    # the first step was taken, the second refused before its update
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("wrapped", [True, False])
def test_guarded_step_skipped_in_sams_second_pass_leaves_the_weights(wrapped: bool) -> None:
    """A SAM step whose second pass (at w + e) is non-finite is skipped: the weights are
    back at w, unchanged, and the next step equals a fresh optimiser's first step."""
    from moracl.guard import StepGuard
    from moracl.train import guarded_step

    model, x, y = _regression()
    params = list(model.parameters())
    if wrapped:
        opt: torch.optim.Optimizer = MoRAOptimizer(
            model, base="sgd", lr=0.1, sam=SAMConfig(rho=0.05)
        )
    else:
        opt = SAM(torch.optim.SGD(params, lr=0.1), rho=0.05)
    before = [p.detach().clone() for p in params]
    calls = {"n": 0}

    def step() -> Tensor:
        calls["n"] += 1
        loss = F.cross_entropy(model(x), y) * (math.nan if calls["n"] == 2 else 1.0)
        loss.backward()
        return loss

    guard = StepGuard("skip")
    assert guarded_step(step, optimizer=opt, params=params, guard=guard, where="toy") is None
    assert calls["n"] == 2 and guard.skipped == 1
    assert "SAM's second pass" in guard.last_skip
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    value = guarded_step(step, optimizer=opt, params=params, guard=guard, where="toy")
    assert value == pytest.approx(float(F.cross_entropy(nn.functional.linear(x, *before), y)))
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
