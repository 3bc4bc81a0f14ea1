"""Data-parallel training over ``torch.distributed``: what ``torchrun`` needs from moracl.

    torchrun --nproc-per-node 2 -m moracl run configs/wordnet_domains.yaml

Every process holds the whole model (frozen backbone, adapters, routers, heads) and walks the
*same* global mini-batches in the same order as a one-process run; each takes a contiguous
slice of the rows of every global batch (:func:`local_rows`). After ``backward`` the
gradients of the trainable parameters are summed across processes, each weighted by its share
of the global batch (:class:`DataParallel`), so the step equals the one-process step on the
global batch. Auxiliary router losses that depend on the whole batch (the Switch balance loss)
use the expert-assignment counts of the global batch (:func:`reduced_aux_loss`).

Why an explicit bucketed all-reduce and not ``DistributedDataParallel``: the set of trainable
parameters changes between experiences (experts grow, old ones and finished heads freeze), the
meta-learning loss runs the model through ``torch.func`` (``functional_call``, ``vmap``), which
never goes through a wrapped module's ``forward``, and sparse routing leaves experts without a
gradient on one process but not on another. DDP fixes its parameter set at construction, needs
its own ``forward`` and ``find_unused_parameters`` (a graph walk per step) for the last case,
and hides the wrapped model's attributes from Avalanche's plugins. :class:`DataParallel` reads
the trainable parameters at every sync, reduces each bucket with one collective, carries one
"has a gradient" flag per tensor in the same buffer (a tensor no process touched keeps
``grad is None``, as in one process), and leaves ``forward`` alone. Adapter gradients are small
next to the backbone's compute, so not overlapping their reduction with ``backward`` costs
little (see ``moracl bench distributed``).

Sharding the frozen backbone (FSDP, :func:`shard_backbone`) is optional: the backbone's blocks
are sharded with ``torch.distributed.fsdp.fully_shard`` while every trainable tensor stays
replicated and is synchronised as above.

The one-process path is untouched: without ``torchrun``'s environment (``WORLD_SIZE`` > 1)
nothing here creates a process group, wraps a model or communicates.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moracl.experts.losses import switch_balance

if TYPE_CHECKING:
    from moracl.experts.routing import RoutingResult

__all__ = [
    "BACKENDS",
    "DataParallel",
    "DistEnv",
    "DistributedConfig",
    "all_reduce_sum",
    "barrier",
    "check_batches",
    "gather_objects",
    "init_distributed",
    "is_main",
    "launched",
    "local_rows",
    "rank",
    "reduced_aux_loss",
    "shard_backbone",
    "shutdown",
    "world_size",
]

#: process-group backends: ``auto`` is NCCL when CUDA is available, gloo otherwise
BACKENDS = ("auto", "nccl", "gloo")
SAM_FIRST_PASS = ("global", "local")


@dataclass
class DistributedConfig:
    """How a job runs when launched by ``torchrun`` with more than one process (ignored
    otherwise)."""

    backend: str = field(default="auto", metadata={"help": "auto (nccl with CUDA), nccl, gloo"})
    shard_backbone: bool = field(
        default=False,
        metadata={"help": "shard the frozen backbone's blocks with FSDP (adapters replicated)"},
    )
    sam_first_pass: str = field(
        default="global",
        metadata={
            "help": "SAM's perturbation: global (gradients synced in both passes: the "
            "one-process result) or local (first pass without sync: m-SAM per process)"
        },
    )
    bucket_mb: float = field(default=25.0, metadata={"help": "gradient all-reduce bucket, MiB"})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"distributed.backend must be one of {list(BACKENDS)}, got {self.backend!r}"
            )
        if self.sam_first_pass not in SAM_FIRST_PASS:
            raise ValueError(
                f"distributed.sam_first_pass must be one of {list(SAM_FIRST_PASS)}, "
                f"got {self.sam_first_pass!r}"
            )
        if not self.bucket_mb > 0:
            raise ValueError(f"distributed.bucket_mb must be > 0, got {self.bucket_mb!r}")


# -- the process group ---------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """This process's place: ``rank`` of ``world_size``, its ``device``, the ``backend``
    (``None`` for a single process)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or alike) with more than one
    process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(
            f"WORLD_SIZE > 1 but {name} is not set: launch with torchrun "
            f"(torchrun --nproc-per-node N -m moracl ...)"
        )
    return int(value)


def init_distributed(
    backend: str = "auto", device: str | torch.device = "cpu", *, timeout_s: float = 1800.0
) -> DistEnv:
    """Join the process group ``torchrun`` describes (idempotent); a no-op for one process.

    Args:
        backend: ``auto`` (NCCL when CUDA is available, gloo otherwise), ``nccl`` or ``gloo``.
        device: ``cpu`` or ``cuda``; with CUDA each process takes ``cuda:LOCAL_RANK``.
        timeout_s: how long a collective waits for the other processes.

    Raises:
        ValueError: an unknown backend, NCCL without a GPU or on a CPU device, more
            processes on a host than it has GPUs, or an incomplete ``torchrun`` environment.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    dev = torch.device(device)
    if not launched():
        return DistEnv(0, 1, 0, None, dev)
    rank_, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    cuda = dev.type == "cuda"
    if backend == "auto":
        backend = "nccl" if cuda and torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError(
            "backend 'nccl' needs CUDA GPUs, but none is available; use backend 'gloo' "
            "(distributed.backend=gloo) to train on CPUs"
        )
    if backend == "nccl" and not cuda:
        raise ValueError(f"backend 'nccl' needs a CUDA device, got device {str(dev)!r}")
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} asked for, but CUDA is not available")
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(
                f"process with LOCAL_RANK {local} has no GPU: this host has {count}; "
                f"start at most {count} processes per node"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(backend, **kwargs)
    return DistEnv(rank_, world, local, backend, dev)


def shutdown() -> None:
    """Leave the process group, if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the running group (1 without one)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op for one)."""
    if _active():
        dist.barrier()


# -- splitting the global batch --------------------------------------------------------------


def local_rows(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """The rows of a global batch of ``n`` rows this process takes: contiguous, the first
    ``n % world`` processes one more (as ``torch.tensor_split``)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def check_batches(rows: int, batch_size: int, world: int, what: str) -> None:
    """Raise when some global batch of ``rows`` rows in batches of ``batch_size`` would
    leave a process without rows (every process must take part in every step).

    Raises:
        ValueError: naming ``what``, the batch sizes and the number of processes.
    """
    if world <= 1 or rows <= 0:
        return
    sizes = {min(batch_size, rows)}
    if rows % batch_size:
        sizes.add(rows % batch_size)
    small = min(sizes)
    if small < world:
        raise ValueError(
            f"{what}: a global batch of {small} rows cannot be split across {world} processes "
            f"({rows} rows in batches of {batch_size}); use fewer processes or a batch size "
            f"whose every batch has at least {world} rows"
        )


def shard_batch(batch: Sequence[Tensor], world: int | None = None) -> tuple[list[Tensor], float]:
    """This process's rows of a global batch (every tensor split on dim 0) and its share of
    the global batch's rows.

    Raises:
        ValueError: the batch has fewer rows than there are processes.
    """
    w = world_size() if world is None else world
    n = int(batch[0].shape[0])
    if n < w:
        raise ValueError(
            f"a global batch of {n} rows cannot be split across {w} processes; use fewer "
            f"processes or a larger batch"
        )
    rows = local_rows(n, world=w)
    return [t[rows] for t in batch], (rows.stop - rows.start) / n


# -- collectives -------------------------------------------------------------------------------


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over the processes, in place; returns it (unchanged for one process). A CPU
    tensor under NCCL travels through this process's GPU."""
    if not _active():
        return t
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu)
        t.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(t)
    return t


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` in rank order, on every process (``[obj]`` for one)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_rng_state() -> None:
    """Give every process rank 0's CPU random state (keeps loaders that draw from it in step)."""
    if not _active():
        return
    state = torch.random.get_rng_state()
    dev = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    buf = state.to(dev) if dev is not None else state.clone()
    dist.broadcast(buf, 0)
    torch.random.set_rng_state(buf.cpu())


# -- gradients -------------------------------------------------------------------------------


def _buckets(params: Sequence[Tensor], limit: int) -> Iterator[list[Tensor]]:
    """Consecutive runs of ``params`` of one device and dtype, at most ``limit`` bytes each
    (a larger tensor gets a bucket of its own)."""
    bucket: list[Tensor] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if bucket and (
            p.dtype != bucket[0].dtype or p.device != bucket[0].device or size + nbytes > limit
        ):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        yield bucket


class DataParallel(nn.Module):
    """Data parallelism for the trainable tensors of ``module`` (adapters, routers, heads):
    after ``backward`` call :meth:`sync_gradients` with this process's share of the global
    batch; each gradient becomes ``Σ_r share_r · grad_r``, the gradient of the global batch's
    mean loss when every process's loss is the mean over its own rows.

    ``forward`` is the wrapped module's. Inside :meth:`no_sync`, :meth:`sync_gradients` does
    nothing (SAM's local first pass: give this wrapper as the optimiser's ``model``). See the
    module docstring for why this is not ``DistributedDataParallel``.

    Args:
        module: the model; its parameters with ``requires_grad`` are read at every sync.
        bucket_mb: size of the flat buffers reduced by one collective each.
    """

    def __init__(self, module: nn.Module, *, bucket_mb: float = 25.0) -> None:
        super().__init__()
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        self.module = module
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._sync = True
        self.syncs = 0  # gradient syncs run (reductions issued), for tests and logs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """:meth:`sync_gradients` is a no-op inside."""
        before = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = before

    @torch.no_grad()
    def sync_gradients(self, share: float | None = None) -> None:
        """Sum the trainable gradients over the processes, weighting this process's by
        ``share`` (its fraction of the global batch; ``None``: ``1 / world_size``).

        A tensor keeps ``grad is None`` only if it has none on every process.
        """
        if not self._sync or not _active():
            return
        weight = 1.0 / dist.get_world_size() if share is None else float(share)
        params = [p for p in self.module.parameters() if p.requires_grad]
        pending = []
        for bucket in _buckets(params, self.bucket_bytes):
            ref = bucket[0]
            flat = torch.empty(
                sum(p.numel() for p in bucket) + len(bucket), dtype=ref.dtype, device=ref.device
            )
            grads = flat[: -len(bucket)]
            flags = flat[-len(bucket) :]  # (tensors,) 1 where this process has a gradient
            offset = 0
            for i, p in enumerate(bucket):
                part = grads[offset : offset + p.numel()]
                if p.grad is None:
                    part.zero_()
                    flags[i] = 0
                else:
                    part.copy_(p.grad.reshape(-1))
                    flags[i] = 1
                offset += p.numel()
            grads.mul_(weight)
            pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
        for bucket, flat, work in pending:
            assert work is not None
            work.wait()
            grads, has = flat[: -len(bucket)], flat[-len(bucket) :].tolist()
            offset = 0
            for p, flag in zip(bucket, has):
                part = grads[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if flag == 0:
                    p.grad = None
                elif p.grad is None:
                    p.grad = part.clone()
                else:
                    p.grad.copy_(part)
        self.syncs += 1


# -- router losses across processes --------------------------------------------------------------


def _counted(chosen: Tensor, tokens: Tensor | None) -> Tensor:
    """``chosen (n, e)`` with the rows outside ``tokens (n,)`` cleared (all kept: ``None``)."""
    return chosen if tokens is None else chosen & tokens[:, None]


def reduced_aux_loss(results: Sequence[RoutingResult]) -> Tensor:
    """``Σ weight · loss`` of the routers' auxiliary losses, with every top-level Switch
    balance loss (``"balance"``) taken over the global batch.

    The balance loss ``E · Σ_e f_e · P_e`` is not a mean over tokens: ``f`` (the fraction of
    assignments per expert, no gradient) is a ratio over the whole batch. Here ``f`` comes from
    the assignment counts summed over the processes (one all-reduce for all layers) and ``P``
    from this process's tokens, so the share-weighted sum over processes of this loss (and of
    its gradient) is the one-process value when every process has the same tokens per row.
    The other losses (z-loss, the per-group losses of hierarchical routers) are means over this
    process's tokens and reduce through the share-weighted gradient sum as they are.  Under a
    declared token mask (``RoutingResult.tokens``) ``f`` and ``P`` count the real tokens only,
    as the routers' own losses do (a routing per sample, expanded to its tokens, then weighs
    each sample by its real tokens).

    Args:
        results: the routing of one forward, one per mixture layer (``MoRAModel.last_routing``).
    Returns: a scalar.
    """
    if not results:
        raise ValueError("reduced_aux_loss needs at least one routing result")
    balanced = [r for r in results if "balance" in r.aux_losses]
    fractions: list[Tensor] = []
    if balanced:
        counts = [_counted(r.chosen, r.tokens).sum(0).to(r.probs.dtype) for r in balanced]
        flat = all_reduce_sum(torch.cat(counts).detach())
        for part in flat.split([c.numel() for c in counts]):
            fractions.append(part / part.sum().clamp_min(1.0))  # (e,)
    f_of = {id(r): f for r, f in zip(balanced, fractions)}
    total = results[0].gates.new_zeros((), dtype=torch.float32)
    for r in results:
        for name, loss in r.aux_losses.items():
            if name == "balance":
                if r.tokens is None:
                    p = r.probs.sum(0) / max(r.probs.shape[0], 1)
                else:
                    w = r.tokens.to(r.probs.dtype)[:, None]  # (n, 1)
                    p = (r.probs * w).sum(0) / w.sum().clamp_min(1.0)
                loss = switch_balance(f_of[id(r)], p)
            total = total + r.aux_weights[name] * loss.float()
    return total


# -- the frozen backbone, sharded ---------------------------------------------------------------


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a backbone: the elements of its largest ``nn.ModuleList``
    holding frozen parameters (a transformer's layers)."""
    best: list[nn.Module] = []
    for m in model.modules():
        frozen = any(not p.requires_grad for p in m.parameters())
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and frozen:
            best = list(m)
    return best


def shard_backbone(model: nn.Module, blocks: Iterable[nn.Module] | None = None) -> list[Tensor]:
    """Shard the frozen backbone parameters of ``model``'s blocks across the processes with
    FSDP (``fully_shard``, one unit per block); adapters, routers and every trainable tensor
    inside the blocks stay whole on every process (``ignored_params``) and are synchronised by
    :class:`DataParallel`.

    Call it after the adapters are injected and before the optimiser is built; experts grown
    later are plain tensors and stay replicated. Works with NCCL and with gloo on CPUs.

    Args:
        model: the model holding the backbone.
        blocks: the modules to shard, each its own FSDP unit (default: the elements of the
            largest ``nn.ModuleList`` with frozen parameters, e.g. a transformer's layers).
    Returns: the sharded parameters (now ``DTensor`` shards; empty for one process).

    Raises:
        ValueError: no blocks found.
    """
    if not _active():
        return []
    from torch.distributed.fsdp import fully_shard

    from moracl.layer import MoRALayer

    units = list(_blocks(model) if blocks is None else blocks)
    if not units:
        raise ValueError(
            f"shard_backbone found no blocks to shard in {type(model).__name__}: it needs an "
            f"nn.ModuleList of frozen blocks (a transformer's layers), or pass blocks="
        )
    sharded: list[Tensor] = []
    for unit in units:
        keep = {p for p in unit.parameters() if p.requires_grad}
        for m in unit.modules():
            if isinstance(m, MoRALayer):
                keep |= set(m.adapters.parameters())
        fully_shard(unit, ignored_params=keep)
        sharded += [p for p in unit.parameters() if p not in keep]
    return sharded
