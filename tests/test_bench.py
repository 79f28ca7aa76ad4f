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
