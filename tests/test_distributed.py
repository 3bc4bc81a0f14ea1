"""Data-parallel training on CPU with gloo: two processes reach what one process reaches on
the same global batches; a run checkpointed by two processes resumes in one; launch errors
are clear.

Processes are started with ``torch.multiprocessing`` on a free local port (the environment
``torchrun`` would set), one thread each.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl import distributed
from moracl.distributed import DataParallel, shard_batch
from tests.conftest import mlp, randomize_adapters

# -- harness -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out: str
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    distributed.init_distributed("gloo", timeout_s=120)
    try:
        result = fn(*args)
        gathered = distributed.gather_objects(result)
    finally:
        distributed.shutdown()
    if rank == 0:
        torch.save(gathered, out)


def spawn(fn: Callable[..., Any], *args: Any, world: int = 2, tmp: Path) -> list[Any]:
    """``fn(*args)`` in ``world`` gloo processes; every process's return value, by rank."""
    import torch.multiprocessing as mp

    out = str(tmp / f"result-{fn.__name__}.pt")
    mp.spawn(_worker, args=(world, _free_port(), fn, args, out), nprocs=world, join=True)
    result: list[Any] = torch.load(out, weights_only=False)
    return result


# -- a small mixture trained with MoRAOptimizer (LARS + SAM) -------------------------------


def _mixture_model(blocks: bool = False) -> nn.Module:
    from moracl import MoRAModel, RouterConfig
    from moracl.experts.mixture import MixtureConfig

    torch.manual_seed(0)
    router = RouterConfig(type="topk", k=2, noise=False, balance_weight=0.1, z_weight=0.01)
    config = MixtureConfig(kind="lora", rank=4, experts=4, router=router, options={"alpha": 8.0})
    base = _Blocks() if blocks else mlp()
    targets = ["layers.0", "layers.1"] if blocks else ["0", "2"]
    return MoRAModel(base, config, target_modules=targets)


class _Blocks(nn.Module):
    """Two linear blocks in an ``nn.ModuleList`` (what FSDP shards), ``(b, 24) -> (b, 12)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(24, 40), nn.Linear(40, 12)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers[1](F.gelu(self.layers[0](x)))


def train_mixture(
    sam_first_pass: str = "global",
    shard: bool = False,
    base: str = "adamw",
    steps: int = 5,
    rows: int = 13,
) -> dict[str, Any]:
    """LARS + SAM steps (``MoRAOptimizer`` over ``base``) on seeded global batches of ``rows``
    rows (odd: unequal shares), split across the processes; returns the trainable tensors
    and the number of gradient syncs."""
    from moracl import MoRAOptimizer, SAMConfig

    model = _mixture_model(blocks=shard)
    randomize_adapters(model, scale=0.1)  # no all-zero lora_B: every gradient is informative
    if shard:
        distributed.shard_backbone(model)
    parallel = DataParallel(model)
    opt = MoRAOptimizer(
        model,
        base=base,
        **({"eps": 1e-6} if base == "adamw" else {}),
        lr=5e-2,
        lars=True,
        sam=SAMConfig(rho=0.05),
        model=parallel if sam_first_pass == "local" else model,
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(rows, 24, generator=gen), torch.randint(0, 12, (rows,), generator=gen)
        (xl, yl), share = shard_batch([x, y])

        def closure(xl: Tensor = xl, yl: Tensor = yl, share: float = share) -> Tensor:
            loss = F.cross_entropy(model(xl), yl) + model.aux_loss()
            loss.backward()
            parallel.sync_gradients(share)
            return loss

        opt.step(closure)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"state": state, "syncs": parallel.syncs}


def _close(a: dict[str, Tensor], b: dict[str, Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = float((a[k] - b[k]).abs().max())
        assert diff <= atol, f"{k}: max difference {diff:.3g} > {atol:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_two_processes_reach_the_weights_of_one(base: str, tmp_path: Path) -> None:
    """The same weights on both processes, and the one-process weights to 1e-5.

    The processes sum their gradients in another order than one process does, a difference
    of float32 rounding (about 1e-7 relative). LARS over SGD (``sgd``) keeps it there
    (about 1e-9 here). Adam divides by ``|g| + eps`` and so enlarges it for entries whose
    gradient is near ``eps``: with AdamW's default ``eps=1e-8`` the weights differ by 2e-5
    after these five steps, with ``eps=1e-6`` by 5e-7 (measured), hence ``eps=1e-6`` and
    adapters that start away from zero."""
    one = train_mixture(base=base)
    two = spawn(train_mixture, "global", False, base, tmp=tmp_path)
    _close(two[0]["state"], two[1]["state"], atol=0.0)
    _close(two[0]["state"], one["state"])
    assert two[0]["syncs"] == 2 * 5  # SAM's two passes, synchronised each
    start_model = _mixture_model()
    randomize_adapters(start_model, scale=0.1)
    start = start_model.state_dict()
    moved = sum(float((v - start[k]).abs().sum()) for k, v in one["state"].items())
    assert moved > 1e-2  # the steps change the weights


@pytest.mark.slow
def test_sam_local_first_pass_skips_one_sync_and_stays_replicated(tmp_path: Path) -> None:
    two = spawn(train_mixture, "local", tmp=tmp_path)
    _close(two[0]["state"], two[1]["state"], atol=0.0)
    assert two[0]["syncs"] == 5  # the second pass only
    # each process perturbs by its own gradient (m-SAM): not the one-process step
    one = train_mixture()
    diff = max(float((two[0]["state"][k] - one["state"][k]).abs().max()) for k in one["state"])
    assert diff > 1e-5


@pytest.mark.slow
def test_sharded_backbone_trains_like_one_process(tmp_path: Path) -> None:
    one = train_mixture("global", True)  # one process: shard_backbone does nothing
    two = spawn(train_mixture, "global", True, tmp=tmp_path)
    _close(two[0]["state"], two[1]["state"], atol=0.0)
    _close(two[0]["state"], one["state"])
