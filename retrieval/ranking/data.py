"""Ranking data: (history, candidate, label) samples from the retrieval split, gathered per batch.

Training: for each train user and position t >= 1 a positive (history = previous <= L
behaviours, candidate = item t) and sampled negatives: items the user never touched
(`uniform`), or items from the retrieval stage's own top-M candidates for that user
(`retrieval`, hard negatives: in production the ranker only sees retrieval's output).

Evaluation follows the protocol: each held-out ground-truth item is a positive paired
with one negative drawn uniformly from the items the user never touched
(`default_rng(2026)`), scored with the last L items of the user's history.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retrieval.data import Dataset, Split, within_prefix
from retrieval.errors import DataError
from retrieval.ranking.common import RankBatch
from retrieval.samples import Histories, Sequences, gather_histories, profile_features


class TouchedItems:
    """Membership test "has user u touched item i", vectorised: over the whole log, or with `ends`
    (U,) over each user's first ends[u] behaviours only (a split's training data: on the temporal
    split what a user does after the cut is not known when the model trains)."""

    def __init__(self, ds: Dataset, ends: np.ndarray | None = None):
        self.width = ds.n_items + 1
        lengths = ds.lengths()
        users = np.repeat(np.arange(ds.n_users, dtype=np.int64), lengths)
        keys = users * self.width + ds.items.astype(np.int64)
        if ends is not None and not np.array_equal(ends, lengths):
            keys = keys[within_prefix(ds, ends)]
        self.keys = np.unique(keys)
        self.n_items = ds.n_items
        self.user_ids = ds.user_ids
        self.distinct = np.bincount(self.keys // self.width, minlength=ds.n_users)  # (U,) items each touched

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users.astype(np.int64) * self.width + items.astype(np.int64)
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, len(self.keys) - 1)
        return self.keys[pos] == keys

    def sample(self, users: np.ndarray, rng: np.random.Generator, shape: tuple[int, ...] = ()) -> np.ndarray:
        """Items drawn uniformly from 1..N that each user never touched; output (len(users), *shape)."""
        full = self.distinct[users] >= self.n_items
        if full.any():  # rejection sampling would never end
            raise DataError(f"user {self.user_ids[users[full][0]]} touched every item: no negative to sample")
        users = np.broadcast_to(users.reshape(users.shape + (1,) * len(shape)), users.shape + shape)
        out = rng.integers(1, self.n_items + 1, size=users.shape)
        bad = self.contains(users, out)
        while bad.any():  # rejection: users touch a small share of items
            out[bad] = rng.integers(1, self.n_items + 1, size=int(bad.sum()))
            bad[bad] = self.contains(users[bad], out[bad])
        return out


@dataclass
class SessionSpec:
    """Session division for DSIN-style rankers (None where the model needs no sessions)."""

    sessions: int  # S: most recent sessions kept
    per_session: int  # T: most recent behaviours kept per session
    gap: int = 1800  # seconds between behaviours that start a new session


def make_rank_batch(
    ds: Dataset,
    touched: TouchedItems | None,
    users: np.ndarray,
    ends: np.ndarray,
    candidates: np.ndarray,
    labels: np.ndarray | None,
    max_len: int,
    rng: np.random.Generator | None = None,
    neg_history: bool = False,
    sessions: SessionSpec | None = None,
    seqs: Sequences | None = None,
    rows: np.ndarray | None = None,
) -> RankBatch:
    """A ranker batch: history before position ends[b] of row users[b], scored against candidates[b].

    The histories are read from `seqs`: the dataset itself by default (users[b] is then a user
    index), or a Histories of request-time behaviours (users[b] is then its row, and the
    row's user, -1 for one not in the dataset, gives the profile). `touched` is needed only
    for negative histories (training). With `rows` (B,), users / ends describe H distinct
    histories and candidate b is scored against history rows[b] (`RankBatch.rows`): scoring M
    candidates of one history gathers and encodes it once. Histories are left-aligned, so the history tensors are
    (B, L') with L' the longest history of the batch (at most max_len): a batch of short
    histories (one new user's request) costs what its behaviours cost."""
    seqs = ds if seqs is None else seqs
    profile_users = seqs.users[users] if isinstance(seqs, Histories) else users
    hist, mask = gather_histories(seqs, users, ends, max_len)
    width = max(int(mask.sum(1).max(initial=0)), 1)  # trailing columns that are padding in every row: dropped
    hist, mask = hist[:, :width], mask[:, :width]  # (B, L') with L' <= L: the same scores, less work
    feats = profile_features(ds, profile_users)
    batch = RankBatch(
        history=torch.from_numpy(hist),
        mask=torch.from_numpy(mask),
        candidate=torch.from_numpy(candidates.astype(np.int64)),
        user_features=feats,
        label=None if labels is None else torch.from_numpy(labels.astype(np.float32)),
        rows=None if rows is None else torch.from_numpy(rows.astype(np.int64)),
    )
    if neg_history:
        assert rng is not None and touched is not None, "negative histories need a random generator and touched items"
        neg = touched.sample(profile_users, rng, (hist.shape[1],)) * mask
        batch.neg_history = torch.from_numpy(neg.astype(np.int64))
    if sessions is not None:
        from retrieval.ranking.sessions import divide_sessions

        first = np.maximum(ends - max_len, 0)  # the sessions of the same last L behaviours the history holds
        s_items, s_mask = divide_sessions(seqs.items, seqs.times, seqs.offsets[users] + first, ends - first,
                                          sessions.gap, sessions.sessions, sessions.per_session)
        width = max(int(s_mask.sum(2).max(initial=0)), 1)  # positions that are padding in every session: dropped
        batch.sessions = torch.from_numpy(s_items[:, :, :width].astype(np.int64))
        batch.session_mask = torch.from_numpy(s_mask[:, :, :width])
    return batch


@dataclass
class PairSet:
    """Flat (user, history end, candidate, label) rows."""

    users: np.ndarray  # (R,) int64
    ends: np.ndarray  # (R,) int64 history = sequence[:end] (its last L)
    candidates: np.ndarray  # (R,) int64
    labels: np.ndarray  # (R,) float32

    def __len__(self) -> int:
        return len(self.users)

    def take(self, idx: np.ndarray) -> "PairSet":
        return PairSet(self.users[idx], self.ends[idx], self.candidates[idx], self.labels[idx])


def protocol_pairs(ds: Dataset, split: Split, part: str, seed: int = 2026) -> PairSet:
    """The protocol's standalone ranking set: each ground-truth item of each held-out user is
    a positive, paired with one negative drawn uniformly from items the user never touched."""
    users = split.users(part)
    users = users[split.history_len[users] < ds.lengths()[users]]
    ends = split.history_len[users]
    n_truth = ds.lengths()[users] - ends
    pos_users = np.repeat(users, n_truth)
    pos_ends = np.repeat(ends, n_truth)
    starts = ds.offsets[users] + ends
    rows = [np.arange(s, s + n) for s, n in zip(starts, n_truth)]
    pos_items = ds.items[np.concatenate(rows + [np.zeros(0, np.int64)])].astype(np.int64)  # empty without users
    neg_items = TouchedItems(ds).sample(pos_users, np.random.default_rng(seed))
    return PairSet(
        users=np.concatenate([pos_users, pos_users]),
        ends=np.concatenate([pos_ends, pos_ends]),
        candidates=np.concatenate([pos_items, neg_items]),
        labels=np.concatenate([np.ones(len(pos_users)), np.zeros(len(pos_users))]).astype(np.float32),
    )
