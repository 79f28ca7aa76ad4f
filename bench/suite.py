"""The benchmark suite: every measurement of the performance issue, one JSON report and one table.

    python -m bench.suite --scale smoke|full --out runs/bench [--parts query,train,ingest,scale,public]

Each part runs in its own process (so its memory, threads and imports are its own) and
writes its own JSON beside the suite's report; the suite then gathers them into
`OUT/report-SCALE.json` and the parts' tables into `OUT/report-SCALE.txt`. With
`--collect` nothing is run: the parts' existing JSON files are gathered (after a part was
run alone, e.g. on a quiet machine).

- query:  1M items, index families, --target-recall tuning, latency p50/p99, batch users/s,
          fresh-process `retrieve query` (bench/bench_query.py)
- serve:  `retrieve serve` on the query part's 1M-item IVF-PQ index: open-loop load at fixed rates
          (p50/p95/p99, errors, achieved throughput) retrieval only and with DIN reranking 200
          candidates, beside the in-process batch path; time to ready, memory, a hot reload under
          load (bench/bench_serve.py, its load generator bench/loadgen.py)
- train:  MIND step time at ML-100K shapes and 1K vs 1M items (bench/bench_train.py)
- ingest: a 10M-interaction log, CSV and Parquet: wall time and peak memory (bench/bench_ingest.py)
- scale:  1M users x 1M items x 50M interactions end to end, peak memory per stage (bench/bench_scale.py)
- public: ours beside torch-rechub 0.9.0 and deepctr-torch (DIN, MIND) on the same batches
          (bench/bench_public.py); needs the throwaway environment of bench/public_env.sh and is
          skipped, with the reason in the report, when its python is absent.

Speed figures are ratios against a reference measured in the same run (raw FAISS, the
public implementations, 1K items); the machine is shared, so absolute times alone are not
evidence. Not part of the test suite: tests/test_bench.py runs a smoke version.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval.artifacts import atomic_write_bytes, atomic_write_json, package_versions  # noqa: E402

PARTS = ("query", "serve", "train", "ingest", "scale", "public")
DEFAULT_PUBLIC_PYTHON = Path("/work/bench-venv/bin/python")


def part_command(part: str, scale: str, out: Path, public_python: Path) -> tuple[list[str], Path]:
    """The command line that runs one part, and the JSON file it writes."""
    py = sys.executable
    if part in ("query", "serve"):  # serve reuses the log, bundle and index that query leaves in OUT
        return [py, str(REPO / "bench" / f"bench_{part}.py"), scale, str(out)], out / f"bench_{part}_{scale}.json"
    if part in ("train", "ingest", "scale"):
        return [py, "-m", f"bench.bench_{part}", "--scale", scale, "--out", str(out)], out / f"bench_{part}.json"
    if part == "public":
        return ([str(public_python), str(REPO / "bench" / "bench_public.py"), "--scale", scale, "--out-dir", str(out)],
                out / f"public-{scale}.json")
    raise ValueError(f"unknown part {part!r}; use {', '.join(PARTS)}")


def run_part(part: str, scale: str, out: Path, public_python: Path, collect: bool) -> dict[str, Any]:
    """Run one part (or, with collect, only read its JSON) -> {"status", "seconds", "result", "table"}."""
    cmd, result_path = part_command(part, scale, out, public_python)
    entry: dict[str, Any] = {"command": " ".join(cmd), "result_file": str(result_path)}
    if part == "public" and not collect and not public_python.is_file():
        return {**entry, "status": "skipped",
                "reason": f"{public_python} not found: create it with `bash bench/public_env.sh {public_python.parents[1]}`"}
    if not collect:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        entry["table"] = _table_text(proc.stdout)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {**entry, "status": "failed", "returncode": proc.returncode, "stderr_tail": tail}
        print(f"{part}: done in {entry['seconds']:.0f} s", file=sys.stderr, flush=True)
    if not result_path.is_file():
        return {**entry, "status": "missing", "reason": f"{result_path} not found"}
    entry["result"] = json.loads(result_path.read_text())
    entry["status"] = "ok"
    if collect:
        entry["table"] = _saved_table(part, result_path, entry["result"])
    return entry


def _table_text(stdout: str) -> str:
    """A part's printed table (its stdout without the trailing 'report: ...' line)."""
    return "\n".join(line for line in stdout.rstrip().splitlines() if not line.startswith("report:")).strip()


def _saved_table(part: str, result_path: Path, result: dict[str, Any]) -> str:
    """The table saved beside a part's JSON, else the part module's own table() of it."""
    txt = result_path.with_suffix(".txt")
    if txt.is_file():
        return txt.read_text().rstrip()
    try:
        return importlib.import_module(f"bench.bench_{part}").table(result)
    except Exception as err:  # a part's module may need its own environment (public: the throwaway venv)
        return f"(table not rendered here: {type(err).__name__}: {err}; see {result_path})"


def run_suite(scale: str, out: Path, parts: list[str], public_python: Path = DEFAULT_PUBLIC_PYTHON,
              collect: bool = False) -> dict[str, Any]:
    """Run (or collect) the parts in order; write OUT/report-SCALE.json and .txt; return the report."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    for part in parts:
        results[part] = run_part(part, scale, out, public_python, collect)
        if results[part].get("table") and results[part]["status"] == "ok" and not collect:
            atomic_write_bytes(Path(results[part]["result_file"]).with_suffix(".txt"),
                               (results[part]["table"] + "\n").encode())
    report = {
        "kind": "bench-report",
        "scale": scale,
        "collected_only": collect,
        "parts": results,
        "wall_s": round(time.perf_counter() - t0, 2),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(out / f"report-{scale}.json", report)
    atomic_write_bytes(out / f"report-{scale}.txt", format_report(report).encode())
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"benchmark suite, scale {report['scale']}, {report['machine']['cpus']} CPUs"]
    for part, entry in report["parts"].items():
        lines += ["", f"== {part}: {entry['status']}" + (f" ({entry['seconds']:.0f} s)" if "seconds" in entry else "")]
        if entry["status"] == "ok":
            lines.append(entry.get("table", ""))
        else:
            lines += [entry.get("reason", "")] + entry.get("stderr_tail", [])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scale", choices=("smoke", "full"), default="smoke")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from: " + ", ".join(PARTS))
    parser.add_argument("--public-python", type=Path, default=DEFAULT_PUBLIC_PYTHON,
                        help="python of the throwaway environment with torch-rechub and deepctr-torch")
    parser.add_argument("--collect", action="store_true", help="gather the parts' existing JSON; run nothing")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"error: unknown part {unknown[0]!r}; use {', '.join(PARTS)}", file=sys.stderr)
        return 2
    report = run_suite(args.scale, args.out, parts, args.public_python, args.collect)
    print(format_report(report))
    print(f"report: {args.out / f'report-{args.scale}.json'}")
    return 0 if all(e["status"] in ("ok", "skipped") for e in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
