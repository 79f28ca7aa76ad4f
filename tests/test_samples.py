"""Training windows: (user, t) positions and per-batch history gathering from the CSR sequences."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from retrieval.data import DataSpec, Dataset, load_dataset, split_users
from retrieval.samples import Histories, gather_histories, history_batch, make_batch, training_positions

# user 1: items 11..18 at times 1..8; user 2: items 21..23; user 3: item 31 only.
SEQS = {1: [11, 12, 13, 14, 15, 16, 17, 18], 2: [21, 22, 23], 3: [31]}


@pytest.fixture
def ds(tmp_path: Path) -> Dataset:
    rows = [(u, item, 100 * u + k) for u, items in SEQS.items() for k, item in enumerate(items)]
    rows = rows[::-1]  # file order is not sequence order
    log_df = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    log_df.write_csv(tmp_path / "log.csv")
    users = pl.DataFrame({"user_id": [1, 2, 3], "gender": ["F", "M", "F"]})
    users.write_parquet(tmp_path / "users.parquet")
    ds = load_dataset(DataSpec(tmp_path / "log.csv", users=tmp_path / "users.parquet"))
    assert ds.user_ids.tolist() == ["1", "2", "3"]
    return ds


def idx(ds: Dataset, raw: list[int]) -> list[int]:
    """Item indices of raw item ids (0 stays padding)."""
    lookup = {v: i for i, v in enumerate(ds.item_ids.tolist())}
    return [lookup[str(r)] if r else 0 for r in raw]


# ---------------------------------------------------------------------------- training_positions


def test_training_positions_by_hand(ds: Dataset) -> None:
    history_len = np.array([5, 3, 1])
    user, pos = training_positions(ds, np.array([0, 1, 2]), history_len)
    assert list(zip(user.tolist(), pos.tolist())) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    assert user.dtype == np.int64 and pos.dtype == np.int64


def test_training_positions_only_given_users(ds: Dataset) -> None:
    user, pos = training_positions(ds, np.array([1]), np.array([8, 3, 1]))
    assert user.tolist() == [1, 1] and pos.tolist() == [1, 2]
    user, pos = training_positions(ds, np.array([2]), np.array([8, 3, 1]))
    assert user.shape == (0,) and pos.shape == (0,)  # a 1-item user has no target with a history


def test_training_positions_train_users_of_a_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 12, 60)
    rows = [(u, int(rng.integers(1, 200)), k) for u in range(60) for k in range(lengths[u])]
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(tmp_path / "log.csv")
    ds = load_dataset(DataSpec(tmp_path / "log.csv"))
    split = split_users(ds, seed=2026)
    user, pos = training_positions(ds, split.train_users, split.history_len)

    assert set(user.tolist()) <= set(split.train_users.tolist())
    assert not set(user.tolist()) & set(np.concatenate([split.val_users, split.test_users]).tolist())
    expected = sorted((int(u), t) for u in split.train_users for t in range(1, int(ds.lengths()[u])))
    assert sorted(zip(user.tolist(), pos.tolist())) == expected
    assert len(user) == int((ds.lengths()[split.train_users] - 1).sum())


def test_training_positions_stay_one_dimensional() -> None:
    """Samples are (user, t) pairs: memory follows the sample count, never samples x L."""
    users = np.arange(2000)
    history_len = np.full(2000, 101)  # 200,000 samples
    tracemalloc.start()
    try:
        user, pos = training_positions(None, users, history_len)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n = 2000 * 100
    assert user.shape == (n,) and pos.shape == (n,)
    # a (samples, L=50) int64 window would be 80 MB; a handful of (S,) arrays is a few MB
    assert peak < 8 * n * 8


# ---------------------------------------------------------------------------- gather_histories


def test_gather_histories_by_hand(ds: Dataset) -> None:
    user = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    end = np.array([0, 1, 2, 5, 8, 1, 3, 1])
    hist, mask = gather_histories(ds, user, end, max_len=3)
    expected = [
        [0, 0, 0],  # nothing before position 0
        [11, 0, 0],
        [11, 12, 0],
        [13, 14, 15],  # the last 3 of 5, oldest first
        [16, 17, 18],
        [21, 0, 0],  # user 2 never sees user 1's tail
        [21, 22, 23],
        [31, 0, 0],  # padding never reaches into the next user (or past the end)
    ]
    assert hist.tolist() == [idx(ds, row) for row in expected]
    assert mask.tolist() == [[v != 0 for v in row] for row in expected]
    assert hist.shape == (8, 3) and hist.dtype == np.int64 and mask.dtype == bool


def test_gather_histories_never_cross_users(ds: Dataset) -> None:
    """Against a brute force on every (user, t) and several L."""
    seqs = [ds.sequence(u).tolist() for u in range(ds.n_users)]
    user = np.array([u for u in range(ds.n_users) for _ in range(len(seqs[u]) + 1)])
    end = np.array([t for u in range(ds.n_users) for t in range(len(seqs[u]) + 1)])
    for max_len in (1, 2, 4, 10):
        hist, mask = gather_histories(ds, user, end, max_len)
        for row, (u, t) in enumerate(zip(user.tolist(), end.tolist())):
            want = seqs[u][max(0, t - max_len) : t]
            assert hist[row].tolist() == want + [0] * (max_len - len(want)), (u, t, max_len)
            assert mask[row].sum() == len(want) and mask[row, : len(want)].all()


def test_make_batch_targets_and_features(ds: Dataset) -> None:
    user, pos = training_positions(ds, np.array([0, 1, 2]), ds.lengths())
    batch = make_batch(ds, user, pos, max_len=4, with_target=True)
    want_target = [ds.sequence(u)[t] for u, t in zip(user.tolist(), pos.tolist())]
    assert batch.target is not None and batch.target.dtype == torch.int64
    assert batch.target.tolist() == want_target
    assert batch.target.tolist() == idx(ds, [12, 13, 14, 15, 16, 17, 18, 22, 23])
    hist, mask = gather_histories(ds, user, pos, 4)
    assert torch.equal(batch.history, torch.from_numpy(hist)) and torch.equal(batch.mask, torch.from_numpy(mask))
    # the target is never inside its own history
    assert not (batch.history == batch.target[:, None]).any()
    # user profile travels with the batch: F -> 2, M -> 3 in the vocabulary [pad, unknown, F, M]
    assert ds.user_feature_vocab["gender"] == ["<pad>", "unknown", "F", "M"]
    assert batch.user_features["gender"].tolist() == [[2]] * 7 + [[3]] * 2


def test_make_batch_without_target(ds: Dataset) -> None:
    batch = make_batch(ds, np.array([1]), np.array([3]), max_len=5)
    assert batch.target is None
    assert batch.history.tolist() == [idx(ds, [21, 22, 23, 0, 0])]
    assert batch.mask.tolist() == [[True, True, True, False, False]]


# ---------------------------------------------------------------------------- Histories


def test_histories_of_a_dataset_are_the_sequence_prefixes(ds: Dataset) -> None:
    hist = Histories.of(ds, np.array([1, 0, 2]), np.array([2, 5, 0]))
    assert len(hist) == 3 and hist.lengths().tolist() == [2, 5, 0]
    assert [r.tolist() for r in hist.rows()] == [idx(ds, [21, 22]), idx(ds, [11, 12, 13, 14, 15]), []]
    assert hist.times.tolist() == [200, 201, 100, 101, 102, 103, 104]
    assert hist.users.tolist() == [1, 0, 2]
    # the same gather serves a Dataset and a Histories
    a = gather_histories(ds, np.array([1, 0, 2]), np.array([2, 5, 0]), 3)
    b = gather_histories(hist, np.arange(3), hist.lengths(), 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_histories_take_and_batches_keep_rows_and_users(ds: Dataset) -> None:
    hist = Histories.of(ds, np.array([0, 1, 2]), np.array([8, 3, 1]))
    sub = hist.take(np.array([2, 0]))
    assert [r.tolist() for r in sub.rows()] == [idx(ds, [31]), idx(ds, SEQS[1])]
    assert sub.users.tolist() == [2, 0] and sub.times.tolist() == [300] + list(range(100, 108))
    parts = list(hist.batches(2))
    assert [len(p) for p in parts] == [2, 1] and parts[1].users.tolist() == [2]
    assert list(hist.batches(3))[0] is hist


def test_history_batch_of_request_histories(ds: Dataset) -> None:
    """A request's behaviours (no stored user, or a stored user with new clicks) batch like stored ones."""
    seqs = [np.array(idx(ds, [11, 12, 13, 14, 15, 16])), np.array(idx(ds, [23]), dtype=np.int32)]
    hist = Histories.from_lists(seqs, users=np.array([1, -1]))
    batch = history_batch(ds, hist, max_len=4)
    assert batch.history.tolist() == [idx(ds, [13, 14, 15, 16]), idx(ds, [23, 0, 0, 0])]
    assert batch.mask.sum(1).tolist() == [4, 1] and batch.target is None
    # vocabulary [pad, unknown, F, M]: the stored user keeps their profile, an unknown one gets 'unknown'
    assert batch.user_features["gender"].tolist() == [[3], [1]]
    empty = Histories.from_lists([np.zeros(0, np.int32)])
    assert history_batch(ds, empty, 2).mask.tolist() == [[False, False]]
