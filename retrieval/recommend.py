"""The serving path: histories -> K interest vectors -> one FAISS search -> merge -> top N.

Used alike by `query`, by validation during training and by `evaluate`, so the figures
measure exactly what a user is served. FAISS ids are row positions: item index i
(1..N) is FAISS id i - 1.

The history is excluded by searching n + min(n, longest history) deep and searching again
only for the rare user whose lists the exclusion emptied (index.faiss_index.search_top_n),
so a long history costs neither every search nor every merge.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch

from index.faiss_index import pad_queries, search_top_n
from index.torch_search import TorchFlatIndex
from retrieval.data import Dataset
from retrieval.device import model_device, to_device
from retrieval.mind import Interests
from retrieval.retrievers import Retriever
from retrieval.samples import Histories, history_batch

Merge = Literal["best", "share"]


@dataclass
class Recommendations:
    items: np.ndarray  # (U, n) item indices 1..N, 0 where fewer than n
    scores: np.ndarray  # (U, n) float32 inner products, -inf where fewer
    interest: np.ndarray  # (U, n) which interest retrieved the item, -1 where fewer (or another channel's)
    channel: np.ndarray | None = None  # (U, n) the channel that put the item there (retrieval.channels.CHANNELS
    # codes), -1 where fewer; None from MIND alone


@torch.inference_mode()
def interest_vectors(model: Retriever, ds: Dataset, hist: Histories, batch_size: int = 2048) -> Interests:
    """The interests of each history's last L behaviours: vectors (U, K, D), active (U, K),
    mass (U, K) and behaviour weights (U, K, L), as CPU tensors (`.numpy()` shares memory)."""
    if model.training:  # eval() walks every module: too slow to repeat for each request
        model.eval()
    L, device = model.config.max_len, model_device(model)
    parts = [model.user_vectors(to_device(history_batch(ds, h, L), device)) for h in hist.batches(batch_size)]
    fields = ("vectors", "active", "mass", "weights")
    if device.type != "cpu":
        parts = [Interests(*(getattr(p, f).cpu() for f in fields)) for p in parts]
    if len(parts) == 1:
        return parts[0]
    return Interests(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))


def history_rows(hist: Histories) -> list[np.ndarray]:
    """FAISS ids (item index - 1) of every item of each history: what the search excludes."""
    return [row.astype(np.int64) - 1 for row in hist.rows()]


def recommend(
    model: Retriever,
    ds: Dataset,
    index: faiss.Index | TorchFlatIndex,
    hist: Histories,
    n: int,
    merge: Merge = "best",
    batch_size: int = 1024,
) -> Recommendations:
    """Top-n items per history; every item of the history is excluded. A TorchFlatIndex (exact
    search on a GPU) applies the exclusion on its device; a FAISS index over-fetches."""
    out_i, out_s, out_k = [], [], []
    search = index.search_top_n if isinstance(index, TorchFlatIndex) else functools.partial(search_top_n, index)
    for h in hist.batches(batch_size):
        it = interest_vectors(model, ds, h)
        ids, scores, which = search(  # an index with a prior coordinate (channels) is searched without it
            pad_queries(it.vectors.numpy(), index.d), it.active.numpy(), n, exclude=history_rows(h), strategy=merge,
            weights=it.mass.numpy() if merge == "share" else None,
        )  # (B, n) each
        out_i.append(np.where(ids >= 0, ids + 1, 0))
        out_s.append(scores)
        out_k.append(which)
    if len(out_i) == 1:
        return Recommendations(out_i[0], out_s[0], out_k[0])
    return Recommendations(np.concatenate(out_i), np.concatenate(out_s), np.concatenate(out_k))
