"""Offline evaluation under `shared/eval-protocol.md`: MIND against its baselines on the same users.

One report holds MIND (best-score merge, and the share merge beside it), MIND with one
interest (K=1), item-based nearest neighbours and popularity, all on the same held-out
users of the same split, with the fields the protocol asks for and throughput figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np

from index.faiss_index import build_index
from retrieval.artifacts import package_versions
from retrieval.baselines import item_knn, popularity
from retrieval.bundle import Bundle
from retrieval.data import Dataset, Split
from retrieval.errors import ArtifactError
from retrieval.metrics import mean_metrics, topn_metrics
from retrieval.retrievers import Retriever
from retrieval.recommend import recommend
from retrieval.samples import Histories

REPORT_KIND = "retrieval-report"  # the "kind" of the JSON report `retrieve evaluate --out` writes
NS = (20, 50)


def held_out_users(ds: Dataset, split: Split, part: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Users of `part` with a non-empty ground truth, their history ends, and their ground truths."""
    users = split.users(part)
    users = users[split.history_len[users] < ds.lengths()[users]]
    ends = split.history_len[users]
    truth = [ds.sequence(u)[e:] for u, e in zip(users, ends)]
    return users, ends, truth


def _score(name: str, run: Callable[[], np.ndarray], truth: list[np.ndarray], ns: Sequence[int]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ranked = run()
    seconds = time.perf_counter() - t0
    figures = mean_metrics(topn_metrics(np.where(ranked > 0, ranked, -1), truth, ns))
    return {"model": name, **figures, "users": len(truth), "users_per_s": len(truth) / max(seconds, 1e-9)}


def exact_index(model: Retriever) -> faiss.Index:
    return build_index(model.item_vectors().detach().numpy().astype(np.float32), "Flat")


def evaluate_models(
    ds: Dataset,
    split: Split,
    mind: Retriever,
    index: faiss.Index | None = None,
    mind_k1: Retriever | None = None,
    part: str = "test",
    ns: Sequence[int] = NS,
    max_len: int = 50,
) -> dict[str, Any]:
    """Metrics of every model on the held-out users of `part`, plus the merge chosen on validation."""
    n = max(ns)
    users, ends, truth = held_out_users(ds, split, part)
    if len(users) == 0:
        raise ArtifactError(f"no {part} users with a ground truth to evaluate")
    index = index if index is not None else exact_index(mind)

    # The merge other than best-score is chosen on validation users only.
    v_users, v_ends, v_truth = held_out_users(ds, split, "validation")
    chosen, val = "best", {}
    if len(v_users):
        for merge in ("best", "share"):
            r = recommend(mind, ds, index, Histories.of(ds, v_users, v_ends), n, merge=merge).items
            val[merge] = mean_metrics(topn_metrics(np.where(r > 0, r, -1), v_truth, (n,)))[f"recall@{n}"]
        chosen = max(val, key=lambda m: (val[m], m == "best"))

    hist = Histories.of(ds, users, ends)
    rows = [
        _score("mind", lambda: recommend(mind, ds, index, hist, n, merge="best").items, truth, ns),
        _score("mind_share_merge", lambda: recommend(mind, ds, index, hist, n, merge="share").items, truth, ns),
    ]
    rows[0]["merge"], rows[1]["merge"] = "best", "share"
    if mind_k1 is not None:
        k1_index = exact_index(mind_k1)
        rows.append(_score("mind_k1", lambda: recommend(mind_k1, ds, k1_index, hist, n).items, truth, ns))
    rows.append(_score("item_knn", lambda: item_knn(ds, split, users, ends, n, max_len=max_len), truth, ns))
    rows.append(_score("popularity", lambda: popularity(ds, split, users, ends, n), truth, ns))
    return {
        "part": part,
        "users": len(users),
        "N": list(ns),
        "merge_chosen_on_validation": chosen,
        f"validation_recall@{n}_by_merge": val,
        "models": {r.pop("model"): r for r in rows},
    }


def bundle_summary(b: Bundle) -> dict[str, Any]:
    c, m = b.config["model"], b.manifest
    return {
        "K": c["interests"],
        "dim": c["dim"],
        "L": c["max_len"],
        "best_epoch": m.get("best_epoch"),
        "epochs_run": len(m.get("history", [])),
        "train_seconds": round(sum(h["seconds"] for h in m.get("history", [])), 2),
        "train_samples_per_s": m.get("train_samples_per_s"),
        "bundle_fingerprint": b.fingerprint,
    }


def evaluate_bundles(bundle: Bundle, index: faiss.Index | None, k1: Bundle | None, part: str) -> dict[str, Any]:
    """The report of `retrieve evaluate`: protocol fields, metrics and throughput."""
    if k1 is not None:
        if k1.manifest["data_fingerprint"] != bundle.manifest["data_fingerprint"]:
            raise ArtifactError(f"{k1.path}: the K=1 bundle was trained on other data than {bundle.path}")
        if k1.split.seed != bundle.split.seed:
            raise ArtifactError(
                f"{k1.path}: the K=1 bundle uses split seed {k1.split.seed}, {bundle.path} uses {bundle.split.seed}"
            )
    t0 = time.perf_counter()
    result = evaluate_models(
        bundle.dataset, bundle.split, bundle.model, index, k1.model if k1 else None, part,
        max_len=bundle.config["model"]["max_len"],
    )
    return {
        "kind": REPORT_KIND,
        "dataset": bundle.config["data"]["interactions"],
        "data_fingerprint": bundle.manifest["data_fingerprint"],
        "split_seed": bundle.split.seed,
        **result,
        "L": bundle.config["model"]["max_len"],
        "K": bundle.config["model"]["interests"],
        "dim": bundle.config["model"]["dim"],
        "training": {"mind": bundle_summary(bundle), **({"mind_k1": bundle_summary(k1)} if k1 else {})},
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": package_versions(),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report's metrics as a fixed-width table (one row per model)."""
    ns = report["N"]
    cols = [f"{m}@{n}" for n in ns for m in ("recall", "hit_rate", "ndcg")]
    width = 17 if isinstance(next(iter(report["models"].values())).get(cols[0]), dict) else 12
    head = f"{'model':<18}" + "".join(f"{c:>{width}}" for c in cols) + f"{'users/s':>10}"
    lines = [head, "-" * len(head)]
    for name, row in report["models"].items():
        cells = "".join(f"{_cell(row, c):>{width}}" for c in cols)
        rate = row.get("users_per_s", float("nan"))
        rate = rate["mean"] if isinstance(rate, dict) else rate
        lines.append(f"{name:<18}{cells}{rate:>10.0f}")
    return "\n".join(lines)


def _cell(row: dict[str, Any], col: str) -> str:
    v = row.get(col)
    if v is None:
        return "-"
    if isinstance(v, dict):  # multi-seed: mean ± std
        return f"{v['mean']:.4f}±{v['std']:.4f}"
    return f"{v:.4f}"
