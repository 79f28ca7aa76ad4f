"""The scale run: 1M users, 1M items, >= 50M interactions, end to end within 24 GiB.

    python -m bench.bench_scale --scale smoke|full --out DIR      # writes DIR/bench_scale.json

Stages, each in a fresh Python process so its peak RSS (the child's own ru_maxrss) is
its alone; they hand over through files under DIR/scale_<scale>/:

1. generate  our generator (vectorised method) writes the Parquet log and side files;
             reported, not counted, and reused on a rerun with the same config.
2. ingest    load_dataset (validation, vocabularies, id encoding, sort, side features),
             the user split and the training samples; the encoded dataset is saved as .npy.
3. train     the training setup (windows, item counts, sampler, model) and a fixed number
             of steps of batch 1024 (retrieval.train.run_steps, the loop `train` runs);
             samples/s over the timed steps and the epoch time they imply. Validation
             is not run (over 100K users it would be a stage of its own).
4. index     item vectors of the 1M items and a FAISS index (index.faiss_index.build_index).
5. query     recommendations for some thousands of test users through the serving path
             (retrieval.recommend.recommend): users/s, and Recall@50 as a sanity figure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_ingest import ensure_data, part_main, peak_rss_mb, run_stage, stage_main  # noqa: E402
from data.synthetic import SyntheticConfig  # noqa: E402
from retrieval.artifacts import atomic_write_json, package_versions  # noqa: E402

MEMORY_LIMIT_MB = 24 * 1024.0
MIN_INTERACTIONS = 50_000_000


@dataclass(frozen=True)
class Plan:
    """What one scale runs."""

    data: SyntheticConfig  # the generated log
    warmup_steps: int  # untimed steps before the timed ones
    steps: int  # timed training steps
    batch_size: int
    factory: str  # faiss index factory
    nprobe: int  # IVF lists visited per query
    query_users: int  # test users served in the query stage
    min_interactions: int  # the log must be at least this long


PLANS = {
    "smoke": Plan(
        data=SyntheticConfig(n_users=5_000, n_items=20_000, n_topics=50, min_len=5, mean_len=30.0, max_len=300,
                             method="vectorised", seed=0),
        warmup_steps=2, steps=10, batch_size=1024, factory="IVF64,Flat", nprobe=8, query_users=500,
        min_interactions=100_000,
    ),
    # E[min(5 + floor(Exp(46.5)), 300)] = 50.9: about 50.9M interactions over 1M users
    "full": Plan(
        data=SyntheticConfig(n_users=1_000_000, n_items=1_000_000, n_topics=1000, min_len=5, mean_len=51.5,
                             max_len=300, method="vectorised", seed=0),
        warmup_steps=10, steps=200, batch_size=1024, factory="IVF1024,Flat", nprobe=16, query_users=5_000,
        min_interactions=MIN_INTERACTIONS,
    ),
}


# ---------------------------------------------------------------------------- handing the dataset over


def save_dataset(ds: Any, out: Path) -> None:
    """Write a Dataset's arrays as .npy files (read back memory-mapped) and its vocabularies as JSON."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    arrays = {"item_ids": ds.item_ids, "user_ids": ds.user_ids, "offsets": ds.offsets, "items": ds.items,
              "times": ds.times}
    arrays.update({f"item_feature.{f}": m for f, m in ds.item_features.items()})
    arrays.update({f"user_feature.{f}": m for f, m in ds.user_features.items()})
    for name, a in arrays.items():
        np.save(out / f"{name}.npy", a)
    vocab = {"item": ds.item_feature_vocab, "user": ds.user_feature_vocab}
    atomic_write_json(out / "vocab.json", vocab)


def read_dataset(path: Path) -> Any:
    """The Dataset written by save_dataset; the big arrays are memory-mapped, not copied."""
    import numpy as np

    from retrieval.data import Dataset

    vocab = json.loads((path / "vocab.json").read_text())

    def load(name: str) -> np.ndarray:
        return np.load(path / f"{name}.npy", mmap_mode="r")

    return Dataset(
        item_ids=load("item_ids"), user_ids=load("user_ids"), offsets=load("offsets"), items=load("items"),
        times=load("times"),
        item_features={f: np.asarray(load(f"item_feature.{f}")) for f in vocab["item"]},
        item_feature_vocab=vocab["item"],
        user_features={f: np.asarray(load(f"user_feature.{f}")) for f in vocab["user"]},
        user_feature_vocab=vocab["user"],
    )


# ---------------------------------------------------------------------------- stages (each in its own process)


def ingest_stage(data_dir: str, work: str, split_seed: int = 2026) -> dict[str, Any]:
    """load_dataset with side files, split, training samples; then save the encoded dataset."""
    from retrieval.data import DataSpec, item_counts, load_dataset, split_users
    from retrieval.samples import training_positions

    d = Path(data_dir)
    spec = DataSpec(d / "interactions.parquet", d / "items.parquet", d / "users.parquet")
    base = peak_rss_mb()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = load_dataset(spec, seconds)
    t = time.perf_counter()
    split = split_users(ds, split_seed)
    seconds["split"] = time.perf_counter() - t
    t = time.perf_counter()
    users, _ = training_positions(ds, split.train_users, split.history_len)
    item_counts(ds, split.train_users)
    seconds["training_samples"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    t = time.perf_counter()
    save_dataset(ds, Path(work) / "dataset")
    return {"interactions": int(len(ds.items)), "users": ds.n_users, "items": ds.n_items,
            "train_windows": int(len(users)), "seconds": seconds, "total_s": total,
            "save_s": time.perf_counter() - t, "baseline_rss_mb": base}


def train_stage(work: str, warmup_steps: int, steps: int, batch_size: int, seed: int = 0,
                split_seed: int = 2026) -> dict[str, Any]:
    """The training setup and warmup + steps training steps; samples/s over the timed steps."""
    import numpy as np
    import torch

    from retrieval.data import split_users
    from retrieval.train import TrainConfig, epoch_order, model_config_for, run_steps, setup

    ds = read_dataset(Path(work) / "dataset")
    split = split_users(ds, split_seed)
    base = peak_rss_mb()
    config = TrainConfig(batch_size=batch_size, seed=seed, max_steps=warmup_steps + steps)
    t = time.perf_counter()
    st = setup(ds, split, model_config_for(ds, interests=4, dim=64, max_len=50), config)
    order = epoch_order(np.random.default_rng(seed), len(st.users), batch_size, warmup_steps + steps)
    setup_s = time.perf_counter() - t
    run_steps(ds, st, order[: warmup_steps * batch_size], batch_size)
    t = time.perf_counter()
    loss = run_steps(ds, st, order[warmup_steps * batch_size :], batch_size)
    seconds = time.perf_counter() - t
    samples = steps * batch_size
    torch.save(st.model.state_dict(), Path(work) / "model.pt")
    return {"setup_s": setup_s, "steps": steps, "batch_size": batch_size, "timed_s": seconds,
            "step_ms": 1000 * seconds / steps, "samples_per_s": samples / seconds, "mean_loss": loss,
            "train_windows": int(len(st.users)), "epoch_hours_at_this_rate": len(st.users) / (samples / seconds) / 3600,
            "torch_threads": torch.get_num_threads(), "baseline_rss_mb": base}


def _model(work: Path, ds: Any) -> Any:
    import numpy as np
    import torch

    from retrieval.mind import MIND
    from retrieval.train import model_config_for

    model = MIND(model_config_for(ds, interests=4, dim=64, max_len=50),
                 {f: torch.from_numpy(m.astype(np.int64)) for f, m in ds.item_features.items()})
    model.load_state_dict(torch.load(work / "model.pt", weights_only=True))
    return model.eval()


def index_stage(work: str, factory: str) -> dict[str, Any]:
    """Item vectors of every item, then the FAISS index over them (trained and filled)."""
    import faiss
    import numpy as np
    import torch

    from index.faiss_index import build_index

    w = Path(work)
    ds = read_dataset(w / "dataset")
    model = _model(w, ds)
    base = peak_rss_mb()
    t = time.perf_counter()
    with torch.no_grad():
        xb = model.item_vectors().numpy().astype(np.float32)  # (N, D)
    vectors_s = time.perf_counter() - t
    t = time.perf_counter()
    index = build_index(xb, factory)
    build_s = time.perf_counter() - t
    faiss.write_index(index, str(w / "index.faiss"))
    return {"factory": factory, "ntotal": int(index.ntotal), "d": int(index.d), "item_vectors_s": vectors_s,
            "build_s": build_s, "faiss_threads": faiss.omp_get_max_threads(), "baseline_rss_mb": base}


def query_stage(work: str, users: int, nprobe: int, n: int = 50, split_seed: int = 2026) -> dict[str, Any]:
    """Serve `users` test users (history = their first 80 %) through recommend(); users/s and Recall@n."""
    import faiss
    import numpy as np

    from retrieval.data import split_users
    from retrieval.metrics import mean_metrics, topn_metrics
    from retrieval.recommend import recommend
    from retrieval.samples import Histories

    w = Path(work)
    ds = read_dataset(w / "dataset")
    model = _model(w, ds)
    index = faiss.read_index(str(w / "index.faiss"))
    try:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    except RuntimeError:  # not an IVF index: nothing to set
        nprobe = 0
    split = split_users(ds, split_seed)
    test = split.test_users[split.history_len[split.test_users] < ds.lengths()[split.test_users]]
    chosen = np.sort(np.random.default_rng(0).choice(test, size=min(users, len(test)), replace=False))
    ends = split.history_len[chosen]
    base = peak_rss_mb()
    t = time.perf_counter()
    rec = recommend(model, ds, index, Histories.of(ds, chosen, ends), n)
    seconds = time.perf_counter() - t
    truth = [np.asarray(ds.sequence(u)[e:]) for u, e in zip(chosen, ends)]
    recall = mean_metrics(topn_metrics(np.where(rec.items > 0, rec.items, -1), truth, ns=(n,)))[f"recall@{n}"]
    return {"users": int(len(chosen)), "n": n, "nprobe": nprobe, "seconds": seconds,
            "users_per_s": len(chosen) / seconds, f"recall@{n}": recall, "baseline_rss_mb": base}


STAGES = {"ingest": ingest_stage, "train": train_stage, "index": index_stage, "query": query_stage}


# ---------------------------------------------------------------------------- the run


def run(scale: str, out_dir: Path) -> dict[str, Any]:
    """Generate (or reuse) the log of `scale`, then ingest, train, index and query, each in a child."""
    return run_plan(PLANS[scale], scale, out_dir)


def run_plan(plan: Plan, scale: str, out_dir: Path) -> dict[str, Any]:
    """run() for any plan; its files go under out_dir/scale_<scale>/."""
    root = Path(out_dir) / f"scale_{scale}"
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    module = "bench.bench_scale"
    result: dict[str, Any] = {
        "bench": "scale",
        "scale": scale,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count()},
        "versions": package_versions(),
        "plan": {**asdict(plan), "data": asdict(plan.data)},
        "memory_limit_mb": MEMORY_LIMIT_MB,
        "stages": {},
    }
    stages = result["stages"]
    t0 = time.perf_counter()
    stages["generate"] = ensure_data(root / "data", plan.data, "parquet")
    if stages["generate"]["interactions"] < plan.min_interactions:
        raise RuntimeError(f"generated {stages['generate']['interactions']:,} interactions, "
                           f"fewer than the {plan.min_interactions:,} the {scale} run needs")
    stages["ingest"] = run_stage(module, "ingest", {"data_dir": str(root / "data"), "work": str(work)})
    stages["train"] = run_stage(module, "train", {"work": str(work), "warmup_steps": plan.warmup_steps,
                                                  "steps": plan.steps, "batch_size": plan.batch_size})
    stages["index"] = run_stage(module, "index", {"work": str(work), "factory": plan.factory})
    stages["query"] = run_stage(module, "query", {"work": str(work), "users": plan.query_users,
                                                  "nprobe": plan.nprobe})
    result["wall_s_after_generate"] = time.perf_counter() - t0 - (0 if stages["generate"]["reused"]
                                                                   else stages["generate"]["wall_s"])
    result["peak_rss_mb"] = max(s["peak_rss_mb"] for s in stages.values())
    result["within_memory_limit"] = result["peak_rss_mb"] <= MEMORY_LIMIT_MB
    return result


def table(result: dict[str, Any]) -> str:
    """One line per stage: its figures, wall time (the child's whole life) and peak RSS."""
    s = result["stages"]
    g, i, tr, ix, q = s["generate"], s["ingest"], s["train"], s["index"], s["query"]
    recall = q[f"recall@{q['n']}"]
    rows = [
        ("generate", f"{g['interactions']:,} interactions in {g['seconds']:.0f} s"
                     f"{' (reused)' if g.get('reused') else ''}", g),
        ("ingest", f"{i['interactions']:,} rows, {i['users']:,} users, {i['items']:,} items in {i['total_s']:.1f} s "
                   f"(" + ", ".join(f"{k} {v:.1f}" for k, v in i["seconds"].items()) + ")", i),
        ("train", f"{tr['steps']} steps of {tr['batch_size']}: {tr['step_ms']:.0f} ms/step, "
                  f"{tr['samples_per_s']:,.0f} samples/s (setup {tr['setup_s']:.1f} s; an epoch of "
                  f"{tr['train_windows']:,} windows: {tr['epoch_hours_at_this_rate']:.1f} h)", tr),
        ("index", f"{ix['factory']} over {ix['ntotal']:,} vectors: vectors {ix['item_vectors_s']:.1f} s, "
                  f"build {ix['build_s']:.1f} s", ix),
        ("query", f"{q['users']:,} users in {q['seconds']:.1f} s = {q['users_per_s']:,.0f} users/s "
                  f"(nprobe {q['nprobe']}, recall@{q['n']} {recall:.3f})", q),
    ]
    lines = [f"bench_scale ({result['scale']})", f"{'stage':<9} {'wall s':>7} {'peak MiB':>9}  figures"]
    lines += [f"{name:<9} {st['wall_s']:7.1f} {st['peak_rss_mb']:9.0f}  {text}" for name, text, st in rows]
    verdict = "within" if result["within_memory_limit"] else "OVER"
    lines.append(f"largest stage peak {result['peak_rss_mb']:,.0f} MiB: {verdict} the "
                 f"{result['memory_limit_mb']:,.0f} MiB limit; stages after generation {result['wall_s_after_generate']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    if not stage_main(STAGES, sys.argv[1:]):
        part_main("bench_scale", __doc__, PLANS, run, table)
