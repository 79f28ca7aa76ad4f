"""The temporal split (`--split time`): worked by hand against the protocol, and every consumer
of training data (counts, baselines, the negative sampler) reading only the training period."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from retrieval.baselines import item_knn, popularity
from retrieval.data import DataSpec, held_out_users, item_counts, load_dataset, make_split, split_time, training_counts
from retrieval.errors import DataError

# user, item, time. Times 1..10: the 0.8 quantile of the 12 timestamps below is 8.8, so
# interactions at times <= 8 are training data.
ROWS = [
    (1, 10, 1), (1, 11, 2), (1, 12, 9), (1, 10, 10),  # user 1: history [10, 11]; after: 12, and 10 again
    (2, 11, 3), (2, 13, 4), (2, 14, 9),  # user 2: history [11, 13]; after: 14
    (3, 12, 5), (3, 10, 6), (3, 11, 7),  # user 3: training period only
    (4, 15, 9), (4, 16, 10),  # user 4: evaluation period only
]


@pytest.fixture()
def ds(tmp_path: Path):
    path = tmp_path / "log.csv"
    pl.DataFrame(ROWS, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(path)
    return load_dataset(DataSpec(path))


def test_temporal_split_worked_by_hand(ds) -> None:
    split = split_time(ds, seed=2026)
    ts = np.array([t for _, _, t in ROWS])
    assert split.kind == "time" and split.cut == pytest.approx(float(np.quantile(ts, 0.8)))
    raw = ds.user_ids.astype(int)
    assert dict(zip(raw.tolist(), split.history_len.tolist())) == {1: 2, 2: 2, 3: 3, 4: 0}
    assert sorted(raw[split.train_users].tolist()) == [1, 2, 3]  # every user with training data
    evaluated = np.array([0, 1])  # users 1 and 2 (indices 0, 1): interactions on both sides
    order = evaluated[np.random.default_rng(2026).permutation(2)]
    assert split.val_users.tolist() == [order[0]] and split.test_users.tolist() == [order[1]]


def test_temporal_ground_truth_leaves_out_the_history(ds) -> None:
    split = split_time(ds, seed=2026)
    found = {}
    for part in ("validation", "test"):
        users, ends, truth = held_out_users(ds, split, part)
        for u, e, t in zip(users, ends, truth):
            found[int(ds.user_ids[u])] = (int(e), sorted(ds.item_ids[t].astype(int).tolist()))
    assert found == {1: (2, [12]), 2: (2, [14])}  # user 1's repeat of item 10 is not something to find


def test_training_counts_read_only_the_training_period(ds) -> None:
    split = split_time(ds, seed=2026)
    counts = dict(zip(ds.item_ids[1:].astype(int).tolist(), training_counts(ds, split)[1:].tolist()))
    assert counts == {10: 2, 11: 3, 12: 1, 13: 1, 14: 0, 15: 0, 16: 0}
    # whole sequences (the user split's train users): the plain count
    users = np.arange(ds.n_users)
    assert item_counts(ds, users, ds.lengths()).tolist() == item_counts(ds, users).tolist()
    assert item_counts(ds, users, split.history_len).tolist() == training_counts(ds, split).tolist()


def test_rankers_train_on_the_training_period_only(ds) -> None:
    """A ranker's negatives exclude only what the user touched before the cut (user 2's item 14,
    taken after it, may be drawn), and its MBA frequencies count the training period."""
    from retrieval.ranking.data import TouchedItems
    from retrieval.ranking.models import build_ranker

    split = split_time(ds, seed=2026)
    u2 = int(np.flatnonzero(ds.user_ids.astype(int) == 2)[0])
    i13, i14 = (1 + int(np.flatnonzero(ds.item_ids[1:].astype(int) == i)[0]) for i in (13, 14))  # 0 is padding
    users, items = np.array([u2, u2]), np.array([i13, i14])
    assert TouchedItems(ds).contains(users, items).tolist() == [True, True]  # the whole log (the protocol's pairs)
    assert TouchedItems(ds, split.history_len).contains(users, items).tolist() == [True, False]
    assert TouchedItems(ds, ds.lengths()).keys.tolist() == TouchedItems(ds).keys.tolist()
    model = build_ranker("base", ds, split.train_users, split.history_len, dim=4)
    assert model.items.count_id.tolist() == training_counts(ds, split).astype(float).tolist()
    assert build_ranker("base", ds, split.train_users, dim=4).items.count_id[i14].item() == 1  # whole sequences


def test_baselines_use_the_training_period_only(ds) -> None:
    split = split_time(ds, seed=2026)
    users, ends, _ = held_out_users(ds, split, "test")
    top = popularity(ds, split, users, ends, 3)
    idx = {int(r): i for i, r in enumerate(ds.item_ids[1:].astype(int), start=1)}
    history = set(ds.sequence(users[0])[: ends[0]].tolist())
    # training-period counts 11: 3, 10: 2, 12: 1, 13: 1, then the items seen only after T (count 0) by index
    expected = [i for i in (idx[11], idx[10], idx[12], idx[13], idx[14]) if i not in history][:3]
    assert top[0].tolist() == expected
    # item-kNN: the items that co-occur with the history in the training period come first; item 14
    # co-occurs with 11 and 13 only after T, so it must not be among them
    periods = [set(ds.sequence(u)[: split.history_len[u]].tolist()) for u in range(ds.n_users)]
    near = set().union(*(p for p in periods if p & history)) - history
    knn = item_knn(ds, split, users, ends, 5)
    assert set(knn[0][: len(near)].tolist()) == near and idx[14] not in near


def test_make_split_names_the_split(ds) -> None:
    assert make_split(ds, "time", 2027).kind == "time" and make_split(ds, "time", 2027).seed == 2027
    with pytest.raises(DataError) as info:
        make_split(ds, "random", 2026)
    assert str(info.value) == "unknown split 'random'; use one of user, time"


def test_temporal_split_needs_users_on_both_sides(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    pl.DataFrame([(1, 10, 1), (1, 11, 2), (2, 10, 3), (2, 12, 10)], schema=["user_id", "item_id", "timestamp"],
                 orient="row").write_csv(path)
    with pytest.raises(DataError) as info:
        split_time(load_dataset(DataSpec(path)))
    assert "leaves 1 users with interactions on both sides of T" in str(info.value)
