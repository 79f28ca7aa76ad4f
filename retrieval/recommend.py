"""The serving path: history -> K interest vectors -> one FAISS search -> merge -> top N.

Used alike by `query`, by validation during training and by `evaluate`, so the figures
measure exactly what a user is served. FAISS ids are row positions: item index i
(1..N) is FAISS id i - 1.

The history is excluded by searching n + min(n, longest history) deep and searching again
only for the rare user whose lists the exclusion emptied (index.faiss_index.search_top_n),
so a long history costs neither every search nor every merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch

from index.faiss_index import search_top_n
from retrieval.data import Dataset
from retrieval.mind import MIND
from retrieval.samples import make_batch

Merge = Literal["best", "share"]


@dataclass
class Recommendations:
    items: np.ndarray  # (U, n) item indices 1..N, 0 where fewer than n
    scores: np.ndarray  # (U, n) float32 inner products, -inf where fewer
    interest: np.ndarray  # (U, n) which interest retrieved the item, -1 where fewer


@torch.inference_mode()
def interest_vectors(
    model: MIND, ds: Dataset, users: np.ndarray, ends: np.ndarray, batch_size: int = 2048
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interest vectors (U, K, D) float32, active mask (U, K) and routing mass (U, K) per user,
    from the history before position ends[u] (its last L behaviours)."""
    if model.training:  # eval() walks every module: too slow to repeat for each request
        model.eval()
    L = model.config.max_len
    parts = []
    for i in range(0, len(users), batch_size):
        b = make_batch(ds, users[i : i + batch_size], ends[i : i + batch_size], L)
        v, a, m = model.user_vectors(b)  # (B, K, D), (B, K), (B, K)
        parts.append((v.numpy(), a.numpy(), m.numpy()))
    if len(parts) == 1:
        return parts[0]
    vecs, actives, masses = zip(*parts)
    return np.concatenate(vecs), np.concatenate(actives), np.concatenate(masses)


def history_rows(ds: Dataset, users: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
    """FAISS ids (item index - 1) of every item each user has seen before position ends[u]."""
    starts = ds.offsets[users]
    return [ds.items[s : s + e].astype(np.int64) - 1 for s, e in zip(starts.tolist(), np.asarray(ends).tolist())]


def recommend(
    model: MIND,
    ds: Dataset,
    index: faiss.Index,
    users: np.ndarray,
    ends: np.ndarray,
    n: int,
    merge: Merge = "best",
    batch_size: int = 1024,
) -> Recommendations:
    """Top-n items per user; the user's history (everything before ends[u]) is excluded."""
    out_i, out_s, out_k = [], [], []
    for i in range(0, len(users), batch_size):
        u, e = users[i : i + batch_size], ends[i : i + batch_size]
        V, A, W = interest_vectors(model, ds, u, e)  # (B, K, D), (B, K), (B, K)
        exclude = history_rows(ds, u, e)
        ids, scores, which = search_top_n(
            index, V, A, n, exclude=exclude, strategy=merge, weights=W if merge == "share" else None
        )  # (B, n) each
        out_i.append(np.where(ids >= 0, ids + 1, 0))
        out_s.append(scores)
        out_k.append(which)
    if len(out_i) == 1:
        return Recommendations(out_i[0], out_s[0], out_k[0])
    return Recommendations(np.concatenate(out_i), np.concatenate(out_s), np.concatenate(out_k))
