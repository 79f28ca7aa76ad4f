"""Ranker serving latency: rerank one user's M candidates in process, one request at a time.

    python -m bench.bench_rank_latency --data ../shared/datasets/ml-100k --out runs/bench \
        [--rankers base,din,dmin,dien,dsin] [--requests 500] [--threads 1]

For each ranker (or variant, `name:key=value;...` as in experiment-rankers), on ML-100K's
split-2026 test users: their histories (the protocol's first 80 %, last L fed), M = 200
candidates each (items they never touched, seeded) with retrieval scores, and the ranker
at its default size. Each request is `scoring.rerank` for one user (batch building, the
forward pass, fusion with the retrieval score, the sort) and is timed alone; p50, p99 and
the mean over `--requests` after a warm-up. The cost of a forward pass does not depend on
the weights, so fresh rankers time what trained ones would. The load average is recorded
beside the figures: the machine is shared, and a busy machine inflates every time.
Writes OUT/bench_rank_latency.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.artifacts import atomic_write_json, package_versions  # noqa: E402
from retrieval.data import DataSpec, load_dataset, split_users  # noqa: E402
from retrieval.ranking.data import TouchedItems  # noqa: E402
from retrieval.ranking.evaluate import scoring_latency  # noqa: E402
from retrieval.ranking.experiment import parse_variant  # noqa: E402
from retrieval.ranking.models import build_ranker  # noqa: E402
from retrieval.samples import Histories  # noqa: E402


def run(data: Path, rankers: list[str], requests: int, m: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    ds = load_dataset(DataSpec(data / "interactions.csv", data / "items.csv", data / "users.csv",
                               user_features=("age", "gender", "occupation")))
    split = split_users(ds, 2026)
    users = split.test_users
    hist = Histories.of(ds, users, split.history_len[users])
    cands = TouchedItems(ds).sample(users, np.random.default_rng(2026), (m,))  # (U, M)
    scores = -np.sort(np.random.default_rng(2027).random((len(users), m)), axis=1).astype(np.float32)  # descending
    out: dict[str, Any] = {"M": m, "users": len(users), "requests": requests, "threads": threads,
                           "history_mean": float(np.minimum(hist.lengths(), 50).mean()),
                           "load_before": os.getloadavg()[0], "rankers": {}}
    for variant in rankers:
        label, name, settings = parse_variant(variant)
        torch.manual_seed(0)
        model = build_ranker(name, ds, split.train_users, **settings).eval()
        model.config.retrieval_weight = 0.5  # fusion on: what a served ranker does
        t0 = time.perf_counter()
        out["rankers"][label] = scoring_latency(model, ds, hist, cands, scores, requests, warmup=50)
        out["rankers"][label]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"{label}: {out['rankers'][label]}", file=sys.stderr, flush=True)
    out["load_after"] = os.getloadavg()[0]
    out["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out["versions"] = package_versions()
    return out


def table(res: dict[str, Any]) -> str:
    lines = [f"rerank one user's {res['M']} candidates, {res['requests']} requests, {res['threads']} thread(s), "
             f"load {res['load_before']:.1f} -> {res['load_after']:.1f}",
             f"{'ranker':<40}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'cpu p50':>10}{'cpu p99':>10}"]
    for label, r in res["rankers"].items():
        lines.append(f"{label:<40}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['mean_ms']:>10.2f}"
                     f"{r['cpu_p50_ms']:>10.2f}{r['cpu_p99_ms']:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/ml-100k")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--rankers", default="base,din,dmin,dien,dsin")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    res = run(args.data, [v for v in args.rankers.split(",") if v.strip()], args.requests, args.candidates,
              args.threads)
    res["command"] = " ".join(sys.argv)
    atomic_write_json(args.out / "bench_rank_latency.json", res)
    print(table(res))


if __name__ == "__main__":
    main()
