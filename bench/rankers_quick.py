"""Quick ranker comparison on one split: train each ranker briefly beside a retrieval bundle,
then report standalone AUC / GAUC and two-stage metrics on the test users (JSON).

    python bench/rankers_quick.py BUNDLE OUT.json base,din,dmin,dien,dsin EPOCHS

A preliminary figure for the ranker issues; the multi-seed report is still to come.
"""

import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.artifacts import atomic_write_json  # noqa: E402
from retrieval.bundle import load_bundle  # noqa: E402
from retrieval.evaluate import exact_index  # noqa: E402
from retrieval.ranking.evaluate import evaluate_ranker  # noqa: E402
from retrieval.ranking.train import RankTrainConfig, train_ranker  # noqa: E402


def main(bundle: str, out: str, names: str, epochs: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    b = load_bundle(Path(bundle))
    idx = exact_index(b.model)
    report = {}
    for name in names.split(","):
        r = train_ranker(b.dataset, b.split, RankTrainConfig(model=name, epochs=int(epochs), patience=1),
                         show_progress=False)
        ev = evaluate_ranker(r.model, b.dataset, b.split, b.model, idx, "test")
        report[name] = {"best_epoch": r.best_epoch, "val_auc": r.best_auc, "train_samples_per_s": r.samples_per_s,
                        "seconds_per_epoch": sum(h["seconds"] for h in r.history) / len(r.history),
                        "split_seed": b.split.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        **ev}
        print(name, json.dumps(report[name]), flush=True)
        atomic_write_json(Path(out), report)


if __name__ == "__main__":
    main(*sys.argv[1:5])
