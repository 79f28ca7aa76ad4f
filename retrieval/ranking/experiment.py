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
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import numpy as np
import torch

from retrieval.artifacts import command_line, package_versions
from retrieval.data import Dataset, DataSpec, split_users
from retrieval.device import Runtime
from retrieval.distributed import current, from_main
from retrieval.errors import ConfigError
from retrieval.evaluate import exact_index
from retrieval.experiment import mean_std
from retrieval.ranking.evaluate import evaluate_ranker
from retrieval.ranking.models import NAMES
from retrieval.ranking.train import RankTrainConfig, hard_negatives, train_ranker
from retrieval.train import TrainConfig, model_config_for, train

log = logging.getLogger(__name__)

KIND = "ranker-experiment"  # the "kind" of the JSON report `retrieve experiment-rankers --out` writes


TRAIN_FIELDS = {f.name for f in dataclasses.fields(RankTrainConfig)} - {"model", "settings"}


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """'dien:evolution=agru;aux_weight=0' -> (label, model name, settings). A setting may also
    name a training field (`din:negative_source=retrieval`, `din:lr=0.002`)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in NAMES:
        raise ConfigError(f"unknown ranker {name!r} in {text!r}; use one of {', '.join(NAMES)}")
    settings: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"bad ranker setting {part!r} in {text!r}; write key=value")
        settings[key.strip()] = _value(value.strip())
    if settings.get("negative_source", "uniform") not in ("uniform", "retrieval"):
        raise ConfigError(f"bad ranker setting negative_source={settings['negative_source']!r} in {text!r}; "
                         "use uniform or retrieval")
    return text.strip(), name, settings


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def variant_config(base: RankTrainConfig, name: str, settings: dict[str, Any]) -> RankTrainConfig:
    """The training config of one variant: training fields set directly, the rest as model settings."""
    train_fields = {k: v for k, v in settings.items() if k in TRAIN_FIELDS}
    model_fields = {k: v for k, v in settings.items() if k not in TRAIN_FIELDS}
    return dataclasses.replace(base, model=name, settings=model_fields, **train_fields)


def run_seed(
    ds: Dataset,
    seed: int,
    variants: Sequence[str],
    retrieval_settings: dict[str, Any],
    retrieval_train: TrainConfig,
    rank_train: RankTrainConfig,
    part: str = "test",
    m: int = 200,
    threads: int = 0,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """One split seed: train MIND, then every variant; -> {"split_seed", "rankers": label -> figures}."""
    if threads:
        torch.set_num_threads(threads)
    split = split_users(ds, seed)
    tc = dataclasses.replace(retrieval_train, split_seed=seed)
    mind = train(ds, split, model_config_for(ds, **retrieval_settings), tc, show_progress=False, runtime=runtime).model
    index = exact_index(mind)
    hard: dict[int, np.ndarray] | None = None
    rows: dict[str, Any] = {}
    for label, name, settings in (parse_variant(v) for v in variants):
        cfg = variant_config(rank_train, name, settings)
        if cfg.negative_source == "retrieval" and hard is None:
            hard = hard_negatives(mind, ds, split, cfg.retrieval_m)
        r = train_ranker(ds, split, cfg, hard=hard if cfg.negative_source == "retrieval" else None,
                         show_progress=False, runtime=runtime)
        ev = from_main(lambda: evaluate_ranker(r.model, ds, split, mind, index, part, m), current())
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
        log.info("seed %d %s: auc %.4f gauc %.4f ndcg@20 %.4f (retrieval %.4f)  %.1f s/epoch", seed, label,
                 rows[label]["auc"], rows[label]["gauc"], rows[label]["two_stage_ndcg@20"],
                 rows[label]["retrieval_ndcg@20"], rows[label]["seconds_per_epoch"])
    return {"split_seed": seed, "rankers": rows}


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
    jobs: int = 1,
    on_seed: Callable[[dict[str, Any]], None] | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Every variant on every split seed. `jobs` > 1 runs that many seeds side by side in
    spawned processes, one torch thread each (the figures do not depend on it; the timings
    do, and the report says so). `on_seed(partial report)` runs as each seed finishes."""
    labels = [parse_variant(v)[0] for v in variants]
    t0 = time.perf_counter()
    per_seed: list[dict[str, Any]] = []
    args = (variants, retrieval_settings, retrieval_train, rank_train, part, m)
    if jobs > 1 and current().parallel:
        raise ConfigError("--jobs runs seeds in separate processes; under torchrun the processes already share each run")

    def report(seconds: float) -> dict[str, Any]:
        return _report(ds, spec, seeds, labels, per_seed, retrieval_settings, retrieval_train, rank_train,
                       part, m, jobs, seconds)

    def done(result: dict[str, Any]) -> None:
        per_seed.append(result)
        per_seed.sort(key=lambda r: seeds.index(r["split_seed"]))
        if on_seed is not None:
            on_seed(report(time.perf_counter() - t0))

    if jobs <= 1:
        for seed in seeds:
            done(run_seed(ds, seed, *args, runtime=runtime))
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_seed, ds, seed, *args, threads=1, runtime=runtime) for seed in seeds]
            for f in as_completed(futures):
                done(f.result())
    return report(time.perf_counter() - t0)


def _report(ds: Dataset, spec: DataSpec, seeds: Sequence[int], labels: list[str], per_seed: list[dict[str, Any]],
            retrieval_settings: dict[str, Any], retrieval_train: TrainConfig, rank_train: RankTrainConfig,
            part: str, m: int, jobs: int, seconds: float) -> dict[str, Any]:
    rankers = {
        label: {k: mean_std([s["rankers"][label][k] for s in per_seed]) for k in per_seed[0]["rankers"][label]}
        for label in labels
    }
    return {
        "kind": KIND,
        "complete": len(per_seed) == len(seeds),
        "dataset": str(spec.interactions),
        "data_fingerprint": ds.fingerprint,
        "split_seeds": [s["split_seed"] for s in per_seed],
        "part": part,
        "M": m,
        "jobs": jobs,
        "timing_note": ("seconds and rates measured with one torch thread per job, "
                        f"{jobs} jobs side by side" if jobs > 1 else "seconds and rates measured in one process"),
        "retrieval_settings": retrieval_settings,
        "retrieval_train_config": dataclasses.asdict(retrieval_train),
        "rank_train_config": dataclasses.asdict(rank_train),
        "rankers": rankers,
        "per_seed": per_seed,
        "wall_time_s": round(seconds, 2),
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
