"""Mean ± std over the per-run records of several `retrieve experiment` reports of one command run
on disjoint seeds (e.g. side by side, one process per core): the figures one report over all the
seeds would give, by the experiment's own `mean_std`.

    python -m bench.combine_experiments A.json B.json ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from retrieval.experiment import mean_std

MODELS = ("retriever", "mind", "mind_share_merge", "mind_prior", "mind_knn", "mind_k1", "item_knn", "popularity")
FIGURES = ("recall@20", "ndcg@20", "recall@50", "hit_rate@50", "ndcg@50")
HEADERS = ("Recall@20", "NDCG@20", "Recall@50", "HitRate@50", "NDCG@50")


def main(paths: list[str]) -> None:
    runs = []
    for path in paths:
        report = json.loads(Path(path).read_text())
        if not report["complete"]:
            sys.exit(f"error: {path}: the experiment did not finish every run")
        runs += report["per_run"]
    runs.sort(key=lambda r: r["split_seed"])
    print("split seeds", [r["split_seed"] for r in runs], "runs", len(runs))
    print("| model | " + " | ".join(HEADERS) + " |")
    print("|---|" + "---|" * len(FIGURES))
    for name in MODELS:
        cells = [mean_std([r["models"][name][k] for r in runs]) for k in FIGURES]
        print(f"| {name} | " + " | ".join(f"{c['mean']:.3f} ± {c['std']:.3f}" for c in cells) + " |")
    for name in ("retriever", "mind", "mind_k1", "item_knn"):
        print(name, "per seed R@50/N@50", [(r["split_seed"], round(r["models"][name]["recall@50"], 4),
                                            round(r["models"][name]["ndcg@50"], 4)) for r in runs])
    for name in ("mind", "mind_k1"):
        rate = mean_std([r["training"][name]["train_samples_per_s"] for r in runs])
        print(name, "samples/s", round(rate["mean"]), "±", round(rate["std"]))


if __name__ == "__main__":
    main(sys.argv[1:])
