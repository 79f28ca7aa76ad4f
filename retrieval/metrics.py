"""Offline metrics in pure numpy: Recall / HitRate / NDCG at N (retrieval), AUC / GAUC (ranking).

Definitions follow ../shared/eval-protocol.md (ComiRec, KDD 2020): for a user with top-N
list R and ground-truth set G,
    Recall@N  = |R ∩ G| / |G|
    HitRate@N = 1 if |R ∩ G| > 0 else 0
    NDCG@N    = DCG / IDCG, binary relevance, DCG = Σ_hits 1 / log2(rank + 1) (rank from 1),
                IDCG over min(|G|, N) hits.
AUC counts tied positive/negative pairs as 1/2 (average ranks); GAUC is the per-user AUC
weighted by the user's number of impressions, users with one class only skipped. Log loss
is the mean binary cross-entropy of the probabilities σ(logit): the calibration beside the order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD = -1  # id that pads a ranked list shorter than n_max


def topn_metrics(
    ranked: np.ndarray, truth: Sequence[np.ndarray], ns: Sequence[int] = (20, 50)
) -> dict[str, np.ndarray]:
    """Per-user Recall@N, HitRate@N and NDCG@N.

    ranked: (U, n_max) int item ids, best first, padded with -1 where a user has fewer.
    truth: U arrays of ground-truth item ids (a set: duplicates count once), none empty.
    Returns {"recall@20": (U,), "hit_rate@20": (U,), "ndcg@20": (U,), ...} as float64,
    in the order of `ns`.
    """
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked must be a 2-D integer array, got {ranked.ndim}-D {ranked.dtype}")
    U, n_max = ranked.shape
    if len(truth) != U:
        raise ValueError(f"truth has {len(truth)} users, ranked has {U}")
    ns = [int(n) for n in ns]
    if not ns or min(ns) < 1 or max(ns) > n_max:
        raise ValueError(f"each N must be in 1..{n_max} (the columns of ranked), got {ns}")
    if ranked.size and ranked.min() < PAD:
        raise ValueError(f"ranked holds a negative id {int(ranked.min())} other than the pad {PAD}")
    truth = [np.asarray(g).ravel() for g in truth]
    sizes = np.array([g.size for g in truth], dtype=np.int64)
    if (sizes == 0).any():
        u = int(np.flatnonzero(sizes == 0)[0])
        raise ValueError(f"user {u} has an empty ground truth; filter such users first")
    if U == 0:
        return {f"{m}@{n}": np.zeros(0) for n in ns for m in ("recall", "hit_rate", "ndcg")}
    g_ids = np.concatenate(truth)
    if not np.issubdtype(g_ids.dtype, np.integer) or (g_ids.size and g_ids.min() < 0):
        raise ValueError("ground-truth ids must be non-negative integers")
    _check_unique_rows(ranked)

    # One key per (user, item): items are first mapped to dense codes so u * span never overflows.
    g_users = np.repeat(np.arange(U, dtype=np.int64), sizes)
    valid = ranked != PAD
    codes, inverse = np.unique(np.concatenate([ranked[valid], g_ids]), return_inverse=True)
    span = np.int64(codes.size)
    n_valid = int(valid.sum())
    rows = np.nonzero(valid)[0].astype(np.int64)  # row-major, as ranked[valid]
    r_keys = rows * span + inverse[:n_valid]
    g_keys = np.unique(g_users * span + inverse[n_valid:])  # deduplicated (user, item) truth pairs
    g_size = np.bincount(g_keys // span, minlength=U)  # (U,) |G| with duplicates removed
    hits = np.zeros((U, n_max), dtype=bool)  # (U, n_max)
    hits[valid] = np.isin(r_keys, g_keys, assume_unique=True)

    discount = 1.0 / np.log2(np.arange(2, n_max + 2))  # (n_max,) 1/log2(rank+1), rank from 1
    ideal = np.cumsum(discount)  # (n_max,) IDCG of 1..n_max hits
    out: dict[str, np.ndarray] = {}
    for n in ns:
        h = hits[:, :n]  # (U, n)
        n_hit = h.sum(axis=1)
        out[f"recall@{n}"] = n_hit / g_size
        out[f"hit_rate@{n}"] = (n_hit > 0).astype(np.float64)
        out[f"ndcg@{n}"] = (h @ discount[:n]) / ideal[np.minimum(g_size, n) - 1]
    return out


def mean_metrics(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """The mean over users of each per-user metric."""
    out = {}
    for name, values in per_user.items():
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            raise ValueError(f"no users to average for {name!r}")
        out[name] = float(values.mean())
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2."""
    labels, scores = _check_labels_scores(labels, scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes, got {n_pos} positives and {n_neg} negatives")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = avg_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-group AUC weighted by the group's number of impressions; single-class groups skipped."""
    labels, scores = _check_labels_scores(labels, scores)
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"groups has shape {groups.shape}, labels {labels.shape}")
    _, g = np.unique(groups, return_inverse=True)  # dense group codes
    g = g.ravel()
    order = np.lexsort((scores, g))  # by group, then score ascending
    g, labels, scores = g[order], labels[order], scores[order]

    # Average rank of each row within its group: a tie run is a maximal stretch of one score
    # inside one group; every row of a run gets the mean of the run's ranks.
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_run = new_group | np.r_[True, scores[1:] != scores[:-1]]
    pos = np.arange(g.size)
    group_start = np.maximum.accumulate(np.where(new_group, pos, 0))
    run = np.cumsum(new_run) - 1
    run_start = pos[new_run]
    run_end = np.r_[run_start[1:], g.size] - 1
    rank = (run_start[run] + run_end[run]) / 2.0 - group_start + 1.0  # 1-based within the group

    size = np.bincount(g).astype(np.float64)  # impressions per group
    n_pos = np.bincount(g, weights=labels.astype(np.float64))
    n_neg = size - n_pos
    rank_sum = np.bincount(g, weights=rank * labels)
    both = (n_pos > 0) & (n_neg > 0)
    if not both.any():
        raise ValueError("GAUC needs at least one group with both classes")
    n_pos, n_neg, rank_sum = n_pos[both], n_neg[both], rank_sum[both]
    per_group = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return float(np.average(per_group, weights=size[both]))


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of click probabilities σ(logit), in nats; computed from the
    logits (log σ(x) = -log(1 + e^-x)), so confident logits never give log(0)."""
    labels, logits = _check_labels_scores(labels, logits)
    if labels.size == 0:
        raise ValueError("log loss needs at least one label")
    signed = np.where(labels, logits, -logits)  # the logit of the observed label
    return float(np.logaddexp(0.0, -signed).mean())  # -log σ(signed)


def _check_labels_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must be 1-D of one length, got {labels.shape} and {scores.shape}"
        )
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(labels)[:5].tolist()}")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    return labels.astype(bool), scores


def _check_unique_rows(ranked: np.ndarray) -> None:
    """A ranked list names each item once; a repeat would count a hit twice."""
    s = np.sort(ranked, axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] != PAD)
    if dup.any():
        u, j = np.argwhere(dup)[0]
        raise ValueError(f"ranked list of user {u} repeats item {int(s[u, j])}")
