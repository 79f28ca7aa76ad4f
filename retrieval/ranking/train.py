"""Training a ranker: pointwise BCE on positives and sampled negatives, early stopping on
validation AUC (the protocol's pairs), the best bundle rewritten atomically on improvement.

On the device of a `Runtime`, and data-parallel under torchrun like MIND's loop: every rank
draws the same epoch rows and order, takes its share of each global batch and steps
through `retrieval.train.backward_step`; rank 0 validates."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from retrieval.data import Dataset, Split
from retrieval.device import Runtime, compile_loss, to_device
from retrieval.distributed import GradientSync, average_batch_norm, broadcast_state, check_in_sync, current, from_main, rank_seed, share
from retrieval.errors import DataError
from retrieval.progress import progress_bar
from retrieval.ranking.data import PairSet, TouchedItems, make_rank_batch, protocol_pairs
from retrieval.ranking.models import Ranker, build_ranker, needs
from retrieval.ranking.scoring import pair_metrics
from retrieval.samples import training_positions
from retrieval.train import Diverged, LossGuard, backward_step, check_finite_weights, seeded, stop_on_divergence

log = logging.getLogger(__name__)

@dataclass
class RankTrainConfig:
    model: str = "din"  # din, dmin, dien, dsin or base (embedding + MLP)
    epochs: int = 10  # most passes over the training positives
    batch_size: int = 256  # rows (positives and negatives) per step
    lr: float = 1e-3  # Adam learning rate
    negatives: int = 1  # sampled negatives per positive
    negative_source: str = "uniform"  # uniform: never-touched items; retrieval: the retriever's top-M
    retrieval_m: int = 200  # M candidates per user for retrieval negatives
    patience: int = 2  # epochs without a better validation AUC before stopping
    seed: int = 0  # seeds initialisation, shuffling and negatives
    dim: int = 16  # embedding size per field
    max_len: int = 50  # L: behaviours fed to the ranker
    threads: int = 0  # torch threads; 0 = torch's default
    settings: dict[str, Any] = field(default_factory=dict)  # model-specific config fields (e.g. evolution="agru")


@dataclass
class RankTrainResult:
    model: Ranker
    history: list[dict[str, Any]]
    best_epoch: int
    best_auc: float
    samples_per_s: float
    diverged: str | None = None  # why training stopped early on a NaN / infinite loss, else None


def training_pairs(
    ds: Dataset,
    split: Split,
    touched: TouchedItems,
    negatives: int,
    rng: np.random.Generator,
    hard: dict[int, np.ndarray] | None = None,
) -> PairSet:
    """One epoch's rows: every training positive and `negatives` fresh negatives for each."""
    users, pos = training_positions(ds, split.train_users, split.history_len)
    pos_items = ds.items[ds.offsets[users] + pos].astype(np.int64)
    neg_users = np.repeat(users, negatives)
    if hard is None:
        neg_items = touched.sample(neg_users, rng)
    else:  # hard negatives: drawn from each user's retrieval candidates
        neg_items = np.array([hard[u][rng.integers(len(hard[u]))] for u in neg_users], dtype=np.int64)
    return PairSet(
        users=np.concatenate([users, neg_users]),
        ends=np.concatenate([pos, np.repeat(pos, negatives)]),
        candidates=np.concatenate([pos_items, neg_items]),
        labels=np.concatenate([np.ones(len(users)), np.zeros(len(neg_users))]).astype(np.float32),
    )


def train_ranker(
    ds: Dataset,
    split: Split,
    config: RankTrainConfig,
    hard: dict[int, np.ndarray] | None = None,
    on_improve: Any = None,
    show_progress: bool = True,
    runtime: Runtime | None = None,
) -> RankTrainResult:
    """Train the configured ranker; `on_improve(model, history)` runs whenever validation AUC
    improves (on rank 0 only, with several processes)."""
    runtime, group = runtime or Runtime(), current()
    rng = seeded(config.seed, config.threads)
    model = build_ranker(config.model, ds, split.train_users, dim=config.dim, max_len=config.max_len,
                         **config.settings)
    model.to(runtime.device)
    spec = needs(model)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True) if runtime.cuda else torch.optim.Adam(
        model.parameters(), lr=config.lr)
    sync, batch_rng = None, rng  # in-batch draws (negative histories): one stream in one process
    if group.parallel:  # epoch rows and order from the shared rng; each rank's in-batch draws its own
        broadcast_state(model, group)
        sync, batch_rng = GradientSync(model, group), np.random.default_rng([config.seed, group.rank])
        if group.rank:
            torch.manual_seed(rank_seed(config.seed, group.rank))
    if runtime.compile:
        compile_loss(model)
    show_progress = show_progress and group.main
    touched = TouchedItems(ds)
    val_pairs = protocol_pairs(ds, split, "validation")
    if len(val_pairs) == 0:
        raise DataError("no validation users with a ground truth: cannot early-stop the ranker")

    history: list[dict[str, Any]] = []
    best_auc, best_epoch, best_state, stale = -1.0, 0, None, 0
    total_rows, total_time, diverged, guard = 0, 0.0, None, LossGuard()
    for epoch in range(1, config.epochs + 1):
        rows = training_pairs(ds, split, touched, config.negatives, rng, hard)
        order = rng.permutation(len(rows))
        steps = (len(order) + config.batch_size - 1) // config.batch_size
        model.train()
        t0, loss_sum = time.perf_counter(), 0.0
        try:
            with progress_bar(f"{config.model} epoch {epoch}", steps, enabled=show_progress) as bar:
                for s in range(steps):
                    lo, hi, weight = s * config.batch_size, min((s + 1) * config.batch_size, len(order)), 1.0
                    if group.parallel:  # this rank's share of the global batch
                        a, b_ = share(hi - lo, group)
                        lo, hi, weight = lo + a, lo + b_, (b_ - a) / (hi - lo)
                    loss = None
                    if hi > lo:
                        p = rows.take(order[lo:hi])
                        b = make_rank_batch(ds, touched, p.users, p.ends, p.candidates, p.labels, spec.max_len,
                                            batch_rng, neg_history=spec.neg_history, sessions=spec.sessions)
                        with runtime.autocast():
                            loss = model.loss(to_device(b, runtime.device))
                    loss_sum += guard.check(backward_step(loss, [opt], sync, weight, runtime.device), s + 1)
                    bar.update(loss=loss_sum / (s + 1), rate=min((s + 1) * config.batch_size, len(order)) / max(time.perf_counter() - t0, 1e-9))
                check_finite_weights(model, steps)
        except Diverged as err:
            diverged = stop_on_divergence(err, epoch, best_epoch)
            break
        seconds = time.perf_counter() - t0
        total_rows, total_time = total_rows + len(order), total_time + seconds
        average_batch_norm(model, group)
        check_in_sync(model, group)
        val = from_main(lambda: pair_metrics(model, ds, val_pairs), group)
        entry = {"epoch": epoch, "loss": loss_sum / steps, "val_auc": val["auc"], "val_gauc": val["gauc"],
                 "samples_per_s": len(order) / seconds, "seconds": seconds}
        history.append(entry)
        log.info("%s epoch %d  loss %.4f  val auc %.4f  gauc %.4f  %.0f samples/s  %.1fs", config.model, epoch,
                 entry["loss"], val["auc"], val["gauc"], entry["samples_per_s"], seconds)
        if val["auc"] > best_auc:
            best_auc, best_epoch, stale = val["auc"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            if on_improve is not None and group.main:
                on_improve(model, history)
        else:
            stale += 1
            if stale >= config.patience:
                log.info("early stop: best epoch %d", best_epoch)
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return RankTrainResult(model, history, best_epoch, best_auc, total_rows / total_time, diverged)


def config_dict(config: RankTrainConfig) -> dict[str, Any]:
    return asdict(config)



def hard_negatives(model: Any, ds: Dataset, split: Split, m: int) -> dict[int, np.ndarray]:
    """Each training user's top-m retrieval candidates from the MIND `model` (never touched by
    them): hard negatives."""
    from retrieval.evaluate import exact_index
    from retrieval.recommend import recommend
    from retrieval.samples import Histories

    users = split.train_users
    rec = recommend(model, ds, exact_index(model), Histories.of(ds, users, split.history_len[users]), m)
    return {int(u): row[row > 0] for u, row in zip(users, rec.items)}
