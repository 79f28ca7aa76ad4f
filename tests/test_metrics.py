"""Metrics against golden values worked by hand, and against brute-force pair counts."""

import math

import numpy as np
import pytest

from retrieval.metrics import auc, gauc, log_loss, mean_metrics, topn_metrics

L3, L4, L5 = math.log2(3), math.log2(4), math.log2(5)


def test_topn_golden_values():
    ranked = np.array(
        [
            [3, 1, 7, -1],  # user 0, G = {1, 9}
            [5, 6, 8, 2],  # user 1, G = {5, 8, 2, 11, 12}
            [4, -1, -1, -1],  # user 2, G = {9}: no hit
            [7, 3, 5, 6],  # user 3, G = {7, 7}: a set, |G| = 1
        ]
    )
    truth = [np.array([1, 9]), np.array([5, 8, 2, 11, 12]), np.array([9]), np.array([7, 7])]
    m = topn_metrics(ranked, truth, ns=(2, 4))
    assert list(m) == ["recall@2", "hit_rate@2", "ndcg@2", "recall@4", "hit_rate@4", "ndcg@4"]
    assert all(v.shape == (4,) and v.dtype == np.float64 for v in m.values())

    # user 0, N=2: R = {3, 1}, one hit at rank 2 -> recall 1/2, DCG = 1/log2 3,
    #   IDCG over min(2, 2) = 2 hits = 1 + 1/log2 3.
    # user 0, N=4: R = {3, 1, 7} (one pad) -> the same hit, the same IDCG.
    # user 1, N=2: hit at rank 1 -> recall 1/5, NDCG = 1 / (1 + 1/log2 3).
    # user 1, N=4: hits at ranks 1, 3, 4 -> recall 3/5, DCG = 1 + 1/log2 4 + 1/log2 5,
    #   IDCG over min(5, 4) = 4 hits = 1 + 1/log2 3 + 1/log2 4 + 1/log2 5.
    # user 3: hit at rank 1 and |G| = 1 -> recall 1, NDCG 1.
    np.testing.assert_allclose(m["recall@2"], [1 / 2, 1 / 5, 0, 1])
    np.testing.assert_allclose(m["hit_rate@2"], [1, 1, 0, 1])
    np.testing.assert_allclose(m["ndcg@2"], [(1 / L3) / (1 + 1 / L3), 1 / (1 + 1 / L3), 0, 1])
    np.testing.assert_allclose(m["recall@4"], [1 / 2, 3 / 5, 0, 1])
    np.testing.assert_allclose(m["hit_rate@4"], [1, 1, 0, 1])
    np.testing.assert_allclose(
        m["ndcg@4"],
        [(1 / L3) / (1 + 1 / L3), (1 + 1 / L4 + 1 / L5) / (1 + 1 / L3 + 1 / L4 + 1 / L5), 0, 1],
    )
    assert m["ndcg@2"][0] == pytest.approx(0.386853, abs=1e-6)


def test_topn_matches_per_user_loop():
    rng = np.random.default_rng(0)
    U, n_max, n_items = 50, 30, 80
    ranked = np.stack([rng.permutation(n_items)[:n_max] for _ in range(U)])
    ranked[rng.random((U, n_max)) < 0.1] = -1  # pads anywhere, even between items
    truth = [rng.choice(n_items, size=rng.integers(1, 20), replace=False) for _ in range(U)]
    m = topn_metrics(ranked, truth, ns=(5, 30))
    for u in range(U):
        g = set(truth[u].tolist())
        for n in (5, 30):
            rel = [int(i in g) for i in ranked[u, :n]]
            dcg = sum(r / math.log2(i + 2) for i, r in enumerate(rel))
            idcg = sum(1 / math.log2(i + 2) for i in range(min(len(g), n)))
            assert m[f"recall@{n}"][u] == pytest.approx(sum(rel) / len(g))
            assert m[f"hit_rate@{n}"][u] == float(sum(rel) > 0)
            assert m[f"ndcg@{n}"][u] == pytest.approx(dcg / idcg)


def test_topn_rejects_bad_input():
    ranked = np.array([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="user 1 has an empty ground truth"):
        topn_metrics(ranked, [np.array([1]), np.array([], dtype=np.int64)], ns=(2,))
    with pytest.raises(ValueError, match="truth has 1 users, ranked has 2"):
        topn_metrics(ranked, [np.array([1])], ns=(2,))
    with pytest.raises(ValueError, match="each N must be in 1..2"):
        topn_metrics(ranked, [np.array([1]), np.array([3])], ns=(20,))
    with pytest.raises(ValueError, match="user 0 repeats item 1"):
        topn_metrics(np.array([[1, 1], [3, 4]]), [np.array([1]), np.array([3])], ns=(2,))
    with pytest.raises(ValueError, match="2-D integer"):
        topn_metrics(ranked.astype(float), [np.array([1]), np.array([3])], ns=(2,))


def test_mean_metrics():
    per_user = {"recall@20": np.array([0.5, 0.0, 1.0]), "ndcg@20": np.array([0.25, 0.75])}
    means = mean_metrics(per_user)
    assert means == {"recall@20": pytest.approx(0.5), "ndcg@20": pytest.approx(0.5)}
    assert all(type(v) is float for v in means.values())
    with pytest.raises(ValueError, match="recall@20"):
        mean_metrics({"recall@20": np.array([])})


def test_auc_hand_counted_with_ties():
    # positives 0.9, 0.5, 0.1 against negatives 0.9, 0.2 -> 6 pairs:
    # 0.9~0.9 tie = 1/2, 0.9>0.2 = 1, 0.5<0.9 = 0, 0.5>0.2 = 1, 0.1<0.9 = 0, 0.1<0.2 = 0
    # AUC = 2.5 / 6
    labels = np.array([1, 0, 1, 0, 1])
    scores = np.array([0.9, 0.9, 0.5, 0.2, 0.1])
    assert auc(labels, scores) == pytest.approx(2.5 / 6)
    assert auc(np.array([0, 1]), np.array([0.3, 0.3])) == pytest.approx(0.5)
    assert auc(np.array([True, False]), np.array([2.0, 1.0])) == 1.0


def test_auc_matches_pair_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=300)
    scores = rng.integers(0, 10, size=300).astype(float)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert auc(labels, scores) == pytest.approx(expected)


def test_auc_rejects_one_class_and_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        auc(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="0/1"):
        auc(np.array([1, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        auc(np.array([1, 0]), np.array([np.nan, 0.2]))
    with pytest.raises(ValueError, match="one length"):
        auc(np.array([1, 0]), np.array([0.1, 0.2, 0.3]))


def test_gauc_hand_counted():
    # user a: labels 1 0 0, scores .8 .3 .9 -> .8>.3 = 1, .8<.9 = 0 -> AUC 1/2, 3 impressions
    # user b: labels 1 1 0 0, scores .7 .2 .5 .2 -> .7>.5, .7>.2, .2<.5, .2~.2 = 1+1+0+1/2
    #         -> AUC 2.5/4, 4 impressions
    # user c: labels 1 1 -> one class, skipped
    # GAUC = (3 * 1/2 + 4 * 5/8) / (3 + 4) = 4/7
    groups = np.array(["b", "a", "c", "b", "a", "b", "c", "a", "b"])
    labels = np.array([1, 1, 1, 1, 0, 0, 1, 0, 0])
    scores = np.array([0.7, 0.8, 0.4, 0.2, 0.3, 0.5, 0.1, 0.9, 0.2])
    assert gauc(groups, labels, scores) == pytest.approx(4 / 7)


def test_gauc_matches_weighted_loop():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, size=2000)
    labels = rng.integers(0, 2, size=2000)
    labels[groups == 7] = 1  # a single-class group
    scores = rng.integers(0, 6, size=2000) / 5  # ties within groups
    num = den = 0.0
    for g in np.unique(groups):
        sel = groups == g
        if labels[sel].min() == labels[sel].max():
            continue
        num += sel.sum() * auc(labels[sel], scores[sel])
        den += sel.sum()
    assert gauc(groups, labels, scores) == pytest.approx(num / den)


def test_gauc_rejects_no_usable_group():
    with pytest.raises(ValueError, match="at least one group with both classes"):
        gauc(np.array([0, 0, 1]), np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="groups has shape"):
        gauc(np.array([0, 0]), np.array([1, 0, 0]), np.array([0.1, 0.2, 0.3]))


def test_log_loss_by_hand_and_stable_for_confident_logits():
    # labels 1, 0 with logits 0 and ln 3: -(log 0.5 + log(1 - 0.75)) / 2 = (ln 2 + ln 4) / 2
    assert log_loss(np.array([1, 0]), np.array([0.0, math.log(3)])) == pytest.approx((math.log(2) + math.log(4)) / 2)
    # a confident right answer costs ~0, a confident wrong one ~|logit|, never inf
    assert log_loss(np.array([1, 0]), np.array([800.0, -800.0])) == pytest.approx(0.0, abs=1e-300)
    assert log_loss(np.array([1]), np.array([-800.0])) == pytest.approx(800.0)
    with pytest.raises(ValueError, match="at least one label"):
        log_loss(np.zeros(0), np.zeros(0))
