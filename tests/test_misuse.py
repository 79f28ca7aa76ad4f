"""Bad input and misuse through the CLI, as a hostile new user would try it.

Every case of the table runs in a working directory holding a log (a synthetic-data
directory), a trained bundle, its index, and a user's own directory and file. Each must
end with exit code 2, one `error:` line (or typer's usage error for a fixed choice or a
range), no traceback, and the directory tree exactly as it was: no file written, changed
or left behind. Nearly every case fails before any training, so the module is fast.
Beside the table: concurrent writers (a real second process holding the lock), the
user's umask, a full disk, divergence, duplicates and what --force may replace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import numpy as np
import polars as pl
import pytest
from conftest import assert_clean_error, assert_usage_error

import cli
from retrieval.artifacts import claim_output, read_manifest
from retrieval.errors import ArtifactError

LOG = "data/interactions.csv"
FAST = ("--epochs", "1", "--dim", "8", "--negatives", "16", "--max-len", "10")
TRAIN = ("train", "--interactions", LOG, *FAST)
USER = "u00003"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root, hidden ones included: a directory's mode, a file's mode, size,
    mtime and sha256. (A directory's own mtime is left out: the lock file of a claim is
    created and removed in the output's parent.)"""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns,
                        hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_data, bundle_k4: Path, index_k4: Path) -> Path:
    """The working directory (also the cwd): data/ (the SMALL log, a synthetic-data artifact),
    B (a mind-bundle), I (its index), notes/ and notes.txt (a user's own files)."""
    shutil.copytree(small_data["interactions"].parent, tmp_path / "data")
    shutil.copytree(bundle_k4, tmp_path / "B")
    shutil.copytree(index_k4, tmp_path / "I")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me\n")
    (tmp_path / "notes.txt").write_text("keep me too\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------- preparations


def few_users(ws: Path) -> None:
    rows = [(f"u{u}", f"i{k}", k) for u in range(1, 10) for k in range(1, 6)]
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(ws / "few.csv")


def binary_users_file(ws: Path) -> None:
    (ws / "bin.txt").write_bytes(b"\xff\xfe\x00\x01 not text\n")


def binary_manifest(ws: Path) -> None:
    shutil.copytree(ws / "B", ws / "Bbin")
    (ws / "Bbin" / "manifest.json").write_bytes(b"\xff\xd8\xff\xe0 a JPEG, say")


def _edit_manifest(path: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))


def edited_bundle_manifest(ws: Path) -> None:
    shutil.copytree(ws / "B", ws / "Bed")
    _edit_manifest(ws / "Bed", lambda m: m.update(split_seed=7))


def edited_index_manifest(ws: Path) -> None:
    shutil.copytree(ws / "I", ws / "Ied")
    _edit_manifest(ws / "Ied", lambda m: m.update(search_param="nprobe", search_value=4))


def foreign_items(ws: Path) -> None:
    items = pl.read_csv(ws / "data" / "items.csv").with_columns(pl.col("item_id") + ".old")
    items.write_csv(ws / "old_items.csv")


def nothing(ws: Path) -> None:
    pass


# ---------------------------------------------------------------------------- the table

CANNOT = "choose a new path or an existing"
# (case, prepare, args, the one error line)
ERRORS = [
    # writing where the command does not own the path
    ("train into the log's directory", nothing, (*TRAIN, "--out", "data"),
     "data: holds data/interactions.csv, an input of this command; write the mind-bundle elsewhere"),
    ("train onto the log", nothing, (*TRAIN, "--out", LOG),
     f"{LOG}: is an input of this command; write the mind-bundle elsewhere"),
    ("train into a user's directory", nothing, (*TRAIN, "--out", "notes"),
     f"notes: is a directory that holds other files, not a mind-bundle; {CANNOT} mind-bundle"),
    ("--force on a user's directory", nothing, (*TRAIN, "--out", "notes", "--force"),
     f"notes: is a directory that holds other files, not a mind-bundle; {CANNOT} mind-bundle "
     "(--force replaces only artifacts)"),
    ("train onto a user's file", nothing, (*TRAIN, "--out", "notes.txt"),
     f"notes.txt: is a file, not a mind-bundle; {CANNOT} mind-bundle"),
    ("--force on a user's file", nothing, (*TRAIN, "--out", "notes.txt", "--force"),
     f"notes.txt: is a file, not a mind-bundle; {CANNOT} mind-bundle (--force replaces only artifacts)"),
    ("train into .", nothing, (*TRAIN, "--out", "."),
     ".: is the working directory; name a new path for the mind-bundle"),
    ("train into ..", nothing, (*TRAIN, "--out", ".."),
     "..: holds the working directory; name a new path for the mind-bundle"),
    ("train onto an index", nothing, (*TRAIN, "--out", "I"),
     "I: is an index, not a mind-bundle; pass --force to replace it"),
    ("train under a file", nothing, (*TRAIN, "--out", "notes.txt/bundle"),
     "notes.txt/bundle: cannot be created (notes.txt is not a directory)"),
    ("build-index onto its bundle", nothing, ("build-index", "--bundle", "B", "--out", "B"),
     "B: is an input of this command; write the index elsewhere"),
    ("build-index inside its bundle", nothing, ("build-index", "--bundle", "B", "--out", "B/index"),
     "B/index: lies inside B, an input of this command; write the index elsewhere"),
    ("build-index onto the data", nothing, ("build-index", "--bundle", "B", "--out", "data"),
     "data: is a synthetic-data, not an index; pass --force to replace it"),
    ("train-ranker onto its bundle", nothing, ("train-ranker", "--bundle", "B", "--out", "B"),
     "B: is an input of this command; write the ranker-bundle elsewhere"),
    ("train-ranker onto an index", nothing, ("train-ranker", "--bundle", "B", "--out", "I"),
     "I: is an index, not a ranker-bundle; pass --force to replace it"),
    ("evaluate onto its bundle", nothing, ("evaluate", "--bundle", "B", "--out", "B"),
     "B: is an input of this command; write the retrieval-report elsewhere"),
    ("evaluate onto an index", nothing, ("evaluate", "--bundle", "B", "--out", "I"),
     "I: is an index, not a retrieval-report; pass --force to replace it"),
    ("evaluate onto a user's file", nothing, ("evaluate", "--bundle", "B", "--out", "notes.txt"),
     f"notes.txt: is a file, not a retrieval-report; {CANNOT} retrieval-report"),
    ("experiment onto the log", nothing, ("experiment", "--interactions", LOG, "--out", LOG),
     f"{LOG}: is an input of this command; write the retrieval-experiment elsewhere"),
    ("experiment-rankers into a user's directory", nothing,
     ("experiment-rankers", "--interactions", LOG, "--out", "notes"),
     f"notes: is a directory that holds other files, not a ranker-experiment; {CANNOT} ranker-experiment"),
    ("generate into a user's directory", nothing, ("generate", "--out", "notes"),
     f"notes: is a directory that holds other files, not a synthetic-data; {CANNOT} synthetic-data"),
    ("generate onto a bundle", nothing, ("generate", "--out", "B"),
     "B: is a mind-bundle, not a synthetic-data; pass --force to replace it"),
    # inputs that used to end in a traceback
    ("a log of 9 users", few_users, ("train", "--interactions", "few.csv", "--out", "X", *FAST),
     "the log has 9 users; the protocol's 80/10/10 user split needs at least 10 (one validation and one test user)"),
    ("a --dim past any memory", nothing, (*TRAIN[:3], "--dim", str(10**30), "--out", "X"),
     f"the model does not fit in memory: D={10**30} over 300 items is too large; lower --dim"),
    ("a binary --users-file", binary_users_file, ("query", "--bundle", "B", "--index", "I", "--users-file", "bin.txt"),
     "bin.txt: not a text file of user ids (one per line)"),
    ("a binary manifest.json", binary_manifest, ("query", "--bundle", "Bbin", "--index", "I", "--user", USER),
     "Bbin/manifest.json: unreadable manifest ('utf-8' codec can't decode byte 0xff in position 0: "
     "invalid start byte)"),
    ("a hand-edited bundle manifest", edited_bundle_manifest, ("build-index", "--bundle", "Bed", "--out", "X"),
     "Bed/manifest.json: the manifest does not match its checksum (edited by hand, corrupt, or written by an "
     "older version); rebuild the mind-bundle"),
    ("a hand-edited index manifest", edited_index_manifest, ("query", "--bundle", "B", "--index", "Ied", "--user", USER),
     "Ied/manifest.json: the manifest does not match its checksum (edited by hand, corrupt, or written by an "
     "older version); rebuild the index"),
    ("--factory IDMap,Flat", nothing, ("build-index", "--bundle", "B", "--out", "X", "--factory", "IDMap,Flat"),
     "index factory 'IDMap,Flat' cannot serve queries: an IDMap takes its ids from the caller, but the query path "
     "reads faiss ids as item rows; drop the IDMap"),
    ("--factory IDMap2,Flat", nothing, ("build-index", "--bundle", "B", "--out", "X", "--factory", "IDMap2,Flat"),
     "index factory 'IDMap2,Flat' cannot serve queries: an IDMap takes its ids from the caller, but the query path "
     "reads faiss ids as item rows; drop the IDMap"),
    ("--factory BFlat (binary)", nothing, ("build-index", "--bundle", "B", "--out", "X", "--factory", "BFlat"),
     "bad faiss index factory 'BFlat' for d=16: a binary index (Hamming distance) cannot serve inner-product queries"),
    ("--factory LSH (L2 only)", nothing, ("build-index", "--bundle", "B", "--out", "X", "--factory", "LSH"),
     "bad faiss index factory 'LSH' for d=16: this index supports only L2 distance, not the inner product the "
     "query path uses"),
    ("experiment --seeds ''", nothing, ("experiment", "--interactions", LOG, "--out", "e.json", "--seeds", ""),
     "--seeds names no split seed, got ''; give at least one, e.g. 2026"),
    ("experiment, a seed twice", nothing, ("experiment", "--interactions", LOG, "--out", "e.json", "--seeds", "1,1"),
     "--seeds repeats a seed, got '1,1'"),
    ("experiment, a negative seed", nothing,
     ("experiment", "--interactions", LOG, "--out", "e.json", "--seeds", "2026,-1"),
     "--seeds must be integers in [0, 4294967295], got -1"),
    ("experiment-rankers, bad seeds", nothing,
     ("experiment-rankers", "--interactions", LOG, "--out", "e.json", "--seeds", "2026,x"),
     "--seeds must be comma-separated integers, got '2026,x'"),
    ("experiment-rankers, an unknown ranker", nothing,
     ("experiment-rankers", "--interactions", LOG, "--out", "e.json", "--rankers", "din,xgboost"),
     "unknown ranker 'xgboost' in 'xgboost'; use one of base, din, dmin, dien, dsin"),
    ("experiment-rankers --user-col", nothing,
     ("experiment-rankers", "--interactions", LOG, "--out", "e.json", "--user-col", "uid"),
     f"{LOG}: missing column 'uid' (columns: user_id, item_id, timestamp)"),
    ("--user-features without --users", nothing, (*TRAIN, "--out", "X", "--user-features", "age"),
     "user features age need a users file (--users)"),
    ("--item-features without --items", nothing, (*TRAIN, "--out", "X", "--item-features", "category"),
     "item features category need an items file (--items)"),
    ("-n above --candidates", nothing,
     ("query", "--bundle", "B", "--index", "I", "--user", USER, "-n", "50", "--rank", "R", "--candidates", "10"),
     "-n 50 is more than --candidates 10: the ranker reorders only the candidates retrieved"),
    ("an items file of other ids", foreign_items,
     (*TRAIN, "--items", "old_items.csv", "--out", "X"),
     "old_items.csv: 300 of 300 ids in column 'item_id' match no item of the interaction log (e.g. 'i00001.old'); "
     "the ids must be the log's"),
]

# (case, args, option, a fragment of typer's message)
USAGE = [
    ("negative --seed", (*TRAIN, "--out", "X", "--seed", "-1"), "--seed", "greater than or equal to 0"),
    ("huge --seed", (*TRAIN, "--out", "X", "--seed", str(2**64)), "--seed", "less than or equal to 4294967295"),
    ("negative --split-seed", (*TRAIN, "--out", "X", "--split-seed", "-5"), "--split-seed", "greater than or equal to 0"),
    ("negative generate --seed", ("generate", "--out", "X", "--seed", "-1"), "--seed", "greater than or equal to 0"),
    ("negative train-ranker --seed", ("train-ranker", "--bundle", "B", "--out", "X", "--seed", "-3"), "--seed",
     "greater than or equal to 0"),
    ("--neg-alpha nan", (*TRAIN, "--out", "X", "--neg-alpha", "nan"), "--neg-alpha",
     "must be a finite number in [-4, 4], got nan"),
    ("--neg-alpha huge", (*TRAIN, "--out", "X", "--neg-alpha", "1e6"), "--neg-alpha",
     "must be a finite number in [-4, 4], got 1000000.0"),
    ("--lr nan", (*TRAIN, "--out", "X", "--lr", "nan"), "--lr", "must be a finite number >= 0, got nan"),
    ("--lr negative", (*TRAIN, "--out", "X", "--lr", "-0.1"), "--lr", "must be a finite number >= 0, got -0.1"),
    ("--pow inf", (*TRAIN, "--out", "X", "--pow", "inf"), "--pow", "must be a finite number >= 0, got inf"),
    ("train --merge", (*TRAIN, "--out", "X", "--merge", "max"), "--merge", "'max' is not one of 'best', 'share'"),
    ("query --merge", ("query", "--bundle", "B", "--index", "I", "--user", USER, "--merge", "max"), "--merge",
     "'max' is not one of 'best', 'share'"),
    ("evaluate --part", ("evaluate", "--bundle", "B", "--part", "val"), "--part",
     "'val' is not one of 'test', 'validation'"),
    ("experiment-rankers --part", ("experiment-rankers", "--interactions", LOG, "--out", "e.json", "--part", "train"),
     "--part", "'train' is not one of 'test', 'validation'"),
    ("generate --format", ("generate", "--out", "X", "--format", "tsv"), "--format",
     "'tsv' is not one of 'csv', 'parquet'"),
    ("generate --method", ("generate", "--out", "X", "--method", "fast"), "--method",
     "'fast' is not one of 'per_user', 'vectorised'"),
    ("train-ranker --model", ("train-ranker", "--bundle", "B", "--out", "X", "--model", "xgboost"), "--model",
     "'xgboost' is not one of 'base', 'din', 'dmin', 'dien', 'dsin'"),
    ("train-ranker --negative-source", ("train-ranker", "--bundle", "B", "--out", "X", "--negative-source", "hard"),
     "--negative-source", "'hard' is not one of 'uniform', 'retrieval'"),
]


@pytest.mark.parametrize("prepare, args, message", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_misuse_ends_in_one_line_and_writes_nothing(invoke, ws, prepare, args, message):
    prepare(ws)
    before = snapshot(ws)
    result = invoke(*args)
    assert_clean_error(result, message)
    assert snapshot(ws) == before


@pytest.mark.parametrize("args, option, fragment", [c[1:] for c in USAGE], ids=[c[0] for c in USAGE])
def test_bad_values_are_typer_usage_errors_and_write_nothing(invoke, ws, args, option, fragment):
    before = snapshot(ws)
    assert_usage_error(invoke(*args), option, fragment)
    assert snapshot(ws) == before


def test_choices_mirror_the_library():
    from data.synthetic import Format, Method
    from retrieval.ranking.models import NAMES, RankerName
    from retrieval.recommend import Merge

    def choices(alias) -> tuple:
        return get_args(get_args(alias)[0])

    assert choices(cli.DataFormat) == get_args(Format)
    assert choices(cli.GenerateMethod) == get_args(Method)
    assert choices(cli.RankerModel) == get_args(RankerName) == NAMES
    assert choices(cli.Merge) == get_args(Merge)


# ---------------------------------------------------------------------------- outputs: what may be replaced


def test_an_unwritable_parent_is_refused_before_any_work(invoke, ws):
    if os.geteuid() == 0:  # root writes anywhere a mode allows: use a kernel filesystem instead
        parent = Path("/sys/retrieve-misuse")
    else:
        parent = ws / "locked"
        parent.mkdir(mode=0o555)
    before = snapshot(ws)
    result = invoke(*TRAIN, "--out", parent / "bundle")
    assert result.exit_code == 2 and "Traceback" not in result.output and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {parent / 'bundle'}: cannot be created in "), errors
    assert "loaded" not in result.stderr  # refused before the log was read
    assert snapshot(ws) == before


def test_same_kind_is_replaced_whole_and_force_replaces_another_kind(invoke, ws):
    result = invoke("build-index", "--bundle", "B", "--out", "I", "--factory", "HNSW16")
    assert result.exit_code == 0, result.output
    assert read_manifest(ws / "I", "index")["factory"] == "HNSW16"
    result = invoke("build-index", "--bundle", "B", "--out", "data", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (ws / "data").iterdir()) == ["channels.npz", "index.faiss", "manifest.json"]
    result = invoke("evaluate", "--bundle", "B", "--out", "I", "--force", "--part", "validation")
    assert result.exit_code == 0, result.output
    assert json.loads((ws / "I").read_text())["kind"] == "retrieval-report"
    assert sorted(p.name for p in ws.iterdir()) == ["B", "I", "data", "notes", "notes.txt"]  # nothing left beside


def test_generate_again_replaces_its_own_directory(invoke, ws):
    args = ("generate", "--users", "20", "--items", "60", "--topics", "10", "--min-len", "5", "--max-len", "10",
            "--mean-len", "8")
    assert invoke(*args, "--out", "gen").exit_code == 0
    assert invoke(*args, "--out", "gen", "--format", "parquet").exit_code == 0
    assert sorted(p.name for p in (ws / "gen").iterdir()) == [
        "interactions.parquet", "items.parquet", "manifest.json", "planted.json", "users.parquet"
    ]
    (ws / "empty").mkdir()  # an empty directory is a new path
    assert invoke(*args, "--out", "empty").exit_code == 0
    assert read_manifest(ws / "empty", "synthetic-data")["config"]["n_users"] == 20


def test_library_writes_without_a_claim_refuse_what_is_not_theirs(ws):
    from data.synthetic import SyntheticConfig, generate
    from index.faiss_index import build_index, save_index

    before = snapshot(ws)
    index = build_index(np.eye(4, dtype=np.float32), "Flat")
    with pytest.raises(ArtifactError, match="^notes: is a directory that holds other files, not an index"):
        save_index(index, Path("notes"), {})
    with pytest.raises(ArtifactError, match="^B: is a mind-bundle, not a synthetic-data; pass --force"):
        generate(Path("B"), SyntheticConfig(n_users=20, n_items=60, n_topics=10, min_len=5, max_len=10, mean_len=8.0))
    assert snapshot(ws) == before


# ---------------------------------------------------------------------------- concurrency

_HOLDER = """
import sys, time
from retrieval.artifacts import claim_output
claim = claim_output(sys.argv[1], "index")
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_writer_fails_at_once_naming_the_holder(invoke, ws):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ws / "I")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(ws)
        result = invoke("build-index", "--bundle", "B", "--out", "I")
        assert_clean_error(
            result, f"I: another process (pid {holder.pid}) is writing it; wait for it to finish or choose another path"
        )
        assert snapshot(ws) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder left its lock file behind; the kernel dropped its lock, so it blocks nobody
    assert (ws / ".I.lock").read_text().strip() == str(holder.pid)
    result = invoke("build-index", "--bundle", "B", "--out", "I")
    assert result.exit_code == 0, result.output
    assert not (ws / ".I.lock").exists()


def test_one_process_cannot_claim_a_path_twice(ws):
    with claim_output(Path("X"), "index") as claim:
        assert claim.replaces is None and (ws / ".X.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(ArtifactError, match=rf"^X: another process \(pid {os.getpid()}\) is writing it"):
            claim_output(Path("X"), "index")
    assert not (ws / ".X.lock").exists()
    with claim_output(Path("I"), "index") as claim:  # free again, and it knows what it replaces
        assert claim.replaces == "index"


def test_a_failed_command_removes_the_parents_it_created(invoke, ws):
    result = invoke("train", "--interactions", "nowhere.csv", "--out", "runs/deep/X")
    assert_clean_error(result, "nowhere.csv: file not found")
    assert not (ws / "runs").exists()


# ---------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("mask", [0o027, 0o002])
def test_artifacts_honour_the_umask(invoke, ws, mask):
    old = os.umask(mask)
    try:
        assert invoke("build-index", "--bundle", "B", "--out", "I2").exit_code == 0
        assert invoke("evaluate", "--bundle", "B", "--part", "validation", "--out", "r.json").exit_code == 0
        assert invoke("generate", "--out", "gen", "--users", "20", "--items", "60", "--topics", "10",
                      "--min-len", "5", "--max-len", "10", "--mean-len", "8").exit_code == 0
        assert invoke("train", "--interactions", "gen/interactions.csv", "--out", "M", *FAST).exit_code == 0
    finally:
        os.umask(old)
    for artifact in ("I2", "gen", "M"):
        assert stat.S_IMODE((ws / artifact).stat().st_mode) == 0o777 & ~mask, artifact
        for f in (ws / artifact).iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    assert stat.S_IMODE((ws / "r.json").stat().st_mode) == 0o666 & ~mask


# ---------------------------------------------------------------------------- a full disk


def _full_disk_for(module, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files `module` opens for writing land on /dev/full: every write fails with ENOSPC."""
    monkeypatch.setattr(module, "open", lambda path, mode="r", *a, **k: open("/dev/full" if "w" in mode else path, mode,
                                                                           *a, **k), raising=False)


def test_a_full_disk_while_writing_an_index_keeps_the_old_one(invoke, ws, monkeypatch):
    import index.faiss_index as faiss_index

    _full_disk_for(faiss_index, monkeypatch)
    before = snapshot(ws)
    result = invoke("build-index", "--bundle", "B", "--out", "I")
    assert_clean_error(result, "I: writing failed (No space left on device); nothing was replaced")
    assert snapshot(ws) == before  # the old index untouched, no temporary directory left


def test_a_full_disk_on_closing_a_small_index_is_caught(ws, monkeypatch):
    """faiss's own writer ignores a failed fclose: an index smaller than the write buffer would be
    left truncated without an error. save_index writes through a Python file, which raises."""
    import index.faiss_index as faiss_index

    _full_disk_for(faiss_index, monkeypatch)
    before = snapshot(ws)
    with pytest.raises(ArtifactError, match=r"^I: writing failed \(No space left on device\); nothing was replaced$"):
        faiss_index.save_index(faiss_index.build_index(np.eye(4, dtype=np.float32)), Path("I"), {})
    assert snapshot(ws) == before


def test_a_full_disk_while_writing_a_bundle_keeps_the_old_one(invoke, ws, monkeypatch):
    import retrieval.bundle

    _full_disk_for(retrieval.bundle, monkeypatch)
    shutil.copytree(ws / "B", ws / "B2")
    before = snapshot(ws)
    result = invoke(*TRAIN, "--out", "B2")
    assert_clean_error(result, "B2: writing failed (No space left on device); nothing was replaced")
    assert snapshot(ws) == before


# ---------------------------------------------------------------------------- divergence


def _loss_turns_nan_from_call(monkeypatch: pytest.MonkeyPatch, first_bad: int) -> None:
    from retrieval.mind import MIND

    real, calls = MIND.loss, {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        value = real(self, *args, **kwargs)
        return value * float("nan") if calls["n"] >= first_bad else value

    monkeypatch.setattr(MIND, "loss", loss)


def test_a_nan_loss_keeps_the_best_bundle_and_says_so(invoke, ws, monkeypatch, caplog):
    _loss_turns_nan_from_call(monkeypatch, first_bad=3)  # two steps an epoch: epoch 2's first step
    with caplog.at_level(logging.WARNING, logger="retrieval.train"):
        result = invoke(*TRAIN[:3], "--out", "X", "--epochs", "3", "--max-steps", "2", "--dim", "8",
                        "--negatives", "16")
    assert result.exit_code == 0, result.output
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "training diverged: the loss became nan at step 1 of epoch 2; stopped, keeping the best epoch 1"
    ]
    assert result.stdout.startswith("bundle: X  best epoch 1  val recall@50 ")
    manifest = read_manifest(ws / "X", "mind-bundle")
    assert manifest["best_epoch"] == 1 and len(manifest["history"]) == 1
    assert manifest["diverged"] == "the loss became nan at step 1 of epoch 2"


def test_a_nan_loss_before_any_epoch_writes_nothing(invoke, ws, monkeypatch):
    _loss_turns_nan_from_call(monkeypatch, first_bad=1)
    before = snapshot(ws)
    result = invoke(*TRAIN, "--out", "X")
    assert_clean_error(result, "training diverged: the loss became nan at step 1 of epoch 1, before any epoch was "
                               "kept; nothing was written (lower the learning rate)")
    assert snapshot(ws) == before


def test_an_exploding_loss_is_divergence(invoke, ws):
    before = snapshot(ws)
    result = invoke(*TRAIN, "--out", "X", "--lr", "1000")
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training diverged: the loss exploded to "), errors
    assert errors[0].endswith("nothing was written (lower the learning rate)")
    assert snapshot(ws) == before


def test_loss_guard():
    from retrieval.train import Diverged, LossGuard

    guard = LossGuard()
    assert guard.check(5.0, 1) == 5.0 and guard.check(499.0, 2) == 499.0  # under 100 x the first
    with pytest.raises(Diverged, match=r"^the loss exploded to 501 \(the first step's was 5\) at step 3$"):
        guard.check(501.0, 3)
    with pytest.raises(Diverged, match="^the loss became inf at step 4$"):
        guard.check(float("inf"), 4)
    small = LossGuard()
    small.check(0.01, 1)
    assert small.check(99.0, 2) == 99.0  # the first loss is floored at 1 for the ratio


# ---------------------------------------------------------------------------- duplicates


def test_duplicate_rows_are_dropped_and_counted(tmp_path, caplog):
    from retrieval.data import DataSpec, load_dataset

    rows = [(f"u{u}", f"i{k}", k) for u in range(1, 11) for k in range(1, 4)]
    rows += [("u1", "i1", 1), ("u1", "i1", 1), ("u2", "i3", 3)]  # three exact repeats
    rows += [("u3", "i1", 9)]  # the same item again later: a real repeat, kept
    path = tmp_path / "log.csv"
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(path)
    with caplog.at_level(logging.INFO, logger="retrieval.data"):
        ds = load_dataset(DataSpec(path))
    assert len(ds.items) == 31
    u3 = ds.user_index("u3")
    assert ds.item_ids[ds.sequence(u3)].tolist() == ["i1", "i2", "i3", "i1"]
    assert ("dropped 3 duplicate rows (same user, item and timestamp); repeats at other times are kept"
            in [r.getMessage() for r in caplog.records])
