"""The headline experiment: MIND (K), MIND (K=1), item-KNN and popularity over several split seeds.

ML-100K has about 95 test users per split, so one split's figure moves by a few points;
the report gives each figure's mean and standard deviation over the seeds, and every
seed's own figures beside them.
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
from retrieval.evaluate import evaluate_models
from retrieval.train import TrainConfig, model_config_for, train

log = logging.getLogger(__name__)

KIND = "retrieval-experiment"  # the "kind" of the JSON report `retrieve experiment --out` writes


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value) of one figure over seeds."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def run_experiment(
    ds: Dataset,
    spec: DataSpec,
    seeds: Sequence[int],
    model_settings: dict[str, Any],
    config: TrainConfig,
    part: str = "test",
    show_progress: bool = False,
) -> dict[str, Any]:
    """Train and evaluate every model on each split seed; aggregate mean and std per figure."""
    t0 = time.perf_counter()
    per_seed = []
    for seed in seeds:
        split = split_users(ds, seed)
        tc = dataclasses.replace(config, split_seed=seed)
        cfg = model_config_for(ds, **model_settings)
        runs = {"mind": train(ds, split, cfg, tc, show_progress=show_progress)}
        if cfg.interests > 1:
            runs["mind_k1"] = train(ds, split, dataclasses.replace(cfg, interests=1), tc, show_progress=show_progress)
        k1 = runs["mind_k1"].model if "mind_k1" in runs else None
        result = evaluate_models(ds, split, runs["mind"].model, None, k1, part, max_len=cfg.max_len)
        result["split_seed"] = seed
        result["training"] = {
            name: {"best_epoch": r.best_epoch, "epochs_run": len(r.history), "val_recall@50": r.best_recall,
                   "train_samples_per_s": r.samples_per_s,
                   "train_seconds": round(sum(h["seconds"] for h in r.history), 2)}
            for name, r in runs.items()
        }
        log.info("seed %d: %s", seed, {m: round(v["recall@50"], 4) for m, v in result["models"].items()})
        per_seed.append(result)
    models: dict[str, dict[str, Any]] = {}
    for name in per_seed[0]["models"]:
        keys = [k for k, v in per_seed[0]["models"][name].items() if isinstance(v, float)]
        models[name] = {k: mean_std([r["models"][name][k] for r in per_seed]) for k in keys}
    training = {
        name: {k: mean_std([r["training"][name][k] for r in per_seed])
               for k in ("train_samples_per_s", "train_seconds", "best_epoch", "epochs_run")}
        for name in per_seed[0]["training"]
    }
    return {
        "kind": KIND,
        "dataset": str(spec.interactions),
        "data_fingerprint": ds.fingerprint,
        "split_seeds": list(seeds),
        "part": part,
        "N": per_seed[0]["N"],
        "L": model_settings.get("max_len", 50),
        "K": model_settings.get("interests", 4),
        "dim": model_settings.get("dim", 64),
        "model_settings": model_settings,
        "train_config": dataclasses.asdict(config),
        "models": models,
        "training": training,
        "per_seed": per_seed,
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "versions": package_versions(),
    }
