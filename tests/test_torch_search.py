"""Exact search in torch (index/torch_search.py) against the flat FAISS index: the same top-k,
the same merged top-n with history exclusion under both merges, in any chunking."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from index.faiss_index import build_index, search_top_n
from index.torch_search import TorchFlatIndex, on_device

devices = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def _data(N: int = 500, d: int = 16, U: int = 60, K: int = 4, seed: int = 0):
    """Seeded items, interest vectors with some interests inactive, and histories to exclude
    (some long enough to empty an interest's first n results)."""
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((N, d)).astype(np.float32)
    queries = rng.standard_normal((U, K, d)).astype(np.float32)
    mask = np.ones((U, K), dtype=bool)
    mask[::3, 2:] = False  # a third of the users with two interests
    mask[5] = [True, False, False, False]
    queries[~mask] = 0.0
    scores = queries @ xb.T  # (U, K, N)
    exclude = []
    for u in range(U):
        if u % 4 == 0:  # each interest's own top 40: the exclusion empties the first lists
            e = np.unique(np.argsort(-scores[u], axis=1)[:, :40].reshape(-1))
        else:
            e = rng.choice(N, rng.integers(0, 30), replace=False)
        exclude.append(e.astype(np.int64))
    exclude[7] = np.array([-1, N + 5, 3], dtype=np.int64)  # ids no result holds are ignored
    weights = rng.random((U, K)) * mask
    return xb, queries, mask, exclude, weights


@pytest.mark.parametrize("device", devices)
def test_search_equals_the_flat_faiss_index(device: str) -> None:
    xb, queries, mask, _, _ = _data()
    xq = queries[mask]  # (q, d) the active interests (inactive ones are zero: all ties)
    D_ref, I_ref = build_index(xb, "Flat").search(xq, 25)
    index = TorchFlatIndex(xb, device, budget=5000)  # 10 queries a chunk
    assert index.ntotal == 500 and index.d == 16
    D, I = index.search(xq, 25)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)
    D, I = index.search(xq[:3], 600)  # deeper than the items: padded as faiss pads
    assert (I[:, 500:] == -1).all() and np.isneginf(D[:, 500:]).all()
    assert sorted(I[0, :500]) == list(range(500))


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("strategy", ["best", "share"])
@pytest.mark.parametrize("budget", [1 << 28, 1500])
def test_search_top_n_equals_faiss_search_top_n(device: str, strategy: str, budget: int) -> None:
    """Exclusion before the top-k gives what FAISS's over-fetch and second search give."""
    xb, queries, mask, exclude, weights = _data()
    w = weights if strategy == "share" else None
    ref = search_top_n(build_index(xb, "Flat"), queries, mask, 20, exclude=exclude, strategy=strategy, weights=w)
    got = TorchFlatIndex(xb, device, budget=budget).search_top_n(queries, mask, 20, exclude=exclude, strategy=strategy,
                                                                 weights=w)
    for a, b in zip(got, ref):
        assert a.shape == b.shape == (60, 20)
    np.testing.assert_array_equal(got[0], ref[0])  # ids
    np.testing.assert_array_equal(got[2], ref[2])  # interests
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-4)
    for u, e in enumerate(exclude):  # nothing excluded is served
        assert not np.isin(got[0][u], e[e >= 0]).any()


def test_search_top_n_when_the_exclusion_leaves_fewer_than_n_items() -> None:
    xb, queries, mask, _, _ = _data(N=30, U=10)
    queries, mask = queries[:4], mask[:4]
    exclude = [np.arange(25), np.arange(0), np.arange(30), np.arange(10)]
    ref = search_top_n(build_index(xb, "Flat"), queries, mask, 20, exclude=exclude)
    ids, scores, interest = TorchFlatIndex(xb).search_top_n(queries, mask, 20, exclude=exclude)
    np.testing.assert_array_equal(ids, ref[0])
    assert (ids[0, 5:] == -1).all() and (ids[2] == -1).all() and np.isneginf(scores[2]).all()
    assert (interest[2] == -1).all()


def test_bad_queries_are_refused() -> None:
    xb, queries, mask, _, _ = _data()
    index = TorchFlatIndex(xb)
    with pytest.raises(ValueError, match=r"queries must be \(U, K, 16\)"):
        index.search_top_n(queries[:, :, :8], mask, 5)
    with pytest.raises(ValueError, match="mask must be a"):
        index.search_top_n(queries, mask.astype(int), 5)
    bad = queries.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search_top_n(bad, mask, 5)
    with pytest.raises(ValueError, match="NaN or infinite"):
        TorchFlatIndex(np.full((3, 2), np.inf, dtype=np.float32))


def test_on_device_moves_only_flat_indexes_to_a_gpu() -> None:
    xb = _data()[0]
    flat, ivf = build_index(xb, "Flat"), build_index(xb, "IVF4,Flat")
    assert on_device(flat, torch.device("cpu")) is flat
    assert on_device(ivf, torch.device("meta")) is ivf  # not exact: stays a FAISS index
    moved = on_device(flat, torch.device("meta"))
    assert isinstance(moved, TorchFlatIndex) and moved.device.type == "meta" and moved.ntotal == flat.ntotal
    assert faiss.METRIC_INNER_PRODUCT == moved.metric_type
