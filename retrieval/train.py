"""Training MIND: shuffled sliding windows, sampled softmax, validation Recall@N, early stopping.

Deterministic for a given seed (numpy and torch generators seeded, fixed thread count).
Each time validation improves the bundle is rewritten atomically, so an interrupted run
leaves the best bundle so far and never a half-written one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.bundle import config_dict, save_bundle
from retrieval.data import Dataset, DataSpec, Split, item_counts
from retrieval.early_stopping import EarlyStopping
from retrieval.errors import DataError
from retrieval.evaluate import exact_index, held_out_users
from retrieval.metrics import mean_metrics, topn_metrics
from retrieval.mind import Batch, log_expected_counts
from retrieval.retrievers import DEFAULT, Retriever, build_retriever, retriever_classes, retriever_name
from retrieval.progress import progress_bar
from retrieval.recommend import Merge, recommend
from retrieval.samples import Histories, make_batch, training_positions

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 30  # most passes over the training windows
    batch_size: int = 256  # windows per step
    lr: float = 3e-3  # Adam learning rate (dense and sparse parameters alike)
    negatives: int = 512  # S: sampled negatives shared across the batch
    neg_alpha: float = 1.0  # negatives drawn with q ∝ (train frequency + 1)^alpha; 0 = uniform (1.0: best on validation)
    patience: int = 3  # stop after this many epochs without a better validation Recall@N
    seed: int = 0  # seeds initialisation, shuffling, negatives and routing draws
    split_seed: int = 2026  # the protocol's user split seed
    eval_n: int = 50  # N of the validation Recall@N that early stopping follows
    merge: str = "best"  # how interests' results are merged for validation and serving
    threads: int = 0  # torch threads; 0 = leave torch's default
    max_steps: int = 0  # cap on steps per epoch (benchmarks, smoke runs); 0 = the whole epoch


@dataclass
class TrainResult:
    model: Retriever
    history: list[dict[str, Any]]  # one entry per epoch
    best_epoch: int
    best_recall: float
    samples_per_s: float


def validation_recall(model: Retriever, ds: Dataset, split: Split, n: int, merge: Merge) -> float:
    """Mean Recall@n of validation users, through the serving path on an exact index."""
    users, ends, truth = held_out_users(ds, split, "validation")
    rec = recommend(model, ds, exact_index(model), Histories.of(ds, users, ends), n, merge=merge)
    return mean_metrics(topn_metrics(np.where(rec.items > 0, rec.items, -1), truth, ns=(n,)))[f"recall@{n}"]


class NegativeSampler:
    """Draws the S shared negatives of each step from q by inverse-CDF lookup.

    Why: `torch.multinomial(q, S)` rebuilds q's cumulative sum on every call, O(N) a
    step; here the CDF is built once and a step costs S binary searches, O(S log N), so
    the step time does not grow with the item count. The draw is exactly q (up to float
    rounding): u ~ U[0, 1) in float64 lands on item i with probability cdf[i] - cdf[i-1]
    = q[i], and an item with q[i] = 0 (the padding index) is never drawn.
    """

    def __init__(self, q: torch.Tensor, num: int, seed: int):
        cdf = torch.cumsum(q.to(torch.float64), 0)  # (N+1,)
        self.cdf = cdf / cdf[-1]  # the last entry is exactly 1, so every u < 1 finds an item
        self.num = num
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self) -> torch.Tensor:
        """(S,) int64 item indices, drawn with replacement from q."""
        u = torch.rand(self.num, dtype=torch.float64, generator=self.gen)  # (S,) in [0, 1)
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


def _optimizers(model: Retriever, lr: float) -> list[torch.optim.Optimizer]:
    """Adam for the dense parameters, RowSparseAdam for the sparse embedding tables."""
    sparse = [p for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()]
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=lr)]
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
    sampler: NegativeSampler  # draws the S shared negatives of a step ∝ q
    log_q: torch.Tensor  # (N+1,) log(S q), the log-Q correction


def setup(ds: Dataset, split: Split, model_config: Any, config: TrainConfig) -> Setup:
    """Seed, build the model and its optimizers, the training windows and the negative sampler."""
    seeded(config.seed, config.threads)
    model = build_retriever(model_config, {f: torch.from_numpy(m.astype(np.int64)) for f, m in ds.item_features.items()})
    users, positions = training_positions(ds, split.train_users, split.history_len)
    if len(users) == 0:
        raise DataError("no training windows: every training user has a single behaviour")
    freq = torch.from_numpy(item_counts(ds, split.train_users))
    q, log_q = log_expected_counts(freq, config.negatives, config.neg_alpha)
    sampler = NegativeSampler(q, config.negatives, config.seed)
    return Setup(model, _optimizers(model, config.lr), users, positions, sampler, log_q)


def train_step(model: Retriever, opts: list[torch.optim.Optimizer], batch: Batch, neg: torch.Tensor,
               log_q: torch.Tensor) -> float:
    """One optimisation step on one batch with the negatives `neg` (S,); returns the loss."""
    loss = model.loss(batch, neg, log_q)
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in opts:
        o.step()
    return loss.item()


def run_steps(ds: Dataset, st: Setup, order: np.ndarray, batch_size: int, bar: Any = None) -> float:
    """Steps over the windows `order` (W',) in batches of batch_size, in that order; mean loss.

    Each batch's histories are gathered from the stored sequences here, so memory follows
    the batch, never windows x L. `bar` is a `progress_bar` (or None) told the running
    loss and rate after every step."""
    model, L = st.model, st.model.config.max_len
    model.train()
    steps = (len(order) + batch_size - 1) // batch_size
    t0, loss_sum = time.perf_counter(), 0.0
    for s in range(steps):
        idx = order[s * batch_size : (s + 1) * batch_size]  # (B,)
        batch = make_batch(ds, st.users[idx], st.positions[idx], L, with_target=True)
        loss_sum += train_step(model, st.opts, batch, st.sampler.draw(), st.log_q)
        if bar is not None:
            done = min((s + 1) * batch_size, len(order))
            bar.update(loss=loss_sum / (s + 1), rate=done / max(time.perf_counter() - t0, 1e-9))
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
) -> TrainResult:
    """Train MIND on the split's train users; validate on its validation users after each epoch."""
    rng = np.random.default_rng(config.seed)
    st = setup(ds, split, model_config, config)
    model = st.model

    history: list[dict[str, Any]] = []
    stopper = EarlyStopping(config.patience)
    total_samples, total_time = 0, 0.0
    for epoch in range(1, config.epochs + 1):
        order = epoch_order(rng, len(st.users), config.batch_size, config.max_steps)
        steps = (len(order) + config.batch_size - 1) // config.batch_size
        t0 = time.perf_counter()
        with progress_bar(f"epoch {epoch}", steps, enabled=show_progress) as bar:
            loss = run_steps(ds, st, order, config.batch_size, bar)
        train_time = time.perf_counter() - t0
        total_samples, total_time = total_samples + len(order), total_time + train_time
        recall = validation_recall(model, ds, split, config.eval_n, config.merge)  # type: ignore[arg-type]
        entry = {
            "epoch": epoch,
            "loss": loss,
            f"val_recall@{config.eval_n}": recall,
            "samples_per_s": len(order) / train_time,
            "seconds": train_time,
        }
        history.append(entry)
        log.info(
            "epoch %d  loss %.4f  val recall@%d %.4f  %.0f samples/s  %.1fs",
            epoch, entry["loss"], config.eval_n, recall, entry["samples_per_s"], train_time,
        )
        if stopper.update(epoch, recall, model):
            if out is not None and data_spec is not None:
                save_bundle(out, model, ds, split, config_dict(model_config, config, data_spec, retriever_name(model_config)),
                            extra={"best_epoch": epoch, f"val_recall@{config.eval_n}": recall,
                                   "train_samples_per_s": total_samples / total_time, "history": history})
        elif stopper.should_stop:
            log.info("early stop: no better validation recall for %d epochs (best epoch %d)", stopper.stale,
                     stopper.best_epoch)
            break
    stopper.restore(model)
    best_epoch, best_recall = stopper.best_epoch, stopper.best
    model.eval()
    if out is not None and data_spec is not None:  # final manifest carries the whole history
        save_bundle(out, model, ds, split, config_dict(model_config, config, data_spec, retriever_name(model_config)),
                    extra={"best_epoch": best_epoch, f"val_recall@{config.eval_n}": best_recall,
                           "train_samples_per_s": total_samples / total_time, "history": history})
    return TrainResult(model, history, best_epoch, best_recall, total_samples / total_time)


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
