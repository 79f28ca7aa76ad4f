"""Why a multi-interest retriever wins or loses: interest collapse, routing concentration, what
each interest (or channel) contributes, and quality by history length.

- Interest collapse: the mean pairwise cosine between a user's active interest vectors
  (users with at least two); near 1 means the interests say the same thing and K > 1
  only costs searches.
- Routing concentration: the share of active capsules whose routing weights put more than
  0.9 of their mass on one behaviour (the failure REMI's routing regularisation targets).
- Per interest (or per channel): its share of the top-N slots and its share of the hits.
- Recall@N and NDCG@N by history length: fewer than 16, 16 to 63, 64 or more behaviours.

Plain numpy on what the serving path returns, so training's validation, `evaluate` and
`experiment` report the same figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.metrics import topn_metrics
from retrieval.mind import Interests

LENGTH_BUCKETS = ((1, 16, "<16"), (16, 64, "16-63"), (64, None, ">=64"))  # [low, high) behaviours
PEAKED = 0.9  # a capsule is concentrated when one behaviour holds more than this share of its weight


def interest_collapse(vectors: np.ndarray, active: np.ndarray) -> tuple[float, int]:
    """Mean over users with >= 2 active interests of the mean pairwise cosine between their
    active interest vectors (U, K, D); also how many users that is (nan, 0 when none)."""
    active = np.asarray(active, dtype=bool)
    norms = np.linalg.norm(vectors, axis=2, keepdims=True)  # (U, K, 1)
    unit = np.where(norms > 0, vectors / np.where(norms > 0, norms, 1.0), 0.0)
    cos = unit @ unit.transpose(0, 2, 1)  # (U, K, K)
    pair = active[:, :, None] & active[:, None, :]
    pair &= ~np.eye(active.shape[1], dtype=bool)[None]
    n_pairs = pair.sum((1, 2))  # (U,) ordered pairs
    many = n_pairs > 0
    if not many.any():
        return float("nan"), 0
    per_user = (cos * pair).sum((1, 2))[many] / n_pairs[many]
    return float(per_user.mean()), int(many.sum())


def routing_concentration(weights: np.ndarray, active: np.ndarray, threshold: float = PEAKED) -> float:
    """Share of active capsules (with any weight) whose normalised weights over behaviours
    (U, K, L) put more than `threshold` on one behaviour (nan when there is none)."""
    total = weights.sum(2)  # (U, K)
    ok = np.asarray(active, dtype=bool) & (total > 0)
    if not ok.any():
        return float("nan")
    peak = weights.max(2)[ok] / total[ok]
    return float((peak > threshold).mean())


def slot_hits(ranked: np.ndarray, truth: Sequence[np.ndarray]) -> np.ndarray:
    """(U, n) bool: the slot holds an item of that user's ground truth (ranked: ids, <= 0 = empty)."""
    U, n = ranked.shape
    rows = np.repeat(np.arange(U, dtype=np.int64), [len(t) for t in truth])
    t = np.concatenate([np.asarray(x, dtype=np.int64) for x in truth] + [np.zeros(0, np.int64)])
    span = np.int64(max(int(ranked.max(initial=0)), int(t.max(initial=0))) + 1)
    hits = np.isin(np.arange(U, dtype=np.int64)[:, None] * span + ranked, rows * span + t)
    return hits & (ranked > 0)


def shares(source: np.ndarray, hits: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per source (interest k or channel c, codes 0..len(names)-1 in `source` (U, n), -1 empty):
    its share of the filled slots and its share of the hits."""
    filled = source >= 0
    n_slots, n_hits = max(int(filled.sum()), 1), max(int(hits.sum()), 1)
    return {name: {"slots": float((source == c).sum() / n_slots), "hits": float(((source == c) & hits).sum() / n_hits)}
            for c, name in enumerate(names)}


def by_history_length(ranked: np.ndarray, truth: Sequence[np.ndarray], lengths: np.ndarray,
                      n: int = 50) -> dict[str, dict[str, float]]:
    """Recall@n and NDCG@n (and the number of users) per history-length bucket."""
    per_user = topn_metrics(np.where(ranked > 0, ranked, -1)[:, :n], truth, (n,))
    out = {}
    for low, high, name in LENGTH_BUCKETS:
        mask = (lengths >= low) & (lengths < high if high is not None else True)
        count = int(mask.sum())
        out[name] = {"users": count,
                     f"recall@{n}": float(per_user[f"recall@{n}"][mask].mean()) if count else float("nan"),
                     f"ndcg@{n}": float(per_user[f"ndcg@{n}"][mask].mean()) if count else float("nan")}
    return out


def interest_diagnostics(it: Interests, interest: np.ndarray, hits: np.ndarray) -> dict[str, Any]:
    """Collapse, routing concentration and per-interest slot / hit shares of one retriever's
    interests (it: the users' Interests; interest (U, n) which interest filled each slot)."""
    vectors, active, weights = it.vectors.numpy(), it.active.numpy(), it.weights.numpy()
    collapse, users = interest_collapse(vectors, active)
    K = vectors.shape[1]
    return {
        "interest_collapse": collapse,
        "users_with_several_interests": users,
        "mean_active_interests": float(active.sum(1).mean()),
        "routing_concentration": routing_concentration(weights, active),
        "per_interest": shares(interest, hits, [str(k) for k in range(K)]),
    }
