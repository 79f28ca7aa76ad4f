"""Pictures beside the numbers: Recall@N for N = 1..200 of every model, and training curves.

matplotlib is an optional extra (`pip install 'retrieve[plot]'`, pulled in by the test
extra); `require_matplotlib` fails early with one line, before any work is done, where it
is missing. Every PNG is written atomically (temp file + rename), like every artifact.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retrieval.artifacts import atomic_write_bytes
from retrieval.errors import RetrievalError

RECALL_PNG = "recall_at_n.png"
TRAINING_PNG = "training_curves.png"


def require_matplotlib() -> None:
    """RetrievalError unless matplotlib can be imported (the `plot` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RetrievalError("drawing pictures needs matplotlib: pip install 'retrieve[plot]'") from None


def _figure() -> Any:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def plot_recall_curves(curves: Mapping[str, Sequence[float]], path: Path, title: str = "") -> Path:
    """One line per model: Recall@N against N = 1..len(curve) (model -> [recall@1, recall@2, ...])."""
    if not curves:
        raise RetrievalError("no recall curves to draw")
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=name, linewidth=1.6)
    for n in (20, 50):
        ax.axvline(n, color="0.8", linewidth=0.8, zorder=0)
    ax.set_xlabel("N")
    ax.set_ylabel("Recall@N")
    ax.set_xlim(1, max(len(c) for c in curves.values()))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Recall@N of every model (held-out users)", fontsize=10)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_training(histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path, n: int = 50,
                  title: str = "") -> Path:
    """Training loss and validation Recall@n per epoch, one line per run (run -> its per-epoch history)."""
    if not histories:
        raise RetrievalError("no training histories to draw")
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    key = f"val_recall@{n}"
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        left.plot(epochs, [h["loss"] for h in history], marker="o", markersize=3, label=name)
        right.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", markersize=3, label=name)
    left.set_title("training loss", fontsize=10)
    right.set_title(f"validation Recall@{n}", fontsize=10)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
