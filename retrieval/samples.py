"""Training windows, gathered per batch from the stored sequences.

A sample is only (user, position t): history = the previous <= L behaviours, target =
the behaviour at t. Histories are gathered per batch from the CSR sequences, so memory
follows the number of interactions, never interactions x L.
"""

from __future__ import annotations

import numpy as np
import torch

from retrieval.data import Dataset
from retrieval.mind import Batch


def training_positions(ds: Dataset, users: np.ndarray, history_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (user, t) with 1 <= t < history_len[user] for the given users: (S,) users, (S,) positions."""
    n = history_len[users]
    counts = np.maximum(n - 1, 0)
    user = np.repeat(users.astype(np.int64), counts)
    # position t runs 1..n-1 within each user: a ramp restarted at each user's block
    starts = np.cumsum(counts) - counts
    pos = np.arange(counts.sum(), dtype=np.int64)  # (S,) in place below: two (S,) arrays at most
    pos -= np.repeat(starts, counts)
    pos += 1
    return user, pos


def gather_histories(ds: Dataset, user: np.ndarray, end: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Histories of the behaviours before position `end` of each user's sequence.

    Returns (B, L) item indices left-aligned (oldest first, most recent last, then 0 padding)
    and the (B, L) bool mask of real behaviours.
    """
    first = np.maximum(end - max_len, 0)  # (B,)
    length = end - first  # (B,)
    cols = np.arange(max_len)[None, :]  # (1, L)
    mask = cols < length[:, None]  # (B, L)
    idx = ds.offsets[user][:, None] + first[:, None] + cols  # (B, L)
    hist = np.where(mask, ds.items[np.minimum(idx, len(ds.items) - 1)], 0)
    return hist.astype(np.int64), mask


def make_batch(
    ds: Dataset, user: np.ndarray, end: np.ndarray, max_len: int, with_target: bool = False
) -> Batch:
    """A model batch for users whose history ends before position `end` (target at `end`)."""
    hist, mask = gather_histories(ds, user, end, max_len)
    feats = {f: torch.from_numpy(m[user].astype(np.int64)) for f, m in ds.user_features.items()}
    target = None
    if with_target:
        target = torch.from_numpy(ds.items[ds.offsets[user] + end].astype(np.int64))
    return Batch(torch.from_numpy(hist), torch.from_numpy(mask), feats, target)
