"""Data-parallel training on torch.distributed: the process group, each rank's share of a
batch, the gradient average, and the decisions only rank 0 takes.

Launched by torchrun (`torchrun --nproc_per_node=N -m cli train ...`; several machines
through torchrun's rendezvous): every process loads the data, builds the same model from
the same seed, and draws the same epoch permutation and the same shared negatives. A
step's global batch (`--batch-size`, the same as in one process) is cut into contiguous
shares, one per rank; each rank back-propagates its share's loss weighted by its share of
the rows, and one all-reduce sums the weighted gradients. The sum is the gradient of the
global batch's mean loss, so N processes take the step one process takes on the whole
batch (within float rounding; the random routing logits of training are drawn per rank).

Gloo (CPU) keeps MIND's row-sparse embedding gradients: a large table is reduced as a
sparse tensor (cost follows the rows a step touches), a small one densely; under NCCL (GPU)
embedding gradients are dense (`Runtime.dense_gradients`). Dense gradients go in one flat
buffer with the step's loss and a has-gradient flag per parameter, so one all-reduce per
step also gives every rank the global loss (identical decisions on a NaN) and the
parameters that no rank touched keep no gradient, as in one process.

Why not DistributedDataParallel: the retrievers train through `loss(batch, neg, log_q)`,
not `forward`; shares of a ragged last batch need weights, not a plain mean; DDP would
broadcast the item-feature buffers every step; and an explicit all-reduce is what lets the
benchmark time communication apart from compute. What is given up: DDP's overlap of the
all-reduce with the backward pass (it matters on GPUs, little on CPU processes).

Rank 0 validates, writes bundles and checkpoints; `from_main` runs such a step there and
hands its result (or its error) to every rank, so early stopping ends all ranks together.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from retrieval.errors import RetrievalError

log = logging.getLogger(__name__)

T = TypeVar("T")


class ReplicaError(RetrievalError):
    """The processes of a data-parallel run disagree (parameters out of sync, a setting differs)."""


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank r of `world` processes (one process: 0 of 1)."""

    rank: int = 0  # global rank; 0 validates and writes
    world: int = 1  # processes in the run
    local_rank: int = 0  # rank on this machine: which GPU it takes
    backend: str | None = None  # gloo or nccl; None for one process

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def current() -> Group:
    """The group of an initialised torch.distributed run, else one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    rank = dist.get_rank()
    return Group(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)), dist.get_backend())


def launched_world() -> int:
    """How many processes the launcher (torchrun) started: WORLD_SIZE, 1 when absent."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: torch.device) -> Group:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL when the device is a GPU, else gloo. One
    process (no WORLD_SIZE, or 1) and an already initialised group are left as they are."""
    if launched_world() <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise RetrievalError("this PyTorch build has no torch.distributed; run one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
    group = current()
    log.info("process %d of %d (%s, %s)", group.rank, group.world, backend, device)
    return group


def shutdown() -> None:
    """Leave the process group (a no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of rank > 0's own random draws (routing logits): distinct per rank and seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def share(n: int, group: Group) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of a global batch of n rows: the first n % world
    ranks take one row more, so shares differ by at most one (a rank may get none)."""
    base, extra = divmod(n, group.world)
    lo = group.rank * base + min(group.rank, extra)
    return lo, lo + base + (group.rank < extra)


DENSE_BELOW = 1 << 20  # elements: a row-sparse table at most this large (4 MiB) is reduced densely


@dataclass
class GradientSync:
    """After each rank's backward of (its share's mean loss x its share of the rows), makes every
    rank's gradients the sum over ranks: the gradient of the global batch's mean loss.

    One all-reduce carries the dense gradients, the row-sparse gradients of tables up to
    DENSE_BELOW elements (scattered into their table's shape, with a mask of the rows the
    global batch touched, so the sparse gradient rebuilt after the sum has exactly the rows
    one process would have had), the weighted loss and a has-gradient flag per parameter.
    Larger tables (a big item vocabulary) are all-reduced as sparse tensors, each rank's
    rows coalesced first: their cost follows the rows a step touches, not the vocabulary.
    The choice depends only on table sizes, so every rank makes the same calls."""

    model: torch.nn.Module
    group: Group
    seconds: float = 0.0  # time spent in all-reduces so far (the benchmark's communication figure)
    params: list[torch.nn.Parameter] = field(init=False)
    sparse: set[int] = field(init=False)  # ids of parameters with row-sparse gradients

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sparse = {
            id(p) for m in self.model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()
        }
        self.dense = [p for p in self.params if id(p) not in self.sparse]
        self.small = [p for p in self.params if id(p) in self.sparse and p.numel() <= DENSE_BELOW]
        self.large = [p for p in self.params if id(p) in self.sparse and p.numel() > DENSE_BELOW]

    def __call__(self, weighted_loss: torch.Tensor) -> torch.Tensor:
        """All-reduce the gradients; returns the global batch's loss (sum of the ranks' weighted losses)."""
        t0 = time.perf_counter()
        device = weighted_loss.device
        has = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32, device=device)
        parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in self.dense]
        for p in self.small:  # (rows * D) summed rows, then (rows,) touched
            table, touched = p.new_zeros(p.shape), p.new_zeros(p.shape[0])
            if p.grad is not None:
                g = p.grad.coalesce()
                table[g.indices()[0]] = g.values()
                touched[g.indices()[0]] = 1.0
            parts += [table.reshape(-1), touched]
        flat = torch.cat([*parts, weighted_loss.detach().reshape(1).float(), has])
        dist.all_reduce(flat)
        for p in self.large:
            p.grad = p.grad.coalesce() if p.grad is not None else torch.sparse_coo_tensor(
                torch.zeros(1, 0, dtype=torch.int64, device=p.device),
                torch.zeros(0, *p.shape[1:], dtype=p.dtype, device=p.device), p.shape, check_invariants=False)
            dist.all_reduce(p.grad)  # this rank's rows, then everyone's (uncoalesced: the optimizer coalesces)
        offset = 0
        for p in self.dense:
            n = p.numel()
            summed = flat[offset : offset + n].view_as(p)
            p.grad = summed.clone() if p.grad is None else p.grad.copy_(summed)
            offset += n
        for p in self.small:
            n, rows = p.numel(), p.shape[0]
            table, touched = flat[offset : offset + n].view_as(p), flat[offset + n : offset + n + rows]
            idx = torch.nonzero(touched).reshape(-1)  # (r,) rows the global batch touched
            p.grad = torch.sparse_coo_tensor(idx[None], table[idx], p.shape, check_invariants=False, is_coalesced=True)
            offset += n + rows
        used = flat[offset + 1 :] > 0  # (params,) some rank had a gradient
        for p, u in zip(self.params, used.tolist()):
            if not u:
                p.grad = None
        self.seconds += time.perf_counter() - t0
        return flat[offset]


def from_main(fn: Callable[[], T], group: Group) -> T:
    """fn() run on rank 0 only, its result handed to every rank (an error raised there is
    raised on every rank, so no rank waits for a step that will never come)."""
    if not group.parallel:
        return fn()
    box: list[Any] = [None]
    if group.main:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # handed over, then raised here too
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def gather_to_main(obj: T, group: Group) -> list[T] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not group.parallel:
        return [obj]
    out: list[Any] | None = [None] * group.world if group.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_state(module: torch.nn.Module, group: Group) -> None:
    """Rank 0's parameters and buffers on every rank (the start of a run)."""
    if not group.parallel:
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def average_batch_norm(module: torch.nn.Module, group: Group) -> None:
    """Batch-norm running statistics (the rankers' Dice) averaged over ranks: each rank saw only
    its shares, and rank 0 validates and saves with them."""
    if not group.parallel:
        return
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                for t in (m.running_mean, m.running_var):
                    dist.all_reduce(t)
                    t.div_(group.world)


def check_in_sync(module: torch.nn.Module, group: Group) -> None:
    """ReplicaError unless every rank holds the same parameters (a checksum per tensor, compared
    by one all-reduce of [x, -x] under MAX)."""
    if not group.parallel:
        return
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in module.parameters()])  # (params,)
        both = torch.cat([sums, -sums])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        spread = both[: len(sums)] + both[len(sums):]  # max - min per tensor
    if bool((spread != 0).any()):
        raise ReplicaError("the processes' parameters differ: data-parallel replicas fell out of sync")
