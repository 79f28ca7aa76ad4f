"""One `retrieve experiment-rankers` report from several runs: runs of one command on disjoint
split seeds (e.g. side by side, one process per core), and runs of other rankers on the same
seeds. The per-seed records are joined and aggregated by the experiment's own code, so the JSON
and its README tables are what one run over all the seeds and rankers would have written
(timings aside: the parts' walls are recorded, and the report's wall is the longest part's).

    python -m bench.combine_ranker_experiments --out reports/ml-100k-rankers-5seeds.json A.json B.json ...

The parts must agree on everything but their seeds and rankers (data, part, M, the retrieval and
ranker training settings, the retrieval stage's settings). Where two parts hold one seed, each
holds other rankers and both must have trained the same retrieval stage on it: its record and
the retrieval order's figures must agree, so every ranker of a seed reranks one candidate list.
A seed's training is reproducible on one kind of CPU but not across kinds (their kernels round
differently, and the trajectories part), so runs from different machines rarely join; the refusal
names both machines where the reports record them (`trained_on`).
The one training setting that may differ is the epoch cap: where it does, each ranker's label
says its cap (`dmin` from a run with --epochs 6 becomes `dmin:epochs=6`). A part that did not
finish contributes the rankers it finished and the combined report says it is incomplete.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.artifacts import atomic_write_bytes, atomic_write_json, command_line  # noqa: E402
from retrieval.experiment import mean_std  # noqa: E402
from retrieval.train import TrainConfig  # noqa: E402
from retrieval.ranking.experiment import KIND, aggregate_rankers, format_ranker_markdown  # noqa: E402

MUST_AGREE = ("data_fingerprint", "part", "M", "retrieval_settings", "rank_train_config", "sessions")


RETRIEVAL_TOLERANCE = 1e-9  # the same retrieval stage gives the same figures, up to summation order


def _settings(report: dict[str, Any]) -> dict[str, Any]:
    """What the parts must share: MUST_AGREE (the ranker training config but its epoch cap) and the
    retrieval training config but its split seed. A retrieval setting that a part's report predates
    counts as TrainConfig's default for it (a setting is added with the default that keeps the old
    behaviour; the per-seed check of the retrieval figures still has the last word)."""
    out = {k: report.get(k) for k in MUST_AGREE}
    out["rank_train_config"] = {k: v for k, v in (report.get("rank_train_config") or {}).items() if k != "epochs"}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    retrieval = {**defaults, **report["retrieval_train_config"]}
    out["retrieval_train_config"] = {k: v for k, v in retrieval.items() if k != "split_seed"}
    return out


def with_cap(label: str, epochs: int) -> str:
    """A ranker label that says its epoch cap: `dmin` -> `dmin:epochs=6`, `din:horizon=20` ->
    `din:horizon=20;epochs=6`; a label that sets its own cap is kept."""
    if "epochs=" in label:
        return label
    return f"{label}{';' if ':' in label else ':'}epochs={epochs}"


def machine(report: dict[str, Any]) -> str | None:
    """The CPU a report's run trained on ("model name (capability)"), or None for a report that
    predates the record."""
    on = report.get("trained_on") or {}
    return f"{on['cpu']} ({on.get('cpu_capability', '?')})" if "cpu" in on else None


def _same_retrieval(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two records of one seed come from the same retrieval stage: its training record
    (timings aside) and the retrieval order's figures on the part's users."""
    def figures(seed: dict[str, Any]) -> dict[str, Any]:
        out = {f"stage.{k}": v for k, v in seed["retrieval"].items() if "seconds" not in k}
        for ranker in seed["rankers"].values():
            out.update({k: v for k, v in ranker.items() if k.startswith("retrieval_") and k != "retrieval_weight"})
        return out

    fa, fb = figures(a), figures(b)
    shared = fa.keys() & fb.keys()
    return all(abs(fa[k] - fb[k]) <= RETRIEVAL_TOLERANCE if isinstance(fa[k], float) else fa[k] == fb[k]
               for k in shared)


def combine(reports: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The combined report of (path, report) parts; ValueError when they do not belong together."""
    if not reports:
        raise ValueError("no reports to combine")
    first_path, first = reports[0]
    expected = _settings(first)
    for path, r in reports:
        if r.get("kind") != KIND:
            raise ValueError(f"{path}: not a ranker-experiment report (kind {r.get('kind')!r})")
        for key, value in _settings(r).items():
            if value != expected[key]:
                raise ValueError(f"{path}: {key} differs from {first_path}'s; only the split seeds, the rankers "
                                 "and the epoch cap may differ")
    caps = {r["rank_train_config"]["epochs"] for _, r in reports}

    def label_of(label: str, r: dict[str, Any]) -> str:
        return with_cap(label, r["rank_train_config"]["epochs"]) if len(caps) > 1 else label

    labels: list[str] = []
    by_seed: dict[int, dict[str, Any]] = {}
    machine_of: dict[int, str | None] = {}  # split seed -> the CPU of the part that first held it
    for path, r in reports:
        for s in r["per_seed"]:
            s = {**s, "rankers": {label_of(label, r): v for label, v in s["rankers"].items()}}
            seen = by_seed.setdefault(s["split_seed"], {**s, "rankers": {}})
            machine_of.setdefault(s["split_seed"], machine(r))
            clash = sorted(s["rankers"].keys() & seen["rankers"].keys())
            if clash:
                raise ValueError(f"{path}: split seed {s['split_seed']}: ranker {clash[0]} is in two reports")
            if seen["rankers"] and not _same_retrieval(seen, s):
                earlier, this = machine_of[s["split_seed"]], machine(r)
                why = (f" (trained on {this}, the earlier on {earlier}: a seed's training reproduces on one kind "
                       "of CPU, not across kinds)" if earlier and this and earlier != this else "")
                raise ValueError(f"{path}: split seed {s['split_seed']}: its retrieval stage differs from an earlier "
                                 f"report's{why}; rankers of one seed must rerank the same candidates")
            seen["rankers"].update(s["rankers"])
        labels += [label for label in (label_of(name, r) for name in r["rankers"]) if label not in labels]
    per_seed = [by_seed[seed] for seed in sorted(by_seed)]
    walls = [r["wall_time_s"] for _, r in reports]
    return {
        **{k: v for k, v in first.items() if k not in ("per_seed", "rankers", "created", "command", "trained_on")},
        # the machine where every part names the same one (each part's, or None, is under "parts")
        **({"trained_on": first["trained_on"]} if machine(first) and len({machine(r) for _, r in reports}) == 1 else {}),
        "complete": all(r["complete"] for _, r in reports) and all(len(s["rankers"]) == len(labels) for s in per_seed),
        "split_seeds": [s["split_seed"] for s in per_seed],
        "retrieval": {k: mean_std([s["retrieval"][k] for s in per_seed]) for k in per_seed[0]["retrieval"]},
        "rank_train_config": {**first["rank_train_config"], "epochs": None if len(caps) > 1 else next(iter(caps))},
        "rankers": aggregate_rankers(labels, per_seed),
        "per_seed": per_seed,
        "wall_time_s": max(walls),
        "timing_note": (f"{len(reports)} runs on disjoint seeds or rankers (walls {', '.join(f'{w:.0f}' for w in walls)} s); "
                        + first["timing_note"]),
        "parts": [{"path": p, "split_seeds": r["split_seeds"], "wall_time_s": r["wall_time_s"],
                   "complete": r["complete"], "command": r["command"], "created": r["created"],
                   "machine": machine(r)} for p, r in reports],
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
