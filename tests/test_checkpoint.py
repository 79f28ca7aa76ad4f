"""Checkpoints and --resume: a training process killed with SIGKILL mid-epoch and resumed ends
with the uninterrupted run's parameters and metrics; a checkpoint of other settings, or a
damaged one, is refused with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error
from retrieval.checkpoint import Checkpointing
from retrieval.data import DataSpec, load_dataset, split_users
from retrieval.errors import ArtifactError
from retrieval.train import TrainConfig, model_config_for, train

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("--epochs", "3", "--patience", "5", "--dim", "8", "--negatives", "32", "--batch-size", "32",
            "--seed", "3", "--threads", "1", "--device", "cpu")

# Runs the CLI in a fresh interpreter and SIGKILLs itself inside training step KILL_AT (counted
# over the whole run): no handler, no flush, the way a crash or an OOM kill ends a process.
KILLER = """
import os, signal, sys
import retrieval.train as t
from cli import app
step, calls = t.train_step, [0]
def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(*args, **kwargs)
t.train_step = killing
app(sys.argv[1:], prog_name="retrieve")
"""


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _data_args(data: dict[str, Path]) -> tuple[str, ...]:
    return ("--interactions", str(data["interactions"]), "--items", str(data["items"]), "--users", str(data["users"]))


def _steps_per_epoch(data: dict[str, Path]) -> int:
    ds = load_dataset(DataSpec(data["interactions"], data["items"], data["users"]))
    split = split_users(ds, 2026)
    windows = int((split.history_len[split.train_users] - 1).clip(min=0).sum())
    return -(-windows // 32)


def test_kill_9_mid_epoch_then_resume_equals_the_uninterrupted_run(invoke, tiny_data, tmp_path: Path, caplog) -> None:
    steps = _steps_per_epoch(tiny_data)
    assert steps >= 8
    full = tmp_path / "full"
    assert invoke("train", *_data_args(tiny_data), "--out", full, *SETTINGS).exit_code == 0

    out = tmp_path / "killed"
    args = ["train", *_data_args(tiny_data), "--out", str(out), *SETTINGS, "--checkpoint-every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": str(steps + 5)}  # in step 5 of epoch 2
    run = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    saved = torch.load(out.with_name("killed.ckpt"), weights_only=True)
    assert (saved["epoch"], saved["step"]) == (2, 3)  # the last checkpoint: mid-epoch
    assert json.loads((out / "manifest.json").read_text())["best_epoch"] == 1  # epoch 1's bundle survived

    with caplog.at_level("INFO", logger="retrieval.checkpoint"):
        result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert f"resuming from {out.with_name('killed.ckpt')}: epoch 2, step 3" in caplog.messages
    a, b = (torch.load(p / "model.pt", weights_only=True) for p in (full, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (full, out))
    assert ma["best_epoch"] == mb["best_epoch"] and ma["val_recall@50"] == mb["val_recall@50"]
    assert [h["loss"] for h in ma["history"]] == [h["loss"] for h in mb["history"]]
    assert not out.with_name("killed.ckpt").exists()  # the finished run removed its checkpoint


def _interrupted(tiny_data: dict[str, Path], ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library run that crashes in its 5th step, leaving the checkpoint of step 3."""
    import retrieval.train as t

    spec = DataSpec(tiny_data["interactions"], tiny_data["items"], tiny_data["users"])
    ds = load_dataset(spec)
    step, calls = t.train_step, [0]

    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(t, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(ds, split_users(ds, 2026), model_config_for(ds, dim=8, seed=3),
              TrainConfig(epochs=2, batch_size=32, negatives=32, seed=3, threads=1), show_progress=False,
              checkpointing=Checkpointing(ckpt, every=3))
    monkeypatch.setattr(t, "train_step", step)
    assert torch.load(ckpt, weights_only=True)["step"] == 3


def test_resume_with_other_settings_is_refused(invoke, tiny_data, tmp_path: Path, monkeypatch) -> None:
    ckpt = tmp_path / "run.ckpt"
    _interrupted(tiny_data, ckpt, monkeypatch)
    result = invoke("train", *_data_args(tiny_data), "--out", tmp_path / "b", "--epochs", "2", "--dim", "8",
                    "--negatives", "32", "--batch-size", "32", "--seed", "3", "--threads", "1", "--lr", "0.001",
                    "--checkpoint", ckpt, "--resume")
    assert_clean_error(result, f"{ckpt}: the checkpoint was written by a run with other settings "
                               "(train.lr: 0.003 -> 0.001); resume with the same settings or start over without --resume")
    assert not (tmp_path / "b").exists() and ckpt.exists()


def test_a_damaged_checkpoint_is_refused(invoke, tiny_data, tmp_path: Path) -> None:
    ckpt = tmp_path / "b.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    result = invoke("train", *_data_args(tiny_data), "--out", tmp_path / "b", "--epochs", "1", "--resume")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {ckpt}: unreadable checkpoint (")
    assert "Traceback" not in result.output


def test_resume_without_a_checkpoint_starts_over(tiny_data, tmp_path: Path) -> None:
    """--resume on the first launch is a fresh start: the same command works before and after a crash."""
    spec = DataSpec(tiny_data["interactions"], tiny_data["items"], tiny_data["users"])
    ds = load_dataset(spec)
    split = split_users(ds, 2026)
    config = TrainConfig(epochs=1, batch_size=32, negatives=32, seed=3, threads=1)
    a = train(ds, split, model_config_for(ds, dim=8, seed=3), config, show_progress=False)
    b = train(ds, split, model_config_for(ds, dim=8, seed=3), config, show_progress=False,
              checkpointing=Checkpointing(tmp_path / "none.ckpt", resume=True))
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    with pytest.raises(ArtifactError, match="not a training checkpoint"):
        torch.save({"kind": "something else"}, tmp_path / "other.ckpt")
        train(ds, split, model_config_for(ds, dim=8, seed=3), config, show_progress=False,
              checkpointing=Checkpointing(tmp_path / "other.ckpt", resume=True))
