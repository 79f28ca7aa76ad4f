"""Ranker bundle: weights, config and a manifest tied to the retrieval bundle it was trained beside.

A ranker is trained on a retrieval bundle's encoded data and split, so the manifest
records that bundle's data fingerprint (and, with retrieval negatives, its bundle
fingerprint); loading it beside a bundle of other data is an error.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retrieval.artifacts import (
    atomic_dir,
    command_line,
    dir_fingerprint,
    package_versions,
    read_manifest,
    write_manifest,
)
from retrieval.bundle import Bundle
from retrieval.device import cpu_state
from retrieval.errors import ArtifactError
from retrieval.ranking.models import Ranker, make_ranker, ranker_config

KIND = "ranker-bundle"


@dataclass
class RankerBundle:
    model: Ranker
    name: str
    config: dict[str, Any]
    manifest: dict[str, Any]
    path: Path | None = None


def save_ranker(out: Path, model: Ranker, name: str, train_config: Any, retrieval: Bundle,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    with atomic_dir(Path(out), KIND) as tmp:
        buf = io.BytesIO()
        torch.save(cpu_state(model), buf)  # CPU tensors whatever the model trained on
        (tmp / "model.pt").write_bytes(buf.getvalue())
        config = {"name": name, "model": dataclasses.asdict(model.config), "train": dataclasses.asdict(train_config)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        manifest = {
            "kind": KIND,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command_line(),
            "versions": package_versions(),
            "model": name,
            "data_fingerprint": retrieval.manifest["data_fingerprint"],
            "split_seed": retrieval.split.seed,
            "retrieval_bundle_fingerprint": retrieval.fingerprint,
            "bundle_fingerprint": dir_fingerprint(tmp),
            **(extra or {}),
        }
        manifest = write_manifest(tmp, manifest)
    return manifest


def load_ranker(path: Path, retrieval: Bundle) -> RankerBundle:
    """Load a ranker for use beside `retrieval`; ArtifactError on corruption or other data."""
    path = Path(path)
    manifest = read_manifest(path, KIND)
    if dir_fingerprint(path) != manifest.get("bundle_fingerprint"):
        raise ArtifactError(f"{path}: ranker contents do not match its manifest fingerprint (modified or corrupt)")
    if manifest.get("data_fingerprint") != retrieval.manifest["data_fingerprint"]:
        raise ArtifactError(f"{path}: the ranker was trained on other data than the retrieval bundle {retrieval.path}")
    if manifest.get("split_seed") != retrieval.split.seed:
        raise ArtifactError(
            f"{path}: the ranker uses split seed {manifest.get('split_seed')}, "
            f"the retrieval bundle uses {retrieval.split.seed}"
        )
    try:
        config = json.loads((path / "config.json").read_text())
        name = config["name"]
        model_cfg = config["model"]
        cfg = ranker_config(name, retrieval.dataset, **{k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in model_cfg.items()
                                                         if k not in ("n_items", "item_feature_sizes", "user_feature_sizes")})
        model = make_ranker(name, cfg, retrieval.dataset)
        model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ArtifactError(f"{path}: unreadable ranker bundle ({str(err).splitlines()[0]})") from None
    model.eval()
    return RankerBundle(model, name, config, manifest, path)
