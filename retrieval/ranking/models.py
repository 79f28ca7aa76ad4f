"""The rankers by name, with what each needs from the data side. Plain explicit imports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import torch

from retrieval.data import Dataset, item_counts
from retrieval.ranking.base import EmbeddingMLP
from retrieval.ranking.common import RankerConfig
from retrieval.ranking.data import SessionSpec
from retrieval.ranking.dien import DIEN, DIENConfig
from retrieval.ranking.din import DIN, DINConfig
from retrieval.ranking.dmin import DMIN, DMINConfig
from retrieval.ranking.dsin import DSIN, DSINConfig

RankerName = Literal["base", "din", "dmin", "dien", "dsin"]
NAMES: tuple[str, ...] = ("base", "din", "dmin", "dien", "dsin")
Ranker = Union[EmbeddingMLP, DIN, DMIN, DIEN, DSIN]

_CLASSES: dict[str, tuple[type, type]] = {
    "base": (EmbeddingMLP, RankerConfig),
    "din": (DIN, DINConfig),
    "dmin": (DMIN, DMINConfig),
    "dien": (DIEN, DIENConfig),
    "dsin": (DSIN, DSINConfig),
}


@dataclass
class Needs:
    max_len: int  # L of the history
    neg_history: bool  # sampled negatives beside each behaviour (auxiliary losses)
    sessions: SessionSpec | None  # session division (DSIN)


def needs(model: Ranker) -> Needs:
    c = model.config
    aux = isinstance(model, (DMIN, DIEN)) and c.aux_weight > 0
    sessions = SessionSpec(c.sessions, c.session_len, c.gap) if isinstance(model, DSIN) else None
    return Needs(c.max_len, aux, sessions)


def ranker_config(name: str, ds: Dataset, **settings: Any) -> RankerConfig:
    if name not in _CLASSES:
        raise ValueError(f"unknown ranker {name!r}; use one of {', '.join(NAMES)}")
    cls = _CLASSES[name][1]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{name} has no setting {unknown[0]!r}; its settings: {', '.join(sorted(known))}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    settings = {k: (v,) if isinstance(defaults.get(k), tuple) and isinstance(v, int) else v  # one MLP width
                for k, v in settings.items()}
    return cls(
        n_items=ds.n_items,
        item_feature_sizes={f: len(v) for f, v in ds.item_feature_vocab.items()},
        user_feature_sizes={f: len(v) for f, v in ds.user_feature_vocab.items()},
        **settings,
    )


def make_ranker(name: str, config: RankerConfig, ds: Dataset) -> Ranker:
    feats = {f: torch.from_numpy(m.astype(np.int64)) for f, m in ds.item_features.items()}
    return _CLASSES[name][0](config, feats)


def build_ranker(name: str, ds: Dataset, train_users: np.ndarray | None = None, ends: np.ndarray | None = None,
                 **settings: Any) -> Ranker:
    """A fresh ranker sized for the dataset; item frequencies (for the MBA regulariser) from the
    train users' sequences, or only their first ends[u] behaviours (a split's `history_len`)."""
    model = make_ranker(name, ranker_config(name, ds, **settings), ds)
    users = np.arange(ds.n_users) if train_users is None else train_users
    counts = torch.from_numpy(item_counts(ds, users, ends).astype(np.float32))
    model.set_frequencies(counts)
    return model
