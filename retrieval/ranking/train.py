"""Training a ranker: pointwise BCE on positives and sampled negatives, to convergence.

Every epoch is validated on the validation users: AUC, GAUC and log loss on the protocol's
pairs and, when the retrieval stage is given (`RetrievalCandidates`), the two-stage
NDCG@20 of reranking each validation user's top-M. Early stopping (`EarlyStopping`,
`patience` epochs) follows the figure named by `monitor`, and the best weights are kept
(and handed to `on_improve`, which rewrites the bundle atomically).

Negatives (what the ranker learns to push down) mix two sources: items the user never
touched, drawn uniformly, and the retriever's top-M candidates the user did not take
(hard negatives: at serving time the ranker only ever sees retrieval's output). Each
negative comes from the top-M with probability `hard_share`.

After training, with the retrieval stage given and `fuse` on, the weight w of the fused
order logit + w × standardised retrieval score (`scoring.fuse`) is chosen on the validation
users' two-stage NDCG@20 (w = 0 keeps the ranker's own order).

On the device of a `Runtime`, and data-parallel under torchrun like MIND's loop: every rank
draws the same epoch rows and order, takes its share of each step's groups and steps
through `retrieval.train.backward_step`; rank 0 validates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from retrieval.checkpoint import Checkpointer, Checkpointing
from retrieval.data import Dataset, Split
from retrieval.device import Runtime, compile_loss, to_device
from retrieval.distributed import (GradientSync, average_batch_norm, broadcast_state, check_in_sync, current, from_main,
                                   gather_to_main, rank_seed, share)
from retrieval.early_stopping import EarlyStopping
from retrieval.errors import ConfigError, DataError
from retrieval.metrics import mean_metrics, topn_metrics
from retrieval.progress import progress_bar
from retrieval.ranking.data import PairSet, TouchedItems, make_rank_batch, protocol_pairs
from retrieval.ranking.models import Ranker, build_ranker, needs
from retrieval.ranking.scoring import fuse, pair_metrics, score_candidates
from retrieval.samples import Histories, training_positions
from retrieval.train import Diverged, LossGuard, backward_step, check_finite_weights, seeded, stop_on_divergence

log = logging.getLogger(__name__)

Monitor = Literal["auc", "gauc", "ndcg@20"]
MONITORS: tuple[str, ...] = ("auc", "gauc", "ndcg@20")
FUSION_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # the grid w is chosen from


@dataclass
class RankTrainConfig:
    model: str = "din"  # din, dmin, dien, dsin or base (embedding + MLP)
    epochs: int = 50  # most passes over the training positives; early stopping usually ends sooner
    batch_size: int = 256  # rows (positives and negatives) per step
    lr: float = 1e-3  # Adam learning rate
    negatives: int = 1  # sampled negatives per positive
    negative_source: str = "uniform"  # uniform: mix by hard_share; retrieval: every negative from the top-M
    hard_share: float = 0.0  # probability that a negative is drawn from the retriever's top-M (else uniform)
    retrieval_m: int = 200  # M candidates per user for hard negatives and the two-stage validation
    horizon: int = 1  # the positive of history end t: one of the behaviours t .. t + horizon - 1 (1 = the next)
    patience: int = 3  # epochs without a better validation figure before stopping
    monitor: str = "auc"  # the validation figure early stopping follows: auc, gauc or ndcg@20 (two-stage)
    fuse: bool = True  # choose the fusion weight with the retrieval score on validation users
    seed: int = 0  # seeds initialisation, shuffling and negatives
    dim: int = 16  # embedding size per field
    max_len: int = 50  # L: behaviours fed to the ranker
    threads: int = 0  # torch threads; 0 = torch's default
    settings: dict[str, Any] = field(default_factory=dict)  # model-specific config fields (e.g. evolution="agru")

    def __post_init__(self) -> None:
        if self.negative_source not in ("uniform", "retrieval"):
            raise ValueError(f"negative_source={self.negative_source!r}; use uniform or retrieval")
        if not 0.0 <= self.hard_share <= 1.0:
            raise ValueError(f"hard_share={self.hard_share} must lie in [0, 1]")
        if self.horizon < 1:
            raise ValueError(f"horizon={self.horizon} must be at least 1")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor={self.monitor!r}; use one of {', '.join(MONITORS)}")

    @property
    def share(self) -> float:
        """The share of negatives drawn from the retriever's top-M."""
        return 1.0 if self.negative_source == "retrieval" else self.hard_share

    @property
    def needs_retrieval(self) -> bool:
        """Whether training reads the retrieval stage's candidates."""
        return self.share > 0 or self.monitor == "ndcg@20" or self.fuse


@dataclass
class RetrievalCandidates:
    """What the ranker sees of the retrieval stage: each training user's top-M candidates it
    never touched (hard negatives) and each validation user's top-M with scores."""

    m: int  # M
    hard: dict[int, np.ndarray]  # train user index -> (<= M,) untaken candidate items
    val_hist: Histories  # validation users with a ground truth, their histories
    val_items: np.ndarray  # (U, M) their candidates in retrieval order, 0 = none
    val_scores: np.ndarray  # (U, M) the retrieval scores, aligned
    val_truth: list[np.ndarray]  # their ground truths


@dataclass
class RankTrainResult:
    model: Ranker
    history: list[dict[str, Any]]  # one entry per epoch
    best_epoch: int
    best_auc: float  # validation AUC at the best epoch
    samples_per_s: float
    best: dict[str, float] = field(default_factory=dict)  # every validation figure at the best epoch
    fusion: dict[str, Any] = field(default_factory=dict)  # validation NDCG@20 per weight and the chosen one
    diverged: str | None = None  # why training stopped early on a NaN / infinite loss, else None


def retrieval_candidates(retriever: Any, ds: Dataset, split: Split, m: int) -> RetrievalCandidates:
    """Run the retriever once for the training users (full histories: hard negatives) and the
    validation users (their histories: the two-stage validation and the fusion weight)."""
    from retrieval.evaluate import exact_index, held_out_users
    from retrieval.recommend import recommend

    v_users, v_ends, v_truth = held_out_users(ds, split, "validation")
    v_hist = Histories.of(ds, v_users, v_ends)
    v_rec = recommend(retriever, ds, exact_index(retriever), v_hist, m)
    return RetrievalCandidates(m, hard_negatives(retriever, ds, split, m), v_hist, v_rec.items, v_rec.scores, v_truth)


def hard_negatives(model: Any, ds: Dataset, split: Split, m: int) -> dict[int, np.ndarray]:
    """Each training user's top-m retrieval candidates from the MIND `model` (never touched by
    them): hard negatives."""
    from retrieval.evaluate import exact_index
    from retrieval.recommend import recommend

    users = split.train_users
    rec = recommend(model, ds, exact_index(model), Histories.of(ds, users, split.history_len[users]), m)
    return {int(u): row[row > 0] for u, row in zip(users, rec.items)}


def _hard_table(hard: dict[int, np.ndarray], n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-user lists as CSR: offsets (n_users + 1,), items (E,)."""
    counts = np.zeros(n_users, dtype=np.int64)
    for u, items in hard.items():
        counts[u] = len(items)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    items = np.zeros(offsets[-1], dtype=np.int64)
    for u, row in hard.items():
        items[offsets[u] : offsets[u + 1]] = row
    return offsets, items


def training_pairs(
    ds: Dataset,
    split: Split,
    touched: TouchedItems,
    negatives: int,
    rng: np.random.Generator,
    hard: dict[int, np.ndarray] | None = None,
    hard_share: float = 1.0,
    horizon: int = 1,
) -> PairSet:
    """One epoch's rows: a positive for every training history end t (history = the behaviours
    before t) and `negatives` fresh negatives for each.

    The positive is behaviour t itself (horizon 1) or one of the behaviours t .. t + horizon - 1,
    drawn afresh each epoch: a held-out user's ground truth is every later behaviour, not only
    the next, and where a burst of ratings shares one timestamp the "next" one is the log's
    tie-break. Without `hard` every negative is uniform over the items the user never touched;
    with it each negative is drawn from the user's list in `hard` with probability
    `hard_share` (uniformly within the list), else uniformly (also where a user's list is empty)."""
    if horizon < 1:
        raise ValueError(f"horizon={horizon} must be at least 1")
    users, pos = training_positions(ds, split.train_users, split.history_len)
    target = pos
    if horizon > 1:
        reach = np.minimum(horizon, split.history_len[users] - pos)  # (R,) >= 1 behaviours from t on
        target = pos + (rng.random(len(pos)) * reach).astype(np.int64)
    pos_items = ds.items[ds.offsets[users] + target].astype(np.int64)
    neg_users = np.repeat(users, negatives)
    neg_items = touched.sample(neg_users, rng)
    if hard is not None and hard_share > 0:
        offsets, items = _hard_table(hard, ds.n_users)
        size = offsets[neg_users + 1] - offsets[neg_users]  # (R,)
        take = (rng.random(len(neg_users)) < hard_share) & (size > 0)
        pick = offsets[neg_users[take]] + (rng.random(int(take.sum())) * size[take]).astype(np.int64)
        neg_items[take] = items[pick]
    return PairSet(
        users=np.concatenate([users, neg_users]),
        ends=np.concatenate([pos, np.repeat(pos, negatives)]),
        candidates=np.concatenate([pos_items, neg_items]),
        labels=np.concatenate([np.ones(len(users)), np.zeros(len(neg_users))]).astype(np.float32),
    )


def step_groups(rows: PairSet, negatives: int, batch_size: int, rng: np.random.Generator
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch's steps over `training_pairs` rows (P positives, then `negatives` for each):
    each step takes batch_size // (1 + negatives) positives (at least one) in a shuffled order,
    each with its own negatives, and yields (row indices (B,), history of each row (B,)) where
    the history index is the positive's place in the step. A positive and its negatives share
    one history, which the models then encode once (`RankBatch.rows`)."""
    P = len(rows) // (1 + negatives)
    per_step = max(1, batch_size // (1 + negatives))
    order = rng.permutation(P)
    for s in range(0, P, per_step):
        g = order[s : s + per_step]  # (G,) positives
        neg = (P + g[:, None] * negatives + np.arange(negatives)).reshape(-1)  # (G k,) their negatives
        hist = np.concatenate([np.arange(len(g)), np.repeat(np.arange(len(g)), negatives)])
        yield np.concatenate([g, neg]), hist


def two_stage_ndcg(model: Ranker, ds: Dataset, retrieval: RetrievalCandidates,
                   weights: tuple[float, ...] = (0.0,), n: int = 20) -> dict[float, float]:
    """Validation users' NDCG@n of their top-M reordered by logit + w × z, for each weight w."""
    logits = score_candidates(model, ds, retrieval.val_hist, retrieval.val_items)  # (U, M), the ranker alone
    out = {}
    for w in weights:
        order = np.argsort(-fuse(logits, retrieval.val_scores, w), axis=1, kind="stable")
        ranked = np.take_along_axis(retrieval.val_items, order, 1)
        out[w] = mean_metrics(topn_metrics(np.where(ranked > 0, ranked, -1), retrieval.val_truth, (n,)))[f"ndcg@{n}"]
    return out


def choose_retrieval_weight(model: Ranker, ds: Dataset, retrieval: RetrievalCandidates,
                            weights: tuple[float, ...] = FUSION_WEIGHTS) -> dict[str, Any]:
    """Set model.config.retrieval_weight to the w of `weights` with the best validation NDCG@20
    (ties: the smallest w); -> {"weight", "val_ndcg@20_by_weight", "val_retrieval_ndcg@20"}."""
    by_weight = two_stage_ndcg(model, ds, retrieval, weights)
    best = max(by_weight, key=lambda w: (by_weight[w], -w))
    model.config.retrieval_weight = float(best)
    items = np.where(retrieval.val_items > 0, retrieval.val_items, -1)
    retrieval_ndcg = mean_metrics(topn_metrics(items, retrieval.val_truth, (20,)))["ndcg@20"]
    return {"weight": float(best), "val_ndcg@20_by_weight": {str(w): v for w, v in by_weight.items()},
            "val_retrieval_ndcg@20": retrieval_ndcg}


def train_ranker(
    ds: Dataset,
    split: Split,
    config: RankTrainConfig,
    retrieval: RetrievalCandidates | None = None,
    on_improve: Callable[[Ranker, list[dict[str, Any]]], None] | None = None,
    show_progress: bool = True,
    runtime: Runtime | None = None,
    checkpointing: Checkpointing | None = None,
    identity: dict[str, Any] | None = None,
) -> RankTrainResult:
    """Train the configured ranker to convergence on the validation figure `config.monitor`;
    `on_improve(model, history)` runs whenever it improves (on rank 0 only, with several
    processes). `retrieval` is needed for hard negatives, the two-stage monitor and fusion
    (`config.needs_retrieval`).

    `checkpointing`: a checkpoint at the end of every epoch (model, optimizer, generators,
    early-stopping state) and, with `resume`, a run that continues from it and ends as the
    uninterrupted run would (`retrieval.checkpoint`); `identity` adds what else it must match
    (e.g. the retrieval bundle's fingerprint). Checkpoints are per epoch: an epoch is seconds to
    minutes here, and a killed run loses at most the one in progress."""
    if retrieval is None and (config.share > 0 or config.monitor == "ndcg@20"):
        raise DataError("hard negatives and the two-stage monitor need the retrieval stage's candidates")
    runtime, group = runtime or Runtime(), current()
    rng = seeded(config.seed, config.threads)
    model = build_ranker(config.model, ds, split.train_users, split.history_len, dim=config.dim, max_len=config.max_len,
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
    touched = TouchedItems(ds, split.history_len)  # negatives: what the user had not touched in the training data
    val_pairs = protocol_pairs(ds, split, "validation")
    if len(val_pairs) == 0:
        raise DataError("no validation users with a ground truth: cannot early-stop the ranker")

    history: list[dict[str, Any]] = []
    stopper = EarlyStopping(config.patience)
    total_rows, total_time, diverged, guard = 0, 0.0, None, LossGuard()
    ckpt, first_epoch = None, 1
    if checkpointing is not None:
        if checkpointing.every:
            raise ConfigError("the rankers checkpoint at the end of each epoch; --checkpoint-every is MIND's")
        ckpt = Checkpointer(checkpointing, {"model": model.config.to_dict(), "train": asdict(config),
                                            "data_fingerprint": ds.fingerprint, "split_seed": split.seed,
                                            **(identity or {})}, group, runtime.device)
        resumed = ckpt.load()
        if resumed is not None:
            ckpt.restore(resumed, model, [opt], {}, rng)
            loop = resumed["loop"]
            first_epoch, history = resumed["epoch"], loop["history"]
            stopper.best, stopper.best_epoch, stopper.stale = loop["best"], loop["best_epoch"], loop["stale"]
            stopper.best_state = resumed["best_state"]
            total_rows, total_time, guard.first = loop["total_rows"], loop["total_time"], loop["guard_first"]
            if group.parallel:  # each rank's in-batch generator as it stood
                batch_rng.bit_generator.state = loop["batch_rng"][group.rank]
            if stopper.should_stop or first_epoch > config.epochs:
                log.info("%s: the checkpoint's run had ended (epoch %d): nothing left to train", config.model,
                         first_epoch - 1)

    def checkpoint(epoch: int) -> None:
        assert ckpt is not None
        ranks = gather_to_main(batch_rng.bit_generator.state, group) if group.parallel else None
        loop = {"history": history, "best": stopper.best, "best_epoch": stopper.best_epoch, "stale": stopper.stale,
                "total_rows": total_rows, "total_time": total_time, "guard_first": guard.first, "batch_rng": ranks}
        ckpt.save(epoch, 0, model, [opt], {}, rng.bit_generator.state, rng.bit_generator.state, loop,
                  stopper.best_state)

    for epoch in range(first_epoch, config.epochs + 1):
        if stopper.should_stop:
            break
        rows = training_pairs(ds, split, touched, config.negatives, rng,
                              retrieval.hard if retrieval is not None else None, config.share, config.horizon)
        steps = list(step_groups(rows, config.negatives, config.batch_size, rng))
        model.train()
        t0, loss_sum, done = time.perf_counter(), 0.0, 0
        try:
            with progress_bar(f"{config.model} epoch {epoch}", len(steps), enabled=show_progress) as bar:
                for s, (idx, hist_rows) in enumerate(steps):
                    weight = 1.0
                    if group.parallel:  # this rank's share of the step's groups (a positive and its negatives)
                        groups = int(hist_rows.max()) + 1
                        a, b_ = share(groups, group)
                        keep = (hist_rows >= a) & (hist_rows < b_)
                        idx, hist_rows, weight = idx[keep], hist_rows[keep] - a, (b_ - a) / groups
                    loss = None
                    if len(idx):
                        p = rows.take(idx)
                        first = idx[: hist_rows.max() + 1]  # each group's positive: its history's user and end
                        b = make_rank_batch(ds, touched, rows.users[first], rows.ends[first], p.candidates, p.labels,
                                            spec.max_len, batch_rng, neg_history=spec.neg_history,
                                            sessions=spec.sessions, rows=hist_rows)
                        with runtime.autocast():
                            loss = model.loss(to_device(b, runtime.device))
                    loss_sum += guard.check(backward_step(loss, [opt], sync, weight, runtime.device), s + 1)
                    done += len(idx)
                    bar.update(loss=loss_sum / (s + 1), rate=done / max(time.perf_counter() - t0, 1e-9))
                check_finite_weights(model, len(steps))
        except Diverged as err:
            diverged = stop_on_divergence(err, epoch, stopper.best_epoch)
            break
        seconds = time.perf_counter() - t0
        total_rows, total_time = total_rows + len(rows), total_time + seconds
        average_batch_norm(model, group)
        check_in_sync(model, group)
        t1 = time.perf_counter()

        def validate() -> dict[str, float]:
            val = pair_metrics(model, ds, val_pairs)
            out = {"val_auc": val["auc"], "val_gauc": val["gauc"], "val_log_loss": val["log_loss"]}
            if retrieval is not None:
                out["val_ndcg@20"] = two_stage_ndcg(model, ds, retrieval)[0.0]
            return out

        val = from_main(validate, group)
        entry = {"epoch": epoch, "loss": loss_sum / len(steps), **val}
        entry.update({"samples_per_s": len(rows) / seconds, "seconds": seconds,
                      "validation_seconds": time.perf_counter() - t1})
        history.append(entry)
        log.info("%s epoch %d  loss %.4f  val auc %.4f  gauc %.4f  log loss %.4f%s  %.0f samples/s  %.1fs",
                 config.model, epoch, entry["loss"], val["val_auc"], val["val_gauc"], val["val_log_loss"],
                 f"  ndcg@20 {entry['val_ndcg@20']:.4f}" if "val_ndcg@20" in entry else "",
                 entry["samples_per_s"], seconds)
        if stopper.update(epoch, entry[f"val_{config.monitor}"], model):
            if on_improve is not None and group.main:
                on_improve(model, history)
        elif stopper.should_stop:
            log.info("early stop: no better validation %s for %d epochs (best epoch %d)", config.monitor,
                     stopper.stale, stopper.best_epoch)
        if ckpt is not None:
            checkpoint(epoch + 1)
    stopper.restore(model)
    model.eval()
    best = {k: v for k, v in history[stopper.best_epoch - 1].items() if k.startswith("val_")}
    fusion: dict[str, Any] = {}
    if retrieval is not None and config.fuse:
        fusion = from_main(lambda: choose_retrieval_weight(model, ds, retrieval), group)
        log.info("%s fusion weight %.2f on validation: ndcg@20 %.4f (ranker alone %.4f, retrieval %.4f)",
                 config.model, fusion["weight"], max(fusion["val_ndcg@20_by_weight"].values()),
                 fusion["val_ndcg@20_by_weight"]["0.0"], fusion["val_retrieval_ndcg@20"])
    if ckpt is not None:
        ckpt.finish()
    return RankTrainResult(model, history, stopper.best_epoch, best["val_auc"], total_rows / total_time, best, fusion,
                           diverged)


def config_dict(config: RankTrainConfig) -> dict[str, Any]:
    return asdict(config)
