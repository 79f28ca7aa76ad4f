"""The retrievers by name: what training, bundles and serving call, and one line per model.

A retriever turns a batch of behaviour histories into up to K interest vectors
(`user_vectors -> Interests`) and embeds items into the same space (`item_embed`,
`item_vectors`), so one FAISS index of item vectors serves every interest. Training calls
`loss`; serving, evaluation and the index call the rest. A new interest extractor is one
file with a model class and its config dataclass, and one line in RETRIEVERS; a bundle
records the name it was trained with (bundles written before the name was recorded hold
"routing", MIND's B2I dynamic routing).
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from retrieval.comirec import ComiRecConfig, ComiRecSA
from retrieval.interests import Batch, Interests
from retrieval.mind import MIND, MINDConfig

DEFAULT = "routing"


class Retriever(Protocol):
    """What training, evaluation, the index and serving call on a retrieval model."""

    config: Any  # a dataclass with at least n_items, dim, interests and max_len

    def user_vectors(self, batch: Batch) -> Interests: ...  # (B, K, D) vectors and their masks and weights

    def item_embed(self, ids: Tensor) -> Tensor: ...  # (..., D) item representations

    def item_vectors(self) -> Tensor: ...  # (N, D) vectors of items 1..N, row i for item i+1

    def loss(self, batch: Batch, neg: Tensor, log_q: Tensor) -> Tensor: ...  # () training loss


# name -> (model class, config class)
RETRIEVERS: dict[str, tuple[type, type]] = {
    "routing": (MIND, MINDConfig),
    "self-attention": (ComiRecSA, ComiRecConfig),
}


def retriever_classes(name: str) -> tuple[type, type]:
    """The (model, config) classes registered under `name`; ValueError for an unknown name."""
    if name not in RETRIEVERS:
        raise ValueError(f"unknown retriever {name!r}; use one of {', '.join(RETRIEVERS)}")
    return RETRIEVERS[name]


def retriever_name(config: Any) -> str:
    """The registered name of the retriever whose config class `config` is an instance of."""
    for name, (_, config_cls) in RETRIEVERS.items():
        if type(config) is config_cls:
            return name
    raise ValueError(f"no retriever is registered for a {type(config).__name__}")


def build_retriever(config: Any, item_features: dict[str, Tensor] | None = None) -> Retriever:
    """A fresh retriever of the kind that `config` configures."""
    model_cls, _ = RETRIEVERS[retriever_name(config)]
    return model_cls(config, item_features)
