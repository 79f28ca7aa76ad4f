"""Scoring with a ranker: the one place that training's validation, evaluation and serving score through.

`score_pairs` scores flat (user, history end, candidate) rows of the dataset (the protocol's
pairs, validation); `score_candidates` and `rerank` score each history's M retrieval
candidates, for held-out users and request-time behaviours alike (`Histories`).
`rerank` returns the permutation, so whatever travels with a candidate (its retrieval
score, the interest that found it) follows it to its new place.

Fusion with the retrieval order: a ranker whose `config.retrieval_weight` w is non-zero
(chosen on validation users after training, `ranking.train.choose_retrieval_weight`)
orders the candidates by the fused score

    logit + w × z,   z = the candidate's retrieval score standardised over the user's M candidates

when the caller passes the retrieval scores (aligned with `candidates`), so the ranker
refines the retriever's order instead of replacing it. z is scale-free: it does not depend
on the size of one user's interest vectors or on the retriever's training run. Without
retrieval scores (or with w = 0) the order is the ranker's own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from retrieval.data import Dataset
from retrieval.device import model_device, to_device
from retrieval.metrics import auc, gauc, log_loss
from retrieval.ranking.data import PairSet, make_rank_batch
from retrieval.ranking.models import Ranker, needs
from retrieval.samples import Histories, Sequences


@torch.no_grad()
def score_pairs(
    model: Ranker, ds: Dataset, pairs: PairSet, batch_size: int = 4096, seqs: Sequences | None = None
) -> np.ndarray:
    """Logits (R,) of every (row, history end, candidate) pair; rows index `seqs` (default the dataset).

    Pairs that share a history (a user's M candidates) are scored against one copy of it
    (`RankBatch.rows`)."""
    if model.training:  # eval() walks every module: not on every request
        model.eval()
    spec = needs(model)
    device = model_device(model)
    out = []
    for i in range(0, len(pairs), batch_size):
        p = pairs.take(np.arange(i, min(i + batch_size, len(pairs))))
        key = p.users.astype(np.int64) * (int(p.ends.max()) + 1) + p.ends  # one key per distinct history
        _, first, rows = np.unique(key, return_index=True, return_inverse=True)
        b = make_rank_batch(ds, None, p.users[first], p.ends[first], p.candidates, None, spec.max_len,
                            sessions=spec.sessions, seqs=seqs, rows=rows.reshape(-1))
        out.append(model.score(to_device(b, device)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def pair_metrics(model: Ranker, ds: Dataset, pairs: PairSet,
                 segments: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """AUC, GAUC and log loss of the model's scores on labelled pairs (the ranker alone). With
    `segments` (name -> (R,) bool mask over the pairs), also {"by_segment": {name: {auc, gauc,
    pairs}}} on each segment's pairs alone (auc and gauc None where a segment holds one class)."""
    s = score_pairs(model, ds, pairs)
    out: dict[str, Any] = {"auc": auc(pairs.labels, s), "gauc": gauc(pairs.users, pairs.labels, s),
                           "log_loss": log_loss(pairs.labels, s)}
    if segments is not None:
        out["by_segment"] = {}
        for name, mask in segments.items():
            labels = pairs.labels[mask]
            both = 0 < labels.sum() < len(labels)
            out["by_segment"][name] = {"auc": auc(labels, s[mask]) if both else None,
                                       "gauc": gauc(pairs.users[mask], labels, s[mask]) if both else None,
                                       "pairs": int(mask.sum())}
    return out


def standardise(retrieval_scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each row's scores (U, M) minus the row's mean over its valid candidates, over their standard
    deviation (1 where the row has none or one distinct value); 0 where not valid."""
    s = np.where(valid, retrieval_scores, 0.0).astype(np.float64)
    n = valid.sum(1, keepdims=True)  # (U, 1)
    mean = s.sum(1, keepdims=True) / np.maximum(n, 1)
    var = (np.where(valid, s - mean, 0.0) ** 2).sum(1, keepdims=True) / np.maximum(n, 1)
    std = np.where(var > 0, np.sqrt(var), 1.0)
    return np.where(valid, (s - mean) / std, 0.0)


def fuse(logits: np.ndarray, retrieval_scores: np.ndarray | None, weight: float) -> np.ndarray:
    """The fused scores (U, M): logits + weight × standardised retrieval scores where a candidate
    exists (finite logit); -inf stays -inf. The logits unchanged without scores or weight."""
    if retrieval_scores is None or weight == 0:
        return logits
    if retrieval_scores.shape != logits.shape:
        raise ValueError(f"retrieval_scores {retrieval_scores.shape} must align with the candidates {logits.shape}")
    valid = np.isfinite(logits)
    z = standardise(np.where(valid, retrieval_scores, 0.0), valid)
    return np.where(valid, logits + weight * z, -np.inf).astype(np.float32)


def score_candidates(model: Ranker, ds: Dataset, hist: Histories, candidates: np.ndarray,
                     retrieval_scores: np.ndarray | None = None) -> np.ndarray:
    """Scores (U, M) of each history's candidates (U, M) item indices; -inf where a candidate is 0
    (none). The ranker's logits, fused with `retrieval_scores` (U, M), aligned with candidates,
    when given and the ranker has a retrieval weight (see the module docstring).

    A history's M candidates share one copy of it (`score_pairs`), so the models encode it once."""
    U, M = candidates.shape
    weight = getattr(model.config, "retrieval_weight", 0.0)
    valid = candidates.reshape(-1) > 0
    rows = np.repeat(np.arange(U, dtype=np.int64), M)[valid]
    pairs = PairSet(rows, hist.lengths()[rows], candidates.reshape(-1)[valid].astype(np.int64),
                    np.zeros(len(rows), np.float32))
    logits = np.full(U * M, -np.inf, dtype=np.float32)
    logits[valid] = score_pairs(model, ds, pairs, seqs=hist)
    return fuse(logits.reshape(U, M), retrieval_scores, weight)


def rerank(model: Ranker, ds: Dataset, hist: Histories, candidates: np.ndarray,
           retrieval_scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each history's candidates (U, M) ordered by the ranker: the permutation (U, M), so that
    `np.take_along_axis(x, order, 1)` reorders candidates and anything aligned with them, and the
    scores (U, M) in the new order (fused with `retrieval_scores` as in `score_candidates`);
    missing candidates (0) stay last, ties keep retrieval order."""
    scores = score_candidates(model, ds, hist, candidates, retrieval_scores)
    order = np.argsort(-scores, axis=1, kind="stable")
    return order, np.take_along_axis(scores, order, 1)
