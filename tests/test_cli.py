"""The `retrieve` CLI end to end: exit codes, what a user reads, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import assert_clean_error, assert_usage_error

from data.synthetic import SyntheticConfig, generate

USER = "u00003"
ITEM_ID = re.compile(r"^i\d{5}$")
MODELS = ("mind", "mind_share_merge", "mind_prior", "mind_knn", "retriever", "mind_k1", "item_knn", "popularity")




def history(data: dict[str, Path], user: str) -> list[str]:
    log = pl.read_csv(data["interactions"], schema_overrides={"user_id": pl.String, "item_id": pl.String})
    return log.filter(pl.col("user_id") == user).get_column("item_id").to_list()


def query_json(invoke, bundle: Path, index: Path, *args: str | Path) -> object:
    result = invoke("query", "--bundle", bundle, "--index", index, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_users(path: Path, users: list[str]) -> Path:
    path.write_text("\n".join(users) + "\n")
    return path


# ------------------------------------------------------------------------- generate


def test_generate_writes_the_library_log(invoke, tmp_path):
    result = invoke("generate", "--out", tmp_path / "cli", "--users", "20", "--items", "400", "--seed", "4")
    assert result.exit_code == 0, result.output
    expected = generate(tmp_path / "lib", SyntheticConfig(n_users=20, n_items=400, seed=4))
    for name, path in expected.items():
        assert f"{name}: {tmp_path / 'cli' / path.name}" in result.stdout.splitlines()
        assert (tmp_path / "cli" / path.name).read_bytes() == path.read_bytes()


def test_generate_parquet_vectorised_writes_the_library_log(invoke, tmp_path):
    result = invoke("generate", "--out", tmp_path / "cli", "--users", "30", "--items", "400", "--seed", "4",
                    "--format", "parquet", "--method", "vectorised", "--topics", "12", "--max-len", "30", "--mean-len", "25")
    assert result.exit_code == 0, result.output
    expected = generate(tmp_path / "lib", SyntheticConfig(n_users=30, n_items=400, seed=4, n_topics=12, max_len=30, mean_len=25.0,
                                                          method="vectorised"), fmt="parquet")
    assert expected["interactions"].suffix == ".parquet"
    for name, path in expected.items():
        got = tmp_path / "cli" / path.name
        assert f"{name}: {got}" in result.stdout.splitlines()
        if path.suffix == ".parquet":
            assert pl.read_parquet(got).equals(pl.read_parquet(path))
        else:
            assert got.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("option, value, choices", [
    ("--format", "tsv", "'csv', 'parquet'"),
    ("--method", "fast", "'per_user', 'vectorised'"),
])
def test_generate_rejects_an_unknown_format_or_method(invoke, tmp_path, option, value, choices):
    result = invoke("generate", "--out", tmp_path / "data", option, value)
    assert_usage_error(result, option, f"'{value}' is not one of {choices}")
    assert not (tmp_path / "data").exists()


def test_generate_rejects_sizes_the_config_cannot_hold(invoke, tmp_path):
    with pytest.raises(ValueError) as err:
        SyntheticConfig(n_users=10, n_items=50, seed=0)
    result = invoke("generate", "--out", tmp_path / "data", "--users", "10", "--items", "50")
    assert_clean_error(result, str(err.value))
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------- train → query


def test_train_reports_the_bundle(bundle_k4):
    manifest = json.loads((bundle_k4 / "manifest.json").read_text())
    config = json.loads((bundle_k4 / "config.json").read_text())
    assert manifest["kind"] == "mind-bundle" and manifest["best_epoch"] == 1
    assert config["model"]["interests"] == 4 and config["model"]["dim"] == 16
    assert config["train"]["negatives"] == 64 and config["train"]["epochs"] == 1
    assert config["retriever"] == "routing" and config["model"]["attention"] == "max"  # MIND's default


def test_train_attention_defaults_to_the_extractors_own(invoke, tiny_data, tmp_path):
    out = tmp_path / "sa_default"
    result = invoke("train", "--interactions", tiny_data["interactions"], "--out", out, "--extractor",
                    "self-attention", "--epochs", "1", "--dim", "8", "--negatives", "16", "--max-steps", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["model"]["attention"] == "hard"  # ComiRec-SA keeps hard


def test_train_max_steps_caps_each_epoch(invoke, tiny_data, tmp_path):
    out = tmp_path / "capped"
    result = invoke("train", "--interactions", tiny_data["interactions"], "--out", out, "--epochs", "2",
                    "--dim", "8", "--negatives", "16", "--batch-size", "8", "--max-steps", "3",
                    "--recent-targets", "0.5")
    assert result.exit_code == 0, result.output
    history = json.loads((out / "manifest.json").read_text())["history"]
    assert len(history) == 2
    assert json.loads((out / "config.json").read_text())["train"]["recent_targets"] == 0.5
    # 3 steps of 8 windows each: the rate is over exactly 24 samples per epoch
    assert all(abs(h["samples_per_s"] * h["seconds"] - 24) < 1e-6 for h in history)


def test_train_self_attention_with_auto_interests_records_every_k(invoke, tiny_data, tmp_path):
    out = tmp_path / "sa"
    result = invoke("train", "--interactions", tiny_data["interactions"], "--items", tiny_data["items"],
                    "--out", out, "--extractor", "self-attention", "--interests", "auto", "--epochs", "1",
                    "--dim", "8", "--negatives", "16", "--hard-negatives", "0.5", "--peak-penalty", "0.1",
                    "--target-window", "3", "--attention", "max")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    search = json.loads((out / "manifest.json").read_text())["interests_search"]
    assert config["retriever"] == "self-attention" and config["model"]["interests"] == search["chosen"]
    assert (config["model"]["hard_negatives"], config["model"]["peak_penalty"]) == (0.5, 0.1)
    assert config["model"]["attention"] == "max"
    assert config["train"]["target_window"] == 3
    assert sorted(search["by_interests"], key=int) == ["1", "2", "4", "8"]
    assert f"K={search['chosen']}" in result.stdout and "<- chosen" in result.stdout
    index = tmp_path / "sa_index"
    assert invoke("build-index", "--bundle", out, "--out", index).exit_code == 0
    items = query_json(invoke, out, index, "--user", "u00001", "-n", "5")["items"]
    assert len(items) == 5 and len({r["item"] for r in items}) == 5


@pytest.mark.parametrize("option, value, message", [
    ("--interests", "two", "must be a positive integer or auto, got 'two'"),
    ("--interests", "0", "must be a positive integer or auto, got '0'"),
    ("--extractor", "transformer", "'transformer' is not one of 'routing', 'self-attention'"),
])
def test_train_rejects_a_bad_interest_count_or_extractor(invoke, tiny_data, tmp_path, option, value, message):
    out = tmp_path / "bad"
    result = invoke("train", "--interactions", tiny_data["interactions"], "--out", out, option, value)
    assert_usage_error(result, option, message)
    assert not out.exists()


def test_train_refuses_to_resume_an_interest_search(invoke, tiny_data, tmp_path):
    out = tmp_path / "auto"
    result = invoke("train", "--interactions", tiny_data["interactions"], "--out", out, "--interests", "auto",
                    "--resume")
    assert_clean_error(result, "--resume continues one training run; --interests auto trains several (give one K)")
    assert not out.exists()


def test_query_table(invoke, bundle_k4, index_k4, small_data):
    seen = history(small_data, USER)
    result = invoke("query", "--bundle", bundle_k4, "--index", index_k4, "--user", USER, "-n", "7")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"user {USER}  ({len(seen)} behaviours)"
    assert lines[1].split() == ["rank", "item", "score", "interest", "title"]
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 7
    assert [int(r[0]) for r in rows] == list(range(1, 8))
    items = [r[1] for r in rows]
    assert all(ITEM_ID.match(i) for i in items), items
    assert len(set(items)) == 7
    assert not set(items) & set(seen)
    assert all(0 <= int(r[3]) < 4 for r in rows)


def test_query_json_matches_the_table(invoke, bundle_k4, index_k4, small_data):
    n = 12
    out = query_json(invoke, bundle_k4, index_k4, "--user", USER, "-n", str(n))
    assert out["user"] == USER and out["history"] == len(history(small_data, USER))
    rows = out["items"]
    assert len(rows) == n
    titles = dict(pl.read_csv(small_data["items"]).select("item_id", "title").iter_rows())
    for row in rows:
        assert ITEM_ID.match(row["item"])
        assert row["title"] == titles[row["item"]]
        assert 0 <= row["interest"] < 4
    scores = [row["score"] for row in rows]
    assert all(a >= b for a, b in zip(scores, scores[1:])), scores
    assert not {row["item"] for row in rows} & set(history(small_data, USER))

    table = invoke("query", "--bundle", bundle_k4, "--index", index_k4, "--user", USER, "-n", str(n))
    assert [line.split()[1] for line in table.stdout.splitlines()[2:]] == [row["item"] for row in rows]


def test_query_users_file(invoke, bundle_k4, index_k4, tmp_path):
    users = write_users(tmp_path / "users.txt", [USER, "u00100"])
    out = query_json(invoke, bundle_k4, index_k4, "--users-file", users, "-n", "5")
    assert isinstance(out, list) and [r["user"] for r in out] == [USER, "u00100"]
    assert all(len(r["items"]) == 5 for r in out)
    alone = query_json(invoke, bundle_k4, index_k4, "--user", USER, "-n", "5")
    assert out[0]["items"] == alone["items"]  # batching users changes nothing
    assert [r["item"] for r in out[0]["items"]] != [r["item"] for r in out[1]["items"]]


def test_query_share_merge_keeps_the_same_candidates_out_of_history(invoke, bundle_k4, index_k4, small_data):
    out = query_json(invoke, bundle_k4, index_k4, "--user", USER, "-n", "10", "--merge", "share")
    items = [r["item"] for r in out["items"]]
    assert len(items) == 10 == len(set(items))
    assert not set(items) & set(history(small_data, USER))


# ------------------------------------------------------------------------- evaluate


def test_evaluate_report(invoke, bundle_k4, bundle_k1, index_k4, tmp_path):
    report_path = tmp_path / "report.json"
    result = invoke("evaluate", "--bundle", bundle_k4, "--index", index_k4, "--k1-bundle", bundle_k1,
                    "--out", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert set(report["models"]) == set(MODELS)
    for name, row in report["models"].items():
        for metric in ("recall", "hit_rate", "ndcg"):
            for n in (20, 50):
                assert 0.0 <= row[f"{metric}@{n}"] <= 1.0, (name, metric, n)
        assert row["recall@20"] <= row["recall@50"] and row["hit_rate@20"] <= row["hit_rate@50"]
        assert row["users_per_s"] > 0
        assert row["users"] == report["users"]
    assert report["split_seed"] == 2026
    assert (report["L"], report["K"], report["dim"]) == (50, 4, 16)
    assert report["users"] > 0
    assert report["training"]["mind"]["train_samples_per_s"] > 0
    assert report["training"]["mind_k1"]["bundle_fingerprint"] != report["training"]["mind"]["bundle_fingerprint"]
    table = result.stdout.splitlines()
    for name in MODELS:
        assert any(line.split()[:1] == [name] for line in table), name
    assert f"report: {report_path}" in table


# ---------------------------------------------------------------------- determinism


def test_same_seed_same_bundle(invoke, tiny_k1_twice, tiny_data, tmp_path):
    a, b = tiny_k1_twice
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()
    fingerprint = [json.loads((p / "manifest.json").read_text())["bundle_fingerprint"] for p in (a, b)]
    assert fingerprint[0] == fingerprint[1]

    other = tmp_path / "other_seed"
    result = invoke("train", "--interactions", tiny_data["interactions"], "--out", other, "--epochs", "1",
                    "--dim", "16", "--negatives", "64", "--interests", "1", "--seed", "6", "--max-len", "10")
    assert result.exit_code == 0, result.output
    assert (other / "model.pt").read_bytes() != (a / "model.pt").read_bytes()


# ---------------------------------------------------------------------------- errors


def test_unknown_user(invoke, bundle_k4, index_k4):
    result = invoke("query", "--bundle", bundle_k4, "--index", index_k4, "--user", "u99999")
    assert_clean_error(result, "unknown user 'u99999': not in the training log")


def test_unknown_user_in_users_file(invoke, bundle_k4, index_k4, tmp_path):
    users = write_users(tmp_path / "users.txt", [USER, "nobody"])
    result = invoke("query", "--bundle", bundle_k4, "--index", index_k4, "--users-file", users)
    assert_clean_error(result, "unknown user 'nobody': not in the training log")


@pytest.mark.parametrize("which, message", [
    ("neither", "give --user, --users-file or --history"),
    ("both", "give exactly one of --user or --users-file"),
    ("file and history", "--history goes with --user or alone, not with --users-file"),
])
def test_who_to_recommend_for(invoke, bundle_k4, index_k4, tmp_path, which, message):
    users = write_users(tmp_path / "u.txt", [USER])
    args = {"neither": [], "both": ["--user", USER, "--users-file", users],
            "file and history": ["--users-file", users, "--history", "i00001"]}[which]
    result = invoke("query", "--bundle", bundle_k4, "--index", index_k4, *args)
    assert_clean_error(result, message)


def test_query_history_and_explain(invoke, bundle_k4, index_k4, small_data):
    seen = history(small_data, USER)
    fresh = [i for i in (f"i{k:05d}" for k in range(1, 300)) if i not in seen][:3]
    before = query_json(invoke, bundle_k4, index_k4, "--user", USER, "-n", "10")
    after = query_json(invoke, bundle_k4, index_k4, "--user", USER, "-n", "10", "--history", ",".join(fresh + ["nope"]),
                       "--explain")
    assert after["history"] == len(seen) + 3 and after["dropped"] == ["nope"] and after["fallback"] is False
    assert [r["item"] for r in after["items"]] != [r["item"] for r in before["items"]]
    assert not {r["item"] for r in after["items"]} & set(fresh + seen)
    assert all(1 <= len(r["because"]) <= 3 and all(b["item"] in seen + fresh for b in r["because"]) for r in after["items"])
    new_user = query_json(invoke, bundle_k4, index_k4, "--history", ",".join(fresh), "-n", "5")
    assert new_user["user"] is None and new_user["history"] == 3 and len(new_user["items"]) == 5
    fallback = invoke("query", "--bundle", bundle_k4, "--index", index_k4, "--history", "nope", "-n", "3")
    assert fallback.exit_code == 0, fallback.output
    lines = fallback.stdout.splitlines()
    assert lines[:3] == ["new user  (0 behaviours)", "dropped (not in the vocabulary): nope",
                         "no known behaviour: the most popular items"]
    assert len(lines) == 3 + 1 + 3 and all(line.split()[2:4] == ["-", "-"] for line in lines[4:])


def test_bad_interactions_file_writes_nothing(invoke, tmp_path):
    bad = tmp_path / "interactions.csv"
    bad.write_text("user_id,item_id,timestamp\nu1,i1,100\nu1,i2,yesterday\nu2,i1,300\n")
    out = tmp_path / "bundle"
    result = invoke("train", "--interactions", bad, "--out", out, *("--epochs", "1"))
    assert_clean_error(result, f"{bad}: column 'timestamp' has a non-numeric timestamp 'yesterday' at row 2")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interactions.csv"]  # no temp directory left


def test_out_under_a_file_is_a_clean_error(invoke, tiny_data, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    result = invoke("train", "--interactions", tiny_data["interactions"], "--out", blocker / "bundle",
                    "--epochs", "1", "--dim", "8", "--negatives", "16", "--max-len", "5")
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(blocker) in errors[0], result.stderr
    assert blocker.read_text() == ""


def test_index_from_another_bundle(invoke, bundle_k1, bundle_k4, index_k4):
    built_from = json.loads((index_k4 / "manifest.json").read_text())["bundle_fingerprint"]
    given = json.loads((bundle_k1 / "manifest.json").read_text())["bundle_fingerprint"]
    assert built_from == json.loads((bundle_k4 / "manifest.json").read_text())["bundle_fingerprint"]
    result = invoke("query", "--bundle", bundle_k1, "--index", index_k4, "--user", USER)
    assert_clean_error(
        result,
        f"{index_k4}: the index was built from another model bundle "
        f"(index: {built_from[:12]}, bundle: {given[:12]}); rebuild it with build-index",
    )
    result = invoke("evaluate", "--bundle", bundle_k1, "--index", index_k4)
    assert result.exit_code == 2 and "built from another model bundle" in result.stderr


def test_bad_factory_string(invoke, bundle_k4, tmp_path):
    out = tmp_path / "index"
    result = invoke("build-index", "--bundle", bundle_k4, "--out", out, "--factory", "Bogus")
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: bad faiss index factory 'Bogus' for d=16: ")
    assert not out.exists()


def test_build_index_default_is_the_merged_retriever(invoke, bundle_k4, tmp_path):
    from retrieval.bundle import load_bundle
    from retrieval.channels import CHANNELS, DECAYS, choose_channels

    out = tmp_path / "default"
    result = invoke("build-index", "--bundle", bundle_k4, "--out", out, "--knn-k", "10,20")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("channels: prior weight ")
    total = 2 + len(DECAYS)  # two table sizes, then the decays on the table kept
    assert result.stderr.splitlines()[-total:] == [f"channels: setting {i}/{total} tried on validation users"
                                                   for i in range(1, total + 1)]
    manifest = json.loads((out / "manifest.json").read_text())
    ch = manifest["channels"]
    assert [s["knn_k"] for s in ch["validation_settings"]][:2] == [10, 20] and manifest["d"] == 17  # D=16 + the prior
    # the oracle: the library's choice on the same bundle
    b = load_bundle(bundle_k4)
    chosen = choose_channels(b.model, b.dataset, b.split, (10, 20), max_len=b.config["model"]["max_len"])
    assert (ch["knn_k"], ch["decay"]) == (chosen.channels.neighbours.k, chosen.channels.decay)
    assert ch["weights"] == {"prior": chosen.channels.weights.prior, "item_knn": chosen.channels.weights.item_knn}

    # a product quantizer whose M does not divide D + 1 = 17: the index holds zeros up to 20
    pq = tmp_path / "pq"
    result = invoke("build-index", "--bundle", bundle_k4, "--out", pq, "--factory", "PQ4", "--knn-k", "10")
    assert result.exit_code == 0, result.output
    assert json.loads((pq / "manifest.json").read_text())["d"] == 20
    q = invoke("query", "--bundle", bundle_k4, "--index", pq, "--user", USER, "-n", "5", "--json")
    assert q.exit_code == 0, q.output
    rows = json.loads(q.stdout)["items"]
    assert len(rows) == 5 and all(r["channel"] in CHANNELS for r in rows)


def test_ivf_with_more_lists_than_items(invoke, bundle_k4, tmp_path):
    out = tmp_path / "index"
    result = invoke("build-index", "--bundle", bundle_k4, "--out", out, "--factory", "IVF4096,Flat")
    assert_clean_error(result, "index factory 'IVF4096,Flat' needs at least 4096 vectors to train 4096 lists, got 300")
    assert not out.exists()


def test_evaluate_with_a_k1_bundle_from_other_data(invoke, bundle_k4, tiny_k1_twice):
    foreign = tiny_k1_twice[0]
    result = invoke("evaluate", "--bundle", bundle_k4, "--k1-bundle", foreign)
    assert_clean_error(result, f"{foreign}: the K=1 bundle was trained on other data than {bundle_k4}")


def test_missing_bundle(invoke, index_k4, tmp_path):
    result = invoke("query", "--bundle", tmp_path / "nowhere", "--index", index_k4, "--user", USER)
    assert_clean_error(result, f"{tmp_path / 'nowhere'}: not a mind-bundle (no manifest.json)")


# ----------------------------------------------------------------- approximate index


def test_hnsw_index_agrees_with_flat(invoke, bundle_k4, index_k4, tmp_path):
    hnsw = tmp_path / "hnsw"
    result = invoke("build-index", "--bundle", bundle_k4, "--out", hnsw, "--factory", "HNSW16", "--no-channels")
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == ["index:", str(hnsw), "HNSW16", "300", "items", "d=16"]
    assert json.loads((hnsw / "manifest.json").read_text())["factory"] == "HNSW16"

    users = write_users(tmp_path / "users.txt", [f"u{u:05d}" for u in range(1, 151, 10)])
    flat = query_json(invoke, bundle_k4, index_k4, "--users-file", users, "-n", "20")
    approx = query_json(invoke, bundle_k4, hnsw, "--users-file", users, "-n", "20")
    overlap = [
        len({r["item"] for r in f["items"]} & {r["item"] for r in a["items"]}) / 20
        for f, a in zip(flat, approx, strict=True)
    ]
    assert np.mean(overlap) >= 0.9, overlap


def test_experiment_reports_mean_and_std_over_split_seeds(invoke, tiny_data, tmp_path):
    out = tmp_path / "experiment.json"
    result = invoke("experiment", "--interactions", tiny_data["interactions"], "--items", tiny_data["items"],
                    "--users", tiny_data["users"], "--seeds", "2026,2027", "--epochs", "1", "--dim", "8",
                    "--negatives", "32", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["split_seeds"] == [2026, 2027] and len(report["per_run"]) == 2 and report["train_seeds"] == [0]
    assert [r["split_seed"] for r in report["per_run"]] == [2026, 2027] and report["complete"]
    assert set(report["models"]) == set(MODELS)
    for name, row in report["models"].items():
        per_seed = [s["models"][name]["recall@50"] for s in report["per_run"]]
        assert row["recall@50"]["mean"] == pytest.approx(sum(per_seed) / 2)
        assert row["recall@50"]["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2**0.5)
    assert report["training"]["mind"]["train_samples_per_s"]["mean"] > 0
    assert (report["K"], report["L"], report["dim"]) == (4, 50, 8)
    assert "mind" in result.stdout and "±" in result.stdout


def test_experiment_auto_interests_reports_the_search_and_its_k1(invoke, tiny_data, tmp_path):
    out = tmp_path / "auto.json"
    result = invoke("experiment", "--interactions", tiny_data["interactions"], "--seeds", "2026", "--epochs", "1",
                    "--dim", "8", "--negatives", "32", "--interests", "auto", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    seed = report["per_run"][0]
    assert report["K"] == "auto" and report["retriever"] == "routing"
    ch = seed["channels"]["mind"]  # the merged retriever's choice and what it was chosen from
    assert (ch["knn_k"], ch["decay"]) in [(t["knn_k"], t["decay"]) for t in ch["validation_settings"]]
    by_k = seed["interests_search"]["by_interests"]
    assert sorted(by_k, key=int) == ["1", "2", "4", "8"]
    # the K=1 baseline is the search's own K=1 model, not a second training
    assert seed["training"]["mind_k1"]["val_recall@50"] == by_k["1"]["val_recall@50"]
    chosen = seed["interests_search"]["chosen"]
    assert seed["training"]["mind"]["val_recall@50"] == max(f["val_recall@50"] for f in by_k.values())
    assert by_k[str(chosen)]["val_recall@50"] == seed["training"]["mind"]["val_recall@50"]


def test_experiment_rejects_bad_seeds(invoke, tiny_data, tmp_path):
    result = invoke("experiment", "--interactions", tiny_data["interactions"], "--seeds", "2026,x",
                    "--out", tmp_path / "e.json")
    assert_clean_error(result, "--seeds must be comma-separated integers, got '2026,x'")
    assert not (tmp_path / "e.json").exists()
