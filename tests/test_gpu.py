"""CUDA checks: bf16 autocast training through every adapter kind matches an fp32 reference.

Skipped without a GPU (CI has none); run on a GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moracl import AdapterConfig, MoRAModel

from .conftest import randomize_adapters

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KINDS = [
    {"kind": "lora"},
    {"kind": "dora"},
    {"kind": "mora", "compression": "sharing"},
    {"kind": "mora", "compression": "rotation"},
    {"kind": "vera"},
]


@pytest.mark.parametrize(
    "options", KINDS, ids=["lora", "dora", "mora-sharing", "mora-rotation", "vera"]
)
def test_bf16_autocast_matches_fp32(options: dict) -> None:
    base = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 384)).cuda()
    model = MoRAModel(base, AdapterConfig(rank=8, **options))
    randomize_adapters(model, scale=0.05)
    x = torch.randn(4, 64, 256, device="cuda")
    ref = model(x)
    ref_grads = torch.autograd.grad(
        ref.square().mean(), [p for p in model.parameters() if p.requires_grad]
    )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(
        out.float().square().mean(), [p for p in model.parameters() if p.requires_grad]
    )
    out_err = ((out.float() - ref).norm() / ref.norm()).item()
    assert out_err < 1e-2, f"output relative error {out_err:.3g}"  # bf16 rounding
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        rel = ((g - r).norm() / r.norm().clamp_min(1e-12)).item()
        assert rel < 5e-2, f"gradient relative error {rel:.3g} for a {tuple(g.shape)} tensor"


def test_compiled_lora_matches_eager() -> None:
    base = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)).cuda()
    model = MoRAModel(base, AdapterConfig(kind="lora", rank=8))
    randomize_adapters(model, scale=0.05)
    x = torch.randn(8, 128, device="cuda")
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_graphed_training_step_trains_like_eager() -> None:
    """A mixture model trained by a CUDA-graph replayed step (moracl.cuda_graphs) ends where
    the same steps in eager mode end: routing, aux losses, backward and AdamW all replay."""
    import copy

    from moracl.cuda_graphs import GraphedStep
    from moracl.experts import MixtureConfig, RouterConfig

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10)).cuda()
    cfg = MixtureConfig(rank=4, experts=4, router=RouterConfig(type="topk", k=2, noise=False))
    models = [MoRAModel(base, cfg)]
    models.append(copy.deepcopy(models[0]))
    batches = [(torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda"))]
    batches += [(torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda"))
                for _ in range(4)]  # fmt: skip
    steps = []
    for model in models:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, capturable=True)

        def step(x: torch.Tensor, y: torch.Tensor, model=model, opt=opt) -> torch.Tensor:  # type: ignore[no-untyped-def]
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = nn.functional.cross_entropy(model(x), y) + model.aux_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        steps.append(step)
    for x, y in batches:
        steps[0](x, y)
    graphed = GraphedStep(steps[1], *batches[0], warmup=1)  # the warm-up trains on batch 0
    for x, y in batches[1:]:
        graphed(x, y)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    moved = [p for n, p in models[1].named_parameters() if "lora_B" in n]
    assert moved and all(p.abs().sum() > 0 for p in moved)


def test_gaussian_task_inference_on_cuda_matches_the_cpu() -> None:
    """Statistics, discriminants and the forward routed by the inferred task on CUDA against
    the same model on the CPU (the statistics in float64 on both)."""
    from moracl.continual.inference import GaussianTaskInference, input_features
    from moracl.experts.mixture import MixtureConfig
    from moracl.experts.routers.config import RouterConfig

    base = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))
    router = RouterConfig(type="task", num_tasks=2, task_weights=True)
    mixture = MixtureConfig(kind="lora", rank=4, experts=2, router=router)
    model = MoRAModel(base, mixture, target_modules=["2"])
    randomize_adapters(model, scale=0.05)
    y = torch.randint(0, 4, (256,))
    x = torch.randn(256, 32) + 2 * (y[:, None] >= 2)  # classes 2 and 3: experience 1
    inference = GaussianTaskInference(2, 4)
    feats = input_features(model, x)  # (256, 64): the input of layer "2"
    for e in (0, 1):
        rows = (y >= 2) == bool(e)
        inference.update(feats[rows], e, y[rows])
    queries = torch.randn(64, 32) + 2 * torch.randint(0, 2, (64, 1))
    scores = inference.scores(input_features(model, queries))
    tasks = scores.argmax(1)
    want = model(queries, task_ids=tasks)
    model.cuda()
    inference.cuda()
    assert inference.second.is_cuda
    cuda_scores = inference.scores(input_features(model, queries.cuda()))
    torch.testing.assert_close(cuda_scores.cpu(), scores, rtol=1e-5, atol=1e-4)
    assert torch.equal(cuda_scores.argmax(1).cpu(), tasks)
    got = model(queries.cuda(), task_ids=tasks.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
