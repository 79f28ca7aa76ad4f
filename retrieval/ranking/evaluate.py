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
from retrieval.ranking.data import protocol_pairs
from retrieval.ranking.models import Ranker
from retrieval.ranking.scoring import pair_metrics, rerank
from retrieval.recommend import recommend
from retrieval.samples import Histories


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
    t0 = time.perf_counter()
    standalone = pair_metrics(ranker, ds, protocol_pairs(ds, split, part))
    users, ends, truth = held_out_users(ds, split, part)
    hist = Histories.of(ds, users, ends)
    cands = recommend(retriever, ds, index, hist, m).items  # (U, M)
    t1 = time.perf_counter()
    order, _ = rerank(ranker, ds, hist, cands)
    reranked = np.take_along_axis(cands, order, 1)
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
