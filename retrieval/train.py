"""Training MIND: shuffled sliding windows, sampled softmax, validation Recall@N, early stopping.

Deterministic for a given seed (numpy and torch generators seeded, fixed thread count).
Each time validation improves the bundle is rewritten atomically, so an interrupted run
leaves the best bundle so far and never a half-written one.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.bundle import config_dict, save_bundle
from retrieval.data import Dataset, DataSpec, Split, item_counts
from retrieval.errors import DataError
from retrieval.evaluate import exact_index, held_out_users
from retrieval.metrics import mean_metrics, topn_metrics
from retrieval.mind import MIND, MINDConfig, log_expected_counts
from retrieval.progress import progress_bar
from retrieval.recommend import Merge, recommend
from retrieval.samples import make_batch, training_positions

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
    model: MIND
    history: list[dict[str, Any]]  # one entry per epoch
    best_epoch: int
    best_recall: float
    samples_per_s: float


def validation_recall(model: MIND, ds: Dataset, split: Split, n: int, merge: Merge) -> float:
    """Mean Recall@n of validation users, through the serving path on an exact index."""
    users, ends, truth = held_out_users(ds, split, "validation")
    rec = recommend(model, ds, exact_index(model), users, ends, n, merge=merge)
    return mean_metrics(topn_metrics(np.where(rec.items > 0, rec.items, -1), truth, ns=(n,)))[f"recall@{n}"]


def _optimizers(model: MIND, lr: float) -> list[torch.optim.Optimizer]:
    sparse = [p for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()]
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=lr)]
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=lr))
    return opts


def seeded(seed: int, threads: int = 0) -> np.random.Generator:
    """Seed torch (and fix its thread count when given) and return a numpy generator from the same seed."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def train(
    ds: Dataset,
    split: Split,
    model_config: MINDConfig,
    config: TrainConfig,
    out: Path | None = None,
    data_spec: DataSpec | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train MIND on the split's train users; validate on its validation users after each epoch."""
    rng = seeded(config.seed, config.threads)
    model = MIND(model_config, {f: torch.from_numpy(m.astype(np.int64)) for f, m in ds.item_features.items()})
    opts = _optimizers(model, config.lr)

    users, positions = training_positions(ds, split.train_users, split.history_len)
    if len(users) == 0:
        raise DataError("no training windows: every training user has a single behaviour")
    freq = torch.from_numpy(item_counts(ds, split.train_users))
    q, log_q = log_expected_counts(freq, config.negatives, config.neg_alpha)
    gen = torch.Generator().manual_seed(config.seed)

    history: list[dict[str, Any]] = []
    best_recall, best_epoch, best_state, stale = -1.0, 0, None, 0
    total_samples, total_time = 0, 0.0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = rng.permutation(len(users))
        steps = (len(order) + config.batch_size - 1) // config.batch_size
        if config.max_steps:
            steps = min(steps, config.max_steps)
            order = order[: steps * config.batch_size]
        t0, loss_sum = time.perf_counter(), 0.0
        with progress_bar(f"epoch {epoch}", steps, enabled=show_progress) as bar:
            for s in range(steps):
                idx = order[s * config.batch_size : (s + 1) * config.batch_size]
                batch = make_batch(ds, users[idx], positions[idx], model_config.max_len, with_target=True)
                neg = torch.multinomial(q, config.negatives, replacement=True, generator=gen)
                loss = model.loss(batch, neg, log_q)
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
                loss_sum += loss.item()
                done = min((s + 1) * config.batch_size, len(order))
                bar.update(loss=loss_sum / (s + 1), rate=done / max(time.perf_counter() - t0, 1e-9))
        train_time = time.perf_counter() - t0
        total_samples, total_time = total_samples + len(order), total_time + train_time
        recall = validation_recall(model, ds, split, config.eval_n, config.merge)  # type: ignore[arg-type]
        entry = {
            "epoch": epoch,
            "loss": loss_sum / steps,
            f"val_recall@{config.eval_n}": recall,
            "samples_per_s": len(order) / train_time,
            "seconds": train_time,
        }
        history.append(entry)
        log.info(
            "epoch %d  loss %.4f  val recall@%d %.4f  %.0f samples/s  %.1fs",
            epoch, entry["loss"], config.eval_n, recall, entry["samples_per_s"], train_time,
        )
        if recall > best_recall:
            best_recall, best_epoch, stale = recall, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            if out is not None and data_spec is not None:
                save_bundle(out, model, ds, split, config_dict(model_config, config, data_spec),
                            extra={"best_epoch": epoch, f"val_recall@{config.eval_n}": recall,
                                   "train_samples_per_s": total_samples / total_time, "history": history})
        else:
            stale += 1
            if stale >= config.patience:
                log.info("early stop: no better validation recall for %d epochs (best epoch %d)", stale, best_epoch)
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    if out is not None and data_spec is not None:  # final manifest carries the whole history
        save_bundle(out, model, ds, split, config_dict(model_config, config, data_spec),
                    extra={"best_epoch": best_epoch, f"val_recall@{config.eval_n}": best_recall,
                           "train_samples_per_s": total_samples / total_time, "history": history})
    return TrainResult(model, history, best_epoch, best_recall, total_samples / total_time)


def model_config_for(ds: Dataset, **overrides: Any) -> MINDConfig:
    """A MINDConfig sized for the dataset's vocabularies, with the given settings."""
    return MINDConfig(
        n_items=ds.n_items,
        item_feature_sizes={f: len(v) for f, v in ds.item_feature_vocab.items()},
        user_feature_sizes={f: len(v) for f, v in ds.user_feature_vocab.items()},
        **overrides,
    )
