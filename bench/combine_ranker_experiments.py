"""One `retrieve experiment-rankers` report from several runs of one command on disjoint split
seeds (e.g. side by side, one process per core): the per-seed records joined and aggregated by
the experiment's own code, so the JSON and its README tables are what one run over all the
seeds would have written (timings aside: the parts' walls are recorded, and the report's wall
is the longest part's).

    python -m bench.combine_ranker_experiments --out reports/ml-100k-rankers-5seeds.json A.json B.json ...

The parts must agree on everything but their seeds (data, part, M, the retrieval and ranker
training settings, the retrieval stage's settings); a part that did not finish contributes the
rankers it finished and the combined report says it is incomplete.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.artifacts import atomic_write_bytes, atomic_write_json, command_line  # noqa: E402
from retrieval.experiment import mean_std  # noqa: E402
from retrieval.ranking.experiment import KIND, aggregate_rankers, format_ranker_markdown  # noqa: E402

MUST_AGREE = ("data_fingerprint", "part", "M", "retrieval_settings", "rank_train_config", "sessions")


def _settings(report: dict[str, Any]) -> dict[str, Any]:
    """What the parts must share: MUST_AGREE and the retrieval training config but its split seed."""
    out = {k: report.get(k) for k in MUST_AGREE}
    out["retrieval_train_config"] = {k: v for k, v in report["retrieval_train_config"].items() if k != "split_seed"}
    return out


def combine(reports: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The combined report of (path, report) parts; ValueError when they do not belong together."""
    if not reports:
        raise ValueError("no reports to combine")
    first_path, first = reports[0]
    labels: list[str] = []
    per_seed: list[dict[str, Any]] = []
    for path, r in reports:
        if r.get("kind") != KIND:
            raise ValueError(f"{path}: not a ranker-experiment report (kind {r.get('kind')!r})")
        for key, value in _settings(r).items():
            if value != _settings(first)[key]:
                raise ValueError(f"{path}: {key} differs from {first_path}'s; only the split seeds may differ")
        for s in r["per_seed"]:
            if any(s["split_seed"] == t["split_seed"] for t in per_seed):
                raise ValueError(f"{path}: split seed {s['split_seed']} is in two reports")
            per_seed.append(s)
        labels += [label for label in r["rankers"] if label not in labels]
    per_seed.sort(key=lambda s: s["split_seed"])
    walls = [r["wall_time_s"] for _, r in reports]
    return {
        **{k: v for k, v in first.items() if k not in ("per_seed", "rankers", "created", "command")},
        "complete": all(r["complete"] for _, r in reports),
        "split_seeds": [s["split_seed"] for s in per_seed],
        "retrieval": {k: mean_std([s["retrieval"][k] for s in per_seed]) for k in per_seed[0]["retrieval"]},
        "rankers": aggregate_rankers(labels, per_seed),
        "per_seed": per_seed,
        "wall_time_s": max(walls),
        "timing_note": (f"{len(reports)} runs side by side on disjoint seeds (walls {', '.join(f'{w:.0f}' for w in walls)} s); "
                        + first["timing_note"]),
        "parts": [{"path": p, "split_seeds": r["split_seeds"], "wall_time_s": r["wall_time_s"],
                   "complete": r["complete"], "command": r["command"], "created": r["created"]} for p, r in reports],
        "command": command_line(),
        "created": max(r["created"] for _, r in reports),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="combined JSON (the README tables go beside it as .md)")
    args = parser.parse_args(argv)
    if args.out.resolve() in {p.resolve() for p in args.reports}:
        sys.exit(f"error: {args.out}: is one of the reports to combine; write the combined report elsewhere")
    try:
        parts = [(str(p), json.loads(p.read_text())) for p in args.reports]
        report = combine(parts)
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"error: {err}")
    atomic_write_json(args.out, report)
    atomic_write_bytes(args.out.with_suffix(".md"), format_ranker_markdown(report).encode())
    print(format_ranker_markdown(report))


if __name__ == "__main__":
    main()
