"""The rankers' headline experiment: every ranker (and named variants) on several split seeds.

For each split seed: MIND is trained once as the retrieval stage, then each ranker is
trained on the same split and evaluated under the protocol: standalone AUC and GAUC,
two-stage Recall / HitRate / NDCG (retrieve M, rerank) beside the retrieval order, seconds
per epoch and scoring candidates/s. Figures are aggregated as mean and std over seeds.

A variant is a ranker with settings, written `name:key=value;key=value`, e.g.
`dien:aux_weight=0` or `dien:evolution=agru` (the DIEN paper's ablation).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.artifacts import command_line, package_versions
from retrieval.data import Dataset, DataSpec, split_users
from retrieval.evaluate import exact_index
from retrieval.experiment import mean_std
from retrieval.ranking.evaluate import evaluate_ranker
from retrieval.ranking.models import NAMES
from retrieval.ranking.train import RankTrainConfig, train_ranker
from retrieval.train import TrainConfig, model_config_for, train

log = logging.getLogger(__name__)


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """'dien:evolution=agru;aux_weight=0' -> (label, model name, settings)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in NAMES:
        raise ValueError(f"unknown ranker {name!r} in {text!r}; use one of {', '.join(NAMES)}")
    settings: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"bad ranker setting {part!r} in {text!r}; write key=value")
        settings[key.strip()] = _value(value.strip())
    return text.strip(), name, settings


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run_ranker_experiment(
    ds: Dataset,
    spec: DataSpec,
    seeds: Sequence[int],
    variants: Sequence[str],
    retrieval_settings: dict[str, Any],
    retrieval_train: TrainConfig,
    rank_train: RankTrainConfig,
    part: str = "test",
    m: int = 200,
) -> dict[str, Any]:
    parsed = [parse_variant(v) for v in variants]
    t0 = time.perf_counter()
    per_seed = []
    for seed in seeds:
        split = split_users(ds, seed)
        tc = dataclasses.replace(retrieval_train, split_seed=seed)
        mind = train(ds, split, model_config_for(ds, **retrieval_settings), tc, show_progress=False).model
        index = exact_index(mind)
        rows: dict[str, Any] = {}
        for label, name, settings in parsed:
            cfg = dataclasses.replace(rank_train, model=name, settings=settings)
            r = train_ranker(ds, split, cfg, show_progress=False)
            ev = evaluate_ranker(r.model, ds, split, mind, index, part, m)
            rows[label] = {
                "auc": ev["standalone"]["auc"],
                "gauc": ev["standalone"]["gauc"],
                **{f"two_stage_{k}": v for k, v in ev["two_stage"].items()},
                **{f"retrieval_{k}": v for k, v in ev["retrieval_only"].items()},
                "seconds_per_epoch": float(np.mean([h["seconds"] for h in r.history])),
                "train_samples_per_s": r.samples_per_s,
                "candidates_per_s": ev["candidates_per_s"],
                "best_epoch": r.best_epoch,
                "val_auc": r.best_auc,
            }
            log.info("seed %d %s: auc %.4f gauc %.4f ndcg@20 %.4f (retrieval %.4f)", seed, label,
                     rows[label]["auc"], rows[label]["gauc"], rows[label]["two_stage_ndcg@20"],
                     rows[label]["retrieval_ndcg@20"])
        per_seed.append({"split_seed": seed, "rankers": rows})
    rankers = {
        label: {k: mean_std([s["rankers"][label][k] for s in per_seed]) for k in per_seed[0]["rankers"][label]}
        for label, _, _ in parsed
    }
    return {
        "kind": "ranker-experiment",
        "dataset": str(spec.interactions),
        "data_fingerprint": ds.fingerprint,
        "split_seeds": list(seeds),
        "part": part,
        "M": m,
        "retrieval_settings": retrieval_settings,
        "retrieval_train_config": dataclasses.asdict(retrieval_train),
        "rank_train_config": dataclasses.asdict(rank_train),
        "rankers": rankers,
        "per_seed": per_seed,
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "versions": package_versions(),
    }


def format_ranker_table(report: dict[str, Any]) -> str:
    cols = ["auc", "gauc", "two_stage_ndcg@20", "retrieval_ndcg@20", "seconds_per_epoch", "candidates_per_s"]
    head = f"{'ranker':<28}" + "".join(f"{c:>20}" for c in cols)
    lines = [head, "-" * len(head)]
    for label, row in report["rankers"].items():
        cells = "".join(
            f"{row[c]['mean']:>12.4f}±{row[c]['std']:<7.4f}" if c not in ("seconds_per_epoch", "candidates_per_s")
            else f"{row[c]['mean']:>12.1f}±{row[c]['std']:<7.1f}" for c in cols
        )
        lines.append(f"{label:<28}{cells}")
    return "\n".join(lines)
