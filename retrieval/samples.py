"""Training windows and request histories, gathered per batch from sequences stored in CSR form.

A training sample is only (user, position t): history = the previous <= L behaviours,
target = the behaviour at t. Histories are gathered per batch from the stored sequences,
so memory follows the number of interactions, never interactions x L.

`Histories` holds the behaviour sequences of a batch of users or requests (a held-out
user's first 80 %, a known user's log with new behaviours appended, a new user's few
clicks) in the same CSR layout as `Dataset`, so one gather serves training, evaluation
and serving alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from retrieval.data import Dataset
from retrieval.mind import Batch


class Sequences(Protocol):
    """Anything holding sequences in CSR form: a Dataset or a Histories."""

    items: np.ndarray  # (E,) item indices 1..N
    times: np.ndarray  # (E,) event times
    offsets: np.ndarray  # (rows+1,) row r's sequence is items[offsets[r]:offsets[r+1]]


@dataclass
class Histories:
    """Behaviour sequences of a batch of users or requests, oldest first, in CSR form."""

    items: np.ndarray  # (E,) int32 item indices 1..N
    times: np.ndarray  # (E,) int64 event times (DSIN's sessions read them)
    offsets: np.ndarray  # (U+1,) int64: row r's history is items[offsets[r]:offsets[r+1]]
    users: np.ndarray  # (U,) int64 each row's user index in the dataset (its profile); -1 = not in it

    @classmethod
    def of(cls, ds: Dataset, users: np.ndarray, ends: np.ndarray) -> Histories:
        """The first ends[r] behaviours of each user's stored sequence."""
        users = np.asarray(users, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        offsets = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(ends, out=offsets[1:])
        idx = np.repeat(ds.offsets[users] - offsets[:-1], ends) + np.arange(offsets[-1])  # (E,) positions in ds
        return cls(ds.items[idx], ds.times[idx], offsets, users)

    @classmethod
    def from_lists(cls, sequences: list[np.ndarray], users: np.ndarray | None = None,
                   times: list[np.ndarray] | None = None) -> Histories:
        """Histories from one array of item indices per row (oldest first); users default to -1."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        items = np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences] + [np.zeros(0, np.int32)])
        t = (np.concatenate([np.asarray(x, dtype=np.int64) for x in times] + [np.zeros(0, np.int64)])
             if times is not None else np.zeros(len(items), dtype=np.int64))
        u = np.full(len(sequences), -1, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
        return cls(items, t, offsets, u)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> Histories:
        """The histories of the given rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = Histories.of(self, rows, self.lengths()[rows])  # type: ignore[arg-type]
        out.users = self.users[rows]
        return out

    def batches(self, size: int) -> Iterator[Histories]:
        """The rows in consecutive batches of at most `size` (itself when it fits in one)."""
        if len(self) <= size:
            yield self
            return
        for i in range(0, len(self), size):
            yield self.take(np.arange(i, min(i + size, len(self))))

    def rows(self) -> list[np.ndarray]:
        """One (length,) array of item indices per row."""
        return np.split(self.items, self.offsets[1:-1])


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


def gather_histories(seqs: Sequences, rows: np.ndarray, end: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Histories of the behaviours before position `end` of each row's sequence.

    `seqs` is a Dataset (rows = users) or a Histories (rows = its rows). Returns (B, L) item
    indices left-aligned (oldest first, most recent last, then 0 padding) and the (B, L)
    bool mask of real behaviours.
    """
    first = np.maximum(end - max_len, 0)  # (B,)
    length = end - first  # (B,)
    cols = np.arange(max_len)[None, :]  # (1, L)
    mask = cols < length[:, None]  # (B, L)
    idx = seqs.offsets[rows][:, None] + first[:, None] + cols  # (B, L)
    hist = np.where(mask, seqs.items[np.minimum(idx, max(len(seqs.items) - 1, 0))] if len(seqs.items) else 0, 0)
    return hist.astype(np.int64), mask


def profile_features(ds: Dataset, users: np.ndarray) -> dict[str, torch.Tensor]:
    """Each profile field's (B, M) value ids for the given users; a user not in the dataset
    (index -1) gets the value 'unknown' (id 1), as a listed user without a profile does."""
    users = np.asarray(users, dtype=np.int64)
    known = users >= 0
    out = {}
    for f, m in ds.user_features.items():
        rows = m[np.where(known, users, 0)].astype(np.int64)  # (B, M)
        if not known.all():
            rows[~known] = 0
            rows[~known, 0] = 1
        out[f] = torch.from_numpy(rows)
    return out


def make_batch(
    ds: Dataset, user: np.ndarray, end: np.ndarray, max_len: int, with_target: bool = False,
    target: np.ndarray | None = None,
) -> Batch:
    """A model batch for users whose history ends before position `end`; with_target, the
    item at position `target` (B,) of each sequence is the target (default: at `end`)."""
    hist, mask = gather_histories(ds, user, end, max_len)
    items = None
    if with_target:
        at = end if target is None else target
        items = torch.from_numpy(ds.items[ds.offsets[user] + at].astype(np.int64))
    return Batch(torch.from_numpy(hist), torch.from_numpy(mask), profile_features(ds, user), items)


def history_batch(ds: Dataset, hist: Histories, max_len: int) -> Batch:
    """A model batch of the last L behaviours of each history, with each row's profile."""
    items, mask = gather_histories(hist, np.arange(len(hist)), hist.lengths(), max_len)
    return Batch(torch.from_numpy(items), torch.from_numpy(mask), profile_features(ds, hist.users))
