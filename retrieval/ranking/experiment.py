"""The rankers' headline experiment: every ranker (and named variants) on several split seeds.

For each split seed: MIND is trained once as the retrieval stage, then each ranker is
trained on the same split to convergence (early stopping on validation users) and evaluated
under the protocol: standalone AUC, GAUC and log loss, two-stage Recall / HitRate / NDCG
(retrieve M, rerank) beside the retrieval order, the best epoch, seconds per epoch, and the
p50 / p99 latency of reranking one user's M candidates in process. Figures are aggregated
as mean and std over seeds, with the number of seeds on which reranking beats the
retrieval order's NDCG@20; the session statistics of the data (DSIN) ride along.

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
from retrieval.device import Runtime, runtime_for
from retrieval.distributed import current, from_main
from retrieval.errors import ConfigError
from retrieval.evaluate import exact_index
from retrieval.experiment import mean_std
from retrieval.ranking.evaluate import evaluate_ranker
from retrieval.ranking.models import NAMES
from retrieval.ranking.sessions import session_statistics
from retrieval.ranking.train import MONITORS, RankTrainConfig, RetrievalCandidates, retrieval_candidates, train_ranker
from retrieval.train import TrainConfig, model_config_for, train

log = logging.getLogger(__name__)

KIND = "ranker-experiment"  # the "kind" of the JSON report `retrieve experiment-rankers --out` writes


TRAIN_FIELDS = {f.name for f in dataclasses.fields(RankTrainConfig)} - {"model", "settings"}


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """'dien:evolution=agru;aux_weight=0' -> (label, model name, settings). A setting may also
    name a training field (`din:hard_share=0.5`, `din:lr=0.002`); MLP widths are joined by '/'
    (`din:att_hidden=80/40`), one width alone is a one-layer MLP (`din:att_hidden=36`)."""
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
    if settings.get("monitor", "auc") not in MONITORS:
        raise ConfigError(f"bad ranker setting monitor={settings['monitor']!r} in {text!r}; use {', '.join(MONITORS)}")
    return text.strip(), name, settings


def _value(text: str) -> Any:
    """A setting's value: true / false, an int, a float, widths joined by '/' (att_hidden=80/40), or text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "/" in text:
        try:
            return tuple(int(p) for p in text.split("/"))
        except ValueError:
            return text
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
    latency_requests: int = 200,
    runtime: Runtime | None = None,
    on_ranker: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One split seed: train MIND, then every variant; -> {"split_seed", "retrieval", "rankers": label -> figures}."""
    if threads:
        torch.set_num_threads(threads)
    split = split_users(ds, seed)
    tc = dataclasses.replace(retrieval_train, split_seed=seed)
    run = train(ds, split, model_config_for(ds, **retrieval_settings), tc, show_progress=False, runtime=runtime)
    mind = run.model
    retrieval = {"best_epoch": run.best_epoch, "epochs_run": len(run.history), "val_recall@50": run.best_recall,
                 "train_seconds": float(sum(h["seconds"] for h in run.history))}
    index = exact_index(mind)
    candidates: dict[int, RetrievalCandidates] = {}  # by M, computed once per seed
    rows: dict[str, Any] = {}
    for label, name, settings in (parse_variant(v) for v in variants):
        cfg = variant_config(rank_train, name, settings)
        rc = None
        if cfg.needs_retrieval:
            if cfg.retrieval_m not in candidates:
                candidates[cfg.retrieval_m] = retrieval_candidates(mind, ds, split, cfg.retrieval_m)
            rc = candidates[cfg.retrieval_m]
        r = train_ranker(ds, split, cfg, retrieval=rc, show_progress=False, runtime=runtime)
        ev = from_main(lambda: evaluate_ranker(r.model, ds, split, mind, index, part, m, latency_users=latency_requests),
                       current())
        rows[label] = {
            "auc": ev["standalone"]["auc"],
            "gauc": ev["standalone"]["gauc"],
            "log_loss": ev["standalone"]["log_loss"],
            **{f"{metric}_{segment}": figures[metric] for segment, figures in ev["standalone"]["by_segment"].items()
               for metric in ("auc", "gauc")},
            "several_sessions_pair_share": ev["standalone"]["by_segment"]["several_sessions"]["pairs"]
            / max(1, sum(f["pairs"] for f in ev["standalone"]["by_segment"].values())),
            **{f"two_stage_{k}": v for k, v in ev["two_stage"].items()},
            "two_stage_ranker_only_ndcg@20": ev["two_stage_ranker_only"]["ndcg@20"],
            **{f"retrieval_{k}": v for k, v in ev["retrieval_only"].items()},
            "retrieval_weight": ev["retrieval_weight"],
            "best_epoch": r.best_epoch,
            "epochs_run": len(r.history),
            **{k: v for k, v in r.best.items() if k in ("val_auc", "val_gauc", "val_log_loss", "val_ndcg@20")},
            "seconds_per_epoch": float(np.mean([h["seconds"] for h in r.history])),
            "train_seconds": float(sum(h["seconds"] + h["validation_seconds"] for h in r.history)),
            "train_samples_per_s": r.samples_per_s,
            "candidates_per_s": ev["candidates_per_s"],
            **({f"latency_{k}": ev["latency"][k] for k in ("p50_ms", "p99_ms")} if "latency" in ev else {}),
        }
        log.info("seed %d %s: auc %.4f gauc %.4f log loss %.4f ndcg@20 %.4f (alone %.4f, retrieval %.4f, w %.2f) "
                 "best epoch %d  %.1f s/epoch", seed, label, rows[label]["auc"], rows[label]["gauc"],
                 rows[label]["log_loss"], rows[label]["two_stage_ndcg@20"], rows[label]["two_stage_ranker_only_ndcg@20"],
                 rows[label]["retrieval_ndcg@20"], rows[label]["retrieval_weight"], r.best_epoch,
                 rows[label]["seconds_per_epoch"])
        if on_ranker is not None:  # the seed so far: a stopped run keeps every ranker it finished
            on_ranker({"split_seed": seed, "retrieval": retrieval, "rankers": dict(rows)})
    return {"split_seed": seed, "retrieval": retrieval, "rankers": rows}


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
    do, and the report says so). `on_seed(partial report)` runs as each seed finishes and, in
    one process, as each ranker finishes (the seed in progress then holds the rankers done)."""
    labels = [parse_variant(v)[0] for v in variants]
    t0 = time.perf_counter()
    per_seed: list[dict[str, Any]] = []
    args = (variants, retrieval_settings, retrieval_train, rank_train, part, m)
    if jobs > 1 and current().parallel:
        raise ConfigError("--jobs runs seeds in separate processes; under torchrun the processes already share each run")

    def report(seconds: float) -> dict[str, Any]:
        return _report(ds, spec, seeds, labels, per_seed, retrieval_settings, retrieval_train, rank_train,
                       part, m, jobs, seconds, runtime or runtime_for())

    def done(result: dict[str, Any]) -> None:
        per_seed.append(result)
        per_seed.sort(key=lambda r: seeds.index(r["split_seed"]))
        if on_seed is not None:
            on_seed(report(time.perf_counter() - t0))

    def ranker_done(partial: dict[str, Any]) -> None:
        if on_seed is not None:
            per_seed.append(partial)
            try:
                on_seed(report(time.perf_counter() - t0))
            finally:
                per_seed.remove(partial)

    if jobs <= 1:
        for seed in seeds:
            done(run_seed(ds, seed, *args, runtime=runtime, on_ranker=ranker_done))
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_seed, ds, seed, *args, threads=1, runtime=runtime) for seed in seeds]
            for f in as_completed(futures):
                done(f.result())
    return report(time.perf_counter() - t0)


def aggregate_rankers(labels: Sequence[str], per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each ranker's figures over the seeds that ran it (mean ± std), the seeds, how many of them
    put the two-stage NDCG@20 above the retrieval order, and each seed's best epoch."""
    rankers = {}
    for label in labels:
        runs = [s["rankers"][label] for s in per_seed if label in s["rankers"]]  # a stopped seed lacks the last
        if not runs:
            continue
        # figures every seed has (a segment with one class has none; older parts lack newer figures)
        keys = [k for k in runs[0] if all(r.get(k) is not None for r in runs)]
        rankers[label] = {k: mean_std([r[k] for r in runs]) for k in keys}
        rankers[label]["seeds"] = [s["split_seed"] for s in per_seed if label in s["rankers"]]
        rankers[label]["seeds_above_retrieval_ndcg@20"] = sum(r["two_stage_ndcg@20"] > r["retrieval_ndcg@20"]
                                                              for r in runs)
        rankers[label]["best_epochs"] = [r["best_epoch"] for r in runs]
    return rankers


def _report(ds: Dataset, spec: DataSpec, seeds: Sequence[int], labels: list[str], per_seed: list[dict[str, Any]],
            retrieval_settings: dict[str, Any], retrieval_train: TrainConfig, rank_train: RankTrainConfig,
            part: str, m: int, jobs: int, seconds: float, runtime: Runtime) -> dict[str, Any]:
    return {
        "kind": KIND,
        "complete": len(per_seed) == len(seeds) and all(len(s["rankers"]) == len(labels) for s in per_seed),
        "dataset": str(spec.interactions),
        "data_fingerprint": ds.fingerprint,
        "split_seeds": [s["split_seed"] for s in per_seed],
        "part": part,
        "M": m,
        "jobs": jobs,
        "timing_note": ("seconds, rates and latencies measured with one torch thread per job, "
                        f"{jobs} jobs side by side" if jobs > 1 else "seconds, rates and latencies measured in one process"),
        "retrieval_settings": retrieval_settings,
        "retrieval_train_config": dataclasses.asdict(retrieval_train),
        "retrieval": {k: mean_std([s["retrieval"][k] for s in per_seed]) for k in per_seed[0]["retrieval"]},
        "rank_train_config": dataclasses.asdict(rank_train),
        "sessions": session_statistics(ds, rank_train.max_len),
        "trained_on": {**runtime.describe(), "processes": current().world},  # a seed reproduces on one kind of CPU
        "rankers": aggregate_rankers(labels, per_seed),
        "per_seed": list(per_seed),  # a snapshot: the run goes on appending
        "wall_time_s": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "versions": package_versions(),
    }


def format_ranker_table(report: dict[str, Any]) -> str:
    """One line per ranker: mean ± std of the headline figures, seeds above retrieval, latency."""
    cols = ["auc", "gauc", "log_loss", "two_stage_ndcg@20", "retrieval_ndcg@20"]
    head = (f"{'ranker':<32}" + "".join(f"{c:>18}" for c in cols)
            + f"{'above':>7}{'best epochs':>16}{'p99 ms':>8}")
    lines = [head, "-" * len(head)]
    for label, row in report["rankers"].items():
        cells = "".join(f"{row[c]['mean']:>10.4f}±{row[c]['std']:<7.4f}" for c in cols)
        epochs = ",".join(str(e) for e in row["best_epochs"])
        p99 = row.get("latency_p99_ms", {}).get("mean", float("nan"))
        lines.append(f"{label:<32}{cells}{row['seeds_above_retrieval_ndcg@20']:>4}/{len(row['seeds']):<2}{epochs:>16}"
                     f"{p99:>8.2f}")
    return "\n".join(lines)


def format_ranker_markdown(report: dict[str, Any]) -> str:
    """The README tables of a ranker report: the headline figures per ranker (mean ± std over
    seeds), each seed's two-stage NDCG@20 against the retrieval order, and the session
    statistics that say how much DSIN has to work with."""
    seeds = report["split_seeds"]
    spread = len(seeds) > 1

    def cell(row: dict[str, Any], key: str, digits: int = 4) -> str:
        v = row.get(key)
        if v is None:
            return "–"
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}" if spread else f"{v['mean']:.{digits}f}"

    cfg = report["rank_train_config"]
    cap = "each at most the epochs its label says" if cfg["epochs"] is None else f"at most {cfg['epochs']} epochs"
    lines = [f"{report['dataset']}, user split, split seed{'s' if spread else ''} {', '.join(map(str, seeds))}, "
             f"{report['part']} users, M={report['M']}; rankers: {cap}, patience "
             f"{cfg['patience']} on validation {cfg['monitor']}, {cfg['negatives']} negative(s) per positive "
             f"(hard share {cfg['hard_share']}); {'mean ± std over seeds' if spread else 'one seed'}; "
             f"wall {report['wall_time_s']:.0f} s"
             + ("" if report.get("complete", True) else " (incomplete: the run stopped before every ranker of every "
                                                        "seed finished; each row says its seeds)"),
             "",
             "| ranker | AUC | GAUC | log loss | two-stage NDCG@20 | ranker alone NDCG@20 | retrieval NDCG@20 "
             "| seeds above retrieval | retrieval weight | best epochs | s / epoch | p50 / p99 ms |",
             "|---" * 12 + "|"]
    for label, row in report["rankers"].items():
        lat = (f"{row['latency_p50_ms']['mean']:.1f} / {row['latency_p99_ms']['mean']:.1f}"
               if "latency_p99_ms" in row else "–")
        lines.append(f"| {label} | {cell(row, 'auc')} | {cell(row, 'gauc')} | {cell(row, 'log_loss')} | "
                     f"{cell(row, 'two_stage_ndcg@20')} | {cell(row, 'two_stage_ranker_only_ndcg@20')} | "
                     f"{cell(row, 'retrieval_ndcg@20')} | {row['seeds_above_retrieval_ndcg@20']} of {len(row['seeds'])} | "
                     f"{cell(row, 'retrieval_weight', 2)} | {', '.join(map(str, row['best_epochs']))} | "
                     f"{cell(row, 'seconds_per_epoch', 0)} | {lat} |")
    lines += ["", "Two-stage NDCG@20 per seed (reranked / retrieval order):", "",
              "| ranker | " + " | ".join(str(s) for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for label in report["rankers"]:
        cells = []
        for s in report["per_seed"]:
            r = s["rankers"].get(label)  # None: the run stopped before this ranker
            cells.append("–" if r is None else f"{r['two_stage_ndcg@20']:.4f} / {r['retrieval_ndcg@20']:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    segmented = [(label, row) for label, row in report["rankers"].items() if "gauc_several_sessions" in row]
    if segmented:
        share = segmented[0][1]["several_sessions_pair_share"]["mean"]
        lines += ["", "AUC / GAUC apart for the users whose last L behaviours hold one session and those whose hold "
                  f"several (30-minute rule; {100 * share:.0f} % of the pairs are of users with several):", "",
                  "| ranker | one session: AUC | GAUC | several sessions: AUC | GAUC |", "|---|---|---|---|---|"]
        for label, row in segmented:
            lines.append(f"| {label} | {cell(row, 'auc_one_session')} | {cell(row, 'gauc_one_session')} | "
                         f"{cell(row, 'auc_several_sessions')} | {cell(row, 'gauc_several_sessions')} |")
    st = report.get("sessions")
    if st:
        lines += ["", f"Sessions (gap {st['gap_s']:.0f} s): "
                  + ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in st.items() if k != "gap_s")]
    return "\n".join(lines) + "\n"
