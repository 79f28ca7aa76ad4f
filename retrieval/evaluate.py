"""Offline evaluation under `shared/eval-protocol.md`: MIND against its baselines on the same users.

One report holds MIND (best-score merge, and the share merge beside it), MIND with the item
prior, the merged retriever (MIND + item-kNN + popularity), MIND with one interest (K=1),
item-based nearest neighbours and popularity, all on the same held-out users of the same
split (user or temporal), with the fields the protocol asks for, throughput figures,
Recall@1..200 of every model (the pictures), figures by history length and the diagnostics
of MIND's interests (retrieval/diagnostics.py). Every choice (merge, channel weights) is
made on validation users.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np
import torch

from index.faiss_index import build_index
from index.torch_search import TorchFlatIndex
from retrieval.artifacts import package_versions
from retrieval.baselines import item_knn, popularity
from retrieval.bundle import Bundle
from retrieval.channels import CHANNELS, KNN_K, ChannelWeights, Channels, choose_channels, retrieve
from retrieval.data import Dataset, Split, held_out_users  # noqa: F401  (held_out_users: imported from here by others)
from retrieval.errors import ArtifactError
from retrieval.metrics import mean_metrics, topn_metrics
from retrieval.retrievers import Retriever
from retrieval.diagnostics import by_history_length, interest_diagnostics, shares, slot_hits
from retrieval.recommend import interest_vectors, recommend
from retrieval.samples import Histories

REPORT_KIND = "retrieval-report"  # the "kind" of the JSON report `retrieve evaluate --out` writes
NS = (20, 50)
CURVE_N = 200  # Recall@N is reported for N = 1..CURVE_N (the pictures)


def _ranked_figures(ranked: np.ndarray, truth: list[np.ndarray], ns: Sequence[int], lengths: np.ndarray,
                    curve_n: int) -> tuple[dict[str, Any], list[float], dict[str, Any], np.ndarray]:
    """Metrics at each N of `ns` (from the list's prefix), Recall@1..curve_n, figures by history
    length at max(ns), and the (U, max(ns)) slot hits."""
    ids = np.where(ranked > 0, ranked, -1)
    figures = mean_metrics(topn_metrics(ids, truth, ns))
    hits = slot_hits(ranked, truth)  # (U, n')
    g = np.array([len(np.unique(t)) for t in truth], dtype=np.float64)
    width = min(curve_n, ranked.shape[1])
    curve = (np.cumsum(hits[:, :width], axis=1) / g[:, None]).mean(0) if len(truth) else np.zeros(width)
    n = max(ns)
    return figures, [round(float(x), 6) for x in curve], by_history_length(ranked, truth, lengths, n), hits[:, :n]


def exact_index(model: Retriever) -> faiss.Index | TorchFlatIndex:
    """Exact search over the model's item vectors: a flat FAISS index for a model on the CPU,
    a TorchFlatIndex on the model's GPU for one there."""
    with torch.no_grad():
        vectors = model.item_vectors().detach()  # (N, D)
    if vectors.device.type != "cpu":
        return TorchFlatIndex(vectors)
    return build_index(vectors.numpy().astype(np.float32), "Flat")


def evaluate_models(
    ds: Dataset,
    split: Split,
    mind: Retriever,
    index: faiss.Index | None = None,
    mind_k1: Retriever | None = None,
    part: str = "test",
    ns: Sequence[int] = NS,
    max_len: int = 50,
    channels: Channels | None = None,
    knn_k: int | Sequence[int] = KNN_K,
    curve_n: int = CURVE_N,
) -> dict[str, Any]:
    """Metrics of every model on the held-out users of `part`, choices made on validation users.

    Models: MIND (best-score merge, and the share merge beside it), MIND with the item prior,
    MIND with item-kNN (no prior; when the weights are chosen here), the merged retriever (MIND + item-kNN + popularity, retrieval/channels.py), MIND K=1 when
    given, item-kNN and popularity. `channels` come with an index built with them (their
    weights chosen on validation at build time); without, they are built from the training
    data here (one per neighbour-table size in `knn_k`; on the temporal split also with
    recency-weighted frequencies, HALFLIVES) and their weights, table size and half-life
    chosen on validation users. Also: Recall@1..curve_n of every
    model, figures by history length, and the diagnostics of MIND's interests and of the
    merged retriever's channels."""
    n = max(ns)
    deep = max(n, curve_n)
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

    # The channels' weights are chosen on validation users only.
    tuned, settings = None, None
    if channels is None:
        picked = choose_channels(mind, ds, split, knn_k, max_len=max_len, n=n)
        tuned, channels, channel_index, settings = picked.tuned, picked.channels, picked.index, picked.settings
    else:
        channel_index = index
    with_prior = dataclasses.replace(channels, weights=ChannelWeights(channels.prior_only, 0.0))
    with_knn = dataclasses.replace(channels, weights=tuned.knn_only) if tuned is not None else None

    hist = Histories.of(ds, users, ends)
    lengths = ends.astype(np.int64)
    runs: dict[str, Callable[[], Any]] = {
        "mind": lambda: recommend(mind, ds, index, hist, deep, merge="best"),
        "mind_share_merge": lambda: recommend(mind, ds, index, hist, n, merge="share"),
        "mind_prior": lambda: retrieve(mind, ds, channel_index, hist, deep, channels=with_prior),
    }
    if with_knn is not None:  # the ablation without the prior (weights of an index's channels: only the merged ones)
        runs["mind_knn"] = lambda: retrieve(mind, ds, channel_index, hist, deep, channels=with_knn)
    runs["retriever"] = lambda: retrieve(mind, ds, channel_index, hist, deep, channels=channels)
    if mind_k1 is not None:
        k1_index = exact_index(mind_k1)
        runs["mind_k1"] = lambda: recommend(mind_k1, ds, k1_index, hist, deep)
    runs["item_knn"] = lambda: item_knn(ds, split, users, ends, deep, max_len=max_len)
    runs["popularity"] = lambda: popularity(ds, split, users, ends, deep)

    models, curves, by_length, diagnostics = {}, {}, {}, {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - t0
        ranked = out if isinstance(out, np.ndarray) else out.items
        figures, curves[name], by_length[name], hits = _ranked_figures(ranked, truth, ns, lengths, curve_n)
        models[name] = {**figures, "users": len(truth), "users_per_s": len(truth) / max(seconds, 1e-9)}
        if name in ("mind", "mind_k1"):
            model = mind if name == "mind" else mind_k1
            diagnostics[name] = interest_diagnostics(interest_vectors(model, ds, hist), out.interest[:, :n], hits)
        elif name == "retriever":
            diagnostics[name] = {"per_channel": shares(out.channel[:, :n], hits, CHANNELS)}
    models["mind"]["merge"], models["mind_share_merge"]["merge"] = "best", "share"
    curves.pop("mind_share_merge")  # a share of n slots is not a prefix of a longer list
    return {
        "part": part,
        "split": split.kind,
        **({"split_cut": split.cut} if split.cut is not None else {}),
        "users": len(users),
        "N": list(ns),
        "merge_chosen_on_validation": chosen,
        f"validation_recall@{n}_by_merge": val,
        "channels": {**channels.settings(),
                     "weights_from": "validation users, here" if tuned else "the index (validation users, at build-index)",
                     **({"validation_settings": settings} if settings and tuned else {}),
                     **({"validation_trials": tuned.trials, "objective": tuned.objective} if tuned else {})},
        "models": models,
        "diagnostics": diagnostics,
        "by_history_length": by_length,
        "recall_curve": curves,
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


def evaluate_bundles(bundle: Bundle, index: faiss.Index | None, k1: Bundle | None, part: str,
                     channels: Channels | None = None) -> dict[str, Any]:
    """The report of `retrieve evaluate`: protocol fields, metrics and throughput."""
    if k1 is not None:
        if k1.manifest["data_fingerprint"] != bundle.manifest["data_fingerprint"]:
            raise ArtifactError(f"{k1.path}: the K=1 bundle was trained on other data than {bundle.path}")
        if (k1.split.kind, k1.split.seed) != (bundle.split.kind, bundle.split.seed):
            raise ArtifactError(
                f"{k1.path}: the K=1 bundle uses split seed {k1.split.seed}, {bundle.path} uses {bundle.split.seed}"
                if k1.split.kind == bundle.split.kind else
                f"{k1.path}: the K=1 bundle uses the {k1.split.kind} split, {bundle.path} the {bundle.split.kind} split"
            )
    t0 = time.perf_counter()
    result = evaluate_models(
        bundle.dataset, bundle.split, bundle.model, index, k1.model if k1 else None, part,
        max_len=bundle.config["model"]["max_len"], channels=channels,
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


def format_diagnostics(report: dict[str, Any]) -> str:
    """The diagnostics of a report as a few lines: interests, channels, history length."""
    lines = []
    n = max(report["N"])
    for name, d in report.get("diagnostics", {}).items():
        if "interest_collapse" in d:
            shares_text = "  ".join(f"{k}: {v['slots']:.2f}/{v['hits']:.2f}" for k, v in d["per_interest"].items())
            lines.append(f"{name}: interest collapse {d['interest_collapse']:.3f}  routing concentration "
                         f"{d['routing_concentration']:.3f}  active interests {d['mean_active_interests']:.2f}  "
                         f"slots/hits per interest {shares_text}")
        if "per_channel" in d:
            lines.append(f"{name}: slots/hits per channel " + "  ".join(
                f"{k}: {v['slots']:.2f}/{v['hits']:.2f}" for k, v in d["per_channel"].items()))
    ch = report.get("channels")
    if ch:
        lines.append(f"channels: prior weight {ch['weights']['prior']:.4g} (alone: {ch['prior_only']:.4g}), item-kNN "
                     f"weight {ch['weights']['item_knn']:.3g}, k={ch['knn_k']}, decay {ch.get('decay', 1.0):.3g}; "
                     f"from {ch['weights_from']}")
    by_len = report.get("by_history_length", {})
    if by_len:
        buckets = list(next(iter(by_len.values())))
        lines.append(f"recall@{n} / ndcg@{n} by history length: " + "   ".join(
            f"{b} ({next(iter(by_len.values()))[b]['users']} users)" for b in buckets))
        for name in ("mind", "mind_k1", "item_knn", "retriever"):
            if name in by_len:
                lines.append(f"  {name:<12}" + "   ".join(
                    f"{by_len[name][b][f'recall@{n}']:.4f} / {by_len[name][b][f'ndcg@{n}']:.4f}" for b in buckets))
    return "\n".join(lines)
