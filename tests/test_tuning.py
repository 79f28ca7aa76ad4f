"""Tuning the search parameter to a target recall: approximate against exact on seeded data,
the smallest value that reaches the target, the manifest, and the CLI's --target-recall."""

from __future__ import annotations

import json
import re

import faiss
import numpy as np
import pytest
from conftest import assert_clean_error

from index.faiss_index import build_index, load_index, search_top_n, set_search_param
from index.tuning import Tuning, exact_top_n, recall_against, tune_on_validation, tune_search_param
from retrieval.bundle import load_bundle
from retrieval.channels import load_channels, prior_vectors
from retrieval.errors import RetrievalError

N = 10


@pytest.fixture(scope="module")
def data():
    """Item vectors around 32 centres (N, d) and 60 users with 3 interests near items, 2 active."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((32, 16))
    xb = (centres[rng.integers(0, 32, 4000)] + rng.standard_normal((4000, 16))).astype(np.float32)
    queries = (xb[rng.integers(0, 4000, (60, 3))] + 0.5 * rng.standard_normal((60, 3, 16))).astype(np.float32)
    mask = np.ones((60, 3), dtype=bool)
    mask[:, 2] = False
    exclude = [rng.choice(4000, 30, replace=False) for _ in range(60)]
    return xb, queries, mask, exclude


def recall_at(index, data, value=None):
    xb, queries, mask, exclude = data
    if value is not None:
        set_search_param(index, "nprobe" if "IVF" in type(index).__name__ else "efSearch", value)
    return recall_against(search_top_n(index, queries, mask, N, exclude)[0], exact_top_n(xb, queries, mask, N, exclude))


def test_recall_against_hand_made():
    ids = np.array([[1, 2, 3, -1], [5, 6, 7, 8], [9, -1, -1, -1]])
    exact = np.array([[1, 2, 4, 9], [8, 7, 6, 5], [-1, -1, -1, -1]])
    # user 0: 2 of 4; user 1: 4 of 4 in another order; user 2 has no exact result: left out
    assert recall_against(ids, exact) == pytest.approx((0.5 + 1.0) / 2)


def test_exact_top_n_is_numpy_brute_force(data):
    xb, queries, mask, exclude = data
    got = exact_top_n(xb, queries, mask, N, exclude)
    for u in range(5):
        scores = (queries[u, mask[u]] @ xb.T).max(0)  # best score over the active interests
        scores[exclude[u]] = -np.inf
        np.testing.assert_array_equal(got[u], np.argsort(-scores, kind="stable")[:N])


def test_ivf_tuned_to_the_smallest_nprobe_that_reaches_the_target(data):
    xb, queries, mask, exclude = data
    index = build_index(xb, "IVF64,Flat")
    t = tune_search_param(index, xb, queries, mask, N, 0.9, exclude)
    assert isinstance(t, Tuning) and t.search_param == "nprobe"
    assert faiss.extract_index_ivf(index).nprobe == t.search_value  # left at the choice
    assert t.recall >= 0.9 and t.recall == recall_at(index, data)
    assert recall_at(build_index(xb, "IVF64,Flat"), data, t.search_value - 1) < 0.9
    assert (t.n, t.users, t.target_recall) == (N, 60, 0.9)
    tried = dict(t.trials)
    assert tried[t.search_value] == t.recall and tried[1] < 0.9  # doubling starts at nprobe=1
    assert 1 < t.search_value < 64
    m = t.manifest()
    assert (m["search_param"], m["search_value"]) == ("nprobe", t.search_value)
    assert m["tuning"]["recall"] == t.recall and m["tuning"]["users"] == 60 and m["tuning"]["n"] == N
    assert m["tuning"]["trials"] == [list(x) for x in t.trials]
    json.dumps(m)  # plain JSON values


def test_hnsw_tuned_efsearch_reaches_the_target(data):
    xb, queries, mask, exclude = data
    index = build_index(xb, "HNSW8")
    t = tune_search_param(index, xb, queries, mask, N, 0.99, exclude)
    assert t.search_param == "efSearch" and t.recall >= 0.99
    assert faiss.downcast_index(index).hnsw.efSearch == t.search_value
    assert t.trials[0][0] == 16


def test_index_without_a_parameter_is_measured_once(data):
    xb, queries, mask, exclude = data
    t = tune_search_param(build_index(xb, "Flat"), xb, queries, mask, N, 1.0, exclude)
    assert (t.search_param, t.search_value, t.recall, t.trials) == (None, None, 1.0, [])
    pq = build_index(xb, "PQ4x4")  # coarse codes: far from exact
    recall = recall_at(pq, data)
    with pytest.raises(RetrievalError) as err:
        tune_search_param(pq, xb, queries, mask, N, 0.99, exclude)
    assert str(err.value) == (
        f"target recall 0.99 not reached: recall@{N} is {recall:.4f} and the index has no search "
        "parameter (nprobe or efSearch) to raise"
    )


def test_unreachable_target_names_the_best_recall(data):
    xb, queries, mask, exclude = data
    index = build_index(xb, "IVF8,PQ4x4")  # quantised codes cap the recall below 1 at any nprobe
    with pytest.raises(RetrievalError) as err:
        tune_search_param(index, xb, queries, mask, N, 1.0, exclude)
    m = re.fullmatch(
        rf"target recall 1.0 not reached: best recall@{N} (0\.\d{{4}}) at nprobe=(\d+) \(tried up to nprobe=8\)",
        str(err.value),
    )
    assert m, str(err.value)
    assert float(m[1]) == pytest.approx(recall_at(build_index(xb, "IVF8,PQ4x4"), data, int(m[2])), abs=5e-5)


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5])
def test_target_outside_zero_one(data, target):
    xb, queries, mask, exclude = data
    with pytest.raises(RetrievalError) as err:
        tune_search_param(build_index(xb[:500], "HNSW8"), xb[:500], queries, mask, N, target, exclude)
    assert str(err.value) == f"target recall must be in (0, 1], got {target}"


def test_no_active_interest(data):
    xb, queries, mask, _ = data
    with pytest.raises(RetrievalError, match="^no users with an active interest to tune the index on$"):
        tune_search_param(build_index(xb[:500], "HNSW8"), xb[:500], queries, np.zeros_like(mask), N, 0.9)


# ------------------------------------------------------------------------------ CLI


def test_build_index_target_recall_records_and_serves_the_choice(invoke, bundle_k4, tmp_path):
    out = tmp_path / "ivf"
    result = invoke("build-index", "--bundle", bundle_k4, "--out", out, "--factory", "IVF16,Flat",
                    "--target-recall", "0.95", "--tune-users", "10", "--tune-n", "20")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    tuning = manifest["tuning"]
    assert manifest["search_param"] == "nprobe" and 1 <= manifest["search_value"] <= 16
    assert tuning["recall"] >= 0.95 and tuning["target_recall"] == 0.95
    assert (tuning["n"], tuning["users"], tuning["part"]) == (20, 10, "validation")
    assert [x for x in result.stdout.splitlines() if x.startswith("tuned: ")] == [(
        f"tuned: nprobe={manifest['search_value']}  recall@20 {tuning['recall']:.4f} against exact search "
        "on 10 validation users (target 0.95)"
    )]
    index, manifest = load_index(out)
    assert faiss.extract_index_ivf(index).nprobe == manifest["search_value"]  # query serves at it

    # the same figure again from the library on the same sampled users: the merged retriever's
    # index (the default) is measured with the queries it serves, interests and prior weight
    b = load_bundle(bundle_k4)
    channels = load_channels(out, manifest)
    xb = prior_vectors(b.model.item_vectors().detach().numpy(), channels)
    set_search_param(index, "nprobe", 1)
    again = tune_on_validation(index, b, xb, 0.95, n=20, max_users=10, prior_weight=channels.weights.prior)
    assert (again.search_value, again.recall) == (manifest["search_value"], tuning["recall"])

    timed = invoke("query", "--bundle", bundle_k4, "--index", out, "--user", "u00003", "--json", "--timings")
    assert timed.exit_code == 0, timed.output
    line = [x for x in timed.stderr.splitlines() if x.startswith("timings: ")]
    phases = json.loads(line[0].removeprefix("timings: "))
    assert list(phases) == ["imports", "load_bundle", "load_index", "search", "print", "total"]
    assert json.loads(timed.stdout)["user"] == "u00003"  # stdout still holds only the JSON


def test_build_index_target_recall_on_flat(invoke, bundle_k4, tmp_path):
    out = tmp_path / "flat"
    result = invoke("build-index", "--bundle", bundle_k4, "--out", out, "--target-recall", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("tuned: no search parameter  recall@50 1.0000 against exact")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["search_param"], manifest["search_value"], manifest["tuning"]["recall"]) == (None, None, 1.0)


@pytest.mark.parametrize("value", ["0", "1.5", "-1"])
def test_build_index_target_recall_out_of_range(invoke, bundle_k4, tmp_path, value):
    out = tmp_path / "index"
    result = invoke("build-index", "--bundle", bundle_k4, "--out", out, "--target-recall", value)
    assert_clean_error(result, f"target recall must be in (0, 1], got {float(value)}")
    assert not out.exists()


def test_build_index_target_recall_never_reached(invoke, bundle_k4, tmp_path):
    out = tmp_path / "index"
    b = load_bundle(bundle_k4)
    xb = b.model.item_vectors().detach().numpy()
    with pytest.raises(RetrievalError) as err:
        tune_on_validation(build_index(xb, "PQ2x4"), b, xb, 0.99, max_users=10)
    result = invoke("build-index", "--bundle", bundle_k4, "--out", out, "--factory", "PQ2x4",
                    "--target-recall", "0.99", "--tune-users", "10", "--no-channels")
    assert_clean_error(result, str(err.value))
    assert str(err.value).startswith("target recall 0.99 not reached: recall@50 is 0.")
    assert not out.exists()  # no index without the recall asked for
