"""Model bundle: weights, config, encoded data and vocabularies, with a manifest.

A bundle is one directory written atomically. Its manifest records package versions,
the fingerprint of the data it was trained on, and a fingerprint of the bundle itself
that every index built from it carries, so a mismatched pair fails loudly on load.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.artifacts import (
    atomic_dir,
    command_line,
    dir_fingerprint,
    package_versions,
    read_manifest,
    write_manifest,
)
from retrieval.data import Dataset, Split, make_split
from retrieval.device import cpu_state
from retrieval.errors import ArtifactError
from retrieval.retrievers import DEFAULT, Retriever, retriever_classes

KIND = "mind-bundle"


@dataclass
class Bundle:
    model: Retriever
    dataset: Dataset
    split: Split
    config: dict[str, Any]  # {"retriever": name, "model": ..., "train": ..., "data": ...}
    manifest: dict[str, Any]
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        return self.manifest["bundle_fingerprint"]


def _dataset_arrays(ds: Dataset) -> dict[str, np.ndarray]:
    arrays = {
        "item_ids": ds.item_ids.astype(str),
        "user_ids": ds.user_ids.astype(str),
        "offsets": ds.offsets,
        "items": ds.items,
        "times": ds.times,
    }
    if ds.titles is not None:
        arrays["titles"] = ds.titles.astype(str)
    for f, m in ds.item_features.items():
        arrays[f"item_feature/{f}"] = m
    for f, m in ds.user_features.items():
        arrays[f"user_feature/{f}"] = m
    return arrays


def save_bundle(
    out: Path, model: Retriever, ds: Dataset, split: Split, config: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the bundle directory atomically; returns its manifest."""
    with atomic_dir(Path(out), KIND) as tmp:
        buf = io.BytesIO()
        torch.save(cpu_state(model), buf)  # CPU tensors whatever the model trained on: loads on any machine
        (tmp / "model.pt").write_bytes(buf.getvalue())
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        with open(tmp / "dataset.npz", "wb") as f:
            np.savez(f, **_dataset_arrays(ds))
        vocab = {"item": ds.item_feature_vocab, "user": ds.user_feature_vocab}
        (tmp / "vocab.json").write_text(json.dumps(vocab) + "\n")
        manifest = {
            "kind": KIND,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command_line(),
            "versions": package_versions(),
            "data_fingerprint": ds.fingerprint,
            "split_seed": split.seed,
            "split": split.kind,
            **({"split_cut": split.cut} if split.cut is not None else {}),
            "bundle_fingerprint": dir_fingerprint(tmp),
            **(extra or {}),
        }
        manifest = write_manifest(tmp, manifest)
    return manifest


def load_bundle(path: Path, verify: bool = True) -> Bundle:
    """Load a bundle; ArtifactError if it is missing, corrupt or was modified after writing."""
    path = Path(path)
    manifest = read_manifest(path, KIND)
    if verify and dir_fingerprint(path) != manifest.get("bundle_fingerprint"):
        raise ArtifactError(f"{path}: bundle contents do not match its manifest fingerprint (modified or corrupt)")
    try:
        config = json.loads((path / "config.json").read_text())
        vocab = json.loads((path / "vocab.json").read_text())
        with np.load(path / "dataset.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ArtifactError(f"{path}: unreadable bundle ({err})") from None
    ds = Dataset(
        item_ids=arrays["item_ids"],
        user_ids=arrays["user_ids"],
        offsets=arrays["offsets"],
        items=arrays["items"],
        times=arrays["times"],
        item_features={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("item_feature/")},
        item_feature_vocab=vocab["item"],
        user_features={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("user_feature/")},
        user_feature_vocab=vocab["user"],
        titles=arrays.get("titles"),
        fingerprint=manifest["data_fingerprint"],
    )
    try:  # a bundle written by another version of the code: other config fields or weight shapes
        model_cls, config_cls = retriever_classes(config.get("retriever", DEFAULT))
        model_cfg = config_cls(**config["model"])
        model = model_cls(model_cfg, {f: torch.from_numpy(m.astype(np.int64)) for f, m in ds.item_features.items()})
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = " ".join(str(err).split())  # load_state_dict's message spans several lines
        raise ArtifactError(f"{path}: bundle does not fit this version of the model ({reason})") from None
    model.eval()
    split = make_split(ds, manifest.get("split", "user"), manifest["split_seed"])  # bundles before the temporal split: "user"
    return Bundle(model, ds, split, config, manifest, path)


def config_dict(model: Any, train: Any, data: Any, retriever: str = DEFAULT) -> dict[str, Any]:
    """The bundle's config.json: the retriever's name, model, training and data settings as plain JSON values."""
    return {
        "retriever": retriever,
        "model": dataclasses.asdict(model),
        "train": dataclasses.asdict(train),
        "data": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(data).items()},
    }
