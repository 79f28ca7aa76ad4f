"""Diagnostics worked by hand, the experiment's variant grammar, the pictures, and the CLI of
the temporal split, the merged retriever and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from retrieval.diagnostics import (by_history_length, interest_collapse, interest_diagnostics, routing_concentration,
                                   shares, slot_hits)
from retrieval.errors import RetrievalError
from retrieval.experiment import _aggregate, parse_grid, parse_settings, parse_variant, split_settings
from retrieval.mind import Interests
import cli
from retrieval.data import SPLITS, SplitKind
from tests.conftest import assert_clean_error, assert_usage_error

# ---------------------------------------------------------------------------- diagnostics


def test_interest_collapse_by_hand() -> None:
    v = np.zeros((3, 3, 2), dtype=np.float32)
    v[0, 0], v[0, 1] = [1, 0], [0, 2]  # orthogonal: cosine 0
    v[1, 0], v[1, 1], v[1, 2] = [1, 1], [2, 2], [-1, -1]  # pairs 1, -1, -1: mean -1/3
    v[2, 0] = [1, 0]  # one interest: not counted
    active = np.array([[True, True, False], [True, True, True], [True, False, False]])
    collapse, users = interest_collapse(v, active)
    assert users == 2 and collapse == pytest.approx((0.0 - 1 / 3) / 2)
    assert np.isnan(interest_collapse(v[2:], active[2:])[0])


def test_routing_concentration_by_hand() -> None:
    w = np.zeros((1, 3, 4))
    w[0, 0] = [0.95, 0.05, 0, 0]  # peaked: 0.95 > 0.9
    w[0, 1] = [0.3, 0.3, 0.2, 0.2]
    w[0, 2] = [9, 1, 0, 0]  # unnormalised: 0.9 of its weight, not more than 0.9
    assert routing_concentration(w, np.array([[True, True, True]])) == pytest.approx(1 / 3)
    assert routing_concentration(w, np.array([[True, False, False]])) == 1.0


def test_slot_and_hit_shares_by_hand() -> None:
    ranked = np.array([[5, 6, 7, 0], [1, 2, 3, 4]])
    truth = [np.array([6, 9]), np.array([1, 4, 3])]
    hits = slot_hits(ranked, truth)
    assert hits.tolist() == [[False, True, False, False], [True, False, True, True]]
    source = np.array([[0, 1, 1, -1], [0, 0, 1, 0]])
    got = shares(source, hits, ["a", "b"])
    # hits: (0,1) from b, (1,0) from a, (1,2) from b, (1,3) from a
    assert got == {"a": {"slots": 4 / 7, "hits": 2 / 4}, "b": {"slots": 3 / 7, "hits": 2 / 4}}


def test_figures_by_history_length_by_hand() -> None:
    ranked = np.array([[1, 2], [3, 4], [5, 6]])
    truth = [np.array([1]), np.array([9]), np.array([6, 8])]
    out = by_history_length(ranked, truth, np.array([3, 20, 70]), n=2)
    assert out["<16"] == {"users": 1, "recall@2": 1.0, "ndcg@2": 1.0}
    assert out["16-63"] == {"users": 1, "recall@2": 0.0, "ndcg@2": 0.0}
    ideal = 1 + 1 / np.log2(3)
    assert out[">=64"]["recall@2"] == 0.5 and out[">=64"]["ndcg@2"] == pytest.approx((1 / np.log2(3)) / ideal)


def test_interest_diagnostics_shapes() -> None:
    it = Interests(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[True, True]]), torch.tensor([[0.5, 0.5]]),
                   torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    d = interest_diagnostics(it, np.array([[0, 1, 1]]), np.array([[True, False, True]]))
    assert d["interest_collapse"] == 0.0 and d["routing_concentration"] == 1.0 and d["mean_active_interests"] == 2.0
    assert d["per_interest"] == {"0": {"slots": 1 / 3, "hits": 0.5}, "1": {"slots": 2 / 3, "hits": 0.5}}


# ---------------------------------------------------------------------------- experiment grammar


def test_variants_grids_and_settings_parse() -> None:
    v = parse_variant("mind:interests=1;lr=0.001;dynamic_interests=false")
    assert (v.label, v.retriever, v.settings) == ("mind:interests=1;lr=0.001;dynamic_interests=false", None,
                                                   {"interests": 1, "lr": 0.001, "dynamic_interests": False})
    assert parse_variant("routing:pow=0").retriever == "routing"
    assert parse_grid("lr=0.001,0.003;dim=32") == {"lr": [0.001, 0.003], "dim": [32]}
    assert parse_settings("attention=power") == {"attention": "power"}
    assert split_settings({"interests": 2, "lr": 0.01, "patience": 2}, "routing") == (
        {"interests": 2}, {"lr": 0.01, "patience": 2})


@pytest.mark.parametrize(("call", "message"), [
    (lambda: parse_variant("nope:k=1"), "unknown retriever 'nope' in variant 'nope:k=1'"),
    (lambda: parse_variant("mind:interests"), "bad setting in variant 'mind:interests' 'interests'; write key=value"),
    (lambda: parse_grid("lr="), "bad tuning grid entry 'lr='; write key=value,value"),
    (lambda: split_settings({"bogus": 1}, "routing"), "unknown setting 'bogus' for retriever 'routing'"),
])
def test_bad_variants_name_the_bad_part(call, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(message)


def test_aggregate_is_mean_and_std_of_every_leaf() -> None:
    runs = [{"a": {"x": 1.0, "y": float("nan")}, "b": 2, "s": "text"}, {"a": {"x": 3.0, "y": 1.0}, "b": 4, "s": "t"}]
    out = _aggregate(runs)
    assert out["a"]["x"] == {"mean": 2.0, "std": pytest.approx(np.sqrt(2))}
    assert out["a"]["y"] == {"mean": 1.0, "std": 0.0}  # nan runs left out
    assert out["b"]["mean"] == 3.0 and "s" not in out


# ---------------------------------------------------------------------------- pictures


def test_plots_are_png_files(tmp_path: Path) -> None:
    from retrieval.plots import plot_recall_curves, plot_training

    p = plot_recall_curves({"mind": [0.1, 0.2, 0.3], "item_knn": [0.05, 0.2, 0.35]}, tmp_path / "a" / "r.png")
    q = plot_training({"mind": [{"epoch": 1, "loss": 5.0, "val_recall@50": 0.2},
                                {"epoch": 2, "loss": 4.0, "val_recall@50": 0.25}]}, tmp_path / "t.png")
    for path in (p, q):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    with pytest.raises(RetrievalError, match="no recall curves"):
        plot_recall_curves({}, tmp_path / "x.png")


# ---------------------------------------------------------------------------- CLI


def test_cli_channels_index_query_and_evaluate(invoke, bundle_k4, bundle_k1, small_data, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = invoke("build-index", "--bundle", bundle_k4, "--out", out, "--channels", "--knn-k", "20")
    assert result.exit_code == 0, result.output
    assert "channels: prior weight" in result.stdout and "chosen on" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["channels"]["knn_k"] == 20 and "channels.npz" in manifest["files_sha256"]
    assert manifest["d"] == 17  # D=16 item vectors + the prior coordinate

    user = "u00001"
    q = invoke("query", "--bundle", bundle_k4, "--index", out, "--user", user, "-n", "8", "--json")
    assert q.exit_code == 0, q.output
    rows = json.loads(q.stdout)["items"]
    assert len(rows) == 8 and all(r["channel"] in ("mind", "popularity", "item_knn") for r in rows)
    assert all((r["interest"] >= 0) == (r["channel"] == "mind") for r in rows)
    table = invoke("query", "--bundle", bundle_k4, "--index", out, "--user", user, "-n", "8")
    assert "channel" in table.stdout.splitlines()[1]
    share = invoke("query", "--bundle", bundle_k4, "--index", out, "--user", user, "--merge", "share")
    assert_clean_error(share, "--merge share applies to MIND alone; this index holds the merged retriever "
                              "(built with --channels)")

    report = tmp_path / "r.json"
    ev = invoke("evaluate", "--bundle", bundle_k4, "--index", out, "--k1-bundle", bundle_k1, "--out", report,
                "--plots", tmp_path / "plots")
    assert ev.exit_code == 0, ev.output
    r = json.loads(report.read_text())
    assert {"mind", "mind_prior", "retriever", "mind_k1", "item_knn", "popularity"} <= set(r["models"])
    assert r["channels"]["weights"] == manifest["channels"]["weights"]  # the index's, chosen at build time
    assert set(r["diagnostics"]["mind"]) >= {"interest_collapse", "routing_concentration", "per_interest"}
    assert len(r["recall_curve"]["mind"]) == 200 and r["split"] == "user"
    assert list(r["by_history_length"]["item_knn"]) == ["<16", "16-63", ">=64"]
    assert "interest collapse" in ev.stdout and "by history length" in ev.stdout
    assert (tmp_path / "plots" / "recall_at_n.png").is_file() and (tmp_path / "plots" / "training_curves.png").is_file()


def test_cli_split_options(invoke, bundle_k4, small_data, tmp_path: Path) -> None:
    assert_clean_error(invoke("evaluate", "--bundle", bundle_k4, "--split", "time"),
                       f"{bundle_k4}: the bundle was trained on the user split, not the time split "
                       "(train it with --split time)")
    bad_split = invoke("train", "--interactions", small_data["interactions"], "--out", tmp_path / "b",
                       "--split", "later")  # a typer choice: typer's own usage error
    assert_usage_error(bad_split, "--split", "'later' is not one of 'user', 'time'")
    assert not (tmp_path / "b").exists()
    assert get_args(get_args(cli.SplitKind)[0]) == get_args(SplitKind) == SPLITS  # the choice mirrors the library
    bad = invoke("experiment", "--interactions", small_data["interactions"], "--out", tmp_path / "e.json",
                 "--variants", "mind:bogus=1")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: unknown setting 'bogus' for retriever 'routing'")
    assert not (tmp_path / "e.json").exists()


def test_cli_trains_and_evaluates_on_the_temporal_split(invoke, small_data, tmp_path: Path) -> None:
    out = tmp_path / "time"
    result = invoke("train", "--interactions", small_data["interactions"], "--out", out, "--split", "time",
                    "--epochs", "1", "--dim", "8", "--negatives", "32", "--interests", "2")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split"] == "time" and manifest["split_cut"] > 0
    assert {"val_ndcg@50", "val_interest_collapse", "val_routing_concentration"} <= set(manifest["history"][0])
    ev = invoke("evaluate", "--bundle", out, "--split", "time", "--part", "validation", "--out", tmp_path / "r.json")
    assert ev.exit_code == 0, ev.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["split"] == "time" and r["split_cut"] == manifest["split_cut"]
