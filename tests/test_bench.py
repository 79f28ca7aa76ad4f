"""Smoke run of the benchmark suite: the parts run in their own processes, the report gathers them."""

import json

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
