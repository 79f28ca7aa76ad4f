"""The item index: exact vs NumPy, approximate vs exact, interest search and merge, artifacts."""

import json

import faiss
import numpy as np
import pytest

from index.faiss_index import (
    build_index,
    load_index,
    merge_interests,
    save_index,
    search_interests,
    search_param_name,
    search_top_n,
    set_search_param,
)
from retrieval.artifacts import write_manifest
from retrieval.errors import ArtifactError, RetrievalError

NEG = -np.inf


def clustered(n: int, d: int, seed: int, n_clusters: int = 32) -> np.ndarray:
    """Seeded item-like vectors: points around a few centres, so IVF lists mean something."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    x = centres[rng.integers(0, n_clusters, size=n)] + rng.standard_normal((n, d))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    xb = clustered(3000, 32, seed=0)  # (N, d)
    rng = np.random.default_rng(1)
    xq = xb[rng.choice(len(xb), 200, replace=False)] + rng.standard_normal((200, 32))  # (nq, d)
    return xb, xq.astype(np.float32)


def recall_at(I: np.ndarray, I_ref: np.ndarray) -> float:
    k = I_ref.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(I, I_ref, strict=True)]))


def test_flat_equals_numpy_brute_force(data):
    xb, xq = data
    index = build_index(xb, "Flat")
    assert index.ntotal == len(xb) and index.d == xb.shape[1]
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    D, I = index.search(xq, 10)
    scores = xq @ xb.T  # (nq, N)
    I_ref = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, np.take_along_axis(scores, I_ref, axis=1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("factory", "param", "value"), [("HNSW32", "efSearch", 128), ("IVF16,Flat", "nprobe", 8)]
)
def test_approximate_reaches_high_recall_against_flat(data, factory, param, value):
    xb, xq = data
    _, I_ref = build_index(xb, "Flat").search(xq, 10)
    index = build_index(xb, factory)
    set_search_param(index, param, value)
    _, I = index.search(xq, 10)
    assert recall_at(I, I_ref) >= 0.95


def test_nprobe_changes_ivf_search(data):
    xb, xq = data
    _, I_ref = build_index(xb, "Flat").search(xq, 10)
    index = build_index(xb, "IVF16,Flat")
    set_search_param(index, "nprobe", 1)
    low = recall_at(index.search(xq, 10)[1], I_ref)  # about 0.74 on this data
    set_search_param(index, "nprobe", 16)  # every list: exact
    assert low < 0.9 and recall_at(index.search(xq, 10)[1], I_ref) == 1.0


def test_bad_factory_and_too_few_vectors_raise_retrieval_error():
    xb = clustered(100, 32, seed=0)
    with pytest.raises(RetrievalError, match=r"factory 'Bogus7'.*could not parse") as err:
        build_index(xb, "Bogus7")
    assert "\n" not in str(err.value)
    with pytest.raises(RetrievalError, match=r"'IVF256,Flat' needs at least 256 vectors.*got 100"):
        build_index(xb, "IVF256,Flat")
    with pytest.raises(RetrievalError, match=r"'IVF4,PQ16' cannot be trained on 100 vectors"):
        build_index(xb, "IVF4,PQ16")  # 8-bit PQ needs 256 training points
    with pytest.raises(RetrievalError, match=r"bad faiss index factory 'PQ7'.*multiple"):
        build_index(xb, "PQ7")  # 32 is not a multiple of 7
    with pytest.raises(RetrievalError, match="efSearch"):
        set_search_param(build_index(xb, "Flat"), "efSearch", 64)


class SpyIndex:
    """Wraps an index and records every search call."""

    def __init__(self, index):
        self.index, self.d, self.ntotal, self.calls = index, index.d, index.ntotal, []

    def search(self, x, k):
        self.calls.append(x.copy())
        return self.index.search(x, k)


def test_search_interests_searches_only_active_rows(data):
    xb, _ = data
    index = build_index(xb[:500], "Flat")
    rng = np.random.default_rng(0)
    U, K, d = 5, 4, xb.shape[1]
    queries = rng.standard_normal((U, K, d)).astype(np.float32)
    mask = rng.random((U, K)) < 0.6
    mask[0] = False  # a user with no active interest
    queries[~mask] = np.nan  # an inactive row that was searched would fail or poison results
    spy = SpyIndex(index)
    D, I = search_interests(spy, queries, mask, k=7)

    assert len(spy.calls) == 1 and spy.calls[0].shape == (mask.sum(), d)
    assert D.shape == I.shape == (U, K, 7) and D.dtype == np.float32 and I.dtype == np.int64
    assert (I[~mask] == -1).all() and np.isneginf(D[~mask]).all()
    D_ref, I_ref = index.search(queries[mask], 7)
    np.testing.assert_array_equal(I[mask], I_ref)
    np.testing.assert_array_equal(D[mask], D_ref)


def test_search_interests_clips_k_to_ntotal():
    index = build_index(clustered(5, 8, seed=0), "Flat")
    queries = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    D, I = search_interests(index, queries, np.ones((2, 3), dtype=bool), k=50)
    assert I.shape == (2, 3, 5)
    assert (np.sort(I, axis=2) == np.arange(5)).all()


def test_search_interests_pads_missing_results_with_neg_inf():
    # IVF with one probed list of few items: faiss pads with -1 ids and -FLT_MAX scores
    xb = clustered(400, 16, seed=0, n_clusters=8)
    index = build_index(xb, "IVF8,Flat")
    D, I = search_interests(index, xb[None, :3], np.ones((1, 3), dtype=bool), k=400)
    assert (I == -1).any()
    assert np.isneginf(D[I == -1]).all() and np.isfinite(D[I >= 0]).all()


def test_merge_best_hand_made():
    # user 0: interest 0 finds 4 (.9), 7 (.5), -1; interest 1 finds 7 (.8), 2 (.6), 5 (.4)
    #   -> 7 keeps .8 from interest 1; 5 is excluded; -1 dropped -> [4, 7, 2], padded to n=5
    # user 1: both interests find 3 with .7 -> tie goes to interest 0; interest 1 is inactive
    I = np.array([[[4, 7, -1], [7, 2, 5]], [[3, 1, 8], [-1, -1, -1]]])
    D = np.array(
        [[[0.9, 0.5, NEG], [0.8, 0.6, 0.4]], [[0.7, 0.2, 0.1], [NEG, NEG, NEG]]], dtype=np.float32
    )
    exclude = [np.array([5, 100]), np.array([], dtype=int)]
    ids, scores, interest = merge_interests(D, I, n=5, exclude=exclude)
    assert ids.dtype == interest.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, [[4, 7, 2, -1, -1], [3, 1, 8, -1, -1]])
    np.testing.assert_allclose(scores, [[0.9, 0.8, 0.6, NEG, NEG], [0.7, 0.2, 0.1, NEG, NEG]])
    np.testing.assert_array_equal(interest, [[0, 1, 1, -1, -1], [0, 0, 0, -1, -1]])

    I2 = np.array([[[3, 1], [3, 9]]])
    D2 = np.array([[[0.7, 0.1], [0.7, 0.3]]], dtype=np.float32)
    ids, scores, interest = merge_interests(D2, I2, n=2)
    np.testing.assert_array_equal(ids, [[3, 9]])
    np.testing.assert_array_equal(interest, [[0, 1]])  # the tie on item 3 goes to interest 0


def test_merge_best_matches_per_user_dict():
    rng = np.random.default_rng(0)
    U, K, k, n = 30, 4, 10, 15
    I = rng.integers(-1, 40, size=(U, K, k))
    D = rng.integers(0, 20, size=(U, K, k)).astype(np.float32) / 4  # ties
    exclude = [rng.choice(40, size=5, replace=False) for _ in range(U)]
    ids, scores, interest = merge_interests(D, I, n=n, exclude=exclude)
    for u in range(U):
        best: dict[int, tuple[float, int]] = {}
        for j in range(K):
            for s, i in zip(D[u, j], I[u, j], strict=True):
                if i < 0 or i in exclude[u]:
                    continue
                if i not in best or (-s, j) < (-best[i][0], best[i][1]):
                    best[int(i)] = (float(s), j)
        top = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[1][1], kv[0]))[:n]
        m = len(top)
        assert ids[u, :m].tolist() == [i for i, _ in top] and (ids[u, m:] == -1).all()
        assert scores[u, :m].tolist() == [s for _, (s, _) in top]
        assert interest[u, :m].tolist() == [j for _, (_, j) in top]


def test_merge_best_packed_keys_match_the_lexsort_path():
    # ids below 2^30 take the packed 64-bit key sort; the same ids shifted past 2^31 cannot
    # be packed and take the three-key lexsort; one user alone takes the request path.
    # Shifting keeps id order, so all must agree, through ties, -0.0 against 0.0,
    # duplicates across interests, -1 ids and exclusions.
    rng = np.random.default_rng(3)
    U, K, k, n = 40, 4, 12, 10
    I = rng.integers(-1, 60, size=(U, K, k))
    D = (rng.integers(-8, 8, size=(U, K, k)) / 4).astype(np.float32)  # many exact ties
    D[D == 0] = np.where(rng.random((D == 0).sum()) < 0.5, -0.0, 0.0)
    D[I < 0] = NEG
    exclude = [rng.choice(60, size=int(rng.integers(0, 8)), replace=False) for _ in range(U)]
    shift = 1 << 31
    big = np.where(I >= 0, I + shift, -1)
    packed = merge_interests(D, I, n=n, exclude=exclude)
    general = merge_interests(D, big, n=n, exclude=[e + shift for e in exclude])
    np.testing.assert_array_equal(packed[0], np.where(general[0] >= 0, general[0] - shift, -1))
    np.testing.assert_array_equal(packed[1], general[1])
    np.testing.assert_array_equal(packed[2], general[2])
    for u in range(U):  # one user at a time, as a request is merged
        one = merge_interests(D[u : u + 1], I[u : u + 1], n=n, exclude=exclude[u : u + 1])
        for a, b in zip(one, packed, strict=True):
            np.testing.assert_array_equal(a[0], b[u])


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_search_top_n_equals_the_deep_search(data, factory):
    # The deep search (every interest n + longest history deep) against search_top_n, which
    # searches n + slack deep and again only for users whose lists the exclusion emptied.
    xb, xq = data
    index = build_index(xb, factory)
    if factory != "Flat":
        set_search_param(index, "nprobe", 4)
    U, K, n = 50, 3, 10
    queries = xq[: U * K].reshape(U, K, -1)
    mask = np.random.default_rng(0).random((U, K)) < 0.8
    _, top = index.search(queries.reshape(U * K, -1), 40)
    top = top.reshape(U, K, 40)
    # every 5th user has its first interest's 30 best results in its history: 2 deep is not enough
    exclude = [
        top[u, 0, :30] if u % 5 == 0 else np.random.default_rng(u).choice(len(xb), 20, replace=False)
        for u in range(U)
    ]
    spy = SpyIndex(index)
    got = search_top_n(spy, queries, mask, n, exclude=exclude, slack=5)
    D, I = search_interests(index, queries, mask, n + 30)
    want = merge_interests(D, I, n, exclude=exclude)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(spy.calls) == 2  # the first search, then the users with an emptied list
    again = [u for u in range(U) if u % 5 == 0 and mask[u, 0]]
    assert len(spy.calls[1]) == mask[again].sum()
    assert (got[0][~mask.any(1)] == -1).all()


def test_search_top_n_share_merge_and_no_exclusion(data):
    xb, xq = data
    index = build_index(xb, "Flat")
    U, K, n = 6, 2, 5
    queries = xq[: U * K].reshape(U, K, -1)
    mask = np.ones((U, K), dtype=bool)
    w = np.random.default_rng(1).random((U, K))
    _, top = index.search(queries.reshape(U * K, -1), 20)
    exclude = [top[u * K, :12] for u in range(U)]  # forces the second search for every user
    got = search_top_n(index, queries, mask, n, exclude=exclude, strategy="share", weights=w, slack=0)
    D, I = search_interests(index, queries, mask, n + 12)
    want = merge_interests(D, I, n, exclude=exclude, strategy="share", weights=w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    D, I = search_interests(index, queries, mask, n)
    np.testing.assert_array_equal(search_top_n(index, queries, mask, n)[0], merge_interests(D, I, n)[0])


@pytest.mark.parametrize(
    ("factory", "name"),
    [("IVF8,Flat", "nprobe"), ("OPQ8,IVF8,PQ8", "nprobe"), ("HNSW16", "efSearch"), ("Flat", None), ("PQ8", None)],
)
def test_search_param_name(data, factory, name):
    assert search_param_name(build_index(data[0][:2000], factory)) == name


def test_load_applies_the_recorded_search_param(tmp_path, data):
    xb, _ = data
    save_index(build_index(xb, "IVF16,Flat"), tmp_path / "idx", {"search_param": "nprobe", "search_value": 7})
    assert faiss.extract_index_ivf(load_index(tmp_path / "idx")[0]).nprobe == 7
    save_index(build_index(xb[:300], "HNSW16"), tmp_path / "hnsw", {"search_param": "efSearch", "search_value": 99})
    assert faiss.downcast_index(load_index(tmp_path / "hnsw")[0]).hnsw.efSearch == 99
    save_index(build_index(xb[:300], "Flat"), tmp_path / "flat", {"search_param": "nprobe", "search_value": 3})
    with pytest.raises(ArtifactError, match=r"flat: manifest search parameter nprobe=3 does not apply to a"):
        load_index(tmp_path / "flat")


def test_merge_share_hand_made():
    # weights .75/.25 and n=4 -> 3 slots for interest 0, 1 for interest 1.
    # interest 0: 10 (.9), 11 (.8), 12 (.7), 13 (.6); interest 1: 20 (.5), 21 (.4)
    # 'best' would take 10, 11, 12, 13; 'share' takes 10, 11, 12 and 20, ordered by score.
    I = np.array([[[10, 11, 12, 13], [20, 21, -1, -1]]])
    D = np.array([[[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, NEG, NEG]]], dtype=np.float32)
    w = np.array([[0.75, 0.25]])
    ids, scores, interest = merge_interests(D, I, n=4, strategy="share", weights=w)
    np.testing.assert_array_equal(ids, [[10, 11, 12, 20]])
    np.testing.assert_allclose(scores, [[0.9, 0.8, 0.7, 0.5]])
    np.testing.assert_array_equal(interest, [[0, 0, 0, 1]])
    assert merge_interests(D, I, n=4)[0].tolist() == [[10, 11, 12, 13]]


def test_merge_share_skips_taken_and_excluded_and_hands_on_unfilled_slots():
    # weights 1/3 each, n=5 -> shares 2, 2, 1 (largest remainder, ties to the lower interest).
    # interest 0: 1 (.9), 2 (.8), 3 (.7); interest 1: 1 (.85), 4 (.6), 5 (.5), 6 (.45)
    # interest 2: 7 (.3) only, but 7 is excluded -> its slot goes to the next best overall.
    # pass 1: i0 takes 1, 2; i1 skips 1 (taken), takes 4, 5; i2 has nothing.
    # pass 2: the free slot goes to 3 (.7, interest 0), the next best of all.
    I = np.array([[[1, 2, 3, -1], [1, 4, 5, 6], [7, -1, -1, -1]]])
    D = np.array(
        [[[0.9, 0.8, 0.7, NEG], [0.85, 0.6, 0.5, 0.45], [0.3, NEG, NEG, NEG]]], dtype=np.float32
    )
    w = np.full((1, 3), 1 / 3)
    exclude = [np.array([7])]
    ids, scores, interest = merge_interests(D, I, n=5, exclude=exclude, strategy="share", weights=w)
    np.testing.assert_array_equal(ids, [[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(interest, [[0, 0, 0, 1, 1]])
    np.testing.assert_allclose(scores, [[0.9, 0.8, 0.7, 0.6, 0.5]])

    # too few results overall: padded; all-zero weights: equal shares
    ids, _, interest = merge_interests(D, I, n=9, strategy="share", weights=np.zeros((1, 3)))
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, -1, -1]]
    assert interest.tolist() == [[0, 0, 0, 1, 1, 1, 2, -1, -1]]


def test_merge_rejects_bad_arguments():
    I = np.zeros((1, 2, 3), dtype=np.int64)
    D = np.zeros((1, 2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="needs weights"):
        merge_interests(D, I, n=2, strategy="share")
    with pytest.raises(ValueError, match=r"weights must be \(1, 2\)"):
        merge_interests(D, I, n=2, strategy="share", weights=np.ones((1, 3)))
    with pytest.raises(ValueError, match="only to strategy='share'"):
        merge_interests(D, I, n=2, weights=np.ones((1, 2)))
    with pytest.raises(ValueError, match="strategy must be"):
        merge_interests(D, I, n=2, strategy="round_robin")
    with pytest.raises(ValueError, match="exclude has 2 users"):
        merge_interests(D, I, n=2, exclude=[np.array([1]), np.array([2])])


def test_save_load_round_trip(tmp_path, data):
    xb, xq = data
    index = build_index(xb, "IVF16,Flat")
    set_search_param(index, "nprobe", 4)
    save_index(index, tmp_path / "idx", {"factory": "IVF16,Flat", "bundle_fingerprint": "ab" * 32})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp dir left
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "manifest.json"]

    loaded, manifest = load_index(tmp_path / "idx", bundle_fingerprint="ab" * 32)
    assert manifest == json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["kind"] == "index" and manifest["factory"] == "IVF16,Flat"
    assert (manifest["d"], manifest["ntotal"], manifest["metric"]) == (32, 3000, "inner_product")
    assert manifest["bundle_fingerprint"] == "ab" * 32
    assert {"faiss", "numpy", "torch"} <= set(manifest["packages"]) and manifest["created"]
    for a, b in zip(index.search(xq, 10), loaded.search(xq, 10), strict=True):
        np.testing.assert_array_equal(a, b)


def test_save_without_factory_recovers_it(tmp_path, data):
    save_index(build_index(data[0][:300], "HNSW32"), tmp_path / "idx", {})
    assert load_index(tmp_path / "idx")[1]["factory"] == "HNSW32"


def test_load_rejects_other_bundle_missing_and_corrupt(tmp_path, data):
    index = build_index(data[0][:300], "Flat")
    save_index(index, tmp_path / "idx", {"bundle_fingerprint": "1234567890abcdef"})
    expected = r"another model bundle \(index: 1234567890ab, bundle: fedcba098765\)"
    with pytest.raises(ArtifactError, match=expected):
        load_index(tmp_path / "idx", bundle_fingerprint="fedcba0987654321")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_index(tmp_path / "nothing")
    (tmp_path / "idx" / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(ArtifactError, match="corrupt index"):
        load_index(tmp_path / "idx")
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["index_sha256"]  # no checksum to catch it: faiss itself refuses the bytes
    write_manifest(tmp_path / "idx", manifest)
    with pytest.raises(ArtifactError, match="unreadable faiss index"):
        load_index(tmp_path / "idx")
    with pytest.raises(ArtifactError, match=r"\(index: none, bundle: fedcba098765\)"):
        save_index(index, tmp_path / "idx2", {})
        load_index(tmp_path / "idx2", bundle_fingerprint="fedcba0987654321")
    (tmp_path / "idx" / "index.faiss").unlink()
    with pytest.raises(ArtifactError, match="no index.faiss"):
        load_index(tmp_path / "idx")


def test_save_is_atomic(tmp_path, monkeypatch, data):
    index = build_index(data[0][:300], "Flat")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", fail)
    with pytest.raises(ArtifactError, match=r"idx: writing failed \(disk full\); nothing was replaced$"):
        save_index(index, tmp_path / "idx", {})
    assert list(tmp_path.iterdir()) == []


def test_save_over_an_existing_index_keeps_it_on_failure(tmp_path, monkeypatch, data):
    save_index(build_index(data[0][:300], "Flat"), tmp_path / "idx", {"bundle_fingerprint": "old"})
    new = build_index(data[0][:100], "Flat")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", fail)
    with pytest.raises(ArtifactError, match=r"idx: writing failed \(disk full\); nothing was replaced$"):
        save_index(new, tmp_path / "idx", {"bundle_fingerprint": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert load_index(tmp_path / "idx", bundle_fingerprint="old")[0].ntotal == 300


def test_save_rejects_reserved_fields(tmp_path, data):
    with pytest.raises(ValueError, match="ntotal"):
        save_index(build_index(data[0][:50], "Flat"), tmp_path / "idx", {"ntotal": 7})


def _ivf(xb: np.ndarray, factory: str, metric: int, nprobe: int) -> faiss.Index:
    index = faiss.index_factory(xb.shape[1], factory, metric)
    index.train(xb)
    index.add(xb)
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ8", "IVF16,SQ8"])
@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2])
@pytest.mark.parametrize("nprobe", [1, 3, 16])
def test_search_index_scores_the_centroids_itself_with_faiss_results(data, monkeypatch, factory, metric, nprobe):
    """An IVF index with a flat quantizer: the coarse step by matrix products (in blocks of 64
    queries here, so 200 queries cross blocks), the lists by faiss: faiss's own results."""
    import index.faiss_index as fi

    monkeypatch.setattr(fi, "COARSE_BLOCK", 64)
    xb, xq = data
    index = _ivf(xb, factory, metric, nprobe)
    D_ref, I_ref = index.search(xq, 10)
    D, I = fi.search_index(index, xq, 10)
    assert fi._centroids(index) is not None  # the coarse step was ours
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF16_HNSW8,Flat", "OPQ8,IVF16,PQ8"])
def test_search_index_leaves_other_indexes_to_faiss(data, factory):
    import index.faiss_index as fi

    xb, xq = data
    index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index.add(xb)
    D, I = fi.search_index(index, xq, 10)
    assert fi._centroids(index) is None
    D_ref, I_ref = index.search(xq, 10)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_array_equal(D, D_ref)


def test_search_index_reads_a_swapped_quantizer_again(data):
    """The centroids are kept per index object; a quantizer swapped in afterwards (another
    centroid set over the same lists) is read again, not served from the old copy."""
    import index.faiss_index as fi

    xb, xq = data
    index = _ivf(xb, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT, 1)
    fi.search_index(index, xq, 10)
    c = index.quantizer.reconstruct_n(0, index.nlist)
    c[0] *= 50.0  # list 0 now draws most queries
    q2 = faiss.IndexFlatIP(xb.shape[1])
    q2.add(c)
    index.quantizer = q2
    q2.this.disown()
    index.own_fields = True
    D_ref, I_ref = index.search(xq, 10)
    D, I = fi.search_index(index, xq, 10)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-3)
