"""Training MIND: shuffled sliding windows, sampled softmax, validation Recall@N, early stopping.

Deterministic for a given seed (numpy and torch generators seeded, fixed thread count).
Each time validation improves the bundle is rewritten atomically, so an interrupted run
leaves the best bundle so far and never a half-written one; with a `Checkpointing` it also
leaves a checkpoint that `resume` continues from (retrieval.checkpoint). A loss that turns
NaN or infinite, or explodes (`LossGuard`), stops training: the best epoch so far is kept,
or, when there is none, a TrainingError says so and nothing is written.

The device and precision come from a `Runtime` (retrieval.device); under torchrun every
process runs this same loop on its share of each batch and rank 0 validates and writes
(retrieval.distributed).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.bundle import config_dict, save_bundle
from retrieval.checkpoint import Checkpointer, Checkpointing
from retrieval.data import Dataset, DataSpec, Split, training_counts
from retrieval.device import Runtime, compile_loss
from retrieval.distributed import GradientSync, Group, broadcast_state, check_in_sync, current, from_main, rank_seed, share
from retrieval.errors import ConfigError, DataError, TrainingError
from retrieval.evaluate import exact_index, held_out_users
from retrieval.metrics import mean_metrics, topn_metrics
from retrieval.mind import Batch, log_expected_counts
from retrieval.retrievers import DEFAULT, Retriever, build_retriever, retriever_classes, retriever_name
from retrieval.progress import progress_bar
from retrieval.diagnostics import interest_collapse, routing_concentration
from retrieval.recommend import Merge, interest_vectors, recommend
from retrieval.resident import ResidentWindows
from retrieval.samples import Histories, make_batch, training_positions

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 30  # most passes over the training windows
    batch_size: int = 256  # windows per step
    lr: float = 3e-3  # Adam learning rate (dense and sparse parameters alike)
    negatives: int = 512  # S: sampled negatives shared across the batch; 0 = every item (full softmax, no log-Q)
    neg_alpha: float = 1.0  # negatives drawn with q ∝ (train frequency + 1)^alpha; 0 = uniform (1.0: best on validation)
    patience: int = 3  # stop after this many epochs without a better validation Recall@N
    seed: int = 0  # seeds initialisation, shuffling, negatives and routing draws
    split_seed: int = 2026  # the protocol's split seed
    split: str = "user"  # "user" (by user, the default) or "time" (the protocol's temporal split)
    eval_n: int = 50  # N of the validation Recall@N that early stopping follows
    merge: str = "best"  # how interests' results are merged for validation and serving
    threads: int = 0  # torch threads; 0 = leave torch's default
    max_steps: int = 0  # cap on steps per epoch (benchmarks, smoke runs); 0 = the whole epoch
    target_window: int = 1  # W: a window's target is drawn uniformly from the next W behaviours (1 = next item)
    # share of the training period whose behaviours are targets (1 = all): the windows whose target lies in
    # the most recent part, so the model learns to predict what was taken nearest to serving; each keeps
    # its whole history before the target
    recent_targets: float = 1.0


@dataclass
class TrainResult:
    model: Retriever
    history: list[dict[str, Any]]  # one entry per epoch
    best_epoch: int
    best_recall: float
    samples_per_s: float
    diverged: str | None = None  # why training stopped early on a NaN / infinite loss, else None
    run_extra: dict[str, Any] = field(default_factory=dict)  # where it was trained (device, processes), for the manifest


class Diverged(Exception):
    """A training step's loss, or the weights after an epoch, became NaN, infinite or exploded."""

    def __init__(self, what: str, step: int):
        super().__init__(f"{what} at step {step}")
        self.step = step


DIVERGENCE_FACTOR = 100.0  # a step loss this many times the run's first (and at least 1) means diverged


class LossGuard:
    """The divergence check of every training loop (MIND and rankers), one call per step.

    A loss that turns NaN or infinite, or grows to DIVERGENCE_FACTOR times the run's first
    step loss (floored at 1), is divergence: cross-entropy losses start near log(classes)
    and a healthy run never multiplies them a hundredfold, while an exploding one (too
    high a learning rate) gets there within a few steps, long before float32 overflows."""

    def __init__(self) -> None:
        self.first: float | None = None

    def check(self, loss: float, step: int) -> float:
        """`loss` back when it is healthy, else Diverged."""
        if not math.isfinite(loss):
            raise Diverged(f"the loss became {loss}", step)
        if self.first is None:
            self.first = loss
        elif loss > DIVERGENCE_FACTOR * max(self.first, 1.0):
            raise Diverged(f"the loss exploded to {loss:.4g} (the first step's was {self.first:.4g})", step)
        return loss


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """Diverged when the last step of an epoch left NaN or infinite weights (its own loss was finite)."""
    with torch.no_grad():
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise Diverged("the weights became NaN or infinite", step)


def stop_on_divergence(err: Diverged, epoch: int, best_epoch: int) -> str:
    """What to do when training diverged: TrainingError when no epoch has been kept yet
    (nothing was written), else a warning; returns the note for the result."""
    note = f"{err} of epoch {epoch}"
    if best_epoch == 0:
        raise TrainingError(f"training diverged: {note}, before any epoch was kept; nothing was written "
                            "(lower the learning rate)")
    log.warning("training diverged: %s; stopped, keeping the best epoch %d", note, best_epoch)
    return note


def available_memory() -> int | None:
    """Bytes of memory this process may still use: MemAvailable, capped by a cgroup limit; None if unknown."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_fits_in_memory(model_config: Any) -> None:
    """ConfigError, before anything is allocated, when the model's float32 weights, gradients
    and two Adam moments, plus the item vectors and exact index of validation, exceed the
    memory available. The model is built on the meta device to count its parameters."""
    n, d = model_config.n_items + 1, model_config.dim
    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in build_retriever(model_config).parameters())
    except (RuntimeError, ValueError, TypeError, OverflowError):  # sizes past what torch can even describe
        raise ConfigError(f"the model does not fit in memory: D={d} over {n - 1:,} items is too large; lower --dim") from None
    need = 4 * (4 * params + 2 * n * d)
    available = available_memory()
    if available is not None and need > available:
        raise ConfigError(
            f"the model does not fit in memory: D={d} over {n - 1:,} items needs about {need / 2**30:,.1f} GiB "
            f"(weights, gradients, optimizer state), {available / 2**30:,.1f} GiB is available; lower --dim"
        )


def validation_recall(model: Retriever, ds: Dataset, split: Split, n: int, merge: Merge) -> float:
    """Mean Recall@n of validation users, through the serving path on an exact index."""
    return validation_figures(model, ds, split, n, merge)[f"recall@{n}"]


def validation_figures(model: Retriever, ds: Dataset, split: Split, n: int, merge: Merge) -> dict[str, float]:
    """Validation users' Recall@n and NDCG@n through the serving path on an exact index, and
    the interests' diagnostics: collapse (mean pairwise cosine) and routing concentration."""
    users, ends, truth = held_out_users(ds, split, "validation")
    hist = Histories.of(ds, users, ends)
    rec = recommend(model, ds, exact_index(model), hist, n, merge=merge)
    figures = mean_metrics(topn_metrics(np.where(rec.items > 0, rec.items, -1), truth, ns=(n,)))
    it = interest_vectors(model, ds, hist)
    collapse, _ = interest_collapse(it.vectors.numpy(), it.active.numpy())
    return {f"recall@{n}": figures[f"recall@{n}"], f"ndcg@{n}": figures[f"ndcg@{n}"], "interest_collapse": collapse,
            "routing_concentration": routing_concentration(it.weights.numpy(), it.active.numpy())}


class NegativeSampler:
    """Draws the S shared negatives of each step from q by inverse-CDF lookup.

    Why: `torch.multinomial(q, S)` rebuilds q's cumulative sum on every call, O(N) a
    step; here the CDF is built once and a step costs S binary searches, O(S log N), so
    the step time does not grow with the item count. The draw is exactly q (up to float
    rounding): u ~ U[0, 1) in float64 lands on item i with probability cdf[i] - cdf[i-1]
    = q[i], and an item with q[i] = 0 (the padding index) is never drawn.
    """

    def __init__(self, q: torch.Tensor, num: int, seed: int, device: torch.device | str = "cpu"):
        cdf = torch.cumsum(q.to(torch.float64), 0)  # (N+1,)
        self.cdf = (cdf / cdf[-1]).to(device)  # the last entry is exactly 1, so every u < 1 finds an item
        self.num = num
        self.gen = torch.Generator(device=device).manual_seed(seed)  # on a GPU the draws stay there

    def draw(self) -> torch.Tensor:
        """(S,) int64 item indices, drawn with replacement from q, on the sampler's device."""
        u = torch.rand(self.num, dtype=torch.float64, generator=self.gen, device=self.cdf.device)  # (S,) in [0, 1)
        return torch.searchsorted(self.cdf, u, right=True)  # first i with cdf[i] > u


class RowSparseAdam(torch.optim.Optimizer):
    """Adam on the rows a sparse gradient touches: torch.optim.SparseAdam's update, step for step.

    Why: SparseAdam reads the moments through `sparse_mask` and writes them back as sparse
    additions, about twice the cost per touched row of gathering the rows with
    `index_select`, updating them densely and scattering them back with `index_copy_` /
    `index_add_`. Both cost O(rows touched), never O(vocabulary); this one keeps the
    1M-item step within a few per cent of the 1K-item step. Rows not in the gradient
    keep their moments and values (lazy Adam), as in SparseAdam.
    """

    def __init__(self, params: list[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("RowSparseAdam takes sparse gradients only; use Adam for dense ones")
                grad = p.grad.coalesce()  # the update is non-linear, so each row once
                rows, g = grad.indices()[0], grad.values()  # (n,), (n, D)
                if rows.numel() == 0:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)  # (N+1, D)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - beta1)  # (n, D) b1 m + (1 - b1) g
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])), alpha=-step_size)


def _optimizers(model: Retriever, lr: float, fused: bool = False) -> list[torch.optim.Optimizer]:
    """Adam for the dense parameters (`fused`: one fused kernel, on a GPU), RowSparseAdam for
    the sparse embedding tables."""
    sparse = [p for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()]
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=lr, fused=True) if fused
                                         else torch.optim.Adam(dense, lr=lr)]
    if sparse:
        opts.append(RowSparseAdam(sparse, lr=lr))
    return opts


def seeded(seed: int, threads: int = 0) -> np.random.Generator:
    """Seed torch (and fix its thread count when given) and return a numpy generator from the same seed."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@dataclass
class Setup:
    """Everything a training step needs, built once before the first epoch."""

    model: Retriever
    opts: list[torch.optim.Optimizer]
    users: np.ndarray  # (W,) user of each training window
    positions: np.ndarray  # (W,) target position of each window in its user's sequence
    sampler: NegativeSampler | None  # draws the S shared negatives of a step ∝ q; None = every item each step
    log_q: torch.Tensor  # (N+1,) log(S q), the log-Q correction (zeros for the full softmax)
    ends: np.ndarray  # (U,) training length of each user's sequence: a target never lies beyond it
    target_window: int  # W: targets drawn from the next W behaviours
    rng: np.random.Generator  # draws the target offsets within the window
    guard: LossGuard = field(default_factory=LossGuard)  # stops a diverging run
    runtime: Runtime = field(default_factory=Runtime)  # device, precision
    group: Group = field(default_factory=Group)  # this process's rank among the run's processes
    windows: ResidentWindows | None = None  # sequences and windows on the device (None: gathered in numpy)
    sync: GradientSync | None = None  # sums the ranks' gradients (None: one process)

    def negatives(self) -> torch.Tensor:
        """(S,) the negatives of one step: a draw from q, or every item 1..N."""
        if self.sampler is None:
            return torch.arange(1, len(self.log_q), dtype=torch.int64, device=self.log_q.device)
        return self.sampler.draw()

    def generators(self) -> dict[str, torch.Generator]:
        """The torch generators a checkpoint saves and restores (none for the full softmax)."""
        return {"negatives": self.sampler.gen} if self.sampler is not None else {}

    def targets(self, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(B,) target positions: the window's own position t, or with W > 1 a position drawn
        uniformly from t .. min(t + W, end) - 1 (the history stays the behaviours before t)."""
        if self.target_window <= 1:
            return positions
        span = np.minimum(self.target_window, self.ends[users] - positions)  # (B,) >= 1
        return positions + (self.rng.random(len(positions)) * span).astype(np.int64)


def recent_windows(ds: Dataset, users: np.ndarray, positions: np.ndarray,
                   share: float) -> tuple[np.ndarray, np.ndarray]:
    """The training windows (users, positions: (S,) each) whose target's time is at or after the
    (1 - share) quantile of all their targets' times: the most recent `share` of the training
    period's behaviours as targets (all of them for share = 1). On data whose interests move
    with time (the temporal split) the items taken just before the cut are the nearest to what
    is taken after it."""
    if not 0.0 < share <= 1.0:  # NaN fails the comparison too
        raise ConfigError(f"recent_targets must be in (0, 1], got {share}")
    if share == 1.0:
        return users, positions
    t = ds.times[ds.offsets[users] + positions]  # (S,) each window's target time
    keep = t >= np.quantile(t, 1.0 - share, method="lower")
    return users[keep], positions[keep]


def setup(ds: Dataset, split: Split, model_config: Any, config: TrainConfig, runtime: Runtime | None = None) -> Setup:
    """Seed, build the model and its optimizers, the training windows and the negative sampler,
    on the runtime's device (dense embedding gradients and a fused Adam on a GPU). With
    several processes, rank 0's initial weights go to every rank and ranks > 0 reseed their
    own draws (routing logits); the negatives stay the same on every rank."""
    check_fits_in_memory(model_config)
    runtime = runtime or Runtime()
    group = current()
    seeded(config.seed, config.threads)
    if runtime.dense_gradients and getattr(model_config, "sparse", False):
        model_config = dataclasses.replace(model_config, sparse=False)
    model = build_retriever(model_config, {f: torch.from_numpy(m.astype(np.int64)) for f, m in ds.item_features.items()})
    model.to(runtime.device)
    users, positions = training_positions(ds, split.train_users, split.history_len)
    if len(users) == 0:
        raise DataError("no training windows: every training user has a single behaviour")
    users, positions = recent_windows(ds, users, positions, config.recent_targets)
    if config.negatives == 0:  # full softmax: every item a negative, nothing to correct
        sampler, log_q = None, torch.zeros(ds.n_items + 1)
    else:
        freq = torch.from_numpy(training_counts(ds, split))  # the training data only (period, on the temporal split)
        q, log_q = log_expected_counts(freq, config.negatives, config.neg_alpha)
        sampler = NegativeSampler(q, config.negatives, config.seed, runtime.device)
    # resident windows serve the next-item target only; a target window gathers in numpy
    on_device = runtime.keeps_windows_on_device and config.target_window <= 1
    windows = ResidentWindows(ds, users, positions, runtime.device) if on_device else None
    sync = None
    if group.parallel:
        broadcast_state(model, group)
        sync = GradientSync(model, group)
        if group.rank:
            torch.manual_seed(rank_seed(config.seed, group.rank))
    if runtime.compile:
        compile_loss(model)
    rng = np.random.default_rng([config.seed, 1])  # its own stream: W = 1 leaves every other draw as it was
    return Setup(model, _optimizers(model, config.lr, fused=runtime.cuda), users, positions, sampler,
                 log_q.to(runtime.device), split.history_len, config.target_window, rng, runtime=runtime,
                 group=group, windows=windows, sync=sync)


def train_step(model: Retriever, opts: list[torch.optim.Optimizer], batch: Batch | None, neg: torch.Tensor,
               log_q: torch.Tensor, sync: GradientSync | None = None, weight: float = 1.0,
               autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
               read: bool = True) -> Any:
    """One optimisation step on one batch with the negatives `neg` (S,); returns the loss
    (`read=False`: as a detached tensor on the device, not read back, so a GPU is not made to
    wait for the host every step).

    With `sync` (several processes) the batch is this rank's share, holding `weight` of the
    global batch's rows (None when the share is empty); the loss is back-propagated weighted
    and the ranks' gradients summed, and the global batch's loss is returned."""
    with autocast() if autocast is not None else contextlib.nullcontext():
        loss = model.loss(batch, neg, log_q) if batch is not None else None
    return backward_step(loss, opts, sync, weight, log_q.device, read)


def backward_step(loss: torch.Tensor | None, opts: list[torch.optim.Optimizer], sync: GradientSync | None = None,
                  weight: float = 1.0, device: torch.device | None = None, read: bool = True) -> Any:
    """Zero the gradients, back-propagate `loss`, step the optimizers; returns the loss (a float,
    or with `read=False` the detached tensor).

    With `sync` (several processes) `loss` is this rank's share's mean loss (None for an
    empty share) holding `weight` of the global batch's rows: it is back-propagated times
    weight, the ranks' gradients are summed, and the global batch's loss is returned.
    Every training loop (MIND's and the rankers') steps through here."""
    for o in opts:
        o.zero_grad(set_to_none=True)
    if sync is None:
        assert loss is not None, "an empty batch only occurs as a rank's share"
        loss.backward()
    else:
        if loss is not None:
            (loss * weight).backward()
        loss = sync(loss.detach() * weight if loss is not None else torch.zeros((), device=device))
    for o in opts:
        o.step()
    return loss.item() if read else loss.detach()


def run_steps(ds: Dataset, st: Setup, order: np.ndarray, batch_size: int, bar: Any = None, start: int = 0,
              loss_sum: float = 0.0, after_step: Callable[[int, float], None] | None = None) -> float:
    """Steps over the windows `order` (W',) in batches of batch_size, in that order; mean loss.

    Each batch's histories are gathered from the stored sequences here (on the device when
    they are resident there), so memory follows the batch, never windows x L. With several
    processes each rank takes its share of every batch. `bar` is a `progress_bar` (or None)
    told the running loss and rate. A resumed epoch starts at step `start` with the loss sum
    of the steps before it; `after_step(steps done, loss sum)` runs whenever the losses have
    been read back (checkpoints): after every step on the CPU, every few steps on a GPU, whose
    losses stay on the device in between (Runtime.loss_read_every)."""
    model, L, group = st.model, st.model.config.max_len, st.group
    model.train()
    steps = (len(order) + batch_size - 1) // batch_size
    t0 = time.perf_counter()
    on_device = st.windows.order(order) if st.windows is not None else None
    read_every = st.runtime.loss_read_every
    pending: list[torch.Tensor] = []  # losses of steps not yet read back
    for s in range(start, steps):
        lo, hi, weight = s * batch_size, min((s + 1) * batch_size, len(order)), 1.0
        if group.parallel:  # this rank's share of the global batch
            a, b = share(hi - lo, group)
            lo, hi, weight = lo + a, lo + b, (b - a) / (hi - lo)
        if hi == lo:
            batch = None
        elif on_device is not None:
            batch = st.windows.batch(on_device[lo:hi], L)  # type: ignore[union-attr]
        else:
            idx = order[lo:hi]  # (B,)
            users, positions = st.users[idx], st.positions[idx]
            batch = make_batch(ds, users, positions, L, with_target=True, target=st.targets(users, positions))
        pending.append(train_step(model, st.opts, batch, st.negatives(), st.log_q, st.sync, weight,
                                  st.runtime.autocast, read=False))
        if len(pending) < read_every and s + 1 < steps:
            continue
        for i, value in enumerate(torch.stack(pending).tolist()):
            loss_sum += st.guard.check(value, s + 2 - len(pending) + i)
        pending.clear()
        if after_step is not None:
            after_step(s + 1, loss_sum)
        if bar is not None:
            done = min((s + 1) * batch_size, len(order))
            bar.update(loss=loss_sum / (s + 1), rate=(done - start * batch_size) / max(time.perf_counter() - t0, 1e-9))
    check_finite_weights(model, steps)
    return loss_sum / max(steps, 1)


def epoch_order(rng: np.random.Generator, n_windows: int, batch_size: int, max_steps: int) -> np.ndarray:
    """A shuffled order of the windows for one epoch, cut to max_steps batches when given."""
    order = rng.permutation(n_windows)
    if max_steps:
        order = order[: max_steps * batch_size]
    return order


def train(
    ds: Dataset,
    split: Split,
    model_config: Any,
    config: TrainConfig,
    out: Path | None = None,
    data_spec: DataSpec | None = None,
    show_progress: bool = True,
    runtime: Runtime | None = None,
    checkpointing: Checkpointing | None = None,
) -> TrainResult:
    """Train MIND on the split's train users; validate on its validation users after each epoch.

    `runtime`: device and precision (default: CPU, fp32). `checkpointing`: write a checkpoint
    at every epoch's end (and every `every` steps) and, with `resume`, continue from it.
    Under torchrun every rank calls this; rank 0 validates and writes the bundle."""
    rng = np.random.default_rng(config.seed)
    st = setup(ds, split, model_config, config, runtime)
    model, group = st.model, st.group
    model_config = model.config  # as trained: dense embedding gradients on a GPU
    show_progress = show_progress and group.main

    history: list[dict[str, Any]] = []
    best_recall, best_epoch, best_state, stale = -1.0, 0, None, 0
    total_samples, total_time, diverged = 0, 0.0, None
    ckpt = resumed = None
    first_epoch, first_step, loss_before, seconds_before = 1, 0, 0.0, 0.0
    if checkpointing is not None:
        ckpt = Checkpointer(checkpointing, _identity(ds, split, model_config, config), group, st.runtime.device)
        resumed = ckpt.load()
    if resumed is not None:
        assert ckpt is not None
        ckpt.restore(resumed, model, st.opts, st.generators(), rng)
        first_epoch, first_step = resumed["epoch"], resumed["step"]
        loop = resumed["loop"]
        history, best_recall, best_epoch, stale = loop["history"], loop["best_recall"], loop["best_epoch"], loop["stale"]
        total_samples, total_time = loop["total_samples"], loop["total_time"]
        loss_before, seconds_before = loop["loss_sum"], loop["seconds"]
        st.guard.first = loop["guard_first"]
        best_state = None if resumed["best_state"] is None else {
            k: v.to(st.runtime.device) for k, v in resumed["best_state"].items()}

    def checkpoint(epoch: int, step: int, rng_epoch: dict[str, Any], loss_sum: float, seconds: float) -> None:
        assert ckpt is not None
        loop = {"history": history, "best_recall": best_recall, "best_epoch": best_epoch, "stale": stale,
                "total_samples": total_samples, "total_time": total_time, "loss_sum": loss_sum, "seconds": seconds,
                "guard_first": st.guard.first}
        ckpt.save(epoch, step, model, st.opts, st.generators(), rng_epoch, rng.bit_generator.state,
                  loop, best_state)

    if resumed is not None and first_epoch > config.epochs:
        log.info("the checkpoint is past the last epoch (%d): nothing left to train", config.epochs)
    for epoch in range(first_epoch, config.epochs + 1):
        rng_epoch = rng.bit_generator.state
        order = epoch_order(rng, len(st.users), config.batch_size, config.max_steps)
        steps = (len(order) + config.batch_size - 1) // config.batch_size
        start, loss_sum, seconds = (first_step, loss_before, seconds_before) if epoch == first_epoch else (0, 0.0, 0.0)
        t0 = time.perf_counter()

        last = [start]  # the step of the previous call

        def after_step(step: int, loss_sum: float) -> None:
            if ckpt is not None and ckpt.due(last[0], step, steps):
                checkpoint(epoch, step, rng_epoch, loss_sum, seconds + time.perf_counter() - t0)
            last[0] = step

        try:
            with progress_bar(f"epoch {epoch}", steps, enabled=show_progress) as bar:
                loss = run_steps(ds, st, order, config.batch_size, bar, start, loss_sum, after_step)
        except Diverged as err:
            diverged = stop_on_divergence(err, epoch, best_epoch)
            break
        train_time = seconds + time.perf_counter() - t0
        total_samples, total_time = total_samples + len(order), total_time + train_time
        check_in_sync(model, group)
        val = from_main(lambda: validation_figures(model, ds, split, config.eval_n, config.merge), group)  # type: ignore[arg-type]
        recall = val[f"recall@{config.eval_n}"]
        entry = {
            "epoch": epoch,
            "loss": loss,
            f"val_recall@{config.eval_n}": recall,
            f"val_ndcg@{config.eval_n}": val[f"ndcg@{config.eval_n}"],
            "val_interest_collapse": val["interest_collapse"],
            "val_routing_concentration": val["routing_concentration"],
            "samples_per_s": len(order) / train_time,
            "seconds": train_time,
        }
        history.append(entry)
        log.info(
            "epoch %d  loss %.4f  val recall@%d %.4f  ndcg %.4f  collapse %.3f  peaked %.3f  %.0f samples/s  %.1fs",
            epoch, entry["loss"], config.eval_n, recall, val[f"ndcg@{config.eval_n}"], val["interest_collapse"],
            val["routing_concentration"], entry["samples_per_s"], train_time,
        )
        if recall > best_recall:
            best_recall, best_epoch, stale = recall, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            if out is not None and data_spec is not None and group.main:
                partial = TrainResult(model, history, epoch, recall, total_samples / total_time,
                                      run_extra=_run_extra(st))
                save_trained(out, partial, ds, split, model_config, config, data_spec)
        else:
            stale += 1
            if stale >= config.patience:
                log.info("early stop: no better validation recall for %d epochs (best epoch %d)", stale, best_epoch)
                break
        if ckpt is not None:
            checkpoint(epoch + 1, 0, rng.bit_generator.state, 0.0, 0.0)
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    result = TrainResult(model, history, best_epoch, best_recall, total_samples / total_time, diverged, _run_extra(st))
    if out is not None and data_spec is not None and group.main:  # final manifest carries the whole history
        save_trained(out, result, ds, split, model_config, config, data_spec)
    if ckpt is not None:
        ckpt.finish()
    return result


def save_trained(out: Path, result: TrainResult, ds: Dataset, split: Split, model_config: Any, config: TrainConfig,
                 data_spec: DataSpec, extra: dict[str, Any] | None = None) -> None:
    """Write the bundle of a trained model (atomically) with its validation figures, history
    and where it was trained."""
    save_bundle(out, result.model, ds, split, config_dict(model_config, config, data_spec, retriever_name(model_config)),
                extra={"best_epoch": result.best_epoch, f"val_recall@{config.eval_n}": result.best_recall,
                       "train_samples_per_s": result.samples_per_s, "history": result.history, **result.run_extra,
                       **({"diverged": result.diverged} if result.diverged else {}), **(extra or {})})


AUTO_INTERESTS = (1, 2, 4, 8)  # the K that `--interests auto` tries


@dataclass
class InterestSearch:
    """One model per K, the same settings otherwise; `k` the one chosen on validation."""

    k: int  # the chosen K: best validation Recall@N, the fewer interests on a tie
    results: dict[int, TrainResult]  # K -> its trained model (at its best epoch) and history
    figures: dict[int, dict[str, float]]  # K -> validation figures of its best epoch, epochs and seconds

    @property
    def best(self) -> TrainResult:
        return self.results[self.k]

    def report(self) -> dict[str, Any]:
        """JSON-ready: the chosen K and every K's validation figures."""
        return {"chosen": self.k, "by_interests": {str(k): f for k, f in self.figures.items()}}


def search_figures(r: TrainResult, n: int = 50) -> dict[str, Any]:
    """One K's validation figures at its best epoch, its epochs and time: what an interest search records."""
    best = r.history[r.best_epoch - 1]
    return {f"val_recall@{n}": best[f"val_recall@{n}"], f"val_ndcg@{n}": best[f"val_ndcg@{n}"],
            "best_epoch": r.best_epoch, "epochs_run": len(r.history), "train_samples_per_s": r.samples_per_s,
            "train_seconds": round(sum(h["seconds"] for h in r.history), 2)}


def choose_interests(figures: dict[int, dict[str, Any]], n: int = 50) -> int:
    """The K with the best validation Recall@n in `figures` (K -> figures); the fewer interests on a tie."""
    return max(figures, key=lambda k: (figures[k][f"val_recall@{n}"], -k))


def search_interests(
    ds: Dataset,
    split: Split,
    model_config: Any,
    config: TrainConfig,
    ks: Sequence[int] = AUTO_INTERESTS,
    out: Path | None = None,
    data_spec: DataSpec | None = None,
    show_progress: bool = True,
    runtime: Runtime | None = None,
) -> InterestSearch:
    """Train the retriever once per number of interests K in `ks` and keep the best on
    validation Recall@N (the early-stopping figure): the shipped model is never worse on
    the user's validation data than its own best K. With `out`, the chosen model's bundle
    records every K's validation figures under "interests_search" (written by rank 0)."""
    if not ks or min(ks) < 1:
        raise ValueError(f"the interest counts to try must be >= 1, got {list(ks)}")
    n = config.eval_n
    results, figures = {}, {}
    for k in ks:
        r = train(ds, split, dataclasses.replace(model_config, interests=k), config, show_progress=show_progress,
                  runtime=runtime)
        best = r.history[r.best_epoch - 1]
        results[k] = r
        figures[k] = search_figures(r, n)
        log.info("interests %d: val recall@%d %.4f  ndcg@%d %.4f", k, n, best[f"val_recall@{n}"], n,
                 best[f"val_ndcg@{n}"])
    chosen = choose_interests(figures, n)
    search = InterestSearch(chosen, results, figures)
    if out is not None and data_spec is not None and current().main:
        save_trained(out, search.best, ds, split, search.best.model.config, config,
                     data_spec, extra={"interests_search": search.report()})
    return search


def _identity(ds: Dataset, split: Split, model_config: Any, config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the settings, the data and the split."""
    return {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config),
            "data_fingerprint": ds.fingerprint, "split_seed": split.seed}


def _run_extra(st: Setup) -> dict[str, Any]:
    """Where the bundle was trained, for its manifest: device, precision, processes."""
    return {"trained_on": {**st.runtime.describe(), "processes": st.group.world,
                           **({"backend": st.group.backend} if st.group.parallel else {})}}


def model_config_for(ds: Dataset, retriever: str = DEFAULT, **overrides: Any) -> Any:
    """The config of the named retriever (MIND's MINDConfig by default), sized for the
    dataset's vocabularies, with the given settings."""
    _, config_cls = retriever_classes(retriever)
    return config_cls(
        n_items=ds.n_items,
        item_feature_sizes={f: len(v) for f, v in ds.item_feature_vocab.items()},
        user_feature_sizes={f: len(v) for f, v in ds.user_feature_vocab.items()},
        **overrides,
    )
