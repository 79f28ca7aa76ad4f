"""Ranker evaluation under the protocol: standalone AUC / GAUC, and two-stage retrieve-then-rank
Recall / HitRate / NDCG beside the retrieval order on the same users."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from retrieval.data import Dataset, Split
from retrieval.errors import RetrievalError
from retrieval.evaluate import held_out_users
from retrieval.metrics import mean_metrics, topn_metrics
from retrieval.retrievers import Retriever
from retrieval.ranking.data import PairSet, TouchedItems, protocol_pairs
from retrieval.ranking.models import Ranker
from retrieval.ranking.train import pair_metrics, score_pairs
from retrieval.recommend import recommend
from retrieval.samples import Histories


def rerank(
    ranker: Ranker, ds: Dataset, touched: TouchedItems, users: np.ndarray, ends: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each user's (M,) candidates (0 = none) by the ranker: items (U, M) and logits (U, M)."""
    U, M = candidates.shape
    valid = candidates > 0
    rows = np.nonzero(valid.reshape(-1))[0]
    pairs = PairSet(np.repeat(users, M)[rows], np.repeat(ends, M)[rows], candidates.reshape(-1)[rows],
                    np.zeros(len(rows), np.float32))
    logits = np.full(U * M, -np.inf, dtype=np.float32)
    logits[rows] = score_pairs(ranker, ds, touched, pairs)
    logits = logits.reshape(U, M)
    order = np.argsort(-logits, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, 1), np.take_along_axis(logits, order, 1)


def evaluate_ranker(
    ranker: Ranker,
    ds: Dataset,
    split: Split,
    retriever: Retriever,
    index: faiss.Index,
    part: str = "test",
    m: int = 200,
    ns: Sequence[int] = (20, 50),
) -> dict[str, Any]:
    """Standalone AUC / GAUC on the protocol's pairs, and two-stage metrics beside retrieval's."""
    if m < max(ns):
        raise RetrievalError(f"M={m} candidates cannot fill a top-{max(ns)} list; use at least {max(ns)}")
    touched = TouchedItems(ds)
    t0 = time.perf_counter()
    standalone = pair_metrics(ranker, ds, touched, protocol_pairs(ds, split, part))
    users, ends, truth = held_out_users(ds, split, part)
    cands = recommend(retriever, ds, index, Histories.of(ds, users, ends), m).items  # (U, M)
    t1 = time.perf_counter()
    reranked, _ = rerank(ranker, ds, touched, users, ends, cands)
    score_s = time.perf_counter() - t1
    as_ranked = lambda x: np.where(x > 0, x, -1)  # noqa: E731
    return {
        "part": part,
        "users": len(users),
        "M": m,
        "N": list(ns),
        "standalone": standalone,
        "retrieval_only": mean_metrics(topn_metrics(as_ranked(cands), truth, ns)),
        "two_stage": mean_metrics(topn_metrics(as_ranked(reranked), truth, ns)),
        "candidates_per_s": float((cands > 0).sum() / max(score_s, 1e-9)),
        "seconds": round(time.perf_counter() - t0, 2),
    }
