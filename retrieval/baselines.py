"""Classical retrieval baselines, run on the same split and users as MIND.

- popularity: items ranked by how often they occur in the training data;
- item-based nearest neighbours: cosine similarity of items over the training users'
  interaction sets (training data only: the training period on the temporal split); a user's score for an item is the sum of its similarities to the
  user's last L history items.

Both exclude the user's history, like the serving path.
"""

from __future__ import annotations

import numpy as np
import torch

from retrieval.data import Dataset, Split, training_counts


def _train_matrix(ds: Dataset, split: Split) -> torch.Tensor:
    """(U_train, N+1) sparse binary user-item matrix of the training data (each train user's
    first history_len items: the whole sequence on the user split, the training period on
    the temporal split)."""
    users = split.train_users
    lengths = split.history_len[users]
    rows = np.repeat(np.arange(len(users)), lengths)
    cols = np.concatenate([ds.sequence(u)[:n] for u, n in zip(users, lengths)] + [np.zeros(0, np.int32)]).astype(np.int64)
    idx = torch.from_numpy(np.stack([rows, cols]))
    vals = torch.ones(len(rows), dtype=torch.float32)
    return torch.sparse_coo_tensor(idx, vals, (len(users), ds.n_items + 1), check_invariants=False).coalesce()


def _top_n_excluding(scores: torch.Tensor, ds: Dataset, users: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """Top-n item indices of (U, N+1) scores with padding and each user's history excluded."""
    scores = scores.clone()
    scores[:, 0] = float("-inf")
    for r, (u, e) in enumerate(zip(users, ends)):
        scores[r, torch.from_numpy(ds.items[ds.offsets[u] : ds.offsets[u] + e].astype(np.int64))] = float("-inf")
    top = torch.topk(scores, min(n, ds.n_items), dim=1)
    return np.where(torch.isfinite(top.values).numpy(), top.indices.numpy(), 0)


def popularity(ds: Dataset, split: Split, users: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """(U, n) most popular items among training users, history excluded."""
    counts = training_counts(ds, split).astype(np.float32)
    # ties broken by item index (stable): add a tiny decreasing ramp
    scores = torch.from_numpy(counts - np.arange(len(counts), dtype=np.float32) * 1e-7)
    return _top_n_excluding(scores.expand(len(users), -1), ds, users, ends, n)


def item_knn(
    ds: Dataset, split: Split, users: np.ndarray, ends: np.ndarray, n: int, max_len: int = 50, batch: int = 512
) -> np.ndarray:
    """(U, n) items by summed cosine similarity to the user's last `max_len` history items.

    sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|) over training users; computed as
    ((h / sqrt(d)) X^T X) / sqrt(d) without forming the N x N matrix.
    """
    X = _train_matrix(ds, split)  # (U_train, N+1)
    deg = torch.sparse.sum(X, dim=0).to_dense()  # (N+1,)
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    Xt = X.t().coalesce()
    out = []
    for i in range(0, len(users), batch):
        u, e = users[i : i + batch], ends[i : i + batch]
        h = torch.zeros(len(u), ds.n_items + 1)
        for r, (uu, ee) in enumerate(zip(u, e)):
            last = ds.items[ds.offsets[uu] + max(0, ee - max_len) : ds.offsets[uu] + ee].astype(np.int64)
            h[r, torch.from_numpy(last)] = 1.0
        a = h * inv  # (B, N+1)
        co = torch.sparse.mm(X, a.t()).t()  # (B, U_train): a X^T
        scores = torch.sparse.mm(Xt, co.t()).t() * inv  # (B, N+1): (a X^T X) / sqrt(d)
        out.append(_top_n_excluding(scores, ds, u, e, n))
    return np.concatenate(out)
