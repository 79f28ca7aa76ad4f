"""The query path at scale (issue 5): index families, tuned recall, latency, throughput, a fresh process.

    python bench/bench_query.py smoke|full OUT_DIR [--threads T] [--factories F1;F2;...]

On the project's own synthetic log (data/synthetic.py; 1M items at "full") a MIND bundle
(K=4, D=64) is trained briefly, so item vectors carry learned structure (random vectors
are a poor proxy for ANN recall). Then, for each index family (faiss factory strings):

- build: seconds, serialized index size and the process's RSS growth;
- tuning: approximate families get the smallest nprobe / efSearch whose recall@50 against
  exact search reaches 0.95 on up to 1,000 validation users (index.tuning, the same call
  as `build-index --target-recall`);
- recall@50 of the served top-50 against exact search on the held-out test users;
- single-user latency, in process, for >= 1,000 users with their whole history (as
  `query` serves them): the project's path (history -> K interest vectors -> FAISS ->
  merge -> history exclusion -> top 50) timed alternately with a raw `index.search` of the
  same user's active interest vectors for 50 results, so noise falls on both alike; p50
  and p99 of each, and the p50 of the stages (interest vectors; search and merge);
- batch throughput: users/s of `recommend` for 10,000 users beside one raw batched
  `index.search` of the same users' active interest vectors;
- `retrieve query --user` as a fresh process: wall time, and the phases it prints with
  --timings (imports, load bundle, load index, search, print); interpreter start and the
  import of the CLI are the rest.

Threads: torch and faiss both run with T threads (default: 1 at smoke, 2 at full, the
machine's cores); the fresh processes get OMP_NUM_THREADS=T. The generated log and the
bundle are kept in OUT_DIR and reused by a rerun with the same settings.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.synthetic import SyntheticConfig, generate  # noqa: E402
from index.faiss_index import build_index, save_index, search_param_name, search_top_n, set_search_param  # noqa: E402
from index.tuning import TargetNotReached, exact_top_n, recall_against, tune_on_validation  # noqa: E402
from retrieval.artifacts import atomic_write_json, package_versions  # noqa: E402
from retrieval.bundle import Bundle, load_bundle  # noqa: E402
from retrieval.data import DataSpec, load_dataset, split_users  # noqa: E402
from retrieval.evaluate import held_out_users  # noqa: E402
from retrieval.recommend import history_rows, interest_vectors, recommend  # noqa: E402
from retrieval.samples import Histories  # noqa: E402
from retrieval.train import TrainConfig, model_config_for, train  # noqa: E402

log = logging.getLogger("bench_query")

N = 50  # the N of top-N and recall@N
TARGET_RECALL = 0.95
TARGET_P99_MS = 2.0  # single-user p99 in process
TARGET_OVERHEAD_MS = 1.0  # the project's path above raw FAISS of the same vectors
TARGET_BATCH_SHARE = 0.8  # batch users/s against raw batched FAISS


@dataclass(frozen=True)
class Scale:
    """Sizes of one benchmark run."""

    n_users: int  # users in the synthetic log (80/10/10 train/validation/test)
    n_items: int  # items, all indexed
    n_topics: int  # planted topics of the synthetic log
    train_steps: int  # training steps of 256 windows (one epoch, capped)
    factories: tuple[str, ...]  # index families, faiss factory strings
    tune_users: int  # validation users the tuning measures recall on
    latency_users: int  # users timed one at a time
    batch_users: int  # users of the batch throughput run
    query_runs: int  # fresh `retrieve query` processes timed
    threads: int  # torch and faiss threads


SCALES = {
    "smoke": Scale(
        n_users=400, n_items=4000, n_topics=20, train_steps=20,
        factories=("Flat", "IVF32,Flat", "HNSW16", "IVF32,PQ32np"),
        tune_users=40, latency_users=40, batch_users=300, query_runs=1, threads=1,
    ),
    "full": Scale(
        n_users=20_000, n_items=1_000_000, n_topics=500, train_steps=300,
        factories=("Flat", "IVF4096,Flat", "HNSW32", "IVF4096,PQ32np"),
        tune_users=1000, latency_users=1000, batch_users=10_000, query_runs=3, threads=2,
    ),
}


# ----------------------------------------------------------------------------- data and model


def synthetic_config(scale: Scale) -> SyntheticConfig:
    """The log's config; the vectorised generator where this version of data/synthetic.py has
    one (the per-user walk costs O(items) per user: about 0.2 s a user at 1M items)."""
    extra = {"method": "vectorised"} if "method" in {f.name for f in fields(SyntheticConfig)} else {}
    return SyntheticConfig(n_users=scale.n_users, n_items=scale.n_items, n_topics=scale.n_topics, seed=0, **extra)


def prepare_bundle(scale: Scale, out_dir: Path) -> tuple[Bundle, dict[str, Any]]:
    """Generate the log and train the bundle, or reuse both from an earlier run with the same settings."""
    cfg = synthetic_config(scale)
    settings = {"synthetic": {k: v for k, v in asdict(cfg).items()}, "train_steps": scale.train_steps,
                "threads": scale.threads}
    stamp = out_dir / "prepared.json"
    bundle_dir = out_dir / "bundle"
    if stamp.is_file() and json.loads(stamp.read_text()).get("settings") == json.loads(json.dumps(settings)):
        log.info("reusing the log and bundle in %s", out_dir)
        return load_bundle(bundle_dir), json.loads(stamp.read_text())["figures"]

    t0 = time.perf_counter()
    paths = generate(out_dir / "data", cfg)
    generate_s = time.perf_counter() - t0
    spec = DataSpec(paths["interactions"], paths["items"], paths["users"])
    t0 = time.perf_counter()
    ds = load_dataset(spec)
    load_s = time.perf_counter() - t0
    split = split_users(ds, 2026)
    model_cfg = model_config_for(ds, dim=64, interests=4, max_len=50)
    tc = TrainConfig(epochs=1, max_steps=scale.train_steps, threads=scale.threads, seed=0)
    t0 = time.perf_counter()
    result = train(ds, split, model_cfg, tc, out=bundle_dir, data_spec=spec, show_progress=False)
    figures = {
        "users": ds.n_users, "items": ds.n_items, "interactions": len(ds.items),
        "generate_s": generate_s, "load_s": load_s, "train_s": time.perf_counter() - t0,
        "train_steps": scale.train_steps, "val_recall@50": result.best_recall,
        "generator": getattr(cfg, "method", "per_user"),
    }
    atomic_write_json(stamp, {"settings": settings, "figures": figures})
    return load_bundle(bundle_dir), figures


# ----------------------------------------------------------------------------- measurements


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _vectors(model: Any, ds: Any, hist: Histories) -> tuple[np.ndarray, np.ndarray]:
    """(U, K, D) interest vectors and (U, K) active mask as numpy arrays."""
    it = interest_vectors(model, ds, hist)
    return it.vectors.numpy(), it.active.numpy()


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99)}


def single_user_latency(b: Bundle, index: faiss.Index, users: np.ndarray) -> dict[str, Any]:
    """The project's path and raw FAISS of the same active interest vectors, timed alternately per user."""
    ds, model = b.dataset, b.model
    hist = Histories.of(ds, users, ds.lengths()[users])
    V, A = _vectors(model, ds, hist)  # (U, K, D), (U, K)
    for u in range(min(20, len(users))):  # warm-up: first-call costs are not a user's latency
        recommend(model, ds, index, Histories.of(ds, users[u : u + 1], ds.lengths()[users[u : u + 1]]), N)
        index.search(V[u][A[u]], N)
    path, raw, vectors, search = [], [], [], []
    for u in range(len(users)):
        one = users[u : u + 1]
        xq = np.ascontiguousarray(V[u][A[u]])  # (K', D)
        t0 = time.perf_counter()
        recommend(model, ds, index, Histories.of(ds, one, ds.lengths()[one]), N)
        t1 = time.perf_counter()
        index.search(xq, N)
        t2 = time.perf_counter()
        path.append(t1 - t0)
        raw.append(t2 - t1)
    for u in range(len(users)):  # the stages, in a second pass
        one = users[u : u + 1]
        t0 = time.perf_counter()
        h = Histories.of(ds, one, ds.lengths()[one])
        Vu, Au = _vectors(model, ds, h)
        t1 = time.perf_counter()
        search_top_n(index, Vu, Au, N, exclude=history_rows(h))
        t2 = time.perf_counter()
        vectors.append(t1 - t0)
        search.append(t2 - t1)
    ours, theirs = percentiles_ms(path), percentiles_ms(raw)
    return {
        "users": len(users), **ours,
        "raw_p50_ms": theirs["p50_ms"], "raw_p99_ms": theirs["p99_ms"],
        "overhead_p50_ms": ours["p50_ms"] - theirs["p50_ms"], "overhead_p99_ms": ours["p99_ms"] - theirs["p99_ms"],
        "stages_p50_ms": {"interest_vectors": percentiles_ms(vectors)["p50_ms"],
                          "search_and_merge": percentiles_ms(search)["p50_ms"]},
    }


def batch_throughput(b: Bundle, index: faiss.Index, users: np.ndarray) -> dict[str, Any]:
    """users/s of recommend for all users at once, beside one raw batched search of their active
    vectors; the interest vectors are timed apart, so search + merge is the rest."""
    ds, model = b.dataset, b.model
    hist = Histories.of(ds, users, ds.lengths()[users])
    t0 = time.perf_counter()
    V, A = _vectors(model, ds, hist)  # (U, K, D), (U, K)
    vectors_s = time.perf_counter() - t0
    xq = np.ascontiguousarray(V[A])  # (nq, D)
    t0 = time.perf_counter()
    index.search(xq, N)
    raw_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    recommend(model, ds, index, hist, N)
    total_s = time.perf_counter() - t0
    U = len(users)
    return {
        "users": U, "queries": len(xq), "seconds": total_s, "users_per_s": U / total_s,
        "raw_seconds": raw_s, "raw_users_per_s": U / raw_s, "share_of_raw": raw_s / total_s,
        "stages_s": {"interest_vectors": vectors_s, "search_and_merge": total_s - vectors_s},
    }


def fresh_query(bundle_dir: Path, index_dir: Path, user: str, runs: int, threads: int) -> dict[str, Any]:
    """`retrieve query --user` in a new process (median of runs): wall time until the answer is
    out (the --timings line follows it on stderr), the phases it reports, the rest (interpreter
    start and CLI import), and the time until the process has exited."""
    exe = shutil.which("retrieve", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-c", "from cli import app; app()"]
    cmd += ["query", "--bundle", str(bundle_dir), "--index", str(index_dir), "--user", user,
            "-n", str(N), "--json", "--timings"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    trials = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=Path(__file__).resolve().parents[1])
        line, wall = "", 0.0
        for line in proc.stderr:  # type: ignore[union-attr]  # the answer (a few KB) waits in the stdout pipe
            if line.startswith("timings: "):
                wall = time.perf_counter() - t0
                break
        _, rest = proc.communicate()
        exit_s = time.perf_counter() - t0
        if proc.returncode != 0 or not wall:
            raise RuntimeError(f"retrieve query failed ({proc.returncode}): {(line + rest).strip()[-500:]}")
        phases = json.loads(line.removeprefix("timings: "))
        trials.append({"wall_s": wall, "phases_s": phases, "startup_s": wall - phases["total"], "exit_s": exit_s})
    trials.sort(key=lambda t: t["wall_s"])
    return {"runs": runs, **trials[len(trials) // 2], "all_wall_s": [t["wall_s"] for t in trials]}


def tuned_index(b: Bundle, xb: np.ndarray, factory: str, scale: Scale, out_dir: Path
                ) -> tuple[faiss.Index, Path, dict[str, Any]]:
    """Build one index family over the item vectors, tune its search parameter to TARGET_RECALL on
    validation users and save it under out_dir/indexes/; the index, its directory and the row's
    figures (build seconds, RSS growth, the setting and the tuning trials). bench_serve serves it."""
    row: dict[str, Any] = {"factory": factory}
    gc.collect()
    rss0, t0 = rss_bytes(), time.perf_counter()
    index = build_index(xb, factory)
    row["build_s"] = time.perf_counter() - t0
    row["rss_growth_bytes"] = rss_bytes() - rss0
    log.info("%s: built in %.1fs", factory, row["build_s"])

    row["search_param"] = search_param_name(index)
    manifest: dict[str, Any] = {"factory": factory, "bundle_fingerprint": b.fingerprint, "bundle": str(b.path)}
    if row["search_param"] is not None:
        try:
            tuning = tune_on_validation(index, b, xb, TARGET_RECALL, n=N, max_users=scale.tune_users)
            row["tuning"] = tuning.manifest()["tuning"]
            row["search_value"] = tuning.search_value
            manifest.update(tuning.manifest())
        except TargetNotReached as err:  # measured anyway, at the best value tried
            row["tuning_error"] = str(err)
            row["tuning"] = {"trials": [list(t) for t in err.trials]}
            set_search_param(index, row["search_param"], err.best_value)  # type: ignore[arg-type]
            row["search_value"] = err.best_value
            manifest.update({"search_param": row["search_param"], "search_value": err.best_value})
        log.info("%s: %s=%s", factory, row["search_param"], row["search_value"])

    index_dir = out_dir / "indexes" / factory.replace(",", "_")
    save_index(index, index_dir, manifest)
    row["index_bytes"] = (index_dir / "index.faiss").stat().st_size
    return index, index_dir, row


def measure_family(
    b: Bundle, xb: np.ndarray, factory: str, scale: Scale, out_dir: Path, test: dict[str, Any],
    latency_users: np.ndarray, batch_users: np.ndarray,
) -> dict[str, Any]:
    """Everything the issue asks of one index family."""
    index, index_dir, row = tuned_index(b, xb, factory, scale, out_dir)

    got = search_top_n(index, test["V"], test["A"], N, exclude=test["exclude"])[0]
    row["recall@50_test"] = recall_against(got, test["exact"])
    row["test_users"] = len(test["V"])
    log.info("%s: recall@50 %.4f on %d test users", factory, row["recall@50_test"], row["test_users"])

    row["latency"] = single_user_latency(b, index, latency_users)
    log.info("%s: single user p50 %.3f ms p99 %.3f ms (raw %.3f / %.3f)", factory, row["latency"]["p50_ms"],
             row["latency"]["p99_ms"], row["latency"]["raw_p50_ms"], row["latency"]["raw_p99_ms"])
    row["batch"] = batch_throughput(b, index, batch_users)
    log.info("%s: batch %.0f users/s (raw %.0f)", factory, row["batch"]["users_per_s"], row["batch"]["raw_users_per_s"])
    del index
    gc.collect()

    user = str(b.dataset.user_ids[int(latency_users[0])])
    row["fresh_query"] = fresh_query(b.path, index_dir, user, scale.query_runs, scale.threads)
    lat = row["latency"]
    row["targets"] = {
        "recall@50>=0.95": row["recall@50_test"] >= TARGET_RECALL,
        "p99<=2ms": lat["p99_ms"] <= TARGET_P99_MS,
        "overhead_p99<=1ms": lat["overhead_p99_ms"] <= TARGET_OVERHEAD_MS,
        "batch>=80%raw": row["batch"]["share_of_raw"] >= TARGET_BATCH_SHARE,
    }
    return row


def run(scale: str, out_dir: Path, threads: int | None = None, factories: tuple[str, ...] | None = None) -> dict:
    """Run the benchmark at `scale` ("smoke" or "full") with its data and indexes under out_dir."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    s = SCALES[scale]
    s = Scale(**{**asdict(s), "threads": threads or s.threads, "factories": factories or s.factories})
    torch.set_num_threads(s.threads)
    faiss.omp_set_num_threads(s.threads)
    out_dir = Path(out_dir).resolve()  # the fresh processes run from the repository root
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    b, prepared = prepare_bundle(s, out_dir)
    t0 = time.perf_counter()
    xb = b.model.item_vectors().detach().numpy()  # (N, D)
    vectors_s = time.perf_counter() - t0

    users, ends, _ = held_out_users(b.dataset, b.split, "test")  # the protocol's history, its rest held out
    hist = Histories.of(b.dataset, users, ends)
    V, A = _vectors(b.model, b.dataset, hist)
    exclude = history_rows(hist)
    t0 = time.perf_counter()
    test = {"V": V, "A": A, "exclude": exclude, "exact": exact_top_n(xb, V, A, N, exclude)}
    exact_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    everyone = rng.permutation(b.dataset.n_users)
    latency_users = everyone[: s.latency_users]
    batch_users = everyone[: s.batch_users]

    families = []
    for factory in s.factories:
        families.append(measure_family(b, xb, factory, s, out_dir, test, latency_users, batch_users))
    return {
        "benchmark": "query path", "scale": scale, "settings": asdict(s), "n": N, "K": b.model.config.interests,
        "dim": b.model.config.dim, "split_seed": b.split.seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "packages": package_versions(),
        "data_and_training": prepared, "item_vectors_s": vectors_s, "exact_test_search_s": exact_s,
        "families": families, "wall_s": time.perf_counter() - started,
        "notes": {
            "serving_depth": "each interest is searched n + min(n, longest history in the batch) deep; users whose "
                             "lists the history exclusion empties are searched again n + |history| deep; HNSW "
                             "searches with ef = max(efSearch, that depth)",
            "raw": "index.search of the same active interest vectors for n results, nothing else",
            "latency_history": "whole history, as `retrieve query` serves; recall uses the protocol's test split",
        },
    }


def table(result: dict) -> str:
    """The figures as text: one line per family and measurement."""
    d = result["data_and_training"]
    head = (
        f"query path, {result['scale']}: {d['items']:,} items, {d['users']:,} users, K={result['K']} D={result['dim']} "
        f"N={result['n']}, {result['settings']['threads']} thread(s); bundle trained {d['train_steps']} steps "
        f"(val recall@50 {d['val_recall@50']:.3f}); wall {result['wall_s']:.0f}s"
    )
    columns = (
        f"{'family':<14} {'param':<13} {'build s':>8} {'MB':>7} {'recall@50':>9}  "
        f"{'p50 ms':>7} {'p99 ms':>7} {'raw p50':>7} {'raw p99':>7}  {'users/s':>8} {'raw u/s':>8} {'share':>6}"
    )
    lines = [head, columns]
    for f in result["families"]:
        param = f"{f['search_param']}={f['search_value']}" if f.get("search_param") else "exact"
        lat, bat = f["latency"], f["batch"]
        lines.append(
            f"{f['factory']:<14} {param:<13} {f['build_s']:>8.1f} {f['index_bytes'] / 2**20:>7.1f} "
            f"{f['recall@50_test']:>9.4f}  {lat['p50_ms']:>7.3f} {lat['p99_ms']:>7.3f} {lat['raw_p50_ms']:>7.3f} "
            f"{lat['raw_p99_ms']:>7.3f}  {bat['users_per_s']:>8,.0f} {bat['raw_users_per_s']:>8,.0f} "
            f"{bat['share_of_raw']:>6.0%}"
        )
    lines.append("where the time goes (p50 ms of one user: interest vectors | search + merge; batch s: same)")
    for f in result["families"]:
        st, bs = f["latency"]["stages_p50_ms"], f["batch"]["stages_s"]
        q = f["fresh_query"]
        phases = "  ".join(f"{k} {v:.3f}" for k, v in q["phases_s"].items() if k != "total")
        lines.append(
            f"{f['factory']:<14} one user {st['interest_vectors']:.3f} | {st['search_and_merge']:.3f}   "
            f"batch {bs['interest_vectors']:.2f} | {bs['search_and_merge']:.2f}   "
            f"fresh query {q['wall_s']:.2f}s = startup {q['startup_s']:.3f}  {phases}"
        )
        missed = [k for k, ok in f["targets"].items() if not ok]
        if f.get("tuning_error"):
            lines.append(f"{'':<14} tuning: {f['tuning_error']}")
        if missed and f.get("search_param"):
            lines.append(f"{'':<14} targets missed: {', '.join(missed)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scale", choices=sorted(SCALES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: per scale)")
    parser.add_argument("--factories", default=None, help="';'-separated faiss factory strings (default: per scale)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    factories = tuple(args.factories.split(";")) if args.factories else None
    result = run(args.scale, args.out_dir, threads=args.threads, factories=factories)
    atomic_write_json(args.out_dir / f"bench_query_{args.scale}.json", result)
    print(table(result))
    print(f"report: {args.out_dir / f'bench_query_{args.scale}.json'}")


if __name__ == "__main__":
    main()
