"""The per-dataset experiment report: MIND, its named variants (ablations), MIND K=1 tuned with
the same budget, the merged retriever, item-kNN and popularity, over several runs.

A run is one (split seed, training seed) pair: the user split's headline is five split
seeds (2026-2030) with one training seed; the temporal split has one split (seed 2026) and
ML-100K's ~110 evaluated users call for five training seeds. Every figure is reported as
the mean and standard deviation over the runs, every run's own figures beside them.

Settings and variants. The main MIND is `model_settings` (+ `settings` overrides written
`key=value;key=value`). A variant is written like the rankers' (`name:key=value;key=value`):
`name` is "mind" (the main configuration) or a registered retriever (retrieval/retrievers.py),
and each key overrides a model-config field or a TrainConfig field, e.g. `mind:interests=2`
or `mind:lr=0.001`. So "each remedy switched off in turn" is one variant per remedy
(`mind:hard_negatives=0`, `mind:peak_penalty=0`, ...), whatever fields the model side adds, and the
label of a row is the variant's text.

Tuning budget. `tune` is a grid (`lr=0.001,0.003;dim=32,64`) tried for the main MIND and for
K=1 alike on every run, each keeping its best validation Recall@50: K=1 gets the same budget
as the multi-interest model. With no grid, both train once at the given settings.

`interests="auto"` (`--interests auto`): the main MIND is tuned once per K in 1, 2, 4, 8 and
the K with the best validation Recall@50 is reported as "mind"; "mind_k1" is the search's own
K=1 model (the same budget, no second training), and the run records every K's figures under
"interests_search". Variants are trained at the chosen K.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.artifacts import command_line, package_versions
from retrieval.data import Dataset, DataSpec, make_split
from retrieval.device import Runtime
from retrieval.distributed import current, from_main
from retrieval.channels import KNN_K
from retrieval.evaluate import evaluate_models
from retrieval.retrievers import DEFAULT, RETRIEVERS, retriever_classes
from retrieval.train import AUTO_INTERESTS, TrainConfig, TrainResult, choose_interests, model_config_for, search_figures, train

log = logging.getLogger(__name__)

KIND = "retrieval-experiment"  # the "kind" of the JSON report `retrieve experiment --out` writes
USER_SEEDS = (2026, 2027, 2028, 2029, 2030)  # the protocol's five user splits
TIME_TRAIN_SEEDS = (0, 1, 2, 3, 4)  # the temporal split: one split, five training seeds
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"split", "split_seed"}
SIZED_FIELDS = {"n_items", "item_feature_sizes", "user_feature_sizes"}  # set from the data, never by a variant


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value) of one figure over runs."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


# ---------------------------------------------------------------------------- variants


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_settings(text: str, what: str = "setting") -> dict[str, Any]:
    """'key=value;key=value' -> {key: value} (ints, floats, true/false, else strings)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad {what} {part!r}; write key=value")
        out[key.strip()] = _value(value.strip())
    return out


@dataclass
class Variant:
    """A MIND configuration relative to the main one."""

    label: str  # the text it was written as: the row's name in the report
    retriever: str | None  # a registered retriever; None = the main configuration's
    settings: dict[str, Any]  # model-config and TrainConfig fields it overrides


def parse_variant(text: str) -> Variant:
    """'mind:interests=1;lr=0.001' -> Variant. "mind" names the main configuration; any other
    name must be a registered retriever."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if name != "mind" and name not in RETRIEVERS:
        raise ValueError(f"unknown retriever {name!r} in variant {text!r}; use mind or one of {', '.join(RETRIEVERS)}")
    return Variant(text.strip(), None if name == "mind" else name, parse_settings(rest, f"setting in variant {text!r}"))


def parse_grid(text: str) -> dict[str, list[Any]]:
    """'lr=0.001,0.003;dim=32,64' -> {"lr": [0.001, 0.003], "dim": [32, 64]}."""
    grid: dict[str, list[Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, values = part.partition("=")
        vals = [_value(v.strip()) for v in values.split(",") if v.strip()]
        if not eq or not key.strip() or not vals:
            raise ValueError(f"bad tuning grid entry {part!r}; write key=value,value")
        grid[key.strip()] = vals
    return grid


def split_settings(settings: dict[str, Any], retriever: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings -> (model-config overrides, TrainConfig overrides); ValueError for a key that is neither."""
    _, config_cls = retriever_classes(retriever)
    model_fields = {f.name for f in dataclasses.fields(config_cls)} - SIZED_FIELDS
    model, training = {}, {}
    for key, value in settings.items():
        if key in model_fields:
            model[key] = value
        elif key in TRAIN_FIELDS:
            training[key] = value
        else:
            raise ValueError(f"unknown setting {key!r} for retriever {retriever!r}; model fields: "
                             f"{', '.join(sorted(model_fields))}; training fields: {', '.join(sorted(TRAIN_FIELDS))}")
    return model, training


def check_settings(model_settings: dict[str, Any], variants: Sequence[Variant], grid: dict[str, list[Any]]) -> None:
    """Fail before any training on a key no configuration has."""
    main = model_settings.get("retriever", DEFAULT)
    split_settings({k: v for k, v in model_settings.items() if k != "retriever"}, main)
    split_settings({k: v[0] for k, v in grid.items()}, main)
    for v in variants:
        split_settings(v.settings, v.retriever or main)


# ---------------------------------------------------------------------------- runs


def _train_one(ds: Dataset, split: Any, settings: dict[str, Any], config: TrainConfig,
               show_progress: bool, runtime: Runtime | None = None) -> TrainResult:
    retriever = settings.get("retriever", DEFAULT)
    model, training = split_settings({k: v for k, v in settings.items() if k != "retriever"}, retriever)
    cfg = model_config_for(ds, retriever, **model)
    return train(ds, split, cfg, dataclasses.replace(config, **training), show_progress=show_progress,
                 runtime=runtime)


def _train_tuned(ds: Dataset, split: Any, settings: dict[str, Any], config: TrainConfig, grid: dict[str, list[Any]],
                 show_progress: bool, runtime: Runtime | None = None
                 ) -> tuple[TrainResult, dict[str, Any], list[dict[str, Any]]]:
    """Train at every grid point (once without a grid); keep the best validation Recall@N."""
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    best: tuple[TrainResult, dict[str, Any]] | None = None
    tried = []
    for point in points:
        r = _train_one(ds, split, {**settings, **point}, config, show_progress, runtime)
        tried.append({**point, "val_recall": r.best_recall})
        if best is None or r.best_recall > best[0].best_recall:
            best = (r, point)
    assert best is not None
    return best[0], best[1], tried


def _chosen_channels(evaluation: dict[str, Any]) -> dict[str, Any]:
    """What the merged retriever chose on validation users (weights, table size, half-life, decay)
    and every setting tried there with its objective."""
    ch = evaluation["channels"]
    keys = ("weights", "prior_only", "knn_k", "halflife", "decay", "validation_settings")
    return {k: ch[k] for k in keys if k in ch}


def _training_record(r: TrainResult, chosen: dict[str, Any], tried: list[dict[str, Any]]) -> dict[str, Any]:
    return {"best_epoch": r.best_epoch, "epochs_run": len(r.history), "val_recall@50": r.best_recall,
            "train_samples_per_s": r.samples_per_s, "train_seconds": round(sum(h["seconds"] for h in r.history), 2),
            "chosen": chosen, "tried": tried, "history": r.history}


def run_once(ds: Dataset, kind: str, split_seed: int, train_seed: int, model_settings: dict[str, Any],
             config: TrainConfig, variants: Sequence[Variant], grid: dict[str, list[Any]], part: str,
             knn_k: int | Sequence[int], show_progress: bool, runtime: Runtime | None = None) -> dict[str, Any]:
    """One run: train the main MIND, K=1 and every variant on one split with one seed; evaluate.
    Under torchrun the processes train each model together and rank 0 evaluates."""
    group = current()
    split = make_split(ds, kind, split_seed)
    tc = dataclasses.replace(config, split_seed=split_seed, split=kind, seed=train_seed)
    settings = {**model_settings, "seed": train_seed}
    max_len = int(settings.get("max_len", 50))
    search = None
    if settings.get("interests") == "auto":
        by_k = {k: _train_tuned(ds, split, {**settings, "interests": k}, tc, grid, show_progress, runtime)
                for k in AUTO_INTERESTS}
        figures = {k: search_figures(r, tc.eval_n) for k, (r, _, _) in by_k.items()}
        chosen = choose_interests(figures, tc.eval_n)
        search = {"chosen": chosen, "by_interests": {str(k): f for k, f in figures.items()}}
        settings["interests"] = chosen  # the variants train at the chosen K
        main, main_choice, main_tried = by_k[chosen]
        training = {"mind": _training_record(main, {**main_choice, "interests": chosen}, main_tried)}
        k1, k1_choice, k1_tried = by_k[1]
        training["mind_k1"] = _training_record(k1, k1_choice, k1_tried)
    else:
        main, main_choice, main_tried = _train_tuned(ds, split, settings, tc, grid, show_progress, runtime)
        training = {"mind": _training_record(main, main_choice, main_tried)}
        k1 = None
        if settings.get("interests", 4) != 1:
            k1, k1_choice, k1_tried = _train_tuned(ds, split, {**settings, "interests": 1}, tc, grid, show_progress,
                                                   runtime)
            training["mind_k1"] = _training_record(k1, k1_choice, k1_tried)
    result = from_main(lambda: evaluate_models(ds, split, main.model, None, k1.model if k1 else None, part,
                                               max_len=max_len, knn_k=knn_k), group)
    channels = {"mind": _chosen_channels(result)}
    for v in variants:
        vs = {**settings, **({"retriever": v.retriever} if v.retriever else {}), **v.settings}
        r = _train_one(ds, split, vs, tc, show_progress, runtime)
        training[v.label] = _training_record(r, v.settings, [])
        ev = from_main(lambda: evaluate_models(ds, split, r.model, None, None, part, max_len=int(vs.get("max_len", 50)),
                                               knn_k=knn_k), group)
        result["models"][v.label] = ev["models"]["mind"]
        result["models"][f"{v.label} +channels"] = ev["models"]["retriever"]
        result["diagnostics"][v.label] = ev["diagnostics"]["mind"]
        result["by_history_length"][v.label] = ev["by_history_length"]["mind"]
        result["recall_curve"][v.label] = ev["recall_curve"]["mind"]
        channels[v.label] = _chosen_channels(ev)
    result.update({"split_seed": split_seed, "train_seed": train_seed, "training": training, "channels": channels})
    if search is not None:
        result["interests_search"] = search
    log.info("split seed %d, training seed %d: recall@50 %s", split_seed, train_seed,
             {m: round(v["recall@50"], 4) for m, v in result["models"].items()})
    return result


def run_experiment(
    ds: Dataset,
    spec: DataSpec,
    seeds: Sequence[int],
    model_settings: dict[str, Any],
    config: TrainConfig,
    part: str = "test",
    show_progress: bool = False,
    split: str = "user",
    train_seeds: Sequence[int] | None = None,
    variants: Sequence[str] = (),
    grid: dict[str, list[Any]] | None = None,
    knn_k: int | Sequence[int] = KNN_K,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Every run (split seed x training seed): train and evaluate every model; aggregate mean
    and std per figure. `on_run(partial report)` is called as each run finishes, so a long
    experiment that is stopped keeps what it finished."""
    t0 = time.perf_counter()
    parsed = [parse_variant(v) for v in variants]
    grid = grid or {}
    check_settings(model_settings, parsed, grid)
    train_seeds = list(train_seeds) if train_seeds else [int(model_settings.get("seed", config.seed))]
    runs = [(s, t) for s in seeds for t in train_seeds]
    per_run: list[dict[str, Any]] = []

    def report() -> dict[str, Any]:
        return _report(ds, spec, split, seeds, train_seeds, runs, per_run, model_settings, config, parsed, grid,
                       part, time.perf_counter() - t0, runtime or Runtime())

    for split_seed, train_seed in runs:
        per_run.append(run_once(ds, split, split_seed, train_seed, model_settings, config, parsed, grid, part,
                                knn_k, show_progress, runtime))
        if on_run is not None:
            on_run(report())
    return report()


# ---------------------------------------------------------------------------- aggregation


_SEP = "\t"  # joins the keys of a path through nested dicts (keys hold dots and dashes, never tabs)


def _numeric_leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    """{path: value} for every int or float leaf of nested dicts (bools and strings left out)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_numeric_leaves(v, f"{prefix}{k}{_SEP}"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[: -len(_SEP)]] = float(tree)
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(_SEP)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _aggregate(trees: list[Any]) -> dict[str, Any]:
    """mean_std of every numeric leaf present in all trees (nan-safe: runs where it is nan are left out)."""
    leaves = [_numeric_leaves(t) for t in trees]
    keys = [k for k in leaves[0] if all(k in x for x in leaves)]
    out = {}
    for k in keys:
        values = [x[k] for x in leaves if np.isfinite(x[k])]
        out[k] = mean_std(values) if values else {"mean": float("nan"), "std": float("nan")}
    return _nest(out)


def _report(ds: Dataset, spec: DataSpec, split: str, seeds: Sequence[int], train_seeds: Sequence[int],
            runs: list[tuple[int, int]], per_run: list[dict[str, Any]], model_settings: dict[str, Any],
            config: TrainConfig, variants: list[Variant], grid: dict[str, list[Any]], part: str,
            seconds: float, runtime: Runtime) -> dict[str, Any]:
    first = per_run[0]
    names = list(first["models"])
    models = {name: {k: v for k, v in _aggregate([r["models"][name] for r in per_run]).items()} for name in names}
    training = {name: _aggregate([{k: v for k, v in r["training"][name].items()
                                   if k in ("train_samples_per_s", "train_seconds", "best_epoch", "epochs_run",
                                            "val_recall@50")} for r in per_run])
                for name in first["training"]}
    curves = {name: [round(float(x), 6) for x in np.mean([r["recall_curve"][name] for r in per_run], axis=0)]
              for name in first["recall_curve"]}
    return {
        "kind": KIND,
        "complete": len(per_run) == len(runs),
        "dataset": str(spec.interactions),
        "data_fingerprint": ds.fingerprint,
        "split": split,
        "split_seeds": list(seeds),
        "train_seeds": list(train_seeds),
        "runs": len(per_run),
        "part": part,
        "N": first["N"],
        "L": model_settings.get("max_len", 50),
        "K": model_settings.get("interests", 4),  # "auto": chosen per run, see per_run[i]["interests_search"]
        "retriever": model_settings.get("retriever", DEFAULT),  # the main model's registered extractor
        "dim": model_settings.get("dim", 64),
        "model_settings": model_settings,
        "train_config": dataclasses.asdict(config),
        "variants": [v.label for v in variants],
        "tuning_grid": grid,
        "trained_on": {**runtime.describe(), "processes": current().world},
        "models": models,
        "training": training,
        "diagnostics": {name: _aggregate([r["diagnostics"][name] for r in per_run]) for name in first["diagnostics"]},
        "by_history_length": {name: _aggregate([r["by_history_length"][name] for r in per_run])
                              for name in first["by_history_length"]},
        "recall_curve": curves,
        "per_run": per_run,
        "wall_time_s": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "versions": package_versions(),
    }


# ---------------------------------------------------------------------------- tables

TABLE_COLUMNS = ("recall@20", "ndcg@20", "recall@50", "hit_rate@50", "ndcg@50")
BASE_ROWS = ("mind", "mind_share_merge", "mind_prior", "mind_knn", "retriever", "mind_k1", "item_knn", "popularity")
ROW_NAMES = {
    "mind": "MIND alone (best-score merge)",
    "mind_share_merge": "MIND alone, share merge",
    "mind_prior": "MIND + item prior",
    "mind_knn": "MIND + item-kNN (no prior)",
    "retriever": "**merged retriever (default)**",
    "mind_k1": "MIND K=1 (same tuning budget)",
    "item_knn": "item-kNN",
    "popularity": "popularity",
}


def _fmt(cell: Any, digits: int = 3, spread: bool = True) -> str:
    if isinstance(cell, dict):
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}" if spread else f"{cell['mean']:.{digits}f}"
    return "-" if cell is None else f"{cell:.{digits}f}"


def format_markdown(report: dict[str, Any]) -> str:
    """The README tables of an experiment report: every model, the gain of the merged retriever,
    diagnostics, figures by history length and training throughput (mean ± std over runs;
    the mean alone for a single run)."""
    spread = report["runs"] > 1

    def fmt(cell: Any, digits: int = 3) -> str:
        return _fmt(cell, digits, spread)

    runs = (f"split seeds {', '.join(map(str, report['split_seeds']))}" if len(report["split_seeds"]) > 1
            else f"split seed {report['split_seeds'][0]}")
    if len(report["train_seeds"]) > 1:
        runs += f", training seeds {', '.join(map(str, report['train_seeds']))}"
    over = "mean ± std over runs" if spread else "one run"
    lines = [f"{report['dataset']}, {report['split']} split, {runs} ({report['runs']} runs), {report['part']} users, "
             f"K={report['K']} L={report['L']} D={report['dim']}; {over}; wall {report['wall_time_s']:.0f} s"
             + ("" if report.get("complete", True) else " (incomplete: the later runs did not finish)"),
             "", "| model | " + " | ".join(c.replace("hit_rate", "HitRate").replace("recall", "Recall")
                                           .replace("ndcg", "NDCG") for c in TABLE_COLUMNS) + " |",
             "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    models = report["models"]
    for name, row in models.items():
        label = ROW_NAMES.get(name, f"variant `{name}`")
        lines.append(f"| {label} | " + " | ".join(fmt(row.get(c)) for c in TABLE_COLUMNS) + " |")
    if all(k in models for k in ("retriever", "mind", "item_knn")):
        lines.append("")
        for m in ("recall@50", "ndcg@50"):
            best_single = max(models["mind"][m]["mean"], models["item_knn"][m]["mean"])
            gain = models["retriever"][m]["mean"] / best_single - 1 if best_single > 0 else float("nan")
            lines.append(f"- merged retriever {m}: {models['retriever'][m]['mean']:.4f}, {gain:+.1%} against the "
                         f"better of MIND alone and item-kNN ({best_single:.4f})")
    diag = report.get("diagnostics", {})
    if diag:
        lines += ["", "| diagnostics (test users) | interest collapse (mean pairwise cosine) | routing concentration "
                  "(capsules > 0.9 on one behaviour) | mean active interests |", "|---|---|---|---|"]
        for name, d in diag.items():
            if "interest_collapse" in d:
                lines.append(f"| {ROW_NAMES.get(name, name)} | {fmt(d['interest_collapse'])} | "
                             f"{fmt(d['routing_concentration'])} | {fmt(d['mean_active_interests'], 2)} |")
        if "retriever" in diag:
            share = diag["retriever"]["per_channel"]
            lines.append("")
            lines.append("- merged retriever, share of top-50 slots / of hits per channel: " + "; ".join(
                f"{c} {fmt(v['slots'], 2)} / {fmt(v['hits'], 2)}" for c, v in share.items()))
    by_len = report.get("by_history_length", {})
    if by_len:
        buckets = list(next(iter(by_len.values())))
        lines += ["", "| Recall@50 / NDCG@50 by history length | " + " | ".join(
            f"{b} ({next(iter(by_len.values()))[b]['users']['mean']:.0f} users)" for b in buckets) + " |",
                  "|---" * (len(buckets) + 1) + "|"]
        for name in [n for n in ("mind", "mind_k1", "item_knn", "retriever") if n in by_len] + \
                [n for n in by_len if n not in BASE_ROWS]:
            cells = [f"{fmt(by_len[name][b].get('recall@50'))} / {fmt(by_len[name][b].get('ndcg@50'))}"
                     for b in buckets]
            lines.append(f"| {ROW_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    training = report.get("training", {})
    if training:
        lines += ["", "| training | samples/s | best epoch | epochs run | seconds | validation Recall@50 |",
                  "|---|---|---|---|---|---|"]
        for name, t in training.items():
            lines.append(f"| {ROW_NAMES.get(name, name)} | {fmt(t['train_samples_per_s'], 0)} | "
                         f"{fmt(t['best_epoch'], 1)} | {fmt(t['epochs_run'], 1)} | {fmt(t['train_seconds'], 0)} | "
                         f"{fmt(t['val_recall@50'])} |")
    return "\n".join(lines) + "\n"
