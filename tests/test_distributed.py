"""Data-parallel training on CPU with gloo: two processes reach what one process reaches on
the same global batches (after a few steps, to a bound on float32 rounding of gradients summed
in another order); a run checkpointed by two processes resumes in one (compared exactly: no
verdict here depends on the machine's kernels); launch errors are clear.

Processes are started with ``torch.multiprocessing`` on a free local port (the environment
``torchrun`` would set), one thread each.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl import distributed
from moracl.distributed import DataParallel, DistributedConfig, local_rows, shard_batch
from tests.conftest import mlp, randomize_adapters
from tests.offline_data import needs_fashion_mnist

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Avalanche creates loggers at import and refuses to on rank > 0 once a group exists:
# import it before the processes join (without Avalanche the run test is skipped)
with contextlib.suppress(ImportError):
    import moracl.continual.run  # noqa: F401

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
    for attempt in range(3):  # the free port can be taken between its probe and its use
        try:
            mp.spawn(_worker, args=(world, _free_port(), fn, args, out), nprocs=world, join=True)
            break
        except mp.ProcessRaisedException as e:
            if "address already in use" not in str(e).lower() or attempt == 2:
                raise
    result: list[Any] = torch.load(out, weights_only=False)
    return result


# -- a small mixture trained with MoRAOptimizer (LARS + SAM) -------------------------------


def _mixture_model(blocks: bool = False) -> nn.Module:
    from moracl import MoRAModel, RouterConfig
    from moracl.adapters import AdapterConfig
    from moracl.experts.mixture import ExpertGroup, MixtureConfig

    torch.manual_seed(0)
    router = RouterConfig(type="topk", k=2, noise=False, balance_weight=0.1, z_weight=0.01)
    expert = AdapterConfig(kind="lora", rank=4, alpha=8.0)  # type: ignore[call-arg]
    config = MixtureConfig(router=router, groups=(ExpertGroup(expert, 4),))
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
        diff = float((a[k].double() - b[k].double()).abs().max())
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


# -- moracl run: two processes, interrupted, resumed by one -------------------------------


class _Features(nn.Module):
    """A small classifier called with keyword inputs, as ``moracl finetune`` calls its model."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def finetune_tiny() -> dict[str, Tensor]:
    """``moracl finetune``'s training loop on a small LoRA model: 30 examples in global
    batches of 7 (the last of 2: unequal shares), 2 epochs."""
    from moracl import AdapterConfig, MoRAModel
    from moracl.config import load_config
    from moracl.jobs.finetune import train_model

    torch.manual_seed(0)
    model = MoRAModel(_Features().requires_grad_(False), AdapterConfig(rank=2, alpha=4.0))
    randomize_adapters(model, scale=0.1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 12, generator=gen), torch.randint(0, 4, (30,), generator=gen)
    config = load_config(
        CONFIGS / "wordnet_finetune.yaml", ["train.batch_size=7", "train.epochs=2"]
    )
    train_model(model, lambda idx: {"x": x[idx]}, y, config.train, name="finetune")
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_finetune_training_in_two_processes_reaches_the_weights_of_one(tmp_path: Path) -> None:
    """``moracl finetune`` under torchrun: each global batch split across the processes, the
    gradients summed by share; both processes hold the same weights, and one process's to
    1e-6 (7e-9 measured: the float32 rounding of gradients summed in another order)."""
    one = finetune_tiny()
    two = spawn(finetune_tiny, tmp=tmp_path)
    _close(two[0], two[1], atol=0.0)
    _close(two[0], one, atol=1e-6)
    with pytest.raises(ValueError, match="moracl finetune: a global batch of 1 rows"):
        distributed.check_batches(29, 7, 2, "moracl finetune")


def _run_config(out: Path) -> Any:
    from moracl.config import from_dict
    from moracl.continual.config import RunConfig

    data = {
        "job": "run",
        "scenario": {
            "name": "split-fashion",
            "setting": "task",
            "options": {"per_class": 30, "test_per_class": 20},
        },
        "strategies": ["moracl", "naive", "replay"],
        "baselines": {"replay_size": 30},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-2, "head_lr": 2e-2},
        "output_dir": str(out),
    }
    return from_dict(RunConfig, data)


def run_until(out: str, stop_after: int | None) -> dict[str, Any]:
    """``moracl run`` of :func:`_run_config` into ``out``, stopped after experience
    ``stop_after``; returns this process's world size and, strategy by strategy in the
    checkpoint's order, the trained tensors it held when the last checkpoint was written
    (rank 0 writes it, the other processes wait at the barrier holding theirs)."""
    import moracl.continual.run as run_module
    from moracl.jobs.continual import run as run_job

    held: list[dict[str, Tensor]] = []
    trained_state = run_module.trained_state

    def spy(model: nn.Module, frozen: set[int]) -> dict[str, Tensor]:
        state = trained_state(model, frozen)
        held.append(state)
        return state

    config = _run_config(Path(out))
    run_module.trained_state = spy  # type: ignore[assignment]
    try:
        run_job(config, progress=False, stop_after=stop_after)
    finally:
        run_module.trained_state = trained_state  # type: ignore[assignment]
    # one call per strategy at each checkpoint, in the order the checkpoint lists them
    return {"world": distributed.world_size(), "held": held[-len(config.strategies) :]}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread, as each process of :func:`spawn` has, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _layout(data: Any) -> Any:
    """A JSON document with every float replaced by ``float``: its keys, list lengths, ``None``
    cells and every int, string and bool stay; only measured values (accuracies, seconds)
    are blanked."""
    if isinstance(data, dict):
        return {k: _layout(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_layout(v) for v in data]
    return float if isinstance(data, float) else data


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _tree(root: Path) -> list[str]:
    """The files of a run folder; event files named by time and process id are counted by
    folder instead."""
    names = []
    for p in root.rglob("*"):
        if p.is_file():
            rel = p.relative_to(root)
            names.append(str(rel.parent / "<events>") if "tfevents" in p.name else str(rel))
    return sorted(names)


def _matrices(run_dir: Path) -> list[tuple[str, Any]]:
    data = json.loads((run_dir / "metrics.json").read_text())
    return [(s["name"], s["matrix"]) for s in data["strategies"]]


@needs_fashion_mnist
@pytest.mark.slow
def test_run_checkpointed_by_two_processes_resumes_in_one(tmp_path: Path) -> None:
    """A checkpoint written by two processes is one a single process could have written, and
    one process resumes from it deterministically. Every assertion is exact.

    What is not compared: the two-process and the one-process *trajectories*. The processes
    sum their gradients in another order, a float32 rounding difference (about 1e-7) that
    Adam at a high learning rate amplifies (it divides by ``|g| + eps``, so rounding noise in
    a near-zero gradient becomes a step of up to the learning rate) and the following
    experiences carry across decision boundaries: how far the accuracies then drift depends
    on the CPU's kernels, so no tolerance on them is machine-independent. Instead:

    1. two gloo processes train experiences 0 and 1 and stop. Both processes hold the very
       tensors rank 0 wrote (gradients summed by an all-reduce that gives every process the
       same bits); nothing is half-written; the run folder has the files of a one-process
       run stopped there and the checkpoint has its strategies, tensor names, shapes and
       dtypes, and its JSON state and results with the same keys, lengths, ``None`` cells
       and every int, string and bool equal (floats are measurements of the trajectory);
    2. what no rounding reaches is bit-identical to the one-process checkpoint: integer and
       boolean tensors (class-to-task maps, seen classes, router masks), the heads of
       experiences 2 to 4 (no row of experiences 0 and 1 reaches them, so no process gives
       them a gradient and they keep their seeded initialisation) and the accuracies of the
       initial model (the same weights, the same test batches in one thread: the same
       logits; the per-process counts are integers, summed exactly);
    3. one process resumes from the two-process checkpoint to the end; another resumes from
       a byte-identical copy, is interrupted after experience 2 and resumed again. Both end
       with the same accuracy matrices, rows 0 and 1 those of the two-process checkpoint,
       and bit-identical final checkpoints: the resumed run is a function of the checkpoint
       alone, whichever number of processes wrote it (the same machine and thread count
       computes both, so this holds on any machine)."""
    pytest.importorskip("avalanche")
    from moracl.continual.checkpoint import load_checkpoint
    from moracl.jobs.continual import run as run_continual

    split, whole = tmp_path / "split", tmp_path / "whole"
    ranks = spawn(run_until, str(split), 1, tmp=tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    with _one_thread():
        assert run_until(str(whole), 1)["world"] == 1
    assert not list(split.glob("**/.tmp-*"))  # one writer, nothing half-written
    assert _tree(split) == _tree(whole)
    for name in ("eval.csv", "train.csv"):  # no rows from the second process
        lines = (split / "logs" / name).read_text().count("\n")
        assert lines == (whole / "logs" / name).read_text().count("\n")
    a, b = load_checkpoint(split), load_checkpoint(whole)  # verifies every checksum
    assert a.experience == b.experience == 1

    # 1. the processes are replicas of what rank 0 wrote
    for r, process in enumerate(ranks):
        assert len(process["held"]) == len(a.tensors)
        for (name, written), held in zip(a.tensors.items(), process["held"]):
            assert held.keys() == written.keys(), (r, name)
            for key, tensor in held.items():
                assert torch.equal(tensor, written[key]), (r, name, key)

    # 1. the layout of the one-process checkpoint
    assert list(a.tensors) == list(b.tensors)
    untouched = [f"heads.{j}." for j in range(2, 5)]
    for name, mine in b.tensors.items():
        theirs = a.tensors[name]
        assert list(theirs) == list(mine), name
        for key, t in mine.items():
            u = theirs[key]
            assert (u.shape, u.dtype) == (t.shape, t.dtype), (name, key)
            if not t.is_floating_point() or key.startswith(tuple(untouched)):
                assert torch.equal(u, t), (name, key)  # 2.
            else:
                assert bool(torch.isfinite(u).all()), (name, key)
    assert _layout(a.state) == _layout(b.state)
    for ckpt, run_dir in ((a, split), (b, whole)):
        assert ckpt.meta["results"]["config"]["output_dir"] == str(run_dir)
        ckpt.meta["results"]["config"]["output_dir"] = "RUN_DIR"
    assert _layout(a.meta) == _layout(b.meta)

    # 2. the initial model's accuracies
    split_matrices = _matrices(split)
    assert [(n, m["b"]) for n, m in split_matrices] == [(n, m["b"]) for n, m in _matrices(whole)]

    # 3. resumed by one process, twice, from the same bytes
    copy = tmp_path / "copy"
    shutil.copytree(split, copy)
    assert _files(copy) == _files(split)
    with _one_thread():
        run_continual(_run_config(split), resume=True, progress=False)
        run_continual(_run_config(copy), resume=True, progress=False, stop_after=2)
        assert load_checkpoint(copy).experience == 2
        run_continual(_run_config(copy), resume=True, progress=False)
    done, again = _matrices(split), _matrices(copy)
    assert done == again
    for (name, before), (_, after) in zip(split_matrices, done):
        assert after["R"][:2] == before["R"][:2], name
        assert all(x is not None for row in after["R"][2:] for x in row), name
    c, d = load_checkpoint(split), load_checkpoint(copy)
    assert c.experience == d.experience == 4
    assert c.state == d.state
    assert list(c.tensors) == list(d.tensors)
    for name, tensors in c.tensors.items():
        assert list(tensors) == list(d.tensors[name]), name
        for key, t in tensors.items():
            assert torch.equal(t, d.tensors[name][key]), (name, key)


# -- launch errors and helpers (no processes started) ----------------------------------------


def test_rows_of_a_global_batch_are_split_in_order() -> None:
    for n in (7, 8, 13):
        parts = [local_rows(n, r, 3) for r in range(3)]
        assert [i for s in parts for i in range(s.start, s.stop)] == list(range(n))
        assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


def test_launch_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        distributed.init_distributed("mpi")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK is not set: launch with torchrun"):
        distributed.init_distributed("gloo")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'nccl' needs CUDA GPUs"):
        distributed.init_distributed("nccl")
    with pytest.raises(ValueError, match="CUDA is not available"):
        distributed.init_distributed("gloo", "cuda")


def test_more_processes_than_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="global batch of 1 rows cannot be split across 2"):
        distributed.check_batches(33, 16, 2, "experience 0")
    distributed.check_batches(34, 16, 2, "experience 0")
    with pytest.raises(ValueError, match="3 rows cannot be split across 4 processes"):
        shard_batch([torch.zeros(3, 2)], world=4)
    with pytest.raises(ValueError, match="sam_first_pass must be one of"):
        DistributedConfig(sam_first_pass="sometimes")


def test_one_process_is_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torchrun nothing joins a group, splits a batch or communicates."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)  # (a test runner launched by torchrun)
    assert not torch.distributed.is_initialized()
    env = distributed.init_distributed()
    assert (env.rank, env.world_size, env.backend) == (0, 1, None)
    assert not torch.distributed.is_initialized()
    x = torch.arange(5.0)
    (mine,), share = shard_batch([x])
    assert mine is not x and torch.equal(mine, x) and share == 1.0
    model = mlp()
    model(torch.randn(2, 24)).sum().backward()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    parallel = DataParallel(model)
    parallel.sync_gradients(0.5)
    assert parallel.syncs == 0
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
