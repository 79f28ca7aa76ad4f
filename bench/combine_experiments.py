"""Mean ± std (ddof 1, as the experiment report) over the per-run records of several `retrieve experiment`
reports of one command run on disjoint seeds: python3 bench/combine_experiments.py A.json B.json ..."""
import json, sys
import numpy as np
runs = []
for f in sys.argv[1:]:
    r = json.load(open(f))
    assert r["complete"], f
    runs += r["per_run"]
seeds = sorted(p["split_seed"] for p in runs)
print("split seeds", seeds, "runs", len(runs))
names = ["retriever", "mind", "mind_share_merge", "mind_prior", "mind_knn", "mind_k1", "item_knn", "popularity"]
keys = ["recall@20", "ndcg@20", "recall@50", "hit_rate@50", "ndcg@50"]
print("| model | " + " | ".join(k.replace("_", " ").title().replace("Ndcg", "NDCG").replace("Hit Rate", "HitRate") for k in keys) + " |")
print("|---|" + "---|" * len(keys))
for n in names:
    cells = []
    for k in keys:
        v = np.array([p["models"][n][k] for p in runs])
        cells.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}")
    print(f"| {n} | " + " | ".join(cells) + " |")
for n in ["retriever", "mind", "mind_k1", "item_knn"]:
    print(n, "per seed R@50/N@50", [(p["split_seed"], round(p["models"][n]["recall@50"], 4), round(p["models"][n]["ndcg@50"], 4)) for p in sorted(runs, key=lambda p: p["split_seed"])])
for n in ["mind", "mind_k1"]:
    v = [p["training"][n]["train_samples_per_s"] for p in runs]
    print(n, "samples/s", round(np.mean(v)), "±", round(np.std(v, ddof=1)))
