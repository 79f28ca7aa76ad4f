"""Throughput on one GPU: MIND training at 1M items, an epoch of the 50M-interaction log, exact
evaluation of 20,000 users over 1M items, one user's exact search.

    python -m bench.bench_gpu --out DIR [--budget 200] [--scale full|smoke] [--device cuda|cpu]

Run by bench/gpu_check.sh on a GPU machine (smoke on the CPU checks the script itself).
Data are Zipf-like random sequences built in memory (item = floor(N^u), u ~ U[0, 1)), the
shapes of the issue: K=4, L=50, D=64, 512 negatives, no side features. Every figure is
the real library path: `retrieval.train.setup` / `run_steps` (dense gradients, fused Adam,
negatives drawn and histories gathered on the device), `retrieval.recommend.recommend`
over `index.torch_search.TorchFlatIndex`.

Parts run in order while the time budget lasts; a part that would not fit is recorded as
skipped. The 50M epoch runs its steps in chunks and, if the budget ends first, reports the
share of the epoch it ran and the epoch time at that rate (marked as such).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from retrieval.data import Dataset, Split  # noqa: E402
from retrieval.device import Runtime, runtime_for  # noqa: E402
from retrieval.mind import MINDConfig  # noqa: E402
from retrieval.train import TrainConfig, run_steps, setup  # noqa: E402


@dataclass(frozen=True)
class Scale:
    items: int  # N of the throughput and evaluation runs
    users: int  # users of the throughput data (seq_len behaviours each)
    seq_len: int
    batch: int  # global batch of the throughput runs
    warmup: int  # untimed steps
    steps: int  # timed steps
    epoch_users: int  # users of the epoch run (epoch_len behaviours each): 1M x 50 = the 50M log
    epoch_len: int
    eval_users: int  # held-out users of the exact evaluation
    big_items: int  # N of the large-vocabulary run (0: none)


SCALES = {
    "full": Scale(items=1_000_000, users=200_000, seq_len=60, batch=8192, warmup=10, steps=60,
                  epoch_users=1_000_000, epoch_len=50, eval_users=20_000, big_items=10_000_000),
    "smoke": Scale(items=5_000, users=2_000, seq_len=30, batch=256, warmup=2, steps=4,
                   epoch_users=3_000, epoch_len=20, eval_users=500, big_items=0),
}


def zipf_dataset(n_items: int, n_users: int, seq_len: int, seed: int = 0) -> Dataset:
    """n_users sequences of seq_len items, item = floor(N^u) clipped to 1..N (Zipf-like), in memory."""
    u = np.random.default_rng(seed).random(n_users * seq_len, dtype=np.float32)
    items = np.clip(np.floor(np.float32(n_items) ** u), 1, n_items).astype(np.int32)
    return Dataset(
        item_ids=np.zeros(n_items + 1, dtype="U1"),  # ids only size the vocabulary here
        user_ids=np.zeros(n_users, dtype="U1"),
        offsets=np.arange(n_users + 1, dtype=np.int64) * seq_len,
        items=items,
        times=np.zeros(len(items), dtype=np.int64),
    )


def all_training(ds: Dataset) -> Split:
    """Every user a training user (throughput runs: no validation)."""
    empty = np.zeros(0, dtype=np.int64)
    return Split(0, np.arange(ds.n_users, dtype=np.int64), empty, empty, ds.lengths())


def _sync(runtime: Runtime) -> None:
    if runtime.cuda:
        torch.cuda.synchronize(runtime.device)


def train_throughput(ds: Dataset, scale: Scale, runtime: Runtime) -> tuple[dict[str, Any], Any]:
    """Samples/s of the training step at the scale's batch, after warm-up steps (compilation, allocations)."""
    split = all_training(ds)
    cfg = MINDConfig(n_items=ds.n_items, dim=64, interests=4, max_len=50)
    t0 = time.perf_counter()
    st = setup(ds, split, cfg, TrainConfig(batch_size=scale.batch, negatives=512, seed=0), runtime)
    setup_s = time.perf_counter() - t0
    order = np.random.default_rng(0).permutation(len(st.users))[: (scale.warmup + scale.steps) * scale.batch]
    t0 = time.perf_counter()
    run_steps(ds, st, order[: scale.warmup * scale.batch], scale.batch)
    _sync(runtime)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss = run_steps(ds, st, order[scale.warmup * scale.batch :], scale.batch)
    _sync(runtime)
    seconds = time.perf_counter() - t0
    samples = scale.steps * scale.batch
    return {
        "n_items": ds.n_items, "batch": scale.batch, "precision": runtime.precision, "compile": runtime.compile,
        "samples_per_s": samples / seconds, "step_ms": 1000 * seconds / scale.steps, "steps_timed": scale.steps,
        "warmup_s": warmup_s, "setup_s": setup_s, "loss": loss,
        "peak_gib": torch.cuda.max_memory_allocated(runtime.device) / 2**30 if runtime.cuda else None,
    }, st


def epoch(scale: Scale, runtime: Runtime, deadline: float) -> dict[str, Any]:
    """One epoch over the windows of epoch_users x epoch_len interactions (1M x 50: the 50M log), in
    chunks of steps until the epoch ends or the deadline comes."""
    t0 = time.perf_counter()
    ds = zipf_dataset(scale.items, scale.epoch_users, scale.epoch_len, seed=1)
    st = setup(ds, all_training(ds), MINDConfig(n_items=ds.n_items, dim=64, interests=4, max_len=50),
               TrainConfig(batch_size=scale.batch, negatives=512, seed=0), runtime)
    order = np.random.default_rng(1).permutation(len(st.users))
    prepare_s = time.perf_counter() - t0
    chunk = 200 * scale.batch
    run_steps(ds, st, order[: scale.warmup * scale.batch], scale.batch)  # warm-up, not timed
    _sync(runtime)
    t0, done = time.perf_counter(), 0
    while done < len(order) and time.perf_counter() < deadline:
        run_steps(ds, st, order[done : done + chunk], scale.batch)
        done = min(done + chunk, len(order))
    _sync(runtime)
    seconds = time.perf_counter() - t0
    rate = done / seconds
    return {"interactions": int(len(ds.items)), "windows": int(len(order)), "windows_run": int(done),
            "complete": done == len(order), "seconds_run": seconds, "samples_per_s": rate,
            "epoch_s": seconds if done == len(order) else len(order) / rate,
            "epoch_s_is": "measured" if done == len(order) else "estimated from the share run",
            "prepare_s": prepare_s}


def exact_evaluation(ds: Dataset, st: Any, scale: Scale) -> dict[str, Any]:
    """Recall@50 of eval_users held-out users over every item: item vectors, the exact index on the
    device, interests, search with history exclusion, merge, metrics; each phase timed."""
    from retrieval.evaluate import exact_index
    from retrieval.metrics import mean_metrics, topn_metrics
    from retrieval.recommend import recommend
    from retrieval.samples import Histories

    model = st.model
    model.eval()
    users = np.random.default_rng(2).choice(ds.n_users, scale.eval_users, replace=False)
    ends = np.full(len(users), int(0.8 * ds.lengths()[0]), dtype=np.int64)
    truth = [ds.sequence(u)[e:] for u, e in zip(users, ends)]
    _sync(st.runtime)
    t0 = time.perf_counter()
    index = exact_index(model)
    _sync(st.runtime)
    t1 = time.perf_counter()
    rec = recommend(model, ds, index, Histories.of(ds, users, ends), 50)
    t2 = time.perf_counter()
    recall = mean_metrics(topn_metrics(np.where(rec.items > 0, rec.items, -1), truth, (50,)))["recall@50"]
    t3 = time.perf_counter()
    one = Histories.of(ds, users[:1], ends[:1])
    recommend(model, ds, index, one, 50)  # warm
    times = []
    for _ in range(50):
        s = time.perf_counter()
        recommend(model, ds, index, one, 50)
        times.append(time.perf_counter() - s)
    return {"users": len(users), "n_items": ds.n_items, "index_type": type(index).__name__,
            "index_s": t1 - t0, "recommend_s": t2 - t1, "metrics_s": t3 - t2, "total_s": t3 - t0,
            "users_per_s": len(users) / (t2 - t1), "recall@50": recall,
            "one_user_ms_median": 1000 * float(np.median(times)), "one_user_ms_p99": 1000 * float(np.quantile(times, 0.99))}


def run(scale_name: str, device: str, budget: float) -> dict[str, Any]:
    scale = SCALES[scale_name]
    start = time.perf_counter()
    deadline = start + budget
    result: dict[str, Any] = {
        "bench": "gpu", "scale": scale_name, "budget_s": budget,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"device": device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "shapes": {"interests": 4, "max_len": 50, "dim": 64, "negatives": 512, "batch": scale.batch},
        "skipped": {},
    }

    def part(name: str, cost: float, fn: Callable[[], Any]) -> Any:
        left = deadline - time.perf_counter()
        if left < cost:
            result["skipped"][name] = f"{left:.0f} s of the budget left, the part needs about {cost:.0f} s"
            return None
        t0 = time.perf_counter()
        out = fn()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        return out

    ds = zipf_dataset(scale.items, scale.users, scale.seq_len)
    fp32 = part("train_fp32", 20, lambda: train_throughput(ds, scale, runtime_for(device)))
    if fp32 is not None:
        result["train_fp32"], st = fp32
        result["exact_eval"] = part("exact_eval", 10, lambda: exact_evaluation(ds, st, scale))
        del st
    for name, precision, compiled in (("train_bf16", "bf16", False), ("train_compile", "fp32", True)):
        if compiled and device == "cpu":  # inductor's CPU code generation: not what this checks
            result["skipped"][name] = "not on the CPU"
            continue
        r = part(name, 60 if compiled else 20,
                 lambda: train_throughput(ds, scale, runtime_for(device, precision, compiled))[0])
        if r is not None:
            result[name] = r
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["epoch_50m"] = part("epoch_50m", 60, lambda: epoch(scale, runtime_for(device), deadline - 15))
    if scale.big_items:
        big = zipf_dataset(scale.big_items, scale.users, scale.seq_len)
        r = part("train_10m_items", 25, lambda: train_throughput(big, scale, runtime_for(device))[0])
        if r is not None:
            result["train_10m_items"] = r
    result["targets"] = targets(result) if scale_name == "full" else "only the full scale is held to the targets"
    result["seconds"] = time.perf_counter() - start
    return result


def targets(r: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against what was measured (None where the part did not run)."""
    train, ev, ep = r.get("train_fp32"), r.get("exact_eval"), r.get("epoch_50m")
    best = max((r[k]["samples_per_s"] for k in ("train_fp32", "train_bf16", "train_compile") if r.get(k)), default=None)
    return {
        "train_samples_per_s_fp32": train and train["samples_per_s"],
        "train_samples_per_s_best": best,
        "train_at_least_800k": None if best is None else best >= 800_000,
        "epoch_50m_s": ep and ep["epoch_s"],
        "epoch_50m_within_120s": None if not ep else ep["epoch_s"] <= 120,
        "eval_20k_users_s": ev and ev["total_s"],
        "eval_within_5s": None if not ev else ev["total_s"] <= 5,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds the parts may take together")
    args = ap.parse_args(argv)
    result = run(args.scale, args.device, args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
