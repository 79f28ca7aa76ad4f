"""What `build-index` writes for a model bundle: its FAISS item index and, by default, the
merged retriever's channels beside it (retrieval/channels.py: MIND's interests, item-kNN over
the history and an item-popularity prior, every choice made on validation users).

The merged retriever is the default because it is the retriever that wins on every log
measured (README, "Retrieval quality"); `channels=False` builds MIND alone. The channels are
chosen on an exact index; the index actually written is then built with the requested
factory over the same vectors (item vector and prior), and `target_recall` tunes its search
parameter against exact search with the queries it will serve (interests and prior weight).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from index.faiss_index import build_index
from index.tuning import Tuning, tune_on_validation
from retrieval.bundle import Bundle
from retrieval.channels import KNN_K, Chosen, channel_files, choose_channels, prior_vectors, prior_width


@dataclass
class BuiltIndex:
    index: faiss.Index
    manifest: dict[str, Any]  # the caller's fields for save_index
    files: dict[str, bytes] | None  # the channels' file beside index.faiss, None for MIND alone
    chosen: Chosen | None  # the merged retriever's choices, None for MIND alone
    tuning: Tuning | None  # the search parameter's choice under target_recall


def build_bundle_index(bundle: Bundle, bundle_path: str, factory: str = "Flat", channels: bool = True,
                       knn_k: int | Sequence[int] = KNN_K, target_recall: float | None = None,
                       tune_users: int = 1000, tune_n: int = 50,
                       on_setting: Callable[[int, int], None] | None = None) -> BuiltIndex:
    """The bundle's item index (and the merged retriever's channels unless `channels` is False)."""
    vectors = bundle.model.item_vectors().detach().numpy()  # (N, D)
    manifest: dict[str, Any] = {"factory": factory, "bundle_fingerprint": bundle.fingerprint, "bundle": bundle_path}
    chosen, files, prior_weight = None, None, 0.0
    if channels:
        width = prior_width(factory, vectors.shape[1])  # checks the factory before the channels' work
        chosen = choose_channels(bundle.model, bundle.dataset, bundle.split, knn_k,
                                 max_len=bundle.config["model"]["max_len"], n=tune_n, require_validation=True,
                                 on_setting=on_setting)
        ch, tuned = chosen.channels, chosen.tuned
        assert tuned is not None  # require_validation
        vectors = prior_vectors(vectors, ch, width)  # (N, width): what the index holds and target_recall reads
        index = chosen.index if factory == "Flat" and width == chosen.index.d else build_index(vectors, factory)
        prior_weight = ch.weights.prior
        manifest["channels"] = {**ch.settings(), "objective": tuned.objective, "validation_users": tuned.users,
                                "validation_trials": tuned.trials, "validation_settings": chosen.settings}
        files = channel_files(ch)
    else:
        index = build_index(vectors, factory)
    tuning = None
    if target_recall is not None:
        tuning = tune_on_validation(index, bundle, np.ascontiguousarray(vectors), target_recall, n=tune_n,
                                    max_users=tune_users, prior_weight=prior_weight)
        manifest.update(tuning.manifest())
    return BuiltIndex(index, manifest, files, chosen, tuning)
