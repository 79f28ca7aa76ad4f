"""`retrieve experiment` options end to end: training seeds, variants, the tuning grid, the temporal
split and the pictures, from two small experiments run once for the module; bad settings are
refused in one line before any work; `bench/combine_experiments.py` over a report cut in two
gives the figures of the whole report."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import assert_clean_error

from retrieval.data import DataSpec, load_dataset, make_split
from retrieval.experiment import mean_std, split_settings
from retrieval.retrievers import RETRIEVERS

TINY_RUN = ("--epochs", "1", "--dim", "8", "--negatives", "32", "--knn-k", "10")
GRID = [0.001, 0.003]  # --tune lr=0.001,0.003
VARIANTS = ("mind:attention=hard", "mind:interests=2")
FIGURES = ("recall@20", "hit_rate@20", "ndcg@20", "recall@50", "hit_rate@50", "ndcg@50")
PNG = b"\x89PNG\r\n\x1a\n"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def seeds_run(invoke, tiny_data, tmp_path_factory):
    """One split seed, training seeds 0 and 1, two variants, an lr grid and (with matplotlib) the
    pictures: (report, stdout, its directory)."""
    root = tmp_path_factory.mktemp("experiment_seeds")
    plots = ("--plots", root / "plots") if HAVE_MATPLOTLIB else ()
    result = invoke("experiment", "--interactions", tiny_data["interactions"], "--items", tiny_data["items"],
                    "--users", tiny_data["users"], "--seeds", "2026", "--train-seeds", "0,1",
                    "--variants", ",".join(VARIANTS), "--tune", "lr=0.001,0.003", *TINY_RUN, *plots,
                    "--out", root / "e.json")
    assert result.exit_code == 0, result.output
    return json.loads((root / "e.json").read_text()), result.stdout, root


@pytest.fixture(scope="module")
def time_run(invoke, tiny_data, tmp_path_factory):
    """The temporal split (its default split seed), one training seed: (report, stdout)."""
    out = tmp_path_factory.mktemp("experiment_time") / "t.json"
    result = invoke("experiment", "--interactions", tiny_data["interactions"], "--split", "time",
                    "--train-seeds", "3", *TINY_RUN, "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.stdout


# ---------------------------------------------------------------------- training seeds


def test_train_seeds_make_one_run_each_and_mean_std_over_them(seeds_run):
    report, stdout, root = seeds_run
    assert report["complete"] and report["split"] == "user" and report["runs"] == 2
    assert report["split_seeds"] == [2026] and report["train_seeds"] == [0, 1]
    assert [(r["split_seed"], r["train_seed"]) for r in report["per_run"]] == [(2026, 0), (2026, 1)]
    for name, row in report["models"].items():  # every row, the variants' included
        for figure in FIGURES:
            assert row[figure] == pytest.approx(mean_std([r["models"][name][figure] for r in report["per_run"]]))
    rate = [r["training"]["mind"]["train_samples_per_s"] for r in report["per_run"]]
    assert report["training"]["mind"]["train_samples_per_s"] == pytest.approx(mean_std(rate))
    # the training seed reaches training: the untuned variant, same settings, learns differently per seed
    losses = [r["training"][VARIANTS[0]]["history"][0]["loss"] for r in report["per_run"]]
    assert losses[0] != losses[1]
    assert "training seeds [0, 1]" in stdout.splitlines()[0]
    assert "split seed 2026, training seeds 0, 1 (2 runs)" in (root / "e.md").read_text()


# --------------------------------------------------------------------------- variants


def test_variants_add_their_rows_trained_with_their_settings(seeds_run):
    report, stdout, root = seeds_run
    assert report["variants"] == list(VARIANTS)
    base = ["mind", "mind_share_merge", "mind_prior", "mind_knn", "retriever", "mind_k1", "item_knn", "popularity"]
    assert list(report["models"]) == base + [f"{v}{s}" for v in VARIANTS for s in ("", " +channels")]
    for run in report["per_run"]:
        for v in VARIANTS:
            assert run["training"][v]["chosen"] == {"mind:attention=hard": {"attention": "hard"},
                                                    "mind:interests=2": {"interests": 2}}[v]
            assert run["training"][v]["tried"] == []  # variants are not tuned
        # interests=2 reached the model: two interests where the main model has four
        assert sorted(run["diagnostics"]["mind:interests=2"]["per_interest"]) == ["0", "1"]
        assert sorted(run["diagnostics"]["mind"]["per_interest"]) == ["0", "1", "2", "3"]
    assert report["model_settings"]["interests"] == 4 and report["model_settings"]["attention"] == "max"
    md = (root / "e.md").read_text()
    assert "| variant `mind:attention=hard` |" in md and "| variant `mind:interests=2 +channels` |" in md
    assert any(line.split()[:1] == ["mind:attention=hard"] for line in stdout.splitlines())


def unknown_setting(key: str) -> str:
    """The library's message for a key no configuration of the main retriever has."""
    with pytest.raises(ValueError) as err:
        split_settings({key: 1}, "routing")
    return str(err.value)


def test_an_unknown_key_in_a_variant_is_one_line_before_any_work(invoke, tiny_data, tmp_path):
    result = invoke("experiment", "--interactions", tiny_data["interactions"], "--variants",
                    "mind:attention=hard,mind:bogus=1", *TINY_RUN, "--out", tmp_path / "e.json")
    message = unknown_setting("bogus")
    assert message.startswith("unknown setting 'bogus' for retriever 'routing'; model fields: ")
    assert "interests" in message and "; training fields: " in message and "lr" in message
    assert_clean_error(result, message)
    assert list(tmp_path.iterdir()) == []  # no report, no tables, no lock left


@pytest.mark.parametrize("option, value, message", [
    ("--variants", "nope:lr=0.1",
     f"unknown retriever 'nope' in variant 'nope:lr=0.1'; use mind or one of {', '.join(RETRIEVERS)}"),
    ("--variants", "mind:lr", "bad setting in variant 'mind:lr' 'lr'; write key=value"),
    ("--tune", "lr=", "bad tuning grid entry 'lr='; write key=value,value"),
    ("--tune", "speed=1,2", unknown_setting("speed")),
    ("--train-seeds", "0,x", "--train-seeds must be comma-separated integers, got '0,x'"),
    ("--train-seeds", "1,1", "--train-seeds must be distinct non-negative integers, at least one, got '1,1'"),
])
def test_a_bad_variant_grid_or_train_seeds_is_one_line_before_any_work(invoke, tiny_data, tmp_path, option,
                                                                          value, message):
    result = invoke("experiment", "--interactions", tiny_data["interactions"], option, value, *TINY_RUN,
                    "--out", tmp_path / "e.json")
    assert_clean_error(result, message)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- tuning


def test_tune_tries_the_grid_for_mind_and_k1_alike_and_keeps_the_best_on_validation(seeds_run):
    report, _, _ = seeds_run
    assert report["tuning_grid"] == {"lr": GRID}
    for run in report["per_run"]:
        for name in ("mind", "mind_k1"):  # K=1 gets the same budget
            t = run["training"][name]
            assert [p["lr"] for p in t["tried"]] == GRID
            best = max(t["tried"], key=lambda p: p["val_recall"])  # the first of equals, as the loop keeps
            assert t["chosen"] == {"lr": best["lr"]}
            assert t["val_recall@50"] == best["val_recall"]
            # the kept model is the one trained at the chosen point: its own validation figure
            assert t["history"][t["best_epoch"] - 1]["val_recall@50"] == best["val_recall"]


# ------------------------------------------------------------------------ temporal split


def test_split_time_reports_the_temporal_split(time_run, tiny_data):
    report, stdout = time_run
    assert report["complete"] and report["split"] == "time" and report["train_config"]["split"] == "time"
    assert report["split_seeds"] == [2026] and report["train_seeds"] == [3] and report["runs"] == 1
    run = report["per_run"][0]
    assert (run["split"], run["split_seed"], run["train_seed"]) == ("time", 2026, 3)
    cut = make_split(load_dataset(DataSpec(tiny_data["interactions"])), "time", 2026).cut
    assert run["split_cut"] == pytest.approx(cut)
    # recency-weighted priors are tried only on the temporal split
    halflives = {s["halflife"] for s in run["channels"]["mind"]["validation_settings"]}
    assert None in halflives and len(halflives - {None}) >= 1
    assert stdout.splitlines()[0].split("  ")[1:3] == ["time split", "seeds [2026]"]


def test_user_split_has_no_temporal_fields(seeds_run):
    for run in seeds_run[0]["per_run"]:
        assert run["split"] == "user" and "split_cut" not in run
        assert {s["halflife"] for s in run["channels"]["mind"]["validation_settings"]} == {None}


# ----------------------------------------------------------------------------- pictures


def test_plots_writes_the_two_pngs(seeds_run):
    pytest.importorskip("matplotlib")
    report, stdout, root = seeds_run
    expected = [root / "plots" / "recall_at_n.png", root / "plots" / "training_curves.png"]
    assert report["plots"] == [str(p) for p in expected]
    assert sorted(p.name for p in (root / "plots").iterdir()) == sorted(p.name for p in expected)
    for path in expected:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 2000
        assert f"plot: {path}" in stdout.splitlines()


# ------------------------------------------------------------------- combining reports


def test_combining_the_runs_of_two_reports_gives_the_whole_reports_figures(seeds_run, tmp_path, capsys):
    from bench.combine_experiments import FIGURES as COMBINED, MODELS, main

    report, _, _ = seeds_run
    paths = []
    for i, run in enumerate(report["per_run"]):  # a report of training seed 0, one of training seed 1
        part = {**report, "train_seeds": [run["train_seed"]], "runs": 1, "per_run": [run]}
        paths.append(tmp_path / f"seed{i}.json")
        paths[-1].write_text(json.dumps(part))
    main([str(p) for p in paths])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "runs (split seed, training seed) [(2026, 0), (2026, 1)] count 2"  # each run once
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in lines
            if line.startswith("| ") and " ± " in line}
    variants = [m for m in report["models"] if m not in MODELS]
    assert variants and list(rows) == [*MODELS, *variants]  # the variants' rows too, after the fixed ones
    for name in rows:
        m = report["models"][name]
        assert rows[name] == [f"{m[f]['mean']:.3f} ± {m[f]['std']:.3f}" for f in COMBINED], name
    rate = report["training"]["mind"]["train_samples_per_s"]
    assert f"mind samples/s {round(rate['mean'])} ± {round(rate['std'])}" in lines
