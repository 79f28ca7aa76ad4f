"""Scoring with a ranker: the one place that training's validation, evaluation and serving score through.

`score_pairs` scores flat (user, history end, candidate) rows of the dataset (the protocol's
pairs, validation); `score_candidates` and `rerank` score each history's M retrieval
candidates, for held-out users and request-time behaviours alike (`Histories`).
`rerank` returns the permutation, so whatever travels with a candidate (its retrieval
score, the interest that found it) follows it to its new place.
"""

from __future__ import annotations

import numpy as np
import torch

from retrieval.data import Dataset
from retrieval.device import model_device, to_device
from retrieval.metrics import auc, gauc
from retrieval.ranking.data import PairSet, make_rank_batch
from retrieval.ranking.models import Ranker, needs
from retrieval.samples import Histories, Sequences


@torch.no_grad()
def score_pairs(
    model: Ranker, ds: Dataset, pairs: PairSet, batch_size: int = 4096, seqs: Sequences | None = None
) -> np.ndarray:
    """Logits (R,) of every (row, history end, candidate) pair; rows index `seqs` (default the dataset)."""
    model.eval()
    spec = needs(model)
    device = model_device(model)
    out = []
    for i in range(0, len(pairs), batch_size):
        p = pairs.take(np.arange(i, min(i + batch_size, len(pairs))))
        b = make_rank_batch(ds, None, p.users, p.ends, p.candidates, None, spec.max_len, sessions=spec.sessions,
                            seqs=seqs)
        out.append(model.score(to_device(b, device)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def pair_metrics(model: Ranker, ds: Dataset, pairs: PairSet) -> dict[str, float]:
    """AUC and GAUC of the model's scores on labelled pairs."""
    s = score_pairs(model, ds, pairs)
    return {"auc": auc(pairs.labels, s), "gauc": gauc(pairs.users, pairs.labels, s)}


PAIRS_PER_CALL = 1 << 15  # (candidate, behaviour) pairs per call of a model's score_candidates: its buffers stay
# a few MB (measured on DIN at M=200, L=50: half the time per request of 1 << 17)


def score_candidates(model: Ranker, ds: Dataset, hist: Histories, candidates: np.ndarray) -> np.ndarray:
    """Logits (U, M) of each history's candidates (U, M) item indices; -inf where a candidate is 0 (none).

    A model with its own `score_candidates(batch, candidates)` (DIN) scores each history's M
    candidates together, sharing the history's work; the others score flat pairs."""
    U, M = candidates.shape
    if hasattr(model, "score_candidates"):
        return _score_per_history(model, ds, hist, candidates)
    valid = candidates.reshape(-1) > 0
    rows = np.repeat(np.arange(U, dtype=np.int64), M)[valid]
    pairs = PairSet(rows, hist.lengths()[rows], candidates.reshape(-1)[valid].astype(np.int64),
                    np.zeros(len(rows), np.float32))
    logits = np.full(U * M, -np.inf, dtype=np.float32)
    logits[valid] = score_pairs(model, ds, pairs, seqs=hist)
    return logits.reshape(U, M)


def rerank(model: Ranker, ds: Dataset, hist: Histories, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each history's candidates (U, M) ordered by the ranker: the permutation (U, M), so that
    `np.take_along_axis(x, order, 1)` reorders candidates and anything aligned with them, and the
    logits (U, M) in the new order; missing candidates (0) stay last, ties keep retrieval order."""
    logits = score_candidates(model, ds, hist, candidates)
    order = np.argsort(-logits, axis=1, kind="stable")
    return order, np.take_along_axis(logits, order, 1)


@torch.no_grad()
def _score_per_history(model: Ranker, ds: Dataset, hist: Histories, candidates: np.ndarray) -> np.ndarray:
    """score_candidates through the model's per-history scorer, in chunks of histories."""
    model.eval()
    spec = needs(model)
    U, M = candidates.shape
    logits = np.full((U, M), -np.inf, dtype=np.float32)
    step = max(1, PAIRS_PER_CALL // max(1, M * spec.max_len))
    lengths = hist.lengths()
    for i in range(0, U, step):
        rows = np.arange(i, min(i + step, U))
        b = make_rank_batch(ds, None, rows, lengths[rows], np.zeros(len(rows), np.int64), None, spec.max_len,
                            seqs=hist)
        cand = candidates[rows].astype(np.int64)  # (R, M), 0 = none: scored as padding, then -inf
        out = model.score_candidates(b, torch.from_numpy(cand)).numpy()  # type: ignore[union-attr]
        logits[rows] = np.where(cand > 0, out, -np.inf)
    return logits
