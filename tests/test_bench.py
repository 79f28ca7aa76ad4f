"""Smoke run of the benchmark suite: the parts run in their own processes, the report gathers them."""

import json
from pathlib import Path

import pytest
from conftest import ML100K

from bench.suite import main


def test_suite_smoke_gathers_parts_and_skips_a_missing_public_env(tmp_path, capsys):
    rc = main(["--scale", "smoke", "--out", str(tmp_path), "--parts", "train,public",
               "--public-python", str(tmp_path / "no-venv" / "bin" / "python")])
    assert rc == 0, capsys.readouterr()
    report = json.loads((tmp_path / "report-smoke.json").read_text())
    train, public = report["parts"]["train"], report["parts"]["public"]
    assert train["status"] == "ok" and train["result"] == json.loads((tmp_path / "bench_train.json").read_text())
    assert train["table"] and train["table"] in (tmp_path / "report-smoke.txt").read_text()
    assert public["status"] == "skipped" and "no-venv/bin/python not found" in public["reason"]
    # collecting again reads the same figures without running anything
    assert main(["--scale", "smoke", "--out", str(tmp_path), "--parts", "train", "--collect"]) == 0
    again = json.loads((tmp_path / "report-smoke.json").read_text())
    assert again["collected_only"] and again["parts"]["train"]["result"] == train["result"]


def test_suite_rejects_an_unknown_part(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--parts", "train,gpu"]) == 2
    assert capsys.readouterr().err == "error: unknown part 'gpu'; use query, serve, train, ingest, scale, public\n"
    assert not (tmp_path / "report-smoke.json").exists()


def test_serve_summary_separates_the_p99_target_from_the_sustained_rate():
    from bench.bench_serve import summarise

    def row(rate, achieved, p99, errors=0):
        return {"offered_rate": rate, "achieved_rate": achieved, "p99_ms": p99, "errors": errors,
                "held": errors == 0 and achieved >= 0.98 * rate, "within_p99_target": False}

    result = {"inprocess": {"retrieval": {"requests_per_s": 1200.0}},
              "retrieval": [row(250, 250, 8.0), row(500, 499, 45.0), row(1000, 700, 2800.0), row(1500, 900, 9000.0, 3)],
              "rank": [row(50, 50, 40.0), row(100, 52, 5900.0)], "trivial": [row(1000, 1000, 3.0)],
              "reload": {"errors": 0, "status": 200}}
    s = summarise(result)["summary"]
    assert s["retrieval_highest_held_rate_p99<=10ms"] == 250 and s["retrieval_share_of_inprocess"] == 250 / 1200
    assert s["retrieval_sustained_rate"] == 700  # the run with failures does not count
    assert s["rank_highest_held_rate_p99<=50ms"] == 50 and s["rank_sustained_rate"] == 52
    t = result["targets"]
    assert t["served>=50%_of_inprocess"] and not t["retrieval>=1000/s_p99<=10ms"] and not t["rank>=100/s_p99<=50ms"]
    assert t["zero_errors_across_reload"]


def _ranker_report(seeds, aucs, complete=True, negatives=4, ranker="din", retrieval_ndcg=0.275, epochs=8):
    """A ranker-experiment report as `experiment-rankers` writes it, with hand-made per-seed records."""
    from retrieval.ranking.experiment import KIND, aggregate_rankers

    per_seed = [{"split_seed": s, "retrieval": {"best_epoch": 3, "train_seconds": 10.0 * a},
                 "rankers": {ranker: {"auc": a, "two_stage_ndcg@20": 0.2 + a / 10, "retrieval_ndcg@20": retrieval_ndcg,
                                      "retrieval_weight": a, "best_epoch": 2}}} for s, a in zip(seeds, aucs)]
    return {"kind": KIND, "complete": complete, "dataset": "d.csv", "data_fingerprint": "f", "split_seeds": list(seeds),
            "part": "test", "M": 200, "jobs": 1, "timing_note": "one process", "retrieval_settings": {},
            "retrieval_train_config": {"epochs": 30, "split_seed": seeds[0]}, "retrieval": {},
            "rank_train_config": {"negatives": negatives, "epochs": epochs, "patience": 2, "monitor": "auc",
                                  "hard_share": 0.0},
            "sessions": {}, "rankers": aggregate_rankers([ranker], per_seed), "per_seed": per_seed,
            "wall_time_s": 100.0 * len(seeds), "created": "2026-12-01T00:00:00Z", "command": "retrieve experiment-rankers"}


def test_combined_ranker_reports_aggregate_every_seed_once(tmp_path):
    import json

    import pytest

    from bench.combine_ranker_experiments import combine, main

    a, b = _ranker_report([2027, 2028], [0.8, 0.9]), _ranker_report([2026], [0.7])
    report = combine([("a", a), ("b", b)])
    assert report["split_seeds"] == [2026, 2027, 2028] and report["complete"]
    assert report["rankers"]["din"]["auc"]["mean"] == pytest.approx(0.8)
    assert report["rankers"]["din"]["auc"]["std"] == pytest.approx(0.1)  # ddof 1 over 0.7, 0.8, 0.9
    assert report["rankers"]["din"]["seeds_above_retrieval_ndcg@20"] == 2  # 0.28 and 0.29 above 0.275, 0.27 not
    assert report["wall_time_s"] == 200.0 and [p["split_seeds"] for p in report["parts"]] == [[2027, 2028], [2026]]
    assert not combine([("a", a), ("c", _ranker_report([2029], [0.7], complete=False))])["complete"]
    with pytest.raises(ValueError, match="split seed 2027: ranker din is in two reports"):
        combine([("a", a), ("a2", _ranker_report([2027], [0.7]))])
    with pytest.raises(ValueError, match="rank_train_config differs"):
        combine([("a", a), ("n", _ranker_report([2029], [0.7], negatives=1))])
    paths = []
    for name, r in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(r))
        paths.append(str(tmp_path / name))
    main([*paths, "--out", str(tmp_path / "all.json")])
    assert json.loads((tmp_path / "all.json").read_text())["split_seeds"] == [2026, 2027, 2028]
    assert "2026, 2027, 2028" in (tmp_path / "all.md").read_text()
    with pytest.raises(SystemExit, match="is one of the reports"):
        main([*paths, "--out", paths[0]])


def test_combined_ranker_reports_join_other_rankers_on_the_same_seeds_and_retrieval_stage(tmp_path):
    import json

    import pytest

    from bench.combine_ranker_experiments import combine, main

    din = _ranker_report([2026, 2027], [0.8, 0.9])
    dmin = _ranker_report([2026, 2027], [0.7, 0.8], ranker="dmin")  # same retrieval stage, other timings and weights
    report = combine([("din", din), ("dmin", dmin)])
    assert list(report["rankers"]) == ["din", "dmin"] and report["split_seeds"] == [2026, 2027]
    assert all(set(s["rankers"]) == {"din", "dmin"} for s in report["per_seed"]) and report["complete"]
    assert report["rankers"]["dmin"]["auc"]["mean"] == pytest.approx(0.75)
    assert report["rank_train_config"]["epochs"] == 8
    # a ranker on fewer seeds than the others: its row says which, and the report is incomplete
    short = combine([("din", din), ("dmin", _ranker_report([2026], [0.7], ranker="dmin"))])
    assert short["rankers"]["dmin"]["seeds"] == [2026] and not short["complete"]
    # another retrieval stage on a shared seed: refused, whatever the ranker
    with pytest.raises(ValueError, match="split seed 2026: its retrieval stage differs"):
        combine([("din", din), ("dmin", _ranker_report([2026], [0.7], ranker="dmin", retrieval_ndcg=0.25))])
    # ... and where both reports say which CPU trained them and the CPUs differ, the refusal names both
    intel = {**din, "trained_on": {"device": "cpu", "cpu": "Intel Xeon", "cpu_capability": "AVX512"}}
    amd = {**_ranker_report([2026], [0.7], ranker="dmin", retrieval_ndcg=0.25),
           "trained_on": {"device": "cpu", "cpu": "AMD EPYC", "cpu_capability": "AVX2"}}
    with pytest.raises(ValueError, match=r"split seed 2026: its retrieval stage differs from an earlier report's "
                                         r"\(trained on AMD EPYC \(AVX2\), the earlier on Intel Xeon \(AVX512\): "
                                         r"a seed's training reproduces on one kind of CPU, not across kinds\)"):
        combine([("intel", intel), ("amd", amd)])
    # the combined report names a machine only where every part names that one
    mixed = combine([("intel", intel), ("dmin", dmin)])
    assert [p["machine"] for p in mixed["parts"]] == ["Intel Xeon (AVX512)", None] and "trained_on" not in mixed
    assert combine([("intel", intel), ("dmin", {**dmin, "trained_on": intel["trained_on"]})])["trained_on"] == \
        intel["trained_on"]
    # other epoch caps: every label says its own cap
    capped = combine([("din", din), ("dmin", _ranker_report([2026, 2027], [0.7, 0.8], ranker="dmin", epochs=6))])
    assert list(capped["rankers"]) == ["din:epochs=8", "dmin:epochs=6"] and capped["rank_train_config"]["epochs"] is None
    (tmp_path / "a.json").write_text(json.dumps(din))
    (tmp_path / "b.json").write_text(json.dumps(_ranker_report([2026, 2027], [0.7, 0.8], ranker="dmin", epochs=6)))
    main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "all.json")])
    md = (tmp_path / "all.md").read_text()
    assert "each at most the epochs its label says" in md and "| dmin:epochs=6 |" in md
    # a retrieval setting an older part predates counts as its default; another value is refused
    newer = _ranker_report([2026, 2027], [0.7, 0.8], ranker="dmin")
    newer["retrieval_train_config"]["recent_targets"] = 1.0
    assert list(combine([("din", din), ("dmin", newer)])["rankers"]) == ["din", "dmin"]
    newer["retrieval_train_config"]["recent_targets"] = 0.5
    with pytest.raises(ValueError, match="retrieval_train_config differs"):
        combine([("din", din), ("dmin", newer)])
    with pytest.raises(ValueError, match="rank_train_config differs"):  # other training settings still refused
        combine([("din", din), ("dmin", _ranker_report([2026], [0.7], ranker="dmin", negatives=1))])


def _experiment_report(tmp_path, name, runs, complete=True, fingerprint="f", split="user"):
    """A `retrieve experiment` report with hand-made per-run records: every model scores
    recall@50 = r + its place in MODELS / 100 on run (split seed, training seed, r); the other
    figures r / 2; MIND trains at 1000 * r samples/s. Written to tmp_path / name."""
    from bench.combine_experiments import FIGURES, MODELS

    per_run = [{"split_seed": s, "train_seed": t,
                "models": {m: {f: (r + i / 100 if f == "recall@50" else r / 2) for f in FIGURES}
                           for i, m in enumerate(MODELS)},
                "training": {m: {"train_samples_per_s": 1000.0 * r} for m in ("mind", "mind_k1")}}
               for s, t, r in runs]
    report = {"kind": "retrieval-experiment", "complete": complete, "data_fingerprint": fingerprint, "split": split,
              "split_seeds": sorted({s for s, _, _ in runs}), "train_seeds": sorted({t for _, t, _ in runs}),
              "runs": len(runs), "per_run": per_run}
    (tmp_path / name).write_text(json.dumps(report))
    return str(tmp_path / name)


def test_combined_experiment_reports_give_mean_and_std_over_every_run_once(tmp_path, capsys):
    from bench.combine_experiments import main

    a = _experiment_report(tmp_path, "a.json", [(2027, 0, 0.2), (2028, 0, 0.3)])
    b = _experiment_report(tmp_path, "b.json", [(2026, 0, 0.1)])
    main([a, b])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "runs (split seed, training seed) [(2026, 0), (2027, 0), (2028, 0)] count 3"
    assert lines[1] == "| model | Recall@20 | NDCG@20 | Recall@50 | HitRate@50 | NDCG@50 |"
    # mind is MODELS[1]: recall@50 0.11, 0.21, 0.31 -> 0.21 ± 0.1; the other figures 0.05, 0.1, 0.15 -> 0.1 ± 0.05
    assert lines[4] == "| mind | 0.100 ± 0.050 | 0.100 ± 0.050 | 0.210 ± 0.100 | 0.100 ± 0.050 | 0.100 ± 0.050 |"
    assert lines[3].startswith("| retriever | ") and "| 0.200 ± 0.100 |" in lines[3]
    assert "mind per run R@50/N@50 [(2026, 0, 0.11, 0.05), (2027, 0, 0.21, 0.1), (2028, 0, 0.31, 0.15)]" in lines
    assert "mind samples/s 200 ± 100" in lines
    # the same runs as one report: the same figures
    main([_experiment_report(tmp_path, "all.json", [(2026, 0, 0.1), (2027, 0, 0.2), (2028, 0, 0.3)])])
    assert capsys.readouterr().out.splitlines() == lines

    unfinished = _experiment_report(tmp_path, "c.json", [(2029, 0, 0.4)], complete=False)
    with pytest.raises(SystemExit) as stop:
        main([a, unfinished])
    assert stop.value.code == f"error: {unfinished}: the experiment did not finish every run"


def test_combining_experiments_refuses_other_data_another_split_and_a_run_twice(tmp_path, capsys):
    from bench.combine_experiments import main

    a = _experiment_report(tmp_path, "a.json", [(2026, 0, 0.1)])
    for name, kwargs, message in (
        ("f.json", {"fingerprint": "g"}, "data_fingerprint differs from"),
        ("t.json", {"split": "time"}, "split differs from"),
    ):
        other = _experiment_report(tmp_path, name, [(2027, 0, 0.2)], **kwargs)
        with pytest.raises(SystemExit) as stop:
            main([a, other])
        assert stop.value.code == f"error: {other}: {message} {a}'s; only the split and training seeds may differ"
    with pytest.raises(SystemExit) as stop:  # the same report twice would halve its std's weight
        main([a, a])
    assert stop.value.code == f"error: {a}: run (split seed, training seed) (2026, 0) is in two reports"
    # temporal runs share one split seed and differ by training seed: both kept, each labelled by both
    b = _experiment_report(tmp_path, "b.json", [(2026, 1, 0.3)])
    main([a, b])
    assert capsys.readouterr().out.splitlines()[0] == "runs (split seed, training seed) [(2026, 0), (2026, 1)] count 2"


def test_combining_experiments_without_k1_prints_the_models_every_run_has(tmp_path, capsys):
    """An `--interests 1` report has no separate K=1 row: the table leaves it out, no KeyError."""
    from bench.combine_experiments import main

    path = _experiment_report(tmp_path, "k1.json", [(2026, 0, 0.1), (2027, 0, 0.2)])
    report = json.loads(Path(path).read_text())
    for r in report["per_run"]:
        del r["models"]["mind_k1"], r["training"]["mind_k1"]
    Path(path).write_text(json.dumps(report))
    main([path])
    out = capsys.readouterr().out
    assert "| mind | " in out and "mind_k1" not in out


@pytest.mark.skipif(not ML100K.is_dir(), reason="../shared/datasets/ml-100k not present")
def test_rank_latency_bench_times_every_ranker_and_writes_its_json(tmp_path, capsys):
    from bench.bench_rank_latency import main as bench_main

    bench_main(["--data", str(ML100K), "--out", str(tmp_path), "--rankers", "base,din:att_hidden=8",
                "--requests", "5", "--candidates", "20"])
    res = json.loads((tmp_path / "bench_rank_latency.json").read_text())
    assert (res["M"], res["requests"], res["threads"]) == (20, 5, 1)
    assert list(res["rankers"]) == ["base", "din:att_hidden=8"]
    for r in res["rankers"].values():
        assert 0 < r["p50_ms"] <= r["p99_ms"] and 0 < r["cpu_p50_ms"] <= r["cpu_p99_ms"]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("rerank one user's 20 candidates, 5 requests, 1 thread(s)")
    assert [line.split()[0] for line in out[2:]] == ["base", "din:att_hidden=8"]
