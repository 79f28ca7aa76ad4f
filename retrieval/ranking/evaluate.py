"""Ranker evaluation under the protocol: standalone AUC / GAUC / log loss, two-stage
retrieve-then-rank Recall / HitRate / NDCG beside the retrieval order on the same users, and
the in-process latency of scoring one user's M candidates."""

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
from retrieval.ranking.scoring import fuse, pair_metrics, rerank, score_candidates
from retrieval.ranking.sessions import sessions_in_history
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
    latency_users: int = 0,
) -> dict[str, Any]:
    """Standalone AUC / GAUC / log loss on the protocol's pairs (also AUC / GAUC apart for the users
    whose history the ranker reads holds one session and those whose holds several, 30-minute
    rule: where DSIN's session structure can help), and two-stage metrics beside
    retrieval's: `two_stage` orders as served (fused with the retrieval score when the ranker has
    a retrieval weight), `two_stage_ranker_only` by the ranker's logits alone. With
    `latency_users` > 0, also the p50 / p99 latency of scoring one user's M candidates."""
    if m < max(ns):
        raise RetrievalError(f"M={m} candidates cannot fill a top-{max(ns)} list; use at least {max(ns)}")
    t0 = time.perf_counter()
    pairs = protocol_pairs(ds, split, part)
    several = sessions_in_history(ds, pairs.users, pairs.ends, ranker.config.max_len) > 1  # (R,)
    standalone = pair_metrics(ranker, ds, pairs, {"one_session": ~several, "several_sessions": several})
    users, ends, truth = held_out_users(ds, split, part)
    hist = Histories.of(ds, users, ends)
    rec = recommend(retriever, ds, index, hist, m)
    cands = rec.items  # (U, M)
    t1 = time.perf_counter()
    logits = score_candidates(ranker, ds, hist, cands)  # (U, M) the ranker alone
    score_s = time.perf_counter() - t1
    as_ranked = lambda x: np.where(x > 0, x, -1)  # noqa: E731

    def reordered(scores: np.ndarray) -> dict[str, float]:
        order = np.argsort(-scores, axis=1, kind="stable")
        return mean_metrics(topn_metrics(as_ranked(np.take_along_axis(cands, order, 1)), truth, ns))

    weight = float(getattr(ranker.config, "retrieval_weight", 0.0))
    out = {
        "part": part,
        "users": len(users),
        "M": m,
        "N": list(ns),
        "standalone": standalone,
        "retrieval_only": mean_metrics(topn_metrics(as_ranked(cands), truth, ns)),
        "two_stage": reordered(fuse(logits, rec.scores, weight)),
        "two_stage_ranker_only": reordered(logits),
        "retrieval_weight": weight,
        "candidates_per_s": float((cands > 0).sum() / max(score_s, 1e-9)),
    }
    if latency_users:
        out["latency"] = scoring_latency(ranker, ds, hist, cands, rec.scores, latency_users)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def scoring_latency(ranker: Ranker, ds: Dataset, hist: Histories, candidates: np.ndarray,
                    retrieval_scores: np.ndarray | None = None, requests: int = 200,
                    warmup: int = 20) -> dict[str, float]:
    """Milliseconds to rerank one user's candidates in process (`rerank`: batch building, the
    ranker's forward pass, fusion and the sort), one request at a time, cycling through the
    rows of `hist` / `candidates` (U, M): p50, p99 and mean of the wall time over `requests`
    timed calls after `warmup` untimed ones, and p50 / p99 of the thread's CPU time (on a shared
    machine the wall time also counts the time other processes held the core; the CPU time
    does not). Measure with one torch thread: the CPU time is then the request's whole work."""
    if len(hist) == 0:
        raise RetrievalError("no users to time the scoring of")
    rows = [(hist.take(np.array([r])), candidates[r : r + 1],
             None if retrieval_scores is None else retrieval_scores[r : r + 1]) for r in range(len(hist))]
    wall, cpu = [], []
    for i in range(warmup + requests):
        h, c, s = rows[i % len(rows)]
        t0, c0 = time.perf_counter(), time.thread_time()
        rerank(ranker, ds, h, c, s)
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    ms, cpu_ms = np.array(wall) * 1e3, np.array(cpu) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "cpu_p50_ms": float(np.percentile(cpu_ms, 50)),
            "cpu_p99_ms": float(np.percentile(cpu_ms, 99)), "requests": requests, "M": int(candidates.shape[1])}
