"""Mean ± std over the per-run records of several `retrieve experiment` reports of one command run
on disjoint runs (e.g. side by side, one process per core): the figures one report over all the
runs would give, by the experiment's own `mean_std`.

    python -m bench.combine_experiments A.json B.json ...

The reports must be of the same data, split, held-out part and settings (only the split seeds and
training seeds may differ), and no run (split seed, training seed) may be in two of them: a
mismatched pair or a report given twice would otherwise be averaged silently. A row is printed
for every model that every run has (variants included; MIND K=1 is absent with `--interests 1`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from retrieval.experiment import mean_std

MODELS = ("retriever", "mind", "mind_share_merge", "mind_prior", "mind_knn", "mind_k1", "item_knn", "popularity")
FIGURES = ("recall@20", "ndcg@20", "recall@50", "hit_rate@50", "ndcg@50")
HEADERS = ("Recall@20", "NDCG@20", "Recall@50", "HitRate@50", "NDCG@50")
KIND = "retrieval-experiment"
# what every part must share: everything that makes its figures comparable but which runs it holds
MUST_AGREE = ("kind", "dataset", "data_fingerprint", "split", "part", "N", "L", "K", "retriever", "dim",
              "model_settings", "train_config", "variants", "tuning_grid")


def _run(r: dict[str, Any]) -> tuple[int, int]:
    return r["split_seed"], r.get("train_seed", 0)


def _models(runs: list[dict[str, Any]]) -> list[str]:
    """The models every run has: MODELS' order first, then the variants in the first run's order."""
    common = set.intersection(*(set(r["models"]) for r in runs))
    return [m for m in MODELS if m in common] + [m for m in runs[0]["models"] if m in common and m not in MODELS]


def load_runs(paths: list[str]) -> list[dict[str, Any]]:
    """Every run of the reports at `paths`, sorted by (split seed, training seed); exits with a
    one-line error when a report is unfinished, of another kind or other settings, or repeats a run."""
    runs: list[dict[str, Any]] = []
    first: tuple[str, dict[str, Any]] | None = None
    for path in paths:
        report = json.loads(Path(path).read_text())
        if report.get("kind") != KIND:
            sys.exit(f"error: {path}: not a retrieval-experiment report (kind {report.get('kind')!r})")
        if not report["complete"]:
            sys.exit(f"error: {path}: the experiment did not finish every run")
        if first is None:
            first = (path, report)
        for key in MUST_AGREE:
            if report.get(key) != first[1].get(key):
                sys.exit(f"error: {path}: {key} differs from {first[0]}'s; only the split and training seeds may differ")
        for r in report["per_run"]:
            if any(_run(r) == _run(s) for s in runs):
                sys.exit(f"error: {path}: run (split seed, training seed) {_run(r)} is in two reports")
            runs.append(r)
    if not runs:
        sys.exit("error: no runs to combine")
    return sorted(runs, key=_run)


def main(paths: list[str]) -> None:
    runs = load_runs(paths)
    print("runs (split seed, training seed)", [_run(r) for r in runs], "count", len(runs))
    print("| model | " + " | ".join(HEADERS) + " |")
    print("|---|" + "---|" * len(FIGURES))
    models = _models(runs)
    for name in models:
        cells = [mean_std([r["models"][name][k] for r in runs]) for k in FIGURES]
        print(f"| {name} | " + " | ".join(f"{c['mean']:.3f} ± {c['std']:.3f}" for c in cells) + " |")
    for name in ("retriever", "mind", "mind_k1", "item_knn"):
        if name in models:
            print(name, "per run R@50/N@50", [(*_run(r), round(r["models"][name]["recall@50"], 4),
                                               round(r["models"][name]["ndcg@50"], 4)) for r in runs])
    for name in ("mind", "mind_k1"):
        if all(name in r.get("training", {}) for r in runs):
            rate = mean_std([r["training"][name]["train_samples_per_s"] for r in runs])
            print(name, "samples/s", round(rate["mean"]), "±", round(rate["std"]))


if __name__ == "__main__":
    main(sys.argv[1:])
