"""Exact inner-product search in torch: chunked matrix products and top-k, on a GPU when there is one.

On a GPU one matrix product over every item beats any CPU index: 1M x 64 item vectors
answer a batch of users at thousands of users a second, exactly. `TorchFlatIndex` holds
the item vectors on a device and answers like a flat FAISS inner-product index:
`search(xq, k)` gives faiss's (D, I), so everything written against a faiss index
(`search_top_n`, tuning) works with it; `search_top_n` is its serving call, with the
same arguments and results as `index.faiss_index.search_top_n` but a history exclusion
applied on the device before the top-k (excluded items score -inf), so one search n deep
is always enough and no user is searched again. The merge of the K lists is faiss_index's
own (`merge_interests`), so the best and share merges are the same code everywhere.

Results equal a flat FAISS index's up to ties (which of several equal scores make the
cut) and float rounding of the inner products. faiss-gpu is not used: its flat search
caps k at 2048, and the exclusion here needs no over-fetch at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import faiss
import numpy as np
import torch
from torch import Tensor

from index.faiss_index import merge_interests

SCORE_BUDGET = 1 << 28  # most (query, item) scores held at once: 1 GiB of float32 (67 users x K=4 over 1M items)


class TorchFlatIndex:
    """Item vectors (N, d) on a device; faiss id = row position, as in build_index."""

    metric_type = faiss.METRIC_INNER_PRODUCT

    def __init__(self, vectors: Tensor | np.ndarray, device: torch.device | str | None = None,
                 budget: int = SCORE_BUDGET):
        xb = torch.as_tensor(vectors)
        if xb.dim() != 2 or not xb.is_floating_point():
            raise ValueError(f"vectors must be a 2-D float array (N, d), got {xb.dim()}-D {xb.dtype}")
        if xb.shape[0] == 0:
            raise ValueError("cannot search 0 item vectors")
        if not bool(torch.isfinite(xb).all()):
            raise ValueError("vectors hold NaN or infinite values")
        self.xb = xb.detach().to(device if device is not None else xb.device, torch.float32).contiguous()  # (N, d)
        self.ntotal, self.d = self.xb.shape
        self.budget = budget

    @property
    def device(self) -> torch.device:
        return self.xb.device

    def _rows_per_chunk(self) -> int:
        return max(1, self.budget // self.ntotal)

    def _top_k(self, xq: Tensor, k: int, exclude: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Top-k of queries xq (q, d) on the device, best first: scores (q, k), ids (q, k) with -1
        where fewer than k items are allowed. exclude: (rows, ids) pairs scored -inf."""
        scores = xq @ self.xb.T  # (q, N)
        if exclude is not None and exclude[0].numel():
            scores.index_put_(exclude, torch.tensor(float("-inf"), device=scores.device))
        D, I = torch.topk(scores, k, dim=1)  # (q, k)
        return D, I.masked_fill(D == float("-inf"), -1)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's Index.search: D (nq, k) float32 inner products and I (nq, k) int64 ids, best first
        (-inf / -1 past the item count)."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        nq = xq.shape[0]
        kk = min(int(k), self.ntotal)
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        step = self._rows_per_chunk()
        for i in range(0, nq, step):
            d, ids = self._top_k(torch.from_numpy(xq[i : i + step]).to(self.device), kk)
            D[i : i + step, :kk], I[i : i + step, :kk] = d.cpu().numpy(), ids.cpu().numpy()
        return D, I

    def search_top_n(
        self,
        queries: np.ndarray,
        mask: np.ndarray,
        n: int,
        exclude: Sequence[np.ndarray] | None = None,
        strategy: Literal["best", "share"] = "best",
        weights: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """index.faiss_index.search_top_n's contract: queries (U, K, d), mask (U, K) bool; ids (U, n)
        int64 (-1 padded), scores (U, n) float32 (-inf padded), interest (U, n) int64 (-1 padded).

        Each active interest's top-n among the items not in exclude[u] is found on the device
        (excluded items scored -inf before the top-k), then the K lists are merged by
        merge_interests. n allowed results per interest are all that either merge can use:
        the best merge keeps n items, and the share merge's interest j skips at most the
        n - share_j items the other interests took before reaching its share."""
        queries = np.asarray(queries)
        if queries.ndim != 3 or queries.shape[2] != self.d:
            raise ValueError(f"queries must be (U, K, {self.d}), got shape {queries.shape}")
        U, K, _ = queries.shape
        mask = np.asarray(mask)
        if mask.shape != (U, K) or mask.dtype != bool:
            raise ValueError(f"mask must be a ({U}, {K}) bool array, got {mask.dtype} {mask.shape}")
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if exclude is not None and len(exclude) != U:
            raise ValueError(f"exclude has {len(exclude)} users, the queries have {U}")
        k = min(n, self.ntotal)
        D = np.full((U, K, k), -np.inf, dtype=np.float32)
        I = np.full((U, K, k), -1, dtype=np.int64)
        users_per_chunk = max(1, self._rows_per_chunk() // K)
        for u0 in range(0, U, users_per_chunk):
            u1 = min(U, u0 + users_per_chunk)
            rows = np.flatnonzero(mask[u0:u1].reshape(-1))  # active (user, interest) rows of the chunk
            if rows.size == 0:
                continue
            xq = queries[u0:u1].reshape(-1, self.d)[rows]  # (q, d)
            if not np.isfinite(xq).all():
                raise ValueError("active interest vectors hold NaN or infinite values")
            excl = None if exclude is None else self._exclusion(rows // K, exclude[u0:u1])
            d, ids = self._top_k(torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)).to(self.device), k, excl)
            D[u0:u1].reshape(-1, k)[rows], I[u0:u1].reshape(-1, k)[rows] = d.cpu().numpy(), ids.cpu().numpy()
        return merge_interests(D, I, n, strategy=strategy, weights=weights)

    def _exclusion(self, row_user: np.ndarray, exclude: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        """(row, id) pairs to score -inf: every excluded id of each query row's user (ids outside 0..N-1,
        which no result can hold, dropped). row_user (q,): the chunk-relative user of each row."""
        lists = [np.unique(np.asarray(e, dtype=np.int64)) for e in exclude]
        lists = [e[(e >= 0) & (e < self.ntotal)] for e in lists]
        lengths = np.array([len(e) for e in lists], dtype=np.int64)[row_user]  # (q,)
        rows = np.repeat(np.arange(len(row_user), dtype=np.int64), lengths)
        ids = np.concatenate([lists[u] for u in row_user] + [np.zeros(0, np.int64)])
        return torch.from_numpy(rows).to(self.device), torch.from_numpy(ids).to(self.device)


def on_device(index: faiss.Index, device: torch.device) -> faiss.Index | TorchFlatIndex:
    """A flat inner-product FAISS index as a TorchFlatIndex on `device` when it is a GPU (exact
    search there); any other index, or any index on the CPU, as it is."""
    if device.type == "cpu" or isinstance(index, TorchFlatIndex):
        return index
    flat = faiss.downcast_index(index)
    if not isinstance(flat, faiss.IndexFlat) or flat.metric_type != faiss.METRIC_INNER_PRODUCT:
        return index
    return TorchFlatIndex(flat.reconstruct_n(0, flat.ntotal), device)
