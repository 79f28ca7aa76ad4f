"""Training throughput of our MIND step: ML-100K shapes, and 1K against 1M items on the same batches.

    python -m bench.bench_train --scale smoke|full --out DIR      # writes DIR/bench_train.json

The figure that matters is the ratio of the step time at 1M items to the one at 1K
items (target: within 1.5x): it says whether a step costs what the batch touches or
what the vocabulary holds. Each configuration runs the real training step
(`retrieval.train`: batch gathered from the CSR sequences, negatives from the
`NegativeSampler`, sampled-softmax loss, Adam + `RowSparseAdam`) and times its phases,
so a slow step shows where its time goes. The "before" rows run the step as it was
before issue 5 (`torch.multinomial` over all N items and `torch.optim.SparseAdam`) on
the same batches.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from retrieval.artifacts import package_versions  # noqa: E402
from retrieval.data import Dataset, DataSpec, item_counts, load_dataset, split_users  # noqa: E402
from retrieval.mind import MIND, MINDConfig, log_expected_counts  # noqa: E402
from retrieval.samples import make_batch, training_positions  # noqa: E402
from retrieval.train import NegativeSampler, RowSparseAdam, _optimizers, model_config_for  # noqa: E402

ML100K = ROOT.parent / "shared" / "datasets" / "ml-100k"
PHASES = ("batch", "negatives", "forward", "backward", "optimizer")


@dataclass(frozen=True)
class Sizes:
    """What one scale runs."""

    warmup: int  # untimed steps first (allocations, optimizer state)
    steps: int  # timed steps per configuration
    small_items: int  # N of the small-vocabulary run
    large_items: int  # N of the large-vocabulary run
    users: int  # users of the synthetic sequences behind the 1K / 1M batches
    seq_len: int  # behaviours per synthetic user


SCALES = {
    "smoke": Sizes(warmup=2, steps=6, small_items=1_000, large_items=100_000, users=5_000, seq_len=60),
    "full": Sizes(warmup=5, steps=40, small_items=1_000, large_items=1_000_000, users=16_000, seq_len=60),
}


def synthetic_dataset(n_items: int, n_users: int, seq_len: int, seed: int = 0) -> Dataset:
    """In-memory sequences whose item ids follow Zipf(1) over n_items: item = floor(N^u), u ~ U[0, 1).

    The same seed gives the same u for every n_items, so two vocabularies see the same
    batches in every respect but the ids' range."""
    u = np.random.default_rng(seed).random(n_users * seq_len)  # (E,)
    items = np.clip(np.floor(n_items**u), 1, n_items).astype(np.int32)
    offsets = np.arange(n_users + 1, dtype=np.int64) * seq_len
    return Dataset(
        item_ids=np.arange(n_items + 1).astype(str),  # (N+1,) ids only size the vocabulary here
        user_ids=np.arange(n_users).astype(str),
        offsets=offsets,
        items=items,
        times=np.zeros(len(items), dtype=np.int64),
    )


class Stepper:
    """Training steps over fixed windows, each step's phases timed.

    `before` runs the step as it was before issue 5: torch.multinomial over q every step,
    and torch.optim.SparseAdam for the embedding tables."""

    def __init__(self, ds: Dataset, model: MIND, users: np.ndarray, positions: np.ndarray, batch_size: int,
                 negatives: int, before: bool = False, seed: int = 0):
        self.ds, self.model, self.users, self.positions = ds, model, users, positions
        self.batch_size, self.negatives, self.before = batch_size, negatives, before
        freq = torch.from_numpy(item_counts(ds, np.unique(users)))
        self.q, self.log_q = log_expected_counts(freq, negatives, 1.0)
        self.sampler = NegativeSampler(self.q, negatives, seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.opts = _optimizers(model, 3e-3)
        if before:
            self.opts = [torch.optim.SparseAdam(o.param_groups[0]["params"], lr=3e-3)
                         if isinstance(o, RowSparseAdam) else o for o in self.opts]
        self.done = 0
        self.times: list[tuple[float, ...]] = []  # seconds of (batch, negatives, forward, backward, optimizer) per step
        self.losses: list[float] = []

    def run(self, steps: int, record: bool = True) -> None:
        model, L, B = self.model, self.model.config.max_len, self.batch_size
        model.train()
        for _ in range(steps):
            idx = np.arange(self.done * B, (self.done + 1) * B) % len(self.users)  # (B,)
            self.done += 1
            t0 = time.perf_counter()
            batch = make_batch(self.ds, self.users[idx], self.positions[idx], L, with_target=True)
            t1 = time.perf_counter()
            if self.before:
                neg = torch.multinomial(self.q, self.negatives, replacement=True, generator=self.gen)
            else:
                neg = self.sampler.draw()
            t2 = time.perf_counter()
            loss = model.loss(batch, neg, self.log_q)
            t3 = time.perf_counter()
            for o in self.opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            t4 = time.perf_counter()
            for o in self.opts:
                o.step()
            t5 = time.perf_counter()
            self.losses.append(loss.item())
            if record:
                self.times.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4))

    def summary(self) -> dict[str, Any]:
        """Median step time (robust to a shared machine's slow spells), mean milliseconds per phase."""
        t = np.asarray(self.times)  # (steps, phases)
        step_ms = 1000 * float(np.median(t.sum(1)))
        return {
            "step_ms": step_ms,
            "samples_per_s": self.batch_size / (step_ms / 1000),
            "phases_ms": {p: 1000 * float(v) for p, v in zip(PHASES, t.mean(0))},
            "steps_timed": len(t),
            "first_loss": self.losses[0],
            "last_loss": self.losses[-1],
        }


def ml100k(sizes: Sizes) -> dict[str, Any] | None:
    """Our step at the protocol's ML-100K shapes: batch 256, L 50, D 64, K 4, 512 negatives, side features."""
    if not ML100K.is_dir():
        return None
    spec = DataSpec(ML100K / "interactions.csv", ML100K / "items.csv", ML100K / "users.csv",
                    user_features=("age", "gender", "occupation"))
    ds = load_dataset(spec)
    split = split_users(ds, 2026)
    users, positions = training_positions(ds, split.train_users, split.history_len)
    order = np.random.default_rng(0).permutation(len(users))
    torch.manual_seed(0)
    cfg = model_config_for(ds, interests=4, dim=64, max_len=50)
    model = MIND(cfg, {f: torch.from_numpy(m.astype(np.int64)) for f, m in ds.item_features.items()})
    stepper = Stepper(ds, model, users[order], positions[order], 256, 512)
    stepper.run(sizes.warmup, record=False)
    stepper.run(2 * sizes.steps)
    return {"n_items": ds.n_items, "batch_size": 256, "max_len": 50, "dim": 64, "interests": 4, "negatives": 512,
            **stepper.summary()}


def vocabulary_pair(sizes: Sizes, before: bool, rounds: int = 5) -> dict[str, Any]:
    """Step time at small_items and large_items, batch 1024, L 50, D 64, K 4, on the same batches.

    The two run in alternating rounds of steps, so a shared machine's slow spells fall on
    both alike; the ratio is of median step times."""
    rng = np.random.default_rng(1)
    n_windows = (sizes.warmup + sizes.steps) * 1024
    users = rng.integers(0, sizes.users, n_windows)  # (W,) the same windows for every n_items
    positions = rng.integers(1, sizes.seq_len, n_windows)
    steppers = {}
    for n_items in (sizes.small_items, sizes.large_items):
        ds = synthetic_dataset(n_items, sizes.users, sizes.seq_len)
        torch.manual_seed(0)
        model = MIND(MINDConfig(n_items=n_items, dim=64, interests=4, max_len=50))
        steppers[n_items] = Stepper(ds, model, users, positions, 1024, 512, before=before)
        steppers[n_items].run(sizes.warmup, record=False)
    per_round = max(1, sizes.steps // rounds)
    for _ in range(rounds):
        for st in steppers.values():
            st.run(per_round)
    out: dict[str, Any] = {str(n): {"n_items": n, **st.summary()} for n, st in steppers.items()}
    out["ratio_large_to_small"] = out[str(sizes.large_items)]["step_ms"] / out[str(sizes.small_items)]["step_ms"]
    return out


def run(scale: str, out_dir: Path) -> dict[str, Any]:
    """Time the configurations of `scale` ("smoke" or "full"). Nothing is written to out_dir:
    the data are built in memory (and ML-100K read from ../shared)."""
    sizes = SCALES[scale]
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "bench": "train",
        "scale": scale,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "versions": package_versions(),
        "ml100k": ml100k(sizes),
        "vocabulary": vocabulary_pair(sizes, before=False),
        "vocabulary_before": vocabulary_pair(sizes, before=True),
        "target_ratio": 1.5,
    }
    result["meets_target"] = result["vocabulary"]["ratio_large_to_small"] <= result["target_ratio"]
    result["seconds"] = time.perf_counter() - t0
    return result


def _row(name: str, r: dict[str, Any]) -> str:
    ph = " ".join(f"{r['phases_ms'][p]:7.1f}" for p in PHASES)
    return f"{name:<30} {r['step_ms']:8.1f} {r['samples_per_s']:10,.0f}   {ph}"


def table(result: dict[str, Any]) -> str:
    """The step times as a text table: median step, mean milliseconds per phase."""
    head = f"{'configuration':<30} {'step ms':>8} {'samples/s':>10}   " + " ".join(f"{p[:7]:>7}" for p in PHASES)
    lines = [f"bench_train ({result['scale']}, {result['machine']['torch_threads']} torch threads)", head]
    if result["ml100k"] is not None:
        lines.append(_row("ML-100K B=256", result["ml100k"]))
    else:
        lines.append("ML-100K: skipped (../shared/datasets/ml-100k not present)")
    for key, label in (("vocabulary", "now"), ("vocabulary_before", "before")):
        v = result[key]
        for r in v.values():
            if isinstance(r, dict):
                lines.append(_row(f"B=1024 N={r['n_items']:,} ({label})", r))
        lines.append(f"{'':<30} ratio {v['ratio_large_to_small']:.2f}x ({label})")
    small, large = (r["n_items"] for r in result["vocabulary"].values() if isinstance(r, dict))
    verdict = "meets" if result["meets_target"] else "misses"
    lines.append(f"N={large:,} vs N={small:,} step-time ratio {result['vocabulary']['ratio_large_to_small']:.2f}x: "
                 f"{verdict} the {result['target_ratio']}x target")
    return "\n".join(lines)


if __name__ == "__main__":
    from bench.bench_ingest import part_main

    part_main("bench_train", __doc__, SCALES, run, table)
