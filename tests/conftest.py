"""Session fixtures shared by the CLI and bundle tests: seeded synthetic logs and bundles trained once.

Every bundle is trained through the CLI itself (`retrieve train`), tiny (one epoch, D=16),
so the whole session costs a few seconds of training on two cores.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli import app
from data.synthetic import SyntheticConfig, generate
from retrieval.artifacts import dir_fingerprint, write_manifest

ML100K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"  # the real log, where present
SMALL = SyntheticConfig(n_users=150, n_items=300, n_topics=10, max_len=60, mean_len=40.0, seed=3)
# A second, different log: a K=1 bundle trained on it is "trained on other data".
TINY = SyntheticConfig(
    n_users=40, n_items=100, n_topics=5, n_categories=5, min_len=10, max_len=20, mean_len=15.0, seed=7
)
FAST = ("--epochs", "1", "--dim", "16", "--negatives", "64")

Invoke = Callable[..., Result]


@pytest.fixture(scope="session")
def invoke() -> Invoke:
    """Run `retrieve ARGS...` in-process; stdout and stderr are kept apart (result.stderr)."""
    runner = CliRunner()

    def run(*args: str | Path) -> Result:
        return runner.invoke(app, [str(a) for a in args])

    return run


def _train(invoke: Invoke, data: dict[str, Path], out: Path, extra: Sequence[str]) -> Path:
    result = invoke(
        "train", "--interactions", data["interactions"], "--items", data["items"], "--users", data["users"],
        "--out", out, *FAST, *extra,
    )
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
    return out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """interactions.csv, items.csv, users.csv, planted.json of the SMALL log."""
    return generate(tmp_path_factory.mktemp("small_data"), SMALL)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("tiny_data"), TINY)


@pytest.fixture(scope="session")
def bundle_k4(invoke: Invoke, small_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MIND with K=4 interests on the SMALL log."""
    return _train(invoke, small_data, tmp_path_factory.mktemp("bundles") / "mind_k4", ("--interests", "4"))


@pytest.fixture(scope="session")
def bundle_k1(invoke: Invoke, small_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same MIND with K=1 on the same log: the evaluation baseline."""
    return _train(invoke, small_data, tmp_path_factory.mktemp("bundles") / "mind_k1", ("--interests", "1"))


@pytest.fixture(scope="session")
def tiny_k1_twice(
    invoke: Invoke, tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """Two K=1 bundles trained on the TINY log with the same seed (for determinism and data mismatch)."""
    root = tmp_path_factory.mktemp("tiny_bundles")
    extra = ("--interests", "1", "--seed", "5", "--max-len", "10")
    return _train(invoke, tiny_data, root / "a", extra), _train(invoke, tiny_data, root / "b", extra)


@pytest.fixture(scope="session")
def index_k4(invoke: Invoke, bundle_k4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exact (Flat) index over the K=4 bundle's item vectors: MIND alone (--no-channels)."""
    out = tmp_path_factory.mktemp("indexes") / "flat_k4"
    result = invoke("build-index", "--bundle", bundle_k4, "--out", out, "--no-channels")
    assert result.exit_code == 0, result.output
    return out


def assert_usage_error(result: Result, option: str, *fragments: str) -> None:
    """Typer's own usage error (exit code 2, no traceback) for `option`, its text holding each
    fragment (e.g. the choices it lists); the error box is unwrapped before matching."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    text = " ".join(result.stderr.translate(str.maketrans("", "", "│╭╮╰╯─")).split())
    assert f"Invalid value for '{option}'" in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert result.stdout == ""


def assert_clean_error(result: Result, message: str) -> None:
    """Exit code 2, exactly `error: message` as the one error line on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message}"]
    assert result.stdout == ""


@pytest.fixture(scope="session")
def index_k1(invoke: Invoke, bundle_k1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exact (Flat) index over the K=1 bundle's item vectors (a second servable pair; MIND alone)."""
    out = tmp_path_factory.mktemp("indexes") / "flat_k1"
    result = invoke("build-index", "--bundle", bundle_k1, "--out", out, "--no-channels")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def din_k4(invoke: Invoke, bundle_k4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small DIN trained one epoch beside the K=4 bundle (serving tests rerank with it)."""
    out = tmp_path_factory.mktemp("rankers") / "din"
    result = invoke("train-ranker", "--bundle", bundle_k4, "--out", out, "--epochs", "1", "--dim", "8")
    assert result.exit_code == 0, result.output
    return out


def rewrite_config(path: Path, change: Callable[[dict], object]) -> None:
    """Change config.json and re-sign the bundle, as a bundle written by other code would be."""
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["bundle_fingerprint"] = dir_fingerprint(path)
    write_manifest(path, manifest)
