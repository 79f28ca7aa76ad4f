"""The ranking stage around the models: sampling, protocol pairs, batches, reranking, and the
`train-ranker` / `query --rank` / `evaluate --ranker` commands end to end.

Hand-made logs where a value can be worked out; the conftest's SMALL bundle (trained once,
through the CLI) for everything that needs a real split; rankers trained for one tiny epoch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error, assert_usage_error, rewrite_config
import torch

from retrieval.bundle import load_bundle
from retrieval.data import Dataset, split_users
from retrieval.errors import DataError
from retrieval.ranking.base import EmbeddingMLP
from retrieval.ranking.bundle import load_ranker
from retrieval.ranking.common import RankerConfig
from retrieval.ranking.data import PairSet, SessionSpec, TouchedItems, make_rank_batch, protocol_pairs
from retrieval.ranking.dien import DIEN
from retrieval.ranking.dmin import DMIN
from retrieval.ranking.dsin import DSIN
from retrieval.ranking.evaluate import evaluate_ranker
from retrieval.ranking.scoring import pair_metrics, rerank, score_pairs
from retrieval.samples import Histories
from retrieval.ranking.train import (
    FUSION_WEIGHTS, RankTrainConfig, RetrievalCandidates, choose_retrieval_weight, hard_negatives,
    retrieval_candidates, train_ranker, training_pairs,
)

TINY_RANKER = ("--epochs", "1", "--dim", "8", "--no-fuse")  # the ranker's own order (fusion: its own tests)
FAST_RANKER = (*TINY_RANKER, "--max-len", "10", "--batch-size", "512")
USER = "u00003"
METRICS = [f"{m}@{n}" for n in (20, 50) for m in ("recall", "hit_rate", "ndcg")]




def hand_dataset(seqs: list[list[int]], n_items: int, times: list[list[int]] | None = None) -> Dataset:
    """A log written out by hand: user u's sequence is seqs[u] (item indices 1..n_items)."""
    lengths = [len(s) for s in seqs]
    if times is None:
        times = [[60 * t for t in range(len(s))] for s in seqs]
    return Dataset(
        item_ids=np.array(["<pad>"] + [f"i{i}" for i in range(1, n_items + 1)]),
        user_ids=np.array([f"u{u}" for u in range(len(seqs))]),
        offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
        items=np.array([i for s in seqs for i in s], dtype=np.int32),
        times=np.array([t for ts in times for t in ts], dtype=np.int64),
    )


@pytest.fixture(scope="module")
def small(bundle_k4):
    """The SMALL retrieval bundle, loaded once: its dataset and split are the ranker's."""
    return load_bundle(bundle_k4)


# ---------------------------------------------------------------------- TouchedItems

HAND = [[1, 2, 3], [3, 4], [2, 2, 6], [5]]  # user 2 repeats item 2


def test_touched_contains_exactly_the_log():
    ds = hand_dataset(HAND, n_items=6)
    touched = TouchedItems(ds)
    users, items = np.meshgrid(np.arange(4), np.arange(1, 7), indexing="ij")  # every (user, item) pair
    got = touched.contains(users.ravel(), items.ravel()).reshape(users.shape)
    want = np.array([[i in s for i in range(1, 7)] for s in HAND])
    np.testing.assert_array_equal(got, want)


def test_touched_sample_never_returns_a_touched_item_and_covers_the_rest_uniformly():
    ds = hand_dataset(HAND, n_items=6)
    touched = TouchedItems(ds)
    users = np.repeat(np.arange(4), 3000)
    draws = touched.sample(users, np.random.default_rng(0))
    assert draws.shape == users.shape and draws.dtype.kind == "i"
    assert not touched.contains(users, draws).any()
    for u, seq in enumerate(HAND):
        free = sorted(set(range(1, 7)) - set(seq))
        counts = np.bincount(draws[users == u], minlength=7)
        assert set(np.flatnonzero(counts)) == set(free)
        share = counts[free] / 3000
        np.testing.assert_allclose(share, 1 / len(free), atol=0.04)  # several std devs of a fair draw


def test_touched_sample_with_a_shape_respects_each_rows_user():
    ds = hand_dataset(HAND, n_items=6)
    touched = TouchedItems(ds)
    users = np.array([0, 1, 2, 3, 0])
    draws = touched.sample(users, np.random.default_rng(1), (50,))
    assert draws.shape == (5, 50)
    for row, u in zip(draws, users):
        assert not set(row.tolist()) & set(HAND[u])


def test_touched_sample_is_deterministic_for_a_seeded_rng():
    touched = TouchedItems(hand_dataset(HAND, n_items=6))
    users = np.arange(4).repeat(25)
    a = touched.sample(users, np.random.default_rng(7))
    b = touched.sample(users, np.random.default_rng(7))
    c = touched.sample(users, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_touched_sample_refuses_a_user_who_touched_every_item():
    ds = hand_dataset([[1, 2, 3], [1]], n_items=3)
    touched = TouchedItems(ds)
    assert set(touched.sample(np.array([1]), np.random.default_rng(0), (40,))[0].tolist()) == {2, 3}
    with pytest.raises(DataError, match="user u0 touched every item"):
        touched.sample(np.array([1, 0]), np.random.default_rng(0))


# --------------------------------------------------------------------- protocol pairs


@pytest.mark.parametrize("part", ["validation", "test"])
def test_protocol_pairs_one_positive_per_truth_item_and_as_many_negatives(small, part):
    ds, split = small.dataset, small.split
    pairs = protocol_pairs(ds, split, part)
    held = split.users(part)
    assert len(held) > 0 and set(np.unique(pairs.users)) <= set(held.tolist())
    touched = TouchedItems(ds)
    n_pos = 0
    for u in held:
        seq, end = ds.sequence(u), split.history_len[u]
        rows = pairs.users == u
        pos = rows & (pairs.labels == 1)
        neg = rows & (pairs.labels == 0)
        assert sorted(pairs.candidates[pos].tolist()) == sorted(seq[end:].tolist())
        assert neg.sum() == pos.sum() == len(seq) - end
        assert (pairs.ends[rows] == end).all()
        assert not touched.contains(pairs.users[neg], pairs.candidates[neg]).any()
        assert not set(pairs.candidates[neg].tolist()) & set(seq.tolist())
        n_pos += int(pos.sum())
    assert len(pairs) == 2 * n_pos
    assert set(np.unique(pairs.labels).tolist()) == {0.0, 1.0} and pairs.labels.dtype == np.float32


def test_protocol_pairs_are_deterministic_with_seed_2026(small):
    ds, split = small.dataset, small.split
    a, b = protocol_pairs(ds, split, "test"), protocol_pairs(ds, split, "test")
    for field in ("users", "ends", "candidates", "labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    other = protocol_pairs(ds, split, "test", seed=2027)
    assert not np.array_equal(a.candidates[a.labels == 0], other.candidates[other.labels == 0])
    np.testing.assert_array_equal(a.candidates[a.labels == 1], other.candidates[other.labels == 1])


def test_protocol_pairs_without_ground_truth_are_empty_and_training_refuses():
    # 10 users of one behaviour each: held-out users keep that one item as history, no truth
    ds = hand_dataset([[u % 5 + 1] for u in range(10)], n_items=5)
    split = split_users(ds, 2026)
    pairs = protocol_pairs(ds, split, "validation")
    assert len(pairs) == 0
    with pytest.raises(DataError, match="no validation users with a ground truth"):
        train_ranker(ds, split, RankTrainConfig(model="base", epochs=1, dim=4), show_progress=False)


@pytest.mark.parametrize("model", ["din", "dien"])
def test_train_ranker_is_deterministic_for_a_seed(small, model):
    """Same seed, same weights, bit for bit, with torch's default threads (the distinct-item
    gather's backward must not depend on thread scheduling)."""
    ds, split = small.dataset, small.split
    cfg = RankTrainConfig(model=model, epochs=1, dim=4, max_len=20, seed=3)
    a, b = (train_ranker(ds, split, cfg, show_progress=False).model.state_dict() for _ in range(2))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_ranker_training_resumes_to_the_uninterrupted_run(small, tmp_path, monkeypatch):
    """A run that dies in epoch 2 resumes from the epoch-1 checkpoint and ends with the weights,
    the history and the best epoch of the run that never stopped; a finished run leaves no
    checkpoint, and a checkpoint of other settings is refused."""
    import retrieval.ranking.train as train_module
    from retrieval.checkpoint import Checkpointing
    from retrieval.errors import ArtifactError, ConfigError

    ds, split = small.dataset, small.split
    cfg = RankTrainConfig(model="dien", epochs=3, patience=5, dim=4, max_len=20, seed=3, threads=1)
    whole = train_ranker(ds, split, cfg, show_progress=False)

    ckpt = Checkpointing(tmp_path / "r.ckpt", resume=True)
    real, calls = train_module.pair_metrics, []

    def dies_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "pair_metrics", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_ranker(ds, split, cfg, show_progress=False, checkpointing=ckpt)
    monkeypatch.setattr(train_module, "pair_metrics", real)
    assert torch.load(tmp_path / "r.ckpt", weights_only=True)["epoch"] == 2  # epoch 1 done, 2 next
    with pytest.raises(ArtifactError, match="other settings"):
        train_ranker(ds, split, RankTrainConfig(**{**cfg.__dict__, "lr": 0.01}), show_progress=False, checkpointing=ckpt)
    resumed = train_ranker(ds, split, cfg, show_progress=False, checkpointing=ckpt)
    assert not (tmp_path / "r.ckpt").exists()
    assert resumed.best_epoch == whole.best_epoch and len(resumed.history) == 3
    for a, b in zip(resumed.history, whole.history):
        assert a["loss"] == b["loss"] and a["val_auc"] == b["val_auc"]
    want = whole.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resumed.model.state_dict().items())
    with pytest.raises(ConfigError, match="checkpoint at the end of each epoch"):
        train_ranker(ds, split, cfg, show_progress=False, checkpointing=Checkpointing(tmp_path / "x", every=5))


# ---------------------------------------------------------------------- training pairs


def test_training_pairs_positives_are_every_train_position(small):
    ds, split = small.dataset, small.split
    touched = TouchedItems(ds)
    rows = training_pairs(ds, split, touched, negatives=3, rng=np.random.default_rng(0))
    pos = rows.labels == 1
    want = {(int(u), t, int(ds.sequence(u)[t])) for u in split.train_users for t in range(1, ds.lengths()[u])}
    got = list(zip(rows.users[pos].tolist(), rows.ends[pos].tolist(), rows.candidates[pos].tolist()))
    assert len(got) == len(want) and set(got) == want
    held = np.concatenate([split.val_users, split.test_users])
    assert not np.isin(rows.users, held).any()  # no held-out user, not even their history
    # three negatives per positive, each with the positive's user and history end
    assert (~pos).sum() == 3 * pos.sum()
    neg_keys = sorted(zip(rows.users[~pos].tolist(), rows.ends[~pos].tolist()))
    assert neg_keys == sorted([(u, t) for u, t, _ in got for _ in range(3)])
    assert not touched.contains(rows.users[~pos], rows.candidates[~pos]).any()


def test_training_pairs_horizon_draws_the_positive_from_the_next_behaviours(small):
    ds, split = small.dataset, small.split
    touched = TouchedItems(ds)
    one = training_pairs(ds, split, touched, 1, np.random.default_rng(0))
    rows = training_pairs(ds, split, touched, 1, np.random.default_rng(0), horizon=5)
    pos = rows.labels == 1
    np.testing.assert_array_equal(rows.users[pos], one.users[one.labels == 1])  # same history ends
    np.testing.assert_array_equal(rows.ends[pos], one.ends[one.labels == 1])
    offset = []
    for u, t, item in zip(rows.users[pos], rows.ends[pos], rows.candidates[pos]):
        seq = ds.sequence(u)
        window = seq[t : t + 5].tolist()
        assert item in window  # one of behaviours t .. t + 4, never one of the history
        offset.append(window.index(item))
    assert len(set(offset)) == 5 and np.mean(np.array(offset) == 0) < 0.5  # not only the next one
    with pytest.raises(ValueError, match="horizon=0 must be at least 1"):
        training_pairs(ds, split, touched, 1, np.random.default_rng(0), horizon=0)


def test_step_groups_keep_each_positive_with_its_negatives(small):
    from retrieval.ranking.train import step_groups

    ds, split = small.dataset, small.split
    rows = training_pairs(ds, split, TouchedItems(ds), negatives=3, rng=np.random.default_rng(0))
    P = int(rows.labels.sum())
    seen = []
    for idx, hist in step_groups(rows, 3, batch_size=50, rng=np.random.default_rng(1)):
        G = hist.max() + 1
        assert G == 12 or len(seen) * 12 + G == P  # 50 // 4 positives a step, the rest in the last one
        assert len(idx) == 4 * G and (rows.labels[idx[:G]] == 1).all() and (rows.labels[idx[G:]] == 0).all()
        # every row of a group has the group's user and history end: one history, encoded once
        np.testing.assert_array_equal(rows.users[idx], rows.users[idx[:G]][hist])
        np.testing.assert_array_equal(rows.ends[idx], rows.ends[idx[:G]][hist])
        seen.append(idx)
    every = np.concatenate(seen)
    assert sorted(every.tolist()) == list(range(len(rows)))  # each row once an epoch
    assert not (np.concatenate([s[: len(s) // 4] for s in seen]) == np.arange(P)).all()  # shuffled


def test_training_pairs_draw_hard_negatives_from_the_given_lists(small):
    ds, split = small.dataset, small.split
    touched = TouchedItems(ds)
    rng = np.random.default_rng(0)
    hard = {int(u): touched.sample(np.array([u]), rng, (3,))[0] for u in split.train_users}
    rows = training_pairs(ds, split, touched, negatives=2, rng=np.random.default_rng(1), hard=hard)
    neg = rows.labels == 0
    assert neg.sum() == 2 * (rows.labels == 1).sum()
    for u, item in zip(rows.users[neg], rows.candidates[neg]):
        assert item in hard[int(u)]
    used = {(int(u), int(i)) for u, i in zip(rows.users[neg], rows.candidates[neg])}
    assert len(used) > len(hard)  # not one fixed item per user: drawn from each list


def test_hard_negatives_are_each_train_users_retrieval_top_m(small, invoke, bundle_k4, index_k4):
    ds, split = small.dataset, small.split
    hard = hard_negatives(small.model, ds, split, 30)
    assert set(hard) == set(split.train_users.tolist())
    touched = TouchedItems(ds)
    for u, items in hard.items():
        assert len(items) == 30 == len(set(items.tolist()))
        assert not touched.contains(np.full(30, u), items).any()
    u = int(split.train_users[0])
    result = invoke("query", "--bundle", bundle_k4, "--index", index_k4, "--user", ds.user_ids[u], "-n", "30", "--json")
    assert result.exit_code == 0, result.output
    assert [r["item"] for r in json.loads(result.stdout)["items"]] == ds.item_ids[hard[u]].tolist()


def test_training_pairs_mix_hard_and_uniform_negatives_by_share(small):
    ds, split = small.dataset, small.split
    touched = TouchedItems(ds)
    rng = np.random.default_rng(0)
    hard = {int(u): touched.sample(np.array([u]), rng, (3,))[0] for u in split.train_users}
    empty = int(split.train_users[0])
    hard[empty] = np.zeros(0, np.int64)  # a user without candidates: uniform negatives only
    share_of_hard = {}
    for share in (0.0, 0.3, 1.0):
        rows = training_pairs(ds, split, touched, negatives=2, rng=np.random.default_rng(1), hard=hard,
                              hard_share=share)
        neg = rows.labels == 0
        assert neg.sum() == 2 * (rows.labels == 1).sum()
        assert not touched.contains(rows.users[neg], rows.candidates[neg]).any()  # never a touched item
        users, items = rows.users[neg], rows.candidates[neg]
        in_list = np.array([i in hard[int(u)] for u, i in zip(users, items)])
        others = users != empty
        share_of_hard[share] = in_list[others].mean()
        assert not in_list[~others].any()
    # a uniform draw lands in a 3-item list by chance about 3 / 280 of the time
    assert share_of_hard[0.0] < 0.03 and share_of_hard[1.0] == 1.0
    assert 0.27 < share_of_hard[0.3] < 0.33 + 0.03


def test_rank_train_config_validates_the_mix_and_the_monitor():
    assert RankTrainConfig(negative_source="retrieval").share == 1.0
    assert RankTrainConfig(hard_share=0.25).share == 0.25
    with pytest.raises(ValueError, match="hard_share=1.5 must lie in"):
        RankTrainConfig(hard_share=1.5)
    with pytest.raises(ValueError, match="monitor='loss'"):
        RankTrainConfig(monitor="loss")
    with pytest.raises(ValueError, match="negative_source='hard'"):
        RankTrainConfig(negative_source="hard")


# --------------------------------------------------------------------------- batches


def test_rank_batch_history_and_negative_history(small):
    ds = small.dataset
    touched = TouchedItems(ds)
    users = np.array([0, 1, 2, 3, 4, 5])
    ends = np.minimum([1, 2, 5, 10, 20, 30], ds.lengths()[users])
    assert ends[-1] > 12  # one history longer than L
    cands = np.arange(1, 7)
    b = make_rank_batch(ds, touched, users, ends, cands, np.array([1, 0, 1, 0, 1, 0]), max_len=12,
                        rng=np.random.default_rng(0), neg_history=True)
    assert b.history.shape == b.mask.shape == b.neg_history.shape == (6, 12)
    assert b.sessions is None and b.session_mask is None
    for r, (u, e) in enumerate(zip(users, ends)):
        want = ds.sequence(u)[:e][-12:]
        assert b.history[r, : len(want)].tolist() == want.tolist()
        assert b.mask[r].tolist() == [True] * len(want) + [False] * (12 - len(want))
    neg = b.neg_history.numpy()
    assert ((neg == 0) == ~b.mask.numpy()).all()  # zero exactly on padding
    real = b.mask.numpy()
    assert not touched.contains(np.broadcast_to(users[:, None], neg.shape)[real], neg[real]).any()
    assert b.candidate.tolist() == cands.tolist() and b.label.tolist() == [1, 0, 1, 0, 1, 0]
    plain = make_rank_batch(ds, touched, users, ends, cands, None, max_len=12)
    assert plain.neg_history is None and plain.label is None and plain.sessions is None


def test_rank_batch_sessions_come_only_from_the_history_before_end(small):
    ds = small.dataset
    users = np.arange(20)
    ends = np.minimum(ds.lengths()[users], np.arange(20) * 2 + 1)
    spec = SessionSpec(sessions=3, per_session=4)
    b = make_rank_batch(ds, TouchedItems(ds), users, ends, np.ones(20, np.int64), None, max_len=8, sessions=spec)
    assert b.sessions.shape == b.session_mask.shape == (20, 3, 4)
    s, m = b.sessions.numpy(), b.session_mask.numpy()
    assert ((s == 0) == ~m).all()
    for r, (u, e) in enumerate(zip(users, ends)):
        before = set(ds.sequence(u)[:e].tolist())
        kept = s[r][m[r]].tolist()
        assert kept and set(kept) <= before
        assert set(kept) <= set(ds.sequence(u)[:e][-8:].tolist())  # the sessions of the last L = 8 behaviours
        assert ds.sequence(u)[e - 1] in kept  # the latest behaviour is in the newest session
        assert not set(kept) & (set(ds.sequence(u).tolist()) - before)


def test_rank_batch_drops_positions_that_are_padding_in_every_row(small):
    ds = small.dataset
    users, ends = np.array([0, 1]), np.array([3, 5])
    b = make_rank_batch(ds, None, users, ends, np.array([1, 2]), None, max_len=12,
                        sessions=SessionSpec(sessions=3, per_session=10))
    assert b.history.shape == b.mask.shape == (2, 5) and b.mask.sum(1).tolist() == [3, 5]
    assert b.sessions.shape == b.session_mask.shape and b.sessions.shape[:2] == (2, 3)
    assert b.sessions.shape[2] == int(b.session_mask.sum(2).max()) <= 5
    full = make_rank_batch(ds, None, users, np.array([3, 30]), np.array([1, 2]), None, max_len=12)
    assert full.history.shape == (2, 12)


def test_session_statistics_by_hand():
    from retrieval.ranking.sessions import session_statistics

    # user 0 rates at 0 s, 60 s and 4000 s: sessions of 2 and 1; user 1 rates 4 items in one second
    ds = hand_dataset([[1, 2, 3], [4, 5, 6, 7]], n_items=8, times=[[0, 60, 4000], [0, 0, 0, 0]])
    st = session_statistics(ds, max_len=3, T=2)
    assert st["sessions_per_user_mean"] == 1.5 and st["sessions_per_user_median"] == 1.5
    assert st["users_with_one_session"] == 0.5
    assert st["behaviours_per_session_mean"] == pytest.approx(7 / 3) and st["behaviours_per_session_median"] == 2
    assert st["behaviours_in_sessions_longer_than_2"] == pytest.approx(4 / 7)
    assert st["sessions_in_last_3_mean"] == 1.5 and st["behaviours_in_last_3_mean"] == 3
    assert st["behaviours_kept_by_5_sessions_of_2_mean"] == 2.5  # user 0 keeps 2 + 1, user 1 the last 2 of 3
    assert st["same_timestamp_as_previous"] == pytest.approx(3 / 5)  # pairs inside a user only


def test_sessions_in_history_counts_the_sessions_a_ranker_reads_by_hand():
    from retrieval.ranking.sessions import sessions_in_history

    # user 0 rates at 0, 60, 4000, 4100, 9000 s: sessions {0, 60}, {4000, 4100}, {9000}
    ds = hand_dataset([[1, 2, 3, 4, 5], [6, 7]], n_items=8, times=[[0, 60, 4000, 4100, 9000], [0, 5000]])
    users, ends = np.array([0, 0, 0, 0, 1, 1]), np.array([5, 5, 2, 0, 1, 2])
    assert sessions_in_history(ds, users, ends).tolist() == [3, 3, 1, 0, 1, 2]
    # only the last max_len behaviours of sequence[:end]: the last 2 of user 0's 5 are 4100, 9000
    assert sessions_in_history(ds, users, ends, max_len=2).tolist() == [2, 2, 1, 0, 1, 2]
    assert sessions_in_history(ds, users, ends, max_len=3, gap=5000).tolist() == [1, 1, 1, 0, 1, 1]


def test_pair_metrics_by_segment_are_the_metrics_of_the_segments_pairs_alone(small):
    from retrieval.metrics import auc, gauc
    from retrieval.ranking.models import build_ranker

    ds, split = small.dataset, small.split
    model = build_ranker("base", ds, split.train_users, dim=4, hidden=(8,)).eval()
    pairs = protocol_pairs(ds, split, "validation")
    some = pairs.users % 2 == 0  # (R,) a segment of whole users
    out = pair_metrics(model, ds, pairs, {"even": some, "odd": ~some, "positives": pairs.labels == 1})
    whole = pair_metrics(model, ds, pairs)
    assert {k: out[k] for k in whole} == whole  # the headline figures are untouched
    s = score_pairs(model, ds, pairs)
    for name, mask in (("even", some), ("odd", ~some)):
        seg = out["by_segment"][name]
        assert seg["pairs"] == mask.sum() > 0
        assert seg["auc"] == pytest.approx(auc(pairs.labels[mask], s[mask]))
        assert seg["gauc"] == pytest.approx(gauc(pairs.users[mask], pairs.labels[mask], s[mask]))
    assert out["by_segment"]["positives"] == {"auc": None, "gauc": None, "pairs": int((pairs.labels == 1).sum())}


# ---------------------------------------------------------------------------- rerank


class CandidateScorer(EmbeddingMLP):
    """Logit = candidate index, negated for histories longer than two behaviours."""

    def score(self, batch):
        batch = batch.per_row()  # scoring shares histories between candidates (RankBatch.rows)
        s = batch.candidate.float()
        return torch.where(batch.mask.sum(1) > 2, -s, s)


def test_rerank_orders_by_logit_with_missing_candidates_last():
    ds = hand_dataset([[1, 2], [3, 4, 5], [1]], n_items=8)
    model = CandidateScorer(RankerConfig(n_items=8, dim=2, max_len=5, hidden=(2,)))
    cands = np.array([[5, 0, 7, 3], [6, 7, 0, 8], [0, 0, 0, 0]])
    order, logits = rerank(model, ds, Histories.of(ds, np.array([0, 1, 2]), np.array([2, 3, 1])), cands)
    items = np.take_along_axis(cands, order, 1)
    assert order.tolist() == [[2, 0, 3, 1], [0, 1, 3, 2], [0, 1, 2, 3]]
    assert items.tolist() == [[7, 5, 3, 0], [6, 7, 8, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(logits[:2, :3], [[7, 5, 3], [-6, -7, -8]])
    assert np.isneginf(logits[:, 3]).all() and np.isneginf(logits[2]).all()


def test_rerank_matches_pairwise_scores_of_a_real_ranker(small):
    from retrieval.ranking.models import build_ranker

    ds, split = small.dataset, small.split
    torch.manual_seed(0)
    model = build_ranker("din", ds, split.train_users, dim=4, max_len=10).eval()
    touched = TouchedItems(ds)
    users, ends = split.test_users[:4], split.history_len[split.test_users[:4]]
    cands = touched.sample(users, np.random.default_rng(0), (6,))
    cands[1, 2:] = 0
    order, logits = rerank(model, ds, Histories.of(ds, users, ends), cands)
    items = np.take_along_axis(cands, order, 1)
    for r in range(4):
        n = int((cands[r] > 0).sum())
        alone = score_pairs(model, ds, PairSet(np.repeat(users[r], n), np.repeat(ends[r], n),
                                                         cands[r, :n], np.zeros(n, np.float32)))
        order = np.argsort(-alone, kind="stable")
        assert items[r, :n].tolist() == cands[r, :n][order].tolist()
        np.testing.assert_allclose(logits[r, :n], alone[order], rtol=1e-5, atol=1e-6)


def test_fuse_adds_the_per_user_standardised_retrieval_score():
    from retrieval.ranking.scoring import fuse

    logits = np.array([[0.0, 1.0, -np.inf], [2.0, 2.0, 2.0]], np.float32)
    scores = np.array([[1.0, 3.0, 99.0], [5.0, 5.0, 5.0]], np.float32)
    # row 0: mean 2 and std 1 over its two candidates -> z = (-1, 1); row 1: no spread -> z = 0
    np.testing.assert_array_equal(fuse(logits, scores, 0.5), [[-0.5, 1.5, -np.inf], [2, 2, 2]])
    assert fuse(logits, scores, 0.0) is logits and fuse(logits, None, 1.0) is logits
    with pytest.raises(ValueError, match="must align"):
        fuse(logits, scores[:, :2], 1.0)


def test_rerank_with_a_retrieval_weight_follows_the_fused_order():
    ds = hand_dataset([[1, 2], [3]], n_items=8)
    model = CandidateScorer(RankerConfig(n_items=8, dim=2, max_len=5, hidden=(2,)))
    hist = Histories.of(ds, np.array([0, 1]), np.array([2, 1]))
    cands = np.array([[3, 4, 5, 0], [6, 7, 8, 5]])  # logit = the candidate's index
    scores = np.array([[30.0, 20.0, 10.0, -np.inf], [1.0, 2.0, 3.0, 4.0]], np.float32)
    ranker_order = [[5, 4, 3, 0], [8, 7, 6, 5]]
    order, _ = rerank(model, ds, hist, cands, scores)  # weight 0: the ranker alone
    assert np.take_along_axis(cands, order, 1).tolist() == ranker_order
    model.config.retrieval_weight = 10.0  # now the retrieval order dominates
    order, fused = rerank(model, ds, hist, cands, scores)
    assert np.take_along_axis(cands, order, 1).tolist() == [[3, 4, 5, 0], [5, 8, 7, 6]]
    z = np.array([1.0, 0.0, -1.0]) * np.sqrt(1.5)  # (30, 20, 10) standardised: mean 20, std sqrt(200 / 3)
    np.testing.assert_allclose(fused[0, :3], np.array([3, 4, 5]) + 10 * z, rtol=1e-6)
    assert np.isneginf(fused[0, 3])
    order, _ = rerank(model, ds, hist, cands)  # without retrieval scores: the ranker's own order
    assert np.take_along_axis(cands, order, 1).tolist() == ranker_order


@pytest.mark.parametrize("truth,weight", [(1, 8.0), (20, 0.0)])
def test_choose_retrieval_weight_picks_the_best_validation_order(truth, weight):
    """Ranker: logit = item index (20 first); retrieval: item 1 first. The weight flips the order
    once w > std of the standardised ramp (5.77): of the grid only 8 does."""
    ds = hand_dataset([[21, 22], [23]], n_items=30)
    model = CandidateScorer(RankerConfig(n_items=30, dim=2, max_len=5, hidden=(2,)))
    hist = Histories.of(ds, np.array([0, 1]), np.array([2, 1]))
    cands = np.tile(np.arange(1, 21), (2, 1))
    scores = np.tile(np.arange(20, 0, -1).astype(np.float32), (2, 1))
    rc = RetrievalCandidates(20, {}, hist, cands, scores, [np.array([truth]), np.array([truth])])
    out = choose_retrieval_weight(model, ds, rc)
    assert out["weight"] == weight == model.config.retrieval_weight  # ties go to the smaller weight
    assert out["val_ndcg@20_by_weight"][str(weight)] == pytest.approx(1.0)
    assert out["val_ndcg@20_by_weight"]["0.0"] == pytest.approx(1.0 if truth == 20 else 1 / np.log2(21))
    assert out["val_retrieval_ndcg@20"] == pytest.approx(1.0 if truth == 1 else 1 / np.log2(21))


def test_request_histories_score_like_stored_ones_sessions_included(small):
    """A request that brings a stored user's behaviours (with their times) scores exactly as the
    stored history does; DSIN's sessions are read from the request's own times."""
    from retrieval.ranking.models import build_ranker
    from retrieval.ranking.scoring import score_candidates

    ds, split = small.dataset, small.split
    torch.manual_seed(0)
    model = build_ranker("dsin", ds, split.train_users, dim=4, max_len=10).eval()
    users = split.test_users[:3]
    stored = Histories.of(ds, users, split.history_len[users])
    cands = TouchedItems(ds).sample(users, np.random.default_rng(1), (5,))
    sent = Histories.from_lists(stored.rows(), users=users, times=np.split(stored.times, stored.offsets[1:-1]))
    np.testing.assert_array_equal(score_candidates(model, ds, sent, cands), score_candidates(model, ds, stored, cands))
    # other times make other sessions: every behaviour an hour apart is a session of its own
    spread = Histories.from_lists(stored.rows(), users=users,
                                  times=[np.arange(len(r)) * 3600 for r in stored.rows()])
    assert not np.allclose(score_candidates(model, ds, spread, cands), score_candidates(model, ds, stored, cands))
    # a user the dataset does not know is scored with the 'unknown' profile
    anon = Histories.from_lists(stored.rows(), times=np.split(stored.times, stored.offsets[1:-1]))
    assert np.isfinite(score_candidates(model, ds, anon, cands)).all()


def test_training_needs_the_retrieval_stage_for_hard_negatives_and_the_two_stage_monitor(small):
    for cfg in (RankTrainConfig(model="base", hard_share=0.5), RankTrainConfig(model="base", monitor="ndcg@20")):
        with pytest.raises(DataError, match="need the retrieval stage"):
            train_ranker(small.dataset, small.split, cfg, show_progress=False)


def test_train_ranker_validates_two_stage_stops_early_and_fuses(small):
    ds, split = small.dataset, small.split
    rc = retrieval_candidates(small.model, ds, split, 30)
    assert rc.val_items.shape == (len(rc.val_hist), 30) == rc.val_scores.shape and len(rc.val_truth) == len(rc.val_hist)
    assert set(rc.hard) == set(split.train_users.tolist())
    cfg = RankTrainConfig(model="base", epochs=4, patience=1, dim=4, max_len=10, monitor="ndcg@20", hard_share=0.5,
                          lr=0.01, seed=1)
    r = train_ranker(ds, split, cfg, retrieval=rc, show_progress=False)
    h = r.history
    assert all({"val_auc", "val_gauc", "val_log_loss", "val_ndcg@20", "validation_seconds"} <= set(e) for e in h)
    ndcg = [e["val_ndcg@20"] for e in h]
    assert r.best_epoch == 1 + max(range(len(h)), key=lambda i: (ndcg[i], -i))  # the first best epoch
    if len(h) < cfg.epochs:  # patience 1: stopped at the first epoch that did not improve
        assert ndcg[-1] <= max(ndcg[:-1]) and all(a < b for a, b in zip(ndcg[:-1], ndcg[1:-1]))
    assert r.best == {k: v for k, v in h[r.best_epoch - 1].items() if k.startswith("val_")}
    # the weights kept are the best epoch's, and the fusion weight is the best of the grid on validation
    by = r.fusion["val_ndcg@20_by_weight"]
    assert list(by) == [str(w) for w in FUSION_WEIGHTS]
    assert by["0.0"] == pytest.approx(r.best["val_ndcg@20"])
    assert r.model.config.retrieval_weight == r.fusion["weight"] and by[str(r.fusion["weight"])] == max(by.values())
    assert pair_metrics(r.model, ds, protocol_pairs(ds, split, "validation"))["auc"] == pytest.approx(r.best_auc)


# ------------------------------------------------------------------ CLI end to end


def train_ranker_cli(invoke, bundle: Path, out: Path, *args: str) -> Path:
    result = invoke("train-ranker", "--bundle", bundle, "--out", out, *args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def ranker_din(invoke, bundle_k4, tmp_path_factory) -> Path:
    return train_ranker_cli(invoke, bundle_k4, tmp_path_factory.mktemp("rankers") / "din", *TINY_RANKER)


def check_ranker_bundle(path: Path, retrieval: Path, model: str) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    retrieval_manifest = json.loads((retrieval / "manifest.json").read_text())
    assert manifest["kind"] == "ranker-bundle" and manifest["model"] == model
    assert manifest["data_fingerprint"] == retrieval_manifest["data_fingerprint"]
    assert manifest["retrieval_bundle_fingerprint"] == retrieval_manifest["bundle_fingerprint"]
    assert manifest["split_seed"] == 2026
    assert [h["epoch"] for h in manifest["history"]] == [1]
    assert 0 <= manifest["history"][0]["val_auc"] <= 1
    assert manifest["best_val_auc"] == manifest["history"][0]["val_auc"]
    return manifest


def test_train_ranker_writes_a_bundle_tied_to_the_retrieval_bundle(ranker_din, bundle_k4, small):
    manifest = check_ranker_bundle(ranker_din, bundle_k4, "din")
    config = json.loads((ranker_din / "config.json").read_text())
    assert config["name"] == "din" and config["model"]["dim"] == 8
    assert config["train"]["epochs"] == 1 and config["train"]["negative_source"] == "uniform"
    # the saved weights reproduce the validation AUC recorded at training time
    rb = load_ranker(ranker_din, small)
    val = pair_metrics(rb.model, small.dataset,
                       protocol_pairs(small.dataset, small.split, "validation"))
    assert val["auc"] == pytest.approx(manifest["history"][0]["val_auc"], abs=1e-6)


def query_json(invoke, bundle: Path, index: Path, *args: str | Path):
    result = invoke("query", "--bundle", bundle, "--index", index, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_query_rank_reorders_the_top_m_retrieval_candidates(invoke, bundle_k4, index_k4, ranker_din, small):
    ds = small.dataset
    retrieved = query_json(invoke, bundle_k4, index_k4, "--user", USER, "-n", "30")["items"]
    ranked = query_json(invoke, bundle_k4, index_k4, "--user", USER, "-n", "30", "--rank", ranker_din,
                        "--candidates", "30")["items"]
    assert sorted(r["item"] for r in ranked) == sorted(r["item"] for r in retrieved)  # the same 30
    assert [r["rank"] for r in ranked] == list(range(1, 31))
    score_of = {r["item"]: r["score"] for r in retrieved}
    assert all(r["score"] == score_of[r["item"]] for r in ranked)  # retrieval scores travel along
    rank_scores = [r["rank_score"] for r in ranked]
    assert all(a >= b for a, b in zip(rank_scores, rank_scores[1:])), rank_scores
    assert [r["item"] for r in ranked] != [r["item"] for r in retrieved]  # a ranker of its own
    u = ds.user_index(USER)
    assert not {r["item"] for r in ranked} & set(ds.item_ids[ds.sequence(u)].tolist())
    # rank_score is the ranker's logit of that item for that user's whole history
    rb = load_ranker(ranker_din, small)
    idx = np.array([np.flatnonzero(ds.item_ids == r["item"])[0] for r in ranked])
    want = score_pairs(rb.model, ds, PairSet(np.full(30, u), np.full(30, ds.lengths()[u]), idx, np.zeros(30, np.float32)))
    np.testing.assert_allclose(rank_scores, want, atol=2e-6)

    top5 = query_json(invoke, bundle_k4, index_k4, "--user", USER, "-n", "5", "--rank", ranker_din,
                      "--candidates", "30")["items"]
    assert top5 == ranked[:5]


def test_query_rank_table_and_users_file(invoke, bundle_k4, index_k4, ranker_din, tmp_path):
    result = invoke("query", "--bundle", bundle_k4, "--index", index_k4, "--user", USER, "-n", "6",
                    "--rank", ranker_din, "--candidates", "40")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["rank", "item", "score", "rank_score", "interest", "title"]
    rows = [line.split() for line in lines[2:]]
    alone = query_json(invoke, bundle_k4, index_k4, "--user", USER, "-n", "6", "--rank", ranker_din,
                       "--candidates", "40")["items"]
    assert [r[1] for r in rows] == [r["item"] for r in alone]
    assert [float(r[3]) for r in rows] == pytest.approx([r["rank_score"] for r in alone], abs=1e-4)

    users = tmp_path / "users.txt"
    users.write_text(f"u00100\n{USER}\n")
    both = query_json(invoke, bundle_k4, index_k4, "--users-file", users, "-n", "6", "--rank", ranker_din,
                      "--candidates", "40")
    assert [r["user"] for r in both] == ["u00100", USER]
    # scoring users together changes nothing (scores up to float rounding of batched matmuls)
    assert [(r["item"], r["interest"]) for r in both[1]["items"]] == [(r["item"], r["interest"]) for r in alone]
    for key in ("score", "rank_score"):
        assert [r[key] for r in both[1]["items"]] == pytest.approx([r[key] for r in alone], abs=1e-4)


def test_evaluate_ranker_report(invoke, bundle_k4, ranker_din, tmp_path):
    out = tmp_path / "report.json"
    result = invoke("evaluate", "--bundle", bundle_k4, "--ranker", ranker_din, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    r = report["ranker"]
    assert r["model"] == "din" and r["M"] == 200 and r["N"] == [20, 50]
    assert r["users"] == report["users"] and r["part"] == "test"
    assert 0 <= r["standalone"]["auc"] <= 1 and 0 <= r["standalone"]["gauc"] <= 1 and r["standalone"]["log_loss"] > 0
    for stage in ("retrieval_only", "two_stage", "two_stage_ranker_only"):
        assert list(r[stage]) == METRICS
        assert all(0 <= v <= 1 for v in r[stage].values())
    assert r["retrieval_weight"] == 0.0 and r["two_stage"] == r["two_stage_ranker_only"]  # trained --no-fuse
    # retrieval-only is the retrieval report's own best-merge figure on the same users
    assert r["retrieval_only"] == pytest.approx({m: report["models"]["mind"][m] for m in METRICS})
    assert r["candidates_per_s"] > 0
    assert f"ranker din: AUC {r['standalone']['auc']:.4f}  GAUC {r['standalone']['gauc']:.4f}" in result.stdout
    assert any(line.split()[0] == "two_stage" for line in result.stdout.splitlines() if line.strip())


def ndcg(ranked: np.ndarray, truth: np.ndarray, n: int) -> float:
    """The protocol's NDCG@n, written out: binary gains at 1-based ranks over the ideal."""
    dcg = sum(1 / np.log2(rank + 1) for rank, i in enumerate(ranked[:n], 1) if i in set(truth.tolist()))
    return dcg / sum(1 / np.log2(rank + 1) for rank in range(1, min(len(truth), n) + 1))


def test_scoring_latency_times_one_users_candidates_per_request(small, ranker_din, monkeypatch):
    import retrieval.ranking.evaluate as ev

    ds, split = small.dataset, small.split
    rb = load_ranker(ranker_din, small)
    users = split.test_users[:3]
    hist = Histories.of(ds, users, split.history_len[users])
    cands = TouchedItems(ds).sample(users, np.random.default_rng(0), (6,))
    seen = []
    real = ev.rerank

    def spy(model, ds_, h, c, s=None):
        seen.append((h.users.tolist(), c.tolist(), s))
        return real(model, ds_, h, c, s)

    monkeypatch.setattr(ev, "rerank", spy)
    out = ev.scoring_latency(rb.model, ds, hist, cands, None, requests=7, warmup=2)
    assert out["requests"] == 7 and out["M"] == 6 and 0 < out["p50_ms"] <= out["p99_ms"]
    assert len(seen) == 9  # warm-up calls are made but not timed
    assert [u for u, _, _ in seen] == [[int(users[i % 3])] for i in range(9)]  # one user a request, cycling
    assert all(c == [cands[i % 3].tolist()] for i, (_, c, _) in enumerate(seen))


def test_two_stage_with_m_equal_n_only_reorders(small, ranker_din):
    from retrieval.evaluate import exact_index, held_out_users
    from retrieval.recommend import recommend
    from retrieval.samples import Histories

    ds, split = small.dataset, small.split
    rb = load_ranker(ranker_din, small)
    index = exact_index(small.model)
    r = evaluate_ranker(rb.model, ds, split, small.model, index, m=20, ns=(20,))
    # reranking 20 candidates cannot change which of them are in the top 20 ...
    assert r["two_stage"]["recall@20"] == pytest.approx(r["retrieval_only"]["recall@20"])
    assert r["two_stage"]["hit_rate@20"] == pytest.approx(r["retrieval_only"]["hit_rate@20"])
    # ... only their order, which NDCG sees: both figures by hand from the two orders
    users, ends, truth = held_out_users(ds, split, "test")
    cands = recommend(small.model, ds, index, Histories.of(ds, users, ends), 20).items
    order, _ = rerank(rb.model, ds, Histories.of(ds, users, ends), cands)
    reranked = np.take_along_axis(cands, order, 1)
    assert r["retrieval_only"]["ndcg@20"] == pytest.approx(np.mean([ndcg(c, t, 20) for c, t in zip(cands, truth)]))
    assert r["two_stage"]["ndcg@20"] == pytest.approx(np.mean([ndcg(c, t, 20) for c, t in zip(reranked, truth)]))
    assert r["two_stage"]["ndcg@20"] != pytest.approx(r["retrieval_only"]["ndcg@20"])


@pytest.mark.parametrize("model,cls", [("base", EmbeddingMLP), ("dmin", DMIN), ("dien", DIEN), ("dsin", DSIN)])
def test_train_ranker_each_model(invoke, bundle_k4, small, tmp_path, model, cls):
    out = train_ranker_cli(invoke, bundle_k4, tmp_path / model, "--model", model, *FAST_RANKER)
    manifest = check_ranker_bundle(out, bundle_k4, model)
    rb = load_ranker(out, small)
    assert type(rb.model) is cls and rb.model.config.max_len == 10 and rb.name == model
    val = pair_metrics(rb.model, small.dataset,
                       protocol_pairs(small.dataset, small.split, "validation"))
    assert val["auc"] == pytest.approx(manifest["history"][0]["val_auc"], abs=1e-6)


def test_train_ranker_with_retrieval_negatives(invoke, bundle_k4, tmp_path):
    out = train_ranker_cli(invoke, bundle_k4, tmp_path / "hard", "--model", "base", "--negative-source", "retrieval",
                           "--candidates", "30", *FAST_RANKER)
    check_ranker_bundle(out, bundle_k4, "base")
    train = json.loads((out / "config.json").read_text())["train"]
    assert train["negative_source"] == "retrieval" and train["retrieval_m"] == 30


def test_train_ranker_mixed_negatives_two_stage_monitor_and_fusion(invoke, bundle_k4, small, tmp_path):
    out = tmp_path / "mix"
    result = invoke("train-ranker", "--bundle", bundle_k4, "--out", out, "--model", "base", "--epochs", "2",
                    "--dim", "8", "--max-len", "10", "--hard-share", "0.5", "--monitor", "ndcg@20", "--candidates", "40")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert config["train"]["hard_share"] == 0.5 and config["train"]["monitor"] == "ndcg@20"
    assert all("val_ndcg@20" in h and "val_log_loss" in h for h in manifest["history"])
    weight = manifest["fusion"]["weight"]
    assert config["model"]["retrieval_weight"] == weight
    assert manifest["fusion"]["val_ndcg@20_by_weight"][str(weight)] == max(manifest["fusion"]["val_ndcg@20_by_weight"].values())
    assert load_ranker(out, small).model.config.retrieval_weight == weight
    assert "ndcg@20" in result.stdout and f"retrieval weight {weight:g}" in result.stdout


def test_query_rank_serves_the_fused_order(invoke, bundle_k4, index_k4, ranker_din, small, tmp_path):
    """A ranker whose retrieval weight is 2: query --rank orders by logit + 2 × standardised retrieval score."""
    from retrieval.ranking.scoring import fuse

    fused = tmp_path / "fused"
    shutil.copytree(ranker_din, fused)
    rewrite_config(fused, lambda c: c["model"].update(retrieval_weight=2.0))  # resealed: the edit is this test's
    ds = small.dataset
    retrieved = query_json(invoke, bundle_k4, index_k4, "--user", USER, "-n", "30")["items"]
    ranked = query_json(invoke, bundle_k4, index_k4, "--user", USER, "-n", "30", "--rank", fused,
                        "--candidates", "30")["items"]
    u = ds.user_index(USER)
    idx = np.array([np.flatnonzero(ds.item_ids == r["item"])[0] for r in retrieved])
    logits = score_pairs(load_ranker(ranker_din, small).model, ds,
                         PairSet(np.full(30, u), np.full(30, ds.lengths()[u]), idx, np.zeros(30, np.float32)))
    want = fuse(logits[None], np.array([[r["score"] for r in retrieved]], np.float32), 2.0)[0]
    order = np.argsort(-want, kind="stable")
    assert [r["item"] for r in ranked] == [retrieved[i]["item"] for i in order]
    np.testing.assert_allclose([r["rank_score"] for r in ranked], want[order], atol=1e-4)


# ---------------------------------------------------------------------------- errors


def test_train_ranker_rejects_an_unknown_model_or_negative_source(invoke, bundle_k4, tmp_path):
    result = invoke("train-ranker", "--bundle", bundle_k4, "--out", tmp_path / "r", "--model", "xgboost")
    assert_usage_error(result, "--model", "'xgboost' is not one of 'base', 'din', 'dmin', 'dien', 'dsin'")
    result = invoke("train-ranker", "--bundle", bundle_k4, "--out", tmp_path / "r", "--negative-source", "popular")
    assert_usage_error(result, "--negative-source", "'popular' is not one of 'uniform', 'retrieval'")
    assert not (tmp_path / "r").exists()


def test_ranker_beside_a_retrieval_bundle_of_other_data(invoke, ranker_din, tiny_k1_twice, tmp_path, monkeypatch):
    foreign = tiny_k1_twice[0]
    message = f"{ranker_din}: the ranker was trained on other data than the retrieval bundle {foreign}"
    index = tmp_path / "tiny_index"
    assert invoke("build-index", "--bundle", foreign, "--out", index).exit_code == 0
    user = str(load_bundle(foreign).dataset.user_ids[0])
    result = invoke("query", "--bundle", foreign, "--index", index, "--user", user, "--rank", ranker_din)
    assert_clean_error(result, message)

    import retrieval.evaluate

    def no_evaluation(*args, **kwargs):  # a bad --ranker must fail before the retrieval evaluation
        raise AssertionError("evaluated before checking the ranker")

    monkeypatch.setattr(retrieval.evaluate, "evaluate_bundles", no_evaluation)
    result = invoke("evaluate", "--bundle", foreign, "--ranker", ranker_din, "--out", tmp_path / "report.json")
    assert_clean_error(result, message)
    assert not (tmp_path / "report.json").exists()


def test_ranker_beside_a_bundle_with_another_split_seed(invoke, small_data, ranker_din, tmp_path):
    other = tmp_path / "seed2027"
    result = invoke("train", "--interactions", small_data["interactions"], "--items", small_data["items"],
                    "--users", small_data["users"], "--out", other, "--epochs", "1", "--dim", "8",
                    "--negatives", "16", "--split-seed", "2027")
    assert result.exit_code == 0, result.output
    result = invoke("evaluate", "--bundle", other, "--ranker", ranker_din)
    assert_clean_error(result, f"{ranker_din}: the ranker uses split seed 2026, the retrieval bundle uses 2027")


@pytest.mark.parametrize("target", ["model.pt", "config.json"])
def test_tampered_ranker_bundle(invoke, bundle_k4, index_k4, ranker_din, tmp_path, target):
    bad = tmp_path / "tampered"
    shutil.copytree(ranker_din, bad)
    data = bytearray((bad / target).read_bytes())
    data[-2] ^= 0x01
    (bad / target).write_bytes(bytes(data))
    message = f"{bad}: ranker contents do not match its manifest fingerprint (modified or corrupt)"
    result = invoke("query", "--bundle", bundle_k4, "--index", index_k4, "--user", USER, "--rank", bad)
    assert_clean_error(result, message)
    assert_clean_error(invoke("evaluate", "--bundle", bundle_k4, "--ranker", bad), message)


def test_ranker_bundle_that_is_not_one(invoke, bundle_k4, index_k4, tmp_path):
    result = invoke("query", "--bundle", bundle_k4, "--index", index_k4, "--user", USER, "--rank", bundle_k4)
    assert_clean_error(result, f"{bundle_k4}: expected a ranker-bundle, found a mind-bundle")
    missing = tmp_path / "nothing"
    result = invoke("evaluate", "--bundle", bundle_k4, "--ranker", missing)
    assert_clean_error(result, f"{missing}: not a ranker-bundle (no manifest.json)")


def test_ranker_bundle_with_a_consistent_but_wrong_config(invoke, bundle_k4, index_k4, ranker_din, tmp_path):
    """Edited and re-fingerprinted (so not caught as tampering): the weights no longer fit."""
    bad = tmp_path / "resized"
    shutil.copytree(ranker_din, bad)
    rewrite_config(bad, lambda c: c["model"].update(dim=6))
    result = invoke("query", "--bundle", bundle_k4, "--index", index_k4, "--user", USER, "--rank", bad)
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: unreadable ranker bundle (")
    assert len(result.stderr.strip().splitlines()) == 1


def test_experiment_rankers_report_with_variants(invoke, tmp_path):
    from data.synthetic import SyntheticConfig, generate

    data = generate(tmp_path / "data", SyntheticConfig(n_users=60, n_items=150, n_topics=6, n_categories=3, max_len=40, mean_len=30.0, seed=5))
    out = tmp_path / "rankers.json"
    result = invoke("experiment-rankers", "--interactions", data["interactions"], "--items", data["items"],
                    "--users", data["users"], "--seeds", "2026,2027", "--rankers",
                    "base,dien:evolution=agru;aux_weight=0,base:hard_share=0.5;fuse=false",
                    "--epochs", "2", "--patience", "1", "--candidates", "60", "--jobs", "2", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    labels = ["base", "dien:evolution=agru;aux_weight=0", "base:hard_share=0.5;fuse=false"]
    assert list(report["rankers"]) == labels
    assert [s["split_seed"] for s in report["per_seed"]] == [2026, 2027] and report["complete"]
    assert report["jobs"] == 2 and "one torch thread per job" in report["timing_note"]
    assert report["rank_train_config"]["patience"] == 1 and report["rank_train_config"]["epochs"] == 2
    assert report["sessions"]["users"] == 60 and 0 <= report["sessions"]["users_with_one_session"] <= 1
    assert set(report["retrieval"]) >= {"best_epoch", "val_recall@50"}
    from retrieval.device import cpu_description  # where it ran: a seed's figures reproduce on one kind of CPU
    assert report["trained_on"] == {"device": "cpu", "precision": "fp32", "compile": False, "processes": 1,
                                    **cpu_description()} and report["trained_on"]["cpu"]
    for label, row in report["rankers"].items():
        assert 0 <= row["auc"]["mean"] <= 1 and row["auc"]["std"] >= 0 and row["log_loss"]["mean"] > 0
        assert row["candidates_per_s"]["mean"] > 0 and 0 < row["latency_p50_ms"]["mean"] <= row["latency_p99_ms"]["mean"]
        runs = [s["rankers"][label] for s in report["per_seed"]]
        assert row["best_epochs"] == [r["best_epoch"] for r in runs] and all(1 <= e <= 2 for e in row["best_epochs"])
        assert row["seeds_above_retrieval_ndcg@20"] == sum(r["two_stage_ndcg@20"] > r["retrieval_ndcg@20"] for r in runs)
        for r in runs:
            assert r["epochs_run"] <= 2 and r["val_auc"] > 0 and "val_ndcg@20" in r
    no_fusion = [s["rankers"][labels[2]] for s in report["per_seed"]]
    assert all(r["retrieval_weight"] == 0 and r["two_stage_ndcg@20"] == r["two_stage_ranker_only_ndcg@20"]
               for r in no_fusion)
    assert "best epochs" in result.stdout and "p99 ms" in result.stdout
    # the README tables beside the JSON: one row per ranker, each seed's NDCG@20 against the retrieval order
    md = out.with_suffix(".md").read_text()
    for label in labels:
        row = report["rankers"][label]
        assert (f"| {label} | {row['auc']['mean']:.4f} ± {row['auc']['std']:.4f} |" in md
                and f"| {row['seeds_above_retrieval_ndcg@20']} of 2 |" in md)
        per_seed = [f"{s['rankers'][label]['two_stage_ndcg@20']:.4f} / {s['rankers'][label]['retrieval_ndcg@20']:.4f}"
                    for s in report["per_seed"]]
        assert f"| {label} | {' | '.join(per_seed)} |" in md
    assert "| ranker | 2026 | 2027 |" in md and "Sessions (gap 1800 s)" in md
    # AUC / GAUC apart for users with one session and with several in the history the ranker reads
    for label, row in report["rankers"].items():
        runs = [s["rankers"][label] for s in report["per_seed"]]
        assert all(0 <= r["several_sessions_pair_share"] <= 1 for r in runs)
        for key in ("auc_one_session", "gauc_one_session", "auc_several_sessions", "gauc_several_sessions"):
            seen = [r[key] for r in runs if r[key] is not None]
            assert (key in row) == (len(seen) == len(runs))  # a figure is aggregated only where every seed has it
            assert all(0 <= v <= 1 for v in seen)
    assert "| ranker | one session: AUC | GAUC | several sessions: AUC | GAUC |" in md


def test_variant_settings_split_into_training_and_model_fields():
    from retrieval.ranking.experiment import parse_variant, variant_config

    label, name, settings = parse_variant("dien:evolution=agru;negative_source=retrieval;lr=0.002")
    cfg = variant_config(RankTrainConfig(epochs=3), name, settings)
    assert (cfg.model, cfg.negative_source, cfg.lr, cfg.epochs) == ("dien", "retrieval", 0.002, 3)
    assert cfg.settings == {"evolution": "agru"}
    _, _, settings = parse_variant("din:att_hidden=80/40;fuse=false;hard_share=0.25;session_pool=target")
    assert settings == {"att_hidden": (80, 40), "fuse": False, "hard_share": 0.25, "session_pool": "target"}
    with pytest.raises(ValueError, match="bad ranker setting negative_source='hard' in 'din:negative_source=hard'"):
        parse_variant("din:negative_source=hard")
    with pytest.raises(ValueError, match="bad ranker setting monitor='loss'"):
        parse_variant("din:monitor=loss")


def test_one_width_is_a_one_layer_mlp(small):
    from retrieval.ranking.models import ranker_config

    assert ranker_config("din", small.dataset, att_hidden=36).att_hidden == (36,)
    assert ranker_config("din", small.dataset, att_hidden=(80, 40)).att_hidden == (80, 40)


def test_experiment_rankers_rejects_unknown_variants(invoke, tmp_path, small_data):
    result = invoke("experiment-rankers", "--interactions", tmp_path / "x.csv", "--rankers", "din,wide",
                    "--out", tmp_path / "r.json")
    assert_clean_error(result, "unknown ranker 'wide' in 'wide'; use one of base, din, dmin, dien, dsin")
    # a bad value fails before any training
    for variant, message in [("din:hard_share=2", "hard_share=2 must lie in [0, 1]"),
                             ("dsin:heads_x=2", "dsin has no setting 'heads_x'")]:
        result = invoke("experiment-rankers", "--interactions", small_data["interactions"], "--rankers", variant,
                        "--out", tmp_path / "r.json")
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
        assert not (tmp_path / "r.json").exists()


def test_ranker_experiment_reports_each_ranker_as_it_finishes(small):
    """In one process the report is handed over after every ranker: a stopped run keeps the
    rankers it finished, marked incomplete, each row naming its seeds."""
    from retrieval.ranking.experiment import format_ranker_markdown, format_ranker_table, run_ranker_experiment
    from retrieval.train import TrainConfig

    from retrieval.data import DataSpec

    partials = []
    report = run_ranker_experiment(small.dataset, DataSpec(Path("log.csv")), [2026], ["base", "base:fuse=false"], {},
                                   TrainConfig(epochs=1, batch_size=64), RankTrainConfig(epochs=1, dim=8), m=60,
                                   on_seed=partials.append)
    assert [list(p["rankers"]) for p in partials] == [["base"], ["base", "base:fuse=false"],
                                                      ["base", "base:fuse=false"]]
    assert [p["complete"] for p in partials] == [False, True, True] and report["complete"]  # the last ranker completes it
    first = partials[0]
    assert first["rankers"]["base"]["seeds"] == [2026] and list(first["per_seed"][0]["rankers"]) == ["base"]
    assert first["rankers"]["base"]["auc"] == report["rankers"]["base"]["auc"]
    md = format_ranker_markdown(first)
    assert "| base |" in md and "base:fuse=false" not in md and "(incomplete:" in md and "base" in format_ranker_table(first)


def test_train_ranker_resume_without_a_checkpoint_starts_fresh_and_leaves_none(invoke, bundle_k4, tmp_path):
    out = train_ranker_cli(invoke, bundle_k4, tmp_path / "r", *FAST_RANKER, "--resume")
    assert (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # the epoch checkpoint r.ckpt is gone with the run
