"""The ``token`` loop at inference on fixed buffers and as CUDA graphs, against the masked
fixed-step form (every token through every step)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from moracl.experts.act import AdaptiveComputation

from .test_act_exit import MAX_STEPS, _act, _assert_same

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_results_of_two_calls_are_independent() -> None:
    act = _act("mlp", torch.float64).eval()
    x1, x2 = torch.randn(2, 30, 8, dtype=torch.float64)
    with torch.no_grad():
        first = act(x1)
        kept = first.output.clone()
        act(x2)
    assert torch.equal(first.output, kept)


def test_the_setting_survives_copies_and_pickles() -> None:
    act = AdaptiveComputation(torch.nn.Linear(8, 8), features=8, max_steps=3, cuda_graphs=True)
    assert copy.deepcopy(act).cuda_graphs and pickle.loads(pickle.dumps(act)).cuda_graphs
    assert not AdaptiveComputation(torch.nn.Linear(8, 8), features=8, max_steps=3).cuda_graphs


def test_cuda_graphs_is_checked() -> None:
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match=f"cuda_graphs must be True or False, got {bad!r}"):
            AdaptiveComputation(torch.nn.Linear(8, 8), features=8, max_steps=2, cuda_graphs=bad)  # type: ignore[arg-type]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("block", ["mlp", "mixture"])
def test_graphed_steps_equal_the_masked_form_call_after_call(block: str) -> None:
    act = _act(block, torch.float32, buckets=4).cuda().eval()
    graphed = copy.deepcopy(act)
    graphed._inference.graphs = True
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):  # eager, eager on a side stream + capture, then replays
        x = torch.randn(6, 7, 8, generator=gen).cuda()
        with torch.no_grad():
            masked = act(x, loop="masked")
            out = graphed(x)
        assert len(torch.unique(masked.steps)) >= 3
        _assert_same(out, masked, atol=1e-5, rtol=1e-5)
        assert out.weights.shape[0] <= MAX_STEPS
    assert graphed._inference._cache, "no graph was captured"


@pytest.mark.gpu
@cuda
def test_graphs_are_captured_again_when_a_parameter_moves() -> None:
    act = _act("mlp", torch.float32).cuda().eval()
    act._inference.graphs = True
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        for _ in range(3):
            act(x)
        first = next(iter(act._inference._cache.values()))
        act.block[0].weight = torch.nn.Parameter(act.block[0].weight * 2)  # a new tensor
        out = act(x)
        masked = act(x, loop="masked")
    assert next(iter(act._inference._cache.values())) is not first
    _assert_same(out, masked, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@cuda
def test_graphed_steps_under_bf16_autocast_equal_the_eager_token_loop() -> None:
    act = _act("mixture", torch.float32, buckets=4).cuda().eval()
    graphed = copy.deepcopy(act)
    graphed._inference.graphs = True
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = act(x)
        for _ in range(3):
            out = graphed(x)
    assert torch.equal(out.steps, ref.steps)
    # the same kernels on the same shapes; bf16's tolerance in case cuBLAS picks another
    torch.testing.assert_close(out.output, ref.output, rtol=2**-7, atol=1e-3)
