"""Ingestion of a 10M-interaction log, CSV and Parquet: wall time per stage and peak memory.

    python -m bench.bench_ingest --scale smoke|full --out DIR      # writes DIR/bench_ingest.json

The log (1M users, 1M items at full scale, with its items and users side files) comes
from our own generator (`data/synthetic.py`, vectorised method); generating it is
reported but not counted. Each format is then ingested in a fresh Python process, so
its peak RSS (the child's own ru_maxrss) is the ingestion's alone: validation (read,
strip, parse, check), id vocabularies, id encoding and the sort into per-user
sequences, side-file features, the user split, and the training samples (the (user,
position) windows and the item counts the negative sampler needs). Windows are never
materialised as (windows x L): the report gives the bytes that would have taken.
Targets: <= 30 s and <= 3 GiB peak per format.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.synthetic import SyntheticConfig, generate  # noqa: E402
from retrieval.artifacts import atomic_write_json, package_versions  # noqa: E402

FORMATS = ("csv", "parquet")
TARGET_SECONDS = 30.0
TARGET_PEAK_MB = 3 * 1024.0

SCALES = {
    # about 200K interactions: a few seconds
    "smoke": SyntheticConfig(n_users=20_000, n_items=50_000, n_topics=100, min_len=3, mean_len=10.5, max_len=200,
                             method="vectorised", seed=0),
    # 1M users x about 10.0 = 10M interactions over 1M items (E[3 + floor(Exp(7.5))] = 10.01)
    "full": SyntheticConfig(n_users=1_000_000, n_items=1_000_000, n_topics=1000, min_len=3, mean_len=10.5,
                            max_len=200, method="vectorised", seed=0),
}


# ---------------------------------------------------------------------------- stages in fresh processes


def peak_rss_mb() -> float:
    """This process's peak resident set so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_stage(module: str, stage: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run `module.STAGES[stage](**args)` in a fresh Python process and return its result,
    with `peak_rss_mb` (the child's own peak, so attributable to this stage alone) and
    `wall_s` (the child's whole life, imports included)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--stage", stage, "--args", json.dumps(args), "--result", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"stage {module}:{stage} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(out.read_text())
    result["wall_s"] = wall
    return result


def stage_main(stages: dict[str, Callable[..., dict[str, Any]]], argv: list[str]) -> bool:
    """If argv asks for a stage (--stage NAME --args JSON --result PATH), run it here, write its
    result with this process's peak RSS, and return True; otherwise return False."""
    if "--stage" not in argv:
        return False
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=sorted(stages), required=True)
    parser.add_argument("--args", default="{}")
    parser.add_argument("--result", type=Path, required=True)
    a = parser.parse_args(argv)
    result = stages[a.stage](**json.loads(a.args))
    result["peak_rss_mb"] = peak_rss_mb()
    atomic_write_json(a.result, result)
    return True


def generate_stage(out_dir: str, config: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Generate the synthetic log into out_dir in one format."""
    cfg = SyntheticConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    t0 = time.perf_counter()
    paths = generate(Path(out_dir), cfg, fmt=fmt)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    import polars as pl

    scan = pl.scan_parquet(paths["interactions"]) if fmt == "parquet" else pl.scan_csv(paths["interactions"])
    rows = scan.select(pl.len()).collect().item()
    return {"seconds": seconds, "interactions": rows,
            "bytes": {k: Path(p).stat().st_size for k, p in paths.items()}}


def ingest_stage(data_dir: str, fmt: str, split_seed: int = 2026, max_len: int = 50) -> dict[str, Any]:
    """Ingest one format as `retrieve train` does: load_dataset (with side files), split, samples."""
    import numpy as np

    from retrieval.data import DataSpec, item_counts, load_dataset, split_users
    from retrieval.samples import training_positions

    d = Path(data_dir)
    spec = DataSpec(d / f"interactions.{fmt}", d / f"items.{fmt}", d / f"users.{fmt}")
    base = peak_rss_mb()  # the interpreter, numpy, polars and torch before any data
    seconds: dict[str, float] = {}
    peaks: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = load_dataset(spec, seconds)
    peaks["load_dataset"] = peak_rss_mb()
    t = time.perf_counter()
    split = split_users(ds, split_seed)
    seconds["split"] = time.perf_counter() - t
    peaks["split"] = peak_rss_mb()
    t = time.perf_counter()
    users, positions = training_positions(ds, split.train_users, split.history_len)
    counts = item_counts(ds, split.train_users)
    seconds["training_samples"] = time.perf_counter() - t
    peaks["training_samples"] = peak_rss_mb()
    total = time.perf_counter() - t0
    windows = len(users)
    return {
        "format": fmt,
        "interactions": int(len(ds.items)),
        "users": ds.n_users,
        "items": ds.n_items,
        "train_windows": windows,
        "negative_pool_items": int((counts > 0).sum()),
        "seconds": seconds,
        "total_s": total,
        "baseline_rss_mb": base,
        "peak_rss_mb_after": peaks,
        "bytes": {
            "sequences": int(ds.items.nbytes + ds.times.nbytes + ds.offsets.nbytes),
            "windows": int(users.nbytes + positions.nbytes),
            "windows_x_L_not_built": int(windows * max_len * np.dtype(np.int64).itemsize),
        },
    }


STAGES = {"generate": generate_stage, "ingest": ingest_stage}


# ---------------------------------------------------------------------------- the benchmark


def ensure_data(data_dir: Path, cfg: SyntheticConfig, fmt: str) -> dict[str, Any]:
    """Generate the log in `fmt` unless data_dir already holds it for this very config."""
    stamp = data_dir / "generated.json"
    want = json.loads(json.dumps({"config": asdict(cfg), "fmt": fmt}))  # tuples as the JSON lists read back
    if stamp.is_file() and json.loads(stamp.read_text()).get("generated") == want:
        return {**json.loads(stamp.read_text())["result"], "reused": True}
    res = run_stage("bench.bench_ingest", "generate", {"out_dir": str(data_dir), "config": asdict(cfg), "fmt": fmt})
    atomic_write_json(stamp, {"generated": want, "result": res})
    return {**res, "reused": False}


def run(scale: str, out_dir: Path) -> dict[str, Any]:
    """Generate (once, reused on a rerun) and ingest the log of `scale` in both formats."""
    cfg = SCALES[scale]
    out_dir = Path(out_dir)
    result: dict[str, Any] = {
        "bench": "ingest",
        "scale": scale,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "polars_threads": os.environ.get("POLARS_MAX_THREADS", "default")},
        "versions": package_versions(),
        "config": asdict(cfg),
        "targets": {"seconds": TARGET_SECONDS, "peak_rss_mb": TARGET_PEAK_MB},
        "generate": {},
        "ingest": {},
    }
    for fmt in FORMATS:
        data_dir = out_dir / f"ingest_{scale}_{fmt}"
        result["generate"][fmt] = ensure_data(data_dir, cfg, fmt)
        r = run_stage("bench.bench_ingest", "ingest", {"data_dir": str(data_dir), "fmt": fmt})
        r["meets_targets"] = r["total_s"] <= TARGET_SECONDS and r["peak_rss_mb"] <= TARGET_PEAK_MB
        result["ingest"][fmt] = r
    return result


def table(result: dict[str, Any]) -> str:
    """Per format: stage times, total, peak RSS against the targets."""
    lines = [f"bench_ingest ({result['scale']}): {result['config']['n_users']:,} users, "
             f"{result['config']['n_items']:,} items"]
    for fmt, g in result["generate"].items():
        lines.append(f"  generate {fmt:<8} {g['interactions']:>12,} rows  {g['seconds']:7.1f} s  "
                     f"peak {g['peak_rss_mb']:7.0f} MiB{'  (reused)' if g.get('reused') else ''}")
    for fmt, r in result["ingest"].items():
        stages = "  ".join(f"{k} {v:.2f}" for k, v in r["seconds"].items())
        mib = 2**20
        lines += [
            f"  ingest {fmt}: {r['interactions']:,} interactions, {r['users']:,} users, {r['items']:,} items, "
            f"{r['train_windows']:,} windows",
            f"    seconds: {stages}",
            f"    total {r['total_s']:.1f} s (target {result['targets']['seconds']:.0f}), peak RSS "
            f"{r['peak_rss_mb']:.0f} MiB (target {result['targets']['peak_rss_mb']:.0f}; interpreter + torch "
            f"{r['baseline_rss_mb']:.0f}): {'meets' if r['meets_targets'] else 'MISSES'} the targets",
            f"    windows {r['bytes']['windows'] / mib:.0f} MiB; as (windows x L) int64 they would be "
            f"{r['bytes']['windows_x_L_not_built'] / mib:,.0f} MiB",
        ]
    return "\n".join(lines)


def part_main(name: str, doc: str | None, scales: Any, run: Callable[[str, Path], dict[str, Any]],
              table: Callable[[dict[str, Any]], str], argv: list[str] | None = None) -> None:
    """The command line every part shares: --scale and --out; runs the part, writes OUT/NAME.json
    atomically and prints its table."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--scale", choices=sorted(scales), default="smoke")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    res = run(args.scale, args.out)
    atomic_write_json(args.out / f"{name}.json", res)
    print(table(res))


if __name__ == "__main__":
    if not stage_main(STAGES, sys.argv[1:]):
        part_main("bench_ingest", __doc__, SCALES, run, table)
