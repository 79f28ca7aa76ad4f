"""The merged retriever: the item-kNN table against brute force, the fused top-n against a dense
scoring of every item, the prior coordinate, the artifact, and the weights chosen on validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from data.synthetic import SyntheticConfig, generate
from index.faiss_index import build_index, load_index, save_index
from retrieval.channels import (CHANNELS, DECAYS, ChannelWeights, build_channels, channel_files, choose_channels, fuse,
                                load_channels, paired_gain, prepare, prior_index, prior_vectors, prior_width, retrieve,
                                tune_channels)
from retrieval.data import DataSpec, held_out_users, load_dataset, split_users
from retrieval.errors import ArtifactError, RetrievalError
from retrieval.evaluate import exact_index
from retrieval.neighbours import build_neighbours, neighbour_scores, training_matrix
from retrieval.recommend import recommend
from retrieval.samples import Histories
from retrieval.train import model_config_for
from retrieval.retrievers import build_retriever


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """A small synthetic log, its split and an untrained (seeded) MIND: the merge is what is tested."""
    paths = generate(tmp_path_factory.mktemp("chan"), SyntheticConfig(n_users=120, n_items=200, n_topics=8, n_categories=4,
                                                                        min_len=5, max_len=40, mean_len=20.0, seed=5))
    ds = load_dataset(DataSpec(paths["interactions"], paths["items"], paths["users"]))
    split = split_users(ds, 2026)
    torch.manual_seed(0)
    model = build_retriever(model_config_for(ds, interests=4, dim=8, hidden=16, max_len=20),
                            {f: torch.from_numpy(m.astype(np.int64)) for f, m in ds.item_features.items()}).eval()
    return ds, split, model


def test_neighbour_table_is_the_brute_force_top_k(setup) -> None:
    ds, split, _ = setup
    x = training_matrix(ds, split).to_dense().numpy()  # (U, N+1) binary
    co = x.T @ x
    deg = np.diag(co)
    sim = co / np.sqrt(np.maximum(np.outer(deg, deg), 1))
    np.fill_diagonal(sim, 0)
    nb = build_neighbours(ds, split, k=7, block=500)  # many blocks of a few rows
    for i in (1, 5, 50, ds.n_items):
        order = np.lexsort((np.arange(len(sim)), -sim[i]))  # similarity desc, then index
        want = [j for j in order if sim[i, j] > 0][:7]
        got = nb.ids[i][nb.ids[i] > 0].tolist()
        assert got == want
        assert np.allclose(nb.sims[i][: len(want)], sim[i, want], atol=1e-6)
    assert (nb.ids[0] == 0).all() and (nb.sims[0] == 0).all()


def test_neighbour_scores_sum_the_last_items_and_drop_the_history(setup) -> None:
    ds, split, _ = setup
    nb = build_neighbours(ds, split, k=5)
    last, full = [np.array([1, 2]), np.array([3])], [np.array([1, 2, 9]), np.array([3])]
    s = neighbour_scores(nb, last, full)
    for r in range(2):
        dense = np.zeros(ds.n_items + 1)
        for h in last[r]:
            np.add.at(dense, nb.ids[h], nb.sims[h])
        dense[0] = 0
        dense[full[r]] = 0
        got = np.zeros_like(dense)
        got[s.items[s.rows == r]] = s.scores[s.rows == r]
        assert np.allclose(got, dense, atol=1e-6)
    assert np.all(np.diff(s.rows) >= 0) and (s.scores > 0).all()


def test_neighbour_scores_weight_older_behaviours_by_the_decay(setup) -> None:
    ds, split, _ = setup
    nb = build_neighbours(ds, split, k=5)
    last, full = [np.array([1, 2, 4]), np.array([3])], [np.array([1, 2, 4, 9]), np.array([3])]
    s = neighbour_scores(nb, last, full, decay=0.5)
    for r in range(2):
        dense = np.zeros(ds.n_items + 1)
        for age, h in enumerate(last[r][::-1]):  # the most recent behaviour counts fully
            np.add.at(dense, nb.ids[h], nb.sims[h] * 0.5**age)
        dense[0] = 0
        dense[full[r]] = 0
        got = np.zeros_like(dense)
        got[s.items[s.rows == r]] = s.scores[s.rows == r]
        assert np.allclose(got, dense, atol=1e-6)
    for bad in (0.0, 1.5):
        with pytest.raises(RetrievalError, match=f"^decay must be in \\(0, 1\\], got {bad}$"):
            neighbour_scores(nb, last, full, decay=bad)


def _dense_fused(p, ch, w: float, a: float, n: int, n_items: int) -> list[list[int]]:
    """Every item scored densely with the module's formula: the exact top n per user."""
    ids = np.arange(1, n_items + 1)
    v = p.embed(ids)  # (N, D)
    out = []
    for u in range(p.vectors.shape[0]):
        act = p.active[u]
        mind = (p.vectors[u][act] @ v.T).max(0)  # (N,)
        s = p.sample_scores[u] + w * ch.log_freq[ch.sample]
        fused = (mind + w * ch.log_freq[ids] - s.mean()) / (s.std() or 1.0)
        if a > 0:
            knn = np.zeros(n_items + 1)
            knn[p.knn.items[p.knn.rows == u]] = p.knn.scores[p.knn.rows == u]
            sd = knn[1:].std()
            if sd > 0:
                fused = fused + a * (knn[1:] - knn[1:].mean()) / sd
        fused[p.exclude[u]] = -np.inf  # FAISS ids = item - 1
        order = np.lexsort((ids, -fused))[:n]
        out.append(ids[order].tolist())
    return out


@pytest.mark.parametrize(("w", "a"), [(0.0, 0.0), (0.7, 0.0), (0.0, 1.5), (0.4, 0.8)])
def test_fused_top_n_is_exact(setup, w: float, a: float) -> None:
    ds, split, model = setup
    ch = build_channels(ds, split, k=10, max_len=20)
    users, ends, _ = held_out_users(ds, split, "test")
    p = prepare(model, ds, Histories.of(ds, users, ends), ch)
    rec = fuse(p, prior_index(model, ch), ch, ChannelWeights(w, a), 15)
    assert rec.items.tolist() == _dense_fused(p, ch, w, a, 15, ds.n_items)
    assert np.all(np.diff(rec.scores, axis=1) <= 1e-6)  # best first
    assert set(np.unique(rec.channel)) <= set(range(len(CHANNELS)))
    assert (rec.interest[rec.channel != 0] == -1).all() and (rec.interest[rec.channel == 0] >= 0).all()
    if a == 0:
        assert not (rec.channel == CHANNELS.index("item_knn")).any()
    if w == 0:
        assert not (rec.channel == CHANNELS.index("popularity")).any()


def test_without_weights_it_is_mind_alone(setup) -> None:
    ds, split, model = setup
    ch = build_channels(ds, split, k=10, max_len=20)
    users, ends, _ = held_out_users(ds, split, "validation")
    hist = Histories.of(ds, users, ends)
    alone = recommend(model, ds, exact_index(model), hist, 20)
    merged_index = prior_index(model, ch)
    assert merged_index.d == exact_index(model).d + 1
    off = retrieve(model, ds, merged_index, hist, 20, channels=ch)  # weights start at 0
    assert off.items.tolist() == alone.items.tolist()
    assert off.interest.tolist() == alone.interest.tolist() and (off.channel == 0).all()
    # the plain serving path on the merged retriever's index is MIND alone too (prior coordinate 0)
    assert recommend(model, ds, merged_index, hist, 20).items.tolist() == alone.items.tolist()
    assert retrieve(model, ds, exact_index(model), hist, 20).items.tolist() == alone.items.tolist()


def test_a_prior_needs_the_prior_coordinate(setup) -> None:
    ds, split, model = setup
    ch = build_channels(ds, split, k=5, max_len=20)
    users, ends, _ = held_out_users(ds, split, "validation")
    ch.weights = ChannelWeights(0.5, 0.0)
    with pytest.raises(RetrievalError, match="build the index with --channels"):
        retrieve(model, ds, exact_index(model), Histories.of(ds, users, ends), 10, channels=ch)
    with pytest.raises(RetrievalError, match="merge 'share' applies to MIND alone"):
        retrieve(model, ds, prior_index(model, ch), Histories.of(ds, users, ends), 10, merge="share", channels=ch)


def test_a_large_prior_serves_the_most_popular_items(setup) -> None:
    ds, split, model = setup
    ch = build_channels(ds, split, k=5, max_len=20)
    users, ends, _ = held_out_users(ds, split, "validation")
    p = prepare(model, ds, Histories.of(ds, users[:1], ends[:1]), ch)
    rec = fuse(p, prior_index(model, ch), ch, ChannelWeights(1e4, 0.0), 5)
    history = set(ds.sequence(users[0])[: ends[0]].tolist())
    allowed = np.array([i for i in range(1, ds.n_items + 1) if i not in history])
    # the five largest frequencies, best first (items of equal frequency are ordered by MIND's score)
    assert ch.log_freq[rec.items[0]].tolist() == sorted(ch.log_freq[allowed].tolist(), reverse=True)[:5]
    assert (rec.channel[0] == CHANNELS.index("popularity")).all()


def test_recency_weighted_frequency(setup) -> None:
    ds, split, _ = setup
    plain = build_channels(ds, split, k=5).log_freq
    assert np.allclose(np.expm1(plain), np.bincount(np.concatenate([ds.sequence(u) for u in split.train_users]),
                                                    minlength=ds.n_items + 1), atol=1e-3)
    recent = build_channels(ds, split, k=5, halflife=1.0).log_freq  # a tiny half-life: only the last instant counts
    assert (recent <= plain + 1e-6).all() and recent.sum() < plain.sum()


def test_channels_travel_with_the_index_and_are_checked(setup, tmp_path: Path) -> None:
    ds, split, model = setup
    ch = build_channels(ds, split, k=6, max_len=20, decay=0.7)
    ch.weights, ch.prior_only = ChannelWeights(0.25, 1.5), 0.5
    index = prior_index(model, ch)
    save_index(index, tmp_path / "idx", {"channels": ch.settings()}, files=channel_files(ch))
    loaded, manifest = load_index(tmp_path / "idx")
    back = load_channels(tmp_path / "idx", manifest)
    assert back is not None and back.weights == ch.weights and back.prior_only == 0.5 and back.decay == 0.7
    assert np.array_equal(back.neighbours.ids, ch.neighbours.ids) and np.array_equal(back.log_freq, ch.log_freq)
    users, ends, _ = held_out_users(ds, split, "test")
    hist = Histories.of(ds, users, ends)
    assert retrieve(model, ds, loaded, hist, 10, channels=back).items.tolist() == \
        retrieve(model, ds, index, hist, 10, channels=ch).items.tolist()
    # a plain index has no channels
    save_index(build_index(np.eye(4, dtype=np.float32)), tmp_path / "plain", {})
    assert load_channels(tmp_path / "plain", load_index(tmp_path / "plain")[1]) is None
    # the channels file is under the index's integrity check
    (tmp_path / "idx" / "channels.npz").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="corrupt index file"):
        load_index(tmp_path / "idx")
    (tmp_path / "idx" / "channels.npz").unlink()
    with pytest.raises(ArtifactError, match=r"incomplete index \(no channels.npz\)"):
        load_index(tmp_path / "idx")


def test_weights_are_chosen_on_validation_users(setup) -> None:
    ds, split, model = setup
    ch = build_channels(ds, split, k=10, max_len=20)
    tuned = tune_channels(model, ds, split, prior_index(model, ch), ch, n=20)
    _, _, truth = held_out_users(ds, split, "validation")
    assert tuned.users == len(truth) and tuned.objective == "recall@20+ndcg@20"
    best = max(t["recall@20"] + t["ndcg@20"] for t in tuned.trials)
    at = [t for t in tuned.trials if (t["prior"], t["item_knn"]) == (tuned.merged.prior, tuned.merged.item_knn)]
    assert at and at[0]["recall@20"] + at[0]["ndcg@20"] == pytest.approx(best) == pytest.approx(tuned.best)
    alone = [t for t in tuned.trials if t["item_knn"] == 0]
    assert tuned.prior_only.item_knn == 0 and max(t["recall@20"] + t["ndcg@20"] for t in alone) == pytest.approx(
        next(t["recall@20"] + t["ndcg@20"] for t in alone if t["prior"] == tuned.prior_only.prior))
    # an untrained MIND is noise: item-kNN must get weight, and the merge beats MIND alone on validation
    assert tuned.merged.item_knn > 0
    first = tuned.trials[0]
    assert (first["prior"], first["item_knn"]) == (0.0, 0.0) and tuned.best > first["recall@20"] + first["ndcg@20"]
    assert dataclasses.asdict(tuned.merged).keys() == {"prior", "item_knn"}


def test_paired_gain_golden() -> None:
    # differences 1, 0, 1: mean 2/3, std (ddof 1) sqrt(1/3), standard error sqrt(1/3) / sqrt(3) = 1/3
    gain, se = paired_gain(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 2.0]))
    assert gain == pytest.approx(2 / 3) and se == pytest.approx(1 / 3)
    assert paired_gain(np.array([0.5]), np.array([0.25])) == (0.25, 0.0)  # one user: no spread to measure


def test_choose_channels_keeps_a_setting_only_when_clearly_better(setup) -> None:
    ds, split, model = setup
    chosen = choose_channels(model, ds, split, (5, 10), max_len=20, n=20)
    tried, goal = chosen.settings, "recall@20+ndcg@20"
    sizes = [(t["knn_k"], t["halflife"], t["decay"]) for t in tried[:2]]
    assert sizes == [(5, None, 1.0), (10, None, 1.0)]  # user split: no half-life; sizes tried with a plain sum
    k = 10 if tried[1]["kept"] else 5
    assert [(t["knn_k"], t["halflife"], t["decay"]) for t in tried[2:]] == [(k, None, d) for d in DECAYS]
    # the first is kept; each later one replaces the kept one only when its gain over it beats its standard error
    assert tried[0]["kept"] and all(t["kept"] == (t["gain"] > t["se"]) for t in tried[1:])
    kept = tried[0]
    for t in tried[1:]:
        assert t["gain"] == pytest.approx(t[goal] - kept[goal], abs=1e-5)  # paired with the setting kept then
        kept = t if t["kept"] else kept
    assert (chosen.channels.neighbours.k, chosen.channels.decay) == (kept["knn_k"], kept["decay"])
    assert chosen.index.d == 9  # D=8 + the prior
    # the oracle: tune_channels on that table and decay alone gives the same weights
    ch = build_channels(ds, split, k=kept["knn_k"], max_len=20, decay=kept["decay"])
    tuned = tune_channels(model, ds, split, prior_index(model, ch), ch, n=20)
    assert chosen.channels.weights == tuned.merged and chosen.channels.prior_only == tuned.prior_only.prior
    assert chosen.tuned.best == pytest.approx(kept[goal])
    assert tuned.per_user.shape == (tuned.users,) and tuned.per_user.mean() == pytest.approx(tuned.best)


def test_choose_channels_without_validation_users(setup) -> None:
    ds, split, model = setup
    none = dataclasses.replace(split, val_users=split.val_users[:0])
    with pytest.raises(RetrievalError, match="^no validation users with a ground truth to choose the merged "
                                             "retriever's weights on$"):
        choose_channels(model, ds, none, (5,), max_len=20, require_validation=True)
    kept = choose_channels(model, ds, none, (5, 10), max_len=20)  # evaluate: MIND alone under the merged name
    assert kept.tuned is None and kept.channels.weights == ChannelWeights(0.0, 0.0)


@pytest.mark.parametrize(("factory", "width"), [("Flat", 9), ("HNSW16", 9), ("IVF4,Flat", 9), ("PQ1", 9),
                                                 ("PQ4", 12), ("PQ2x4", 10), ("IVF4,PQ8", 16)])
def test_prior_width_is_the_narrowest_the_factory_takes(factory: str, width: int) -> None:
    assert prior_width(factory, 8) == width


def test_a_bad_factory_is_refused_at_the_item_vectors_width() -> None:
    with pytest.raises(RetrievalError, match="^bad faiss index factory 'Bogus' for d=8: "):
        prior_width("Bogus", 8)


def test_padding_after_the_prior_changes_nothing(setup) -> None:
    ds, split, model = setup
    ch = build_channels(ds, split, k=10, max_len=20)
    ch.weights = ChannelWeights(0.7, 1.5)
    vectors = model.item_vectors().detach().numpy()
    users, ends, _ = held_out_users(ds, split, "validation")
    hist = Histories.of(ds, users, ends)
    narrow = retrieve(model, ds, build_index(prior_vectors(vectors, ch), "Flat"), hist, 20, channels=ch)
    wide_index = build_index(prior_vectors(vectors, ch, width=12), "Flat")
    assert wide_index.d == 12
    wide = retrieve(model, ds, wide_index, hist, 20, channels=ch)
    assert wide.items.tolist() == narrow.items.tolist()
    np.testing.assert_allclose(wide.scores, narrow.scores, rtol=1e-5, atol=1e-5)
    assert wide.channel.tolist() == narrow.channel.tolist()
