"""Item-based nearest neighbours as a precomputed sparse table: the k most similar items of each item.

Why a table: the item-kNN baseline (retrieval/baselines.py) scores all N items for every
user through the training matrix, fine offline on 10^4 items but not per request on 10^6.
Serving needs, per item, its top-k neighbours by cosine similarity over the training
data's user sets, sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|); a user's score for item j
is then the sum of sim(h, j) over their last L history items h, gathered from L rows of the
table (L x k entries), never from an N x N matrix.

The table is built from co-occurrence counts X^T X (X the binary user x item matrix of the
training data: each train user's first history_len items), a block of item rows at a time
as a sparse product, keeping each row's top k; memory follows the block, not N^2.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from retrieval.data import Dataset, Split
from retrieval.errors import RetrievalError

log = logging.getLogger(__name__)


@dataclass
class ItemNeighbours:
    """The top-k neighbours of every item; row 0 (padding) and rows of unseen items are empty."""

    ids: np.ndarray  # (N+1, k) int32 neighbour item indices, 0 where fewer than k
    sims: np.ndarray  # (N+1, k) float32 cosine similarities, best first, 0 where no neighbour

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])


def training_matrix(ds: Dataset, split: Split) -> torch.Tensor:
    """(U_train, N+1) sparse binary (COO, coalesced) user-item matrix of the split's training
    data: each train user's first history_len items (a repeated item counts once)."""
    users = split.train_users
    lengths = split.history_len[users]
    rows = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
    starts = np.repeat(ds.offsets[users], lengths)
    pos = np.arange(len(rows), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    cols = ds.items[starts + pos].astype(np.int64)
    x = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.ones(len(rows)),
                                (len(users), ds.n_items + 1), check_invariants=False).coalesce()
    return torch.sparse_coo_tensor(x.indices(), torch.ones_like(x.values()), x.shape, check_invariants=False).coalesce()


def build_neighbours(ds: Dataset, split: Split, k: int = 100, block: int = 1 << 24) -> ItemNeighbours:
    """The top-k cosine neighbours of each item over the split's training data (self excluded).

    Item rows are taken in blocks whose co-occurrence entries number at most about `block`
    (bounded by each item's reach: the summed lengths of its users), so a popular item's
    dense row never meets thousands of others in memory. Ties are broken by the lower item
    index, so the table is deterministic."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" and invariant-check notices
        warnings.simplefilter("ignore", UserWarning)
        return _build_neighbours(ds, split, k, block)


def _build_neighbours(ds: Dataset, split: Split, k: int, block: int) -> ItemNeighbours:
    t0 = time.perf_counter()
    n1 = ds.n_items + 1
    x = training_matrix(ds, split)  # (U, N+1)
    deg = torch.sparse.sum(x, 0).to_dense().numpy() if x._nnz() else np.zeros(n1)  # (N+1,) users per item
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1)), 0.0)
    x_csr = x.to_sparse_csr()
    xt = x.t().coalesce().to_sparse_csr()  # (N+1, U)
    crow, col = xt.crow_indices(), xt.col_indices()
    ids = np.zeros((n1, k), dtype=np.int32)
    sims = np.zeros((n1, k), dtype=np.float32)
    user_len = torch.sparse.sum(x, 1).to_dense()  # (U,) distinct items per user
    reach = torch.mv(xt.to_sparse_coo(), user_len).numpy()  # (N+1,) bound on each row's entries
    reach[0] = 0
    cum = np.cumsum(np.minimum(reach, n1))
    bounds = [1]
    while bounds[-1] < n1:  # each block holds about `block` entries, at least one row
        s = bounds[-1]
        bounds.append(max(s + 1, int(np.searchsorted(cum, cum[s - 1] + block, side="right"))))
    bounds[-1] = min(bounds[-1], n1)
    for s, e in zip(bounds[:-1], bounds[1:]):  # row 0 is padding
        a, b = int(crow[s]), int(crow[e])
        if a == b:
            continue
        rows = torch.sparse_csr_tensor(crow[s : e + 1] - a, col[a:b], torch.ones(b - a), (e - s, x.shape[0]))
        co = torch.sparse.mm(rows, x_csr)  # (block, N+1) co-occurrence counts, sparse
        r = np.repeat(np.arange(e - s), np.diff(co.crow_indices().numpy()))  # (nnz,) row within block
        j = co.col_indices().numpy()
        sim = co.values().numpy() * inv[s + r] * inv[j]
        keep = j != s + r  # not the item itself
        r, j, sim = r[keep], j[keep], sim[keep]
        order = np.lexsort((j, -sim, r))  # by row, then similarity descending, then item index
        r, j, sim = r[order], j[order], sim[order]
        first = np.searchsorted(r, np.arange(e - s))  # (block,) each row's first entry
        rank = np.arange(len(r)) - first[r]
        top = rank < k
        ids[s + r[top], rank[top]] = j[top]
        sims[s + r[top], rank[top]] = sim[top]
    log.info("item neighbours: top %d of %d items in %.1fs", k, ds.n_items, time.perf_counter() - t0)
    return ItemNeighbours(ids, sims)


@dataclass
class NeighbourScores:
    """Each history's item-kNN scores, sparse: the items with a positive score, row by row."""

    rows: np.ndarray  # (E,) int64 row (history) of each entry, ascending
    items: np.ndarray  # (E,) int64 item index 1..N
    scores: np.ndarray  # (E,) float32 summed similarity to the history's last L items (> 0)
    n_rows: int  # U

    def sums(self) -> tuple[np.ndarray, np.ndarray]:
        """(U,) sum and (U,) sum of squares of each row's scores (zeros elsewhere add nothing)."""
        s = np.bincount(self.rows, weights=self.scores, minlength=self.n_rows)
        ss = np.bincount(self.rows, weights=self.scores.astype(np.float64) ** 2, minlength=self.n_rows)
        return s, ss


def neighbour_scores(nb: ItemNeighbours, last: list[np.ndarray], exclude: list[np.ndarray],
                     decay: float = 1.0) -> NeighbourScores:
    """Sum over each row's items `last[r]` (its last L behaviours, oldest first) of their
    neighbour rows, the j-th most recent behaviour's row weighted decay^j (1 = a plain sum);
    items in exclude[r] (its whole history) are dropped."""
    if not 0 < decay <= 1:
        raise RetrievalError(f"decay must be in (0, 1], got {decay}")
    U, k = len(last), nb.k
    lens = np.array([len(h) for h in last], dtype=np.int64)
    h = np.concatenate([np.asarray(x, dtype=np.int64) for x in last] + [np.zeros(0, np.int64)])  # (H,)
    row = np.repeat(np.repeat(np.arange(U, dtype=np.int64), lens), k)  # (H*k,)
    item = nb.ids[h].reshape(-1).astype(np.int64)  # (H*k,)
    sim = nb.sims[h]  # (H, k)
    if decay != 1.0:
        age = np.repeat(np.cumsum(lens), lens) - 1 - np.arange(len(h), dtype=np.int64)  # (H,) 0 = the most recent
        sim = sim * np.power(np.float32(decay), age, dtype=np.float32)[:, None]
    sim = sim.reshape(-1)
    ex_len = np.array([len(x) for x in exclude], dtype=np.int64)
    ex_row = np.repeat(np.arange(U, dtype=np.int64), ex_len)
    ex_item = np.concatenate([np.asarray(x, dtype=np.int64) for x in exclude] + [np.zeros(0, np.int64)])
    span = np.int64(nb.ids.shape[0])
    keep = item > 0
    keys = row[keep] * span + item[keep]
    uniq, inv = np.unique(keys, return_inverse=True)  # sorted: by row, then item
    total = np.bincount(inv, weights=sim[keep], minlength=len(uniq)).astype(np.float32)
    drop = np.isin(uniq, ex_row * span + ex_item)
    uniq, total = uniq[~drop], total[~drop]
    return NeighbourScores(uniq // span, uniq % span, total, U)
