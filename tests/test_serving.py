"""The serving object in process: Recommender (request-time behaviours, fallback, rerank,
explanations, batches), the explanation arithmetic, id lookups and the micro-batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest

from retrieval.bundle import load_bundle
from retrieval.channels import CHANNELS, ChannelWeights, retrieve
from retrieval.errors import ArtifactError, RetrievalError
from retrieval.explain import interest_groups, top_behaviours, window_start
from retrieval.recommend import interest_vectors, recommend
from retrieval.samples import Histories
from retrieval.server.batcher import MicroBatcher
from retrieval.serving import MAX_CANDIDATES, MAX_HISTORY, MAX_N, IdLookup, Recommender, Request, RequestError

USER = "u00003"


@pytest.fixture(scope="module")
def rec(bundle_k4, index_k4, din_k4) -> Recommender:
    r = Recommender.load(bundle_k4, index_k4, din_k4)
    r.warm()
    return r


def stored(rec: Recommender, user: str) -> list[str]:
    ds = rec.dataset
    return ds.item_ids[ds.sequence(ds.user_index(user))].tolist()


def unseen(rec: Recommender, user: str, k: int, skip: int = 0) -> list[str]:
    """k item ids the user never touched."""
    seen = set(stored(rec, user))
    return [i for i in rec.dataset.item_ids[1:].tolist() if i not in seen][skip : skip + k]


def ids(resp) -> list[str]:
    return [it.item for it in resp.items]


# ----------------------------------------------------------------------------- the Recommender


def test_a_known_user_gets_what_the_serving_path_gives(rec):
    ds = rec.dataset
    u = np.array([ds.user_index(USER)])
    want = recommend(rec.model, ds, rec.index, Histories.of(ds, u, ds.lengths()[u]), 12)
    [got] = rec.recommend([Request(user=USER, n=12)])
    assert got.known_user and not got.fallback and got.dropped == [] and got.history == int(ds.lengths()[u[0]])
    assert got.used == min(got.history, rec.max_len)
    assert ids(got) == ds.item_ids[want.items[0]].tolist()
    assert [it.score for it in got.items] == pytest.approx(want.scores[0].tolist(), abs=1e-6)
    assert [it.interest for it in got.items] == want.interest[0].tolist()
    assert [it.rank for it in got.items] == list(range(1, 13))
    assert all(it.rank_score is None and it.because is None for it in got.items)


def test_fresh_behaviours_change_the_next_recommendations(rec):
    [before] = rec.recommend([Request(user=USER, n=20)])
    fresh = unseen(rec, USER, 3)
    [after] = rec.recommend([Request(user=USER, history=fresh, n=20)])
    assert after.known_user and after.history == before.history + 3 and after.dropped == []
    assert ids(after) != ids(before)
    assert not set(fresh) & set(ids(after))  # what the user just did is excluded like their log
    assert not set(stored(rec, USER)) & set(ids(after))
    # nothing is remembered between requests: the stored log alone gives the first answer again
    [again] = rec.recommend([Request(user=USER, n=20)])
    assert ids(again) == ids(before)


def test_a_new_user_with_three_behaviours_is_served(rec):
    clicks = unseen(rec, USER, 3, skip=10)
    [resp] = rec.recommend([Request(history=clicks[:2] + ["no-such-item"] + clicks[2:], n=10)])
    assert not resp.known_user and not resp.fallback and resp.user is None
    assert resp.history == 3 and resp.used == 3 and resp.dropped == ["no-such-item"]
    assert len(resp.items) == 10 and not set(clicks) & set(ids(resp))
    assert {it.interest for it in resp.items} == {0}  # K' = max(1, min(K, floor(log2 3))) = 1
    # an unknown user id with the same clicks is the same new user
    [named] = rec.recommend([Request(user="somebody-new", history=clicks, n=10)])
    assert not named.known_user and named.user == "somebody-new" and ids(named) == ids(resp)


def test_no_known_behaviour_falls_back_to_popularity(rec):
    ds = rec.dataset
    counts = np.bincount(ds.items, minlength=ds.n_items + 1)
    order = sorted(range(1, ds.n_items + 1), key=lambda i: (-counts[i], i))[:7]
    for req in (Request(history=["nope", "nada"], n=7), Request(user="stranger", n=7), Request(history=[], n=7)):
        [resp] = rec.recommend([req])
        assert resp.fallback and resp.history == 0 and not resp.known_user
        assert ids(resp) == ds.item_ids[order].tolist()
        assert all(it.score is None and it.interest is None for it in resp.items)
    assert rec.recommend([Request(history=["nope", "nada"], n=7)])[0].dropped == ["nope", "nada"]


def test_a_history_longer_than_L_uses_its_most_recent_L(rec):
    L = rec.max_len
    long = unseen(rec, USER, L + 15)
    [resp] = rec.recommend([Request(history=long, n=10, explain=True)])
    assert resp.history == L + 15 and resp.used == L
    [recent] = rec.recommend([Request(history=long[-L:], n=10 + 15, explain=True)])
    # the same interests: the scores of the items both lists hold agree
    common = set(ids(resp)) & set(ids(recent))
    assert common
    by_item = {it.item: it.score for it in recent.items}
    assert all(it.score == pytest.approx(by_item[it.item], abs=1e-5) for it in resp.items if it.item in common)
    # every behaviour named by an explanation is one of the last L
    named = {b.item for it in resp.items for b in it.because} | {b.item for g in resp.interests for b in g.behaviours}
    assert named and named <= set(long[-L:])
    assert not set(long) & set(ids(resp))  # all of the history is excluded, not only the last L


def test_rerank_keeps_each_items_retrieval_score_and_interest(rec):
    M = 40
    [plain] = rec.recommend([Request(user=USER, n=M)])
    [ranked] = rec.recommend([Request(user=USER, n=10, rank=True, candidates=M)])
    assert ranked.ranked and len(ranked.items) == 10
    retrieved = {it.item: (it.score, it.interest) for it in plain.items}
    assert set(ids(ranked)) <= set(retrieved)
    assert all((it.score, it.interest) == retrieved[it.item] for it in ranked.items)
    scores = [it.rank_score for it in ranked.items]
    assert all(a >= b for a, b in zip(scores, scores[1:]))
    # the ranker's own scores for those candidates, computed directly
    from retrieval.ranking.scoring import score_candidates

    ds = rec.dataset
    u = np.array([ds.user_index(USER)])
    hist = Histories.of(ds, u, ds.lengths()[u])
    cand = np.array([[ds.item_ids.tolist().index(i) for i in retrieved]])
    logits = dict(zip(retrieved, score_candidates(rec.ranker.model, ds, hist, cand)[0].tolist()))
    assert scores == pytest.approx([logits[i] for i in ids(ranked)], abs=1e-5)
    assert scores[0] == pytest.approx(max(logits.values()), abs=1e-5)


def test_rerank_serves_the_order_fused_with_the_retrieval_scores(rec, monkeypatch):
    """A ranker with a retrieval weight w serves logit + w x standardised retrieval score, as
    evaluation measured it (scoring.fuse), not its logits alone."""
    from retrieval.ranking.scoring import fuse, score_candidates

    M, w = 40, 0.5
    [plain] = rec.recommend([Request(user=USER, n=M)])
    monkeypatch.setattr(rec.ranker.model.config, "retrieval_weight", w)
    [ranked] = rec.recommend([Request(user=USER, n=M, rank=True, candidates=M)])
    ds = rec.dataset
    u = np.array([ds.user_index(USER)])
    hist = Histories.of(ds, u, ds.lengths()[u])
    cand = np.array([[ds.item_ids.tolist().index(it.item) for it in plain.items]])
    retrieval = np.array([[it.score for it in plain.items]], dtype=np.float32)
    fused = fuse(score_candidates(rec.ranker.model, ds, hist, cand), retrieval, w)[0]
    alone = score_candidates(rec.ranker.model, ds, hist, cand, None)[0]
    assert not np.allclose(fused, alone)  # the weight changes the scores, so the test can fail
    want = dict(zip(ids(plain), fused.tolist()))
    assert [it.rank_score for it in ranked.items] == pytest.approx([want[i] for i in ids(ranked)], abs=1e-4)
    assert ids(ranked) == sorted(want, key=lambda i: -want[i])


def test_explanations_name_the_behaviours_with_the_largest_weight(rec):
    [resp] = rec.recommend([Request(user=USER, n=10, explain=True)])
    ds = rec.dataset
    u = np.array([ds.user_index(USER)])
    it = interest_vectors(rec.model, ds, Histories.of(ds, u, ds.lengths()[u]))
    seq = stored(rec, USER)
    start = window_start(len(seq), rec.max_len)
    W = it.weights[0].numpy()  # (K, L)
    for item in resp.items:
        w = W[item.interest, : len(seq) - start]
        top = np.sort(w)[::-1][:3]
        assert [b.weight for b in item.because] == pytest.approx(top.tolist(), abs=1e-6)
        for b in item.because:  # each named behaviour sits in the window with exactly that weight
            assert any(seq[start + l] == b.item and abs(w[l] - b.weight) < 1e-6 for l in range(len(w)))
        assert all(b.title and b.title.startswith("Item ") for b in item.because)
    groups = resp.interests
    assert [g.interest for g in groups] == np.flatnonzero(it.active[0].numpy()).tolist()
    assert sum(g.mass for g in groups) == pytest.approx(1.0, abs=1e-5)
    members = [b.item for g in groups for b in g.behaviours]
    assert len(members) == len(set(members)) and set(members) <= set(seq[start:])


def test_a_batch_answers_as_each_request_alone(rec):
    fresh = unseen(rec, USER, 3)
    batch = [
        Request(user=USER, n=5),
        Request(user="u00007", history=fresh, n=12, explain=True),
        Request(history=fresh[:1] + ["zzz"], n=3),
        Request(history=["zzz"], n=4),
        Request(user="u00011", n=8, rank=True, candidates=30),
        Request(user=USER, n=7, rank=True, candidates=7, explain=True),
    ]
    together = rec.recommend(batch, now=1_800_000_000)
    alone = [rec.recommend([r], now=1_800_000_000)[0] for r in batch]
    for a, b in zip(together, alone):
        assert _same(a.to_dict(), b.to_dict())


@pytest.fixture(scope="module")
def merged(invoke, bundle_k4, tmp_path_factory) -> Recommender:
    """A Recommender over an index that holds the merged retriever (build-index --channels)."""
    out = tmp_path_factory.mktemp("indexes") / "merged_k4"
    result = invoke("build-index", "--bundle", bundle_k4, "--out", out, "--channels", "--knn-k", "20")
    assert result.exit_code == 0, result.output
    return Recommender.load(bundle_k4, out)


def test_an_index_with_channels_is_served_by_the_merged_retriever(merged):
    ds = merged.dataset
    assert merged.channels is not None and merged.info()["channels"]["knn_k"] == 20
    fresh = unseen(merged, USER, 3)
    batch = [Request(user=USER, n=12, explain=True), Request(user=USER, history=fresh, n=5), Request(history=fresh, n=9)]
    got = merged.recommend(batch, now=1_800_000_000)
    for req, resp in zip(batch, got):  # the same function as `query` and `evaluate`, row by row
        hist, _, _ = merged._histories([req], 1_800_000_000)
        want = retrieve(merged.model, ds, merged.index, hist, req.n, channels=merged.channels)
        assert ids(resp) == ds.item_ids[want.items[0]].tolist()
        assert [it.score for it in resp.items] == pytest.approx(want.scores[0].tolist(), abs=1e-5)
        assert [it.channel for it in resp.items] == [CHANNELS[c] for c in want.channel[0]]
        # an item another channel put there names no interest and no behaviours of one
        assert all((it.interest is not None) == (it.channel == "mind") for it in resp.items)
        assert all(it.because is None for it in resp.items if it.channel != "mind")
    assert {it.channel for r in got for it in r.items} - {"mind"}, "the fixture should exercise another channel"
    assert got[0].interests  # the user's interests as groups of behaviours, whichever channel filled the list
    # MIND's items in a merged list name their behaviours; a light kNN weight makes sure MIND fills
    # slots whatever weights validation chose for this small fixture
    light = Recommender(merged.bundle, merged.index, merged.index_manifest,
                        channels=dataclasses.replace(merged.channels, weights=ChannelWeights(prior=0.0, item_knn=0.1)))
    many = light.recommend([Request(user=str(u), n=12, explain=True) for u in ds.user_ids[:30]])
    mind = [it for r in many for it in r.items if it.channel == "mind"]
    assert mind and all(it.because for it in mind)
    with pytest.raises(RetrievalError, match="merge share applies to MIND alone"):
        Recommender(merged.bundle, merged.index, merged.index_manifest, merge="share", channels=merged.channels)


def _same(a, b) -> bool:
    """Equal, floats to 1e-5 (a batch's matrix products may round differently from one row's)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b)
        return all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-5)
        return True
    assert a == b
    return True


def test_request_times_reach_the_histories(rec):
    hist, users, dropped = rec._histories([Request(user=USER, history=unseen(rec, USER, 2), times=[5, 6]),
                                           Request(history=unseen(rec, USER, 1))], now_s=777)
    ds = rec.dataset
    u = ds.user_index(USER)
    rows = np.split(hist.times, hist.offsets[1:-1])
    assert rows[0].tolist() == ds.times[ds.offsets[u] : ds.offsets[u + 1]].tolist() + [5, 6]
    assert rows[1].tolist() == [777]
    assert users.tolist() == [u, -1] and dropped == [[], []]


@pytest.mark.parametrize("req, message", [
    (Request(), "give user, history or both"),
    (Request(user=USER, n=0), f"n must be between 1 and {MAX_N}, got 0"),
    (Request(user=USER, n=MAX_N + 1), f"n must be between 1 and {MAX_N}, got {MAX_N + 1}"),
    (Request(user=USER, n=50, rank=True, candidates=20), f"candidates must be between n (50) and {MAX_CANDIDATES}, got 20"),
    (Request(user=USER, rank=True, candidates=MAX_CANDIDATES + 1),
     f"candidates must be between n (10) and {MAX_CANDIDATES}, got {MAX_CANDIDATES + 1}"),
    (Request(history=["i00001"] * (MAX_HISTORY + 1)), f"history holds {MAX_HISTORY + 1} behaviours, at most {MAX_HISTORY}"),
    (Request(history=["i00001", "i00002"], times=[1]), "times holds 1 values for 2 behaviours"),
])
def test_bad_requests_name_the_bad_value(rec, req, message):
    with pytest.raises(RequestError) as err:
        rec.recommend([Request(user=USER), req])
    assert str(err.value) == message


def test_rank_needs_a_ranker(bundle_k4, index_k4):
    plain = Recommender.load(bundle_k4, index_k4)
    with pytest.raises(RequestError, match="no ranker is loaded"):
        plain.recommend([Request(user=USER, rank=True)])


def test_artifacts_must_belong_together(bundle_k4, bundle_k1, index_k4, index_k1, din_k4, tiny_k1_twice):
    with pytest.raises(ArtifactError, match="built from another model bundle"):
        Recommender.load(bundle_k1, index_k4)
    from index.faiss_index import load_index

    idx, manifest = load_index(index_k1)
    with pytest.raises(ArtifactError, match="built from another model bundle"):
        Recommender(load_bundle(bundle_k4), idx, manifest)
    with pytest.raises(ArtifactError, match="trained on other data"):
        Recommender.load(tiny_k1_twice[0], _index_for(tiny_k1_twice[0]), din_k4)


def _index_for(bundle):
    from typer.testing import CliRunner

    from cli import app

    out = bundle.parent / f"{bundle.name}-index"
    if not out.exists():
        assert CliRunner().invoke(app, ["build-index", "--bundle", str(bundle), "--out", str(out)]).exit_code == 0
    return out


def test_browsing_helpers(rec):
    ds = rec.dataset
    first = rec.sample_users(3)
    assert [u["user"] for u in first] == ds.user_ids[:3].tolist()
    assert first[0]["history"] == int(ds.lengths()[0])
    assert rec.sample_users(5, seed=1) == rec.sample_users(5, seed=1) != rec.sample_users(5)
    found = rec.search_items("TOPIC 3)", limit=4)
    assert len(found) == 4 and all("(topic 3)" in f["title"] for f in found)
    want = [i for i, t in zip(ds.item_ids[1:].tolist(), ds.titles[1:].tolist()) if "(topic 3)" in t][:4]
    assert [f["item"] for f in found] == want
    assert rec.search_items("i00005", limit=2)[0] == {"item": "i00005", "title": ds.titles[5]}
    assert rec.search_items("no such words") == []


# ----------------------------------------------------------------------------- explanations by hand


def test_top_behaviours_by_hand():
    w = np.array([[0.1, 0.7, 0.7, 0.0], [0.9, 0.3, 0.3, 0.0]])  # (K=2, L=4), the last slot padding
    # a history of 3 (window from 0): interest 0's strongest, equal weights the more recent first
    assert top_behaviours(w, 3, 0, 2) == [(2, 0.7), (1, 0.7)]
    assert top_behaviours(w, 3, 1, 5) == [(0, 0.9), (2, 0.3), (1, 0.3)]
    # a history of 10 whose last 4 filled the window: positions are offset by 6
    w_full = np.array([[0.2, 0.4, 0.1, 0.3]])
    assert window_start(10, 4) == 6
    assert top_behaviours(w_full, 10, 0, 2) == [(7, 0.4), (9, 0.3)]


def test_interest_groups_by_hand():
    w = np.array([[0.6, 0.2, 0.5, 0.0], [0.4, 0.8, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])  # (K=3, L=4)
    active = np.array([True, True, False])
    mass = np.array([0.433, 0.567, 0.0])
    groups = interest_groups(w, active, mass, length=3, m=5)
    # behaviour 2 ties (0.5, 0.5): it goes to the lower interest
    assert groups == [(0, 0.433, [(0, 0.6), (2, 0.5)]), (1, 0.567, [(1, 0.8)])]
    assert interest_groups(w, active, mass, length=3, m=1)[0] == (0, 0.433, [(0, 0.6)])


# ----------------------------------------------------------------------------- id lookups


def test_id_lookup_finds_ids_in_any_order():
    lookup = IdLookup(np.array(["10", "9", "100", "a", "B"]))  # numeric order is not string order
    assert lookup.find(["9", "100", "a", "zz", "B", ""]).tolist() == [1, 2, 3, -1, 4, -1]
    assert lookup.find([]).tolist() == []
    assert IdLookup(np.array(["a", "b"])).order is None  # already sorted: no copy


# ----------------------------------------------------------------------------- the micro-batcher


def run_async(coro):
    return asyncio.run(coro)


def test_batcher_coalesces_concurrent_requests_up_to_max_batch():
    seen: list[list[int]] = []

    def handle(items):
        seen.append(list(items))
        return [x * 10 for x in items]

    b = MicroBatcher(handle, max_batch=4, max_wait_s=0.05)

    async def main():
        return await asyncio.gather(*(b.submit([i]) for i in range(10)))

    try:
        results = run_async(main())
    finally:
        b.close()
    assert results == [[i * 10] for i in range(10)]
    assert [len(s) for s in seen] == [4, 4, 2]
    assert sorted(x for s in seen for x in s) == list(range(10))


def test_batcher_fails_only_the_job_whose_item_failed_and_survives_a_crash():
    def handle(items):
        if "crash" in items:
            raise RuntimeError("boom")
        return [ValueError(f"bad {x}") if x == "bad" else x.upper() for x in items]

    b = MicroBatcher(handle, max_batch=8, max_wait_s=0.02)

    async def main():
        return await asyncio.gather(b.submit(["a", "b"]), b.submit(["bad"]), b.submit(["c"]), return_exceptions=True)

    async def crash():
        return await asyncio.gather(b.submit(["crash"]), b.submit(["d"]), return_exceptions=True)

    try:
        good, bad, other = run_async(main())
        crashed = run_async(crash())
        after = run_async(b.submit(["e"]))
    finally:
        b.close()
    assert good == ["A", "B"] and other == ["C"]
    assert isinstance(bad, ValueError) and str(bad) == "bad bad"
    assert all(isinstance(x, RuntimeError) for x in crashed)  # one batch: both jobs fail with it
    assert after == ["E"]  # the worker lives on


def test_batcher_close_finishes_queued_work():
    started = threading.Event()

    def handle(items):
        started.set()
        time.sleep(0.05)
        return items

    b = MicroBatcher(handle, max_batch=1, max_wait_s=0)

    async def main():
        tasks = [asyncio.ensure_future(b.submit([i])) for i in range(3)]
        await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, b.close)
        return await asyncio.gather(*tasks)

    assert run_async(main()) == [[0], [1], [2]]


# ----------------------------------------------------------------------------- the rerank fast path


def test_din_scores_each_historys_candidates_as_their_own_rows_would(rec):
    """score_candidates shares one copy of each history among its candidates (DIN's shared-history
    path); scoring every (history, candidate) pair with its own copy gives the same logits."""
    import torch

    from retrieval.ranking import scoring
    from retrieval.ranking.data import make_rank_batch

    ds, model = rec.dataset, rec.ranker.model
    users = np.array([0, 5, 9, 17])
    hist = Histories.of(ds, users, np.array([1, 3, ds.lengths()[9], 60]))  # short and longer than L histories
    cand = np.random.default_rng(0).integers(1, ds.n_items + 1, size=(4, 30))
    cand[2, 20:] = 0  # fewer candidates than M
    fast = scoring.score_candidates(model, ds, hist, cand)
    rows = np.repeat(np.arange(4), 30)[cand.reshape(-1) > 0]
    own = make_rank_batch(ds, None, rows, hist.lengths()[rows], cand[cand > 0], None, model.config.max_len, seqs=hist)
    assert own.rows is None and own.history.shape[0] == len(rows)
    with torch.no_grad():
        slow = model.eval().score(own).numpy()
    assert np.array_equal(np.isinf(fast), cand == 0)
    np.testing.assert_allclose(fast[cand > 0], slow, atol=1e-5)


def test_dice_scoring_path_is_batch_norm_with_running_statistics():
    import torch

    from retrieval.layers import Dice

    torch.manual_seed(0)
    d = Dice(6).eval()
    d.bn.running_mean.normal_()
    d.bn.running_var.uniform_(0.5, 2.0)
    d.alpha.data.uniform_(0.0, 0.5)
    s = torch.randn(5, 3, 6)
    z = (s - d.bn.running_mean) / torch.sqrt(d.bn.running_var + d.bn.eps)
    want = torch.sigmoid(z) * s + (1 - torch.sigmoid(z)) * d.alpha * s  # the paper's form
    with torch.no_grad():
        got = d(s)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d(s), want, atol=1e-6, rtol=1e-5)  # with grad enabled: the training form


def test_batcher_sheds_what_it_cannot_queue():
    from retrieval.server.batcher import Overloaded

    release = threading.Event()

    def handle(items):
        release.wait(5)
        return items

    b = MicroBatcher(handle, max_batch=1, max_wait_s=0, max_queue=2)

    async def main():
        first = asyncio.ensure_future(b.submit([1]))
        await asyncio.sleep(0.05)  # taken by the worker, which now blocks: nothing waits
        queued = [asyncio.ensure_future(b.submit([i])) for i in (2, 3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="2 requests already wait"):
            await b.submit([4])
        release.set()
        return await asyncio.gather(first, *queued)

    try:
        assert run_async(main()) == [[1], [2], [3]]
    finally:
        release.set()
        b.close()
