"""What every multi-interest retriever shares; an extractor only says how a history becomes capsules.

A retriever embeds items (item id and side-feature embeddings, mean-pooled: the same
representation for behaviours, targets and the index), turns the last L behaviours of a
history into up to K interest capsules (the extractor: MIND's B2I routing, ComiRec's
self-attention, ...), joins each capsule with the user's profile embedding through two
ReLU layers, and trains with label-aware attention over the interests against the target
item and a sampled softmax (shared negatives, log-Q correction). The number of interests
adapts to the history (MIND): K'_u = max(1, min(K, floor(log2 |history|))).

Two training remedies of REMI (Xie et al., RecSys 2023, arXiv:2302.14532) act here, on
every extractor: interest-aware hard negatives (`hard_negatives`, beta: the sampled
negatives reweighted by exp(beta * logit)) and routing regularisation (`peak_penalty`,
lambda: a penalty on interests whose behaviour weights peak on a few behaviours). The
penalty only trains what its weights depend on: MIND's routing weights carry no gradient
unless `routing_grad` lets it through (mind.py).

Shapes: B batch, L history length, K interests, D dimension, N items, S sampled negatives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.layers import (
    PooledEmbedding,
    best_interest_softmax_loss,
    encode_distinct,
    label_aware_attention,
    mlp,
    peak_penalty,
    sampled_softmax_loss,
)

UNIQUE_FROM = 1024  # item_embed encodes distinct ids once from this many ids on (a sort pays off)


@dataclass
class Batch:
    """Model input; tensors on one device."""

    history: Tensor  # (B, L) int64 item indices, left-aligned, 0-padded
    mask: Tensor  # (B, L) bool, True on real behaviours
    user_features: dict[str, Tensor]  # field -> (B, M) int64 value ids, 0-padded
    target: Tensor | None = None  # (B,) int64 next item (training only)


@dataclass
class Interests:
    """What an interest extractor makes of a batch of histories; every retriever returns it."""

    vectors: Tensor  # (B, K, D) interest vectors, zero where not active
    active: Tensor  # (B, K) bool, the interests in use (K'_u of them, the first ones)
    mass: Tensor  # (B, K) share of the behaviours each interest holds (rows sum to 1 over active ones)
    weights: Tensor  # (B, K, L) behaviour l's weight in interest k, zero on padding and inactive interests;
    # for routing the coupling coefficients (each behaviour's weights sum to 1 over interests),
    # for self-attention the attention (each interest's weights sum to 1 over behaviours)


@dataclass
class InterestConfig:
    """Settings every extractor shares; an extractor's config adds its own fields."""

    n_items: int  # N: item indices run 1..N, 0 is padding
    item_feature_sizes: dict[str, int] = field(default_factory=dict)  # item side field -> vocabulary size
    user_feature_sizes: dict[str, int] = field(default_factory=dict)  # profile field -> vocabulary size
    dim: int = 64  # D: item and interest vector size
    interests: int = 4  # K: most interest capsules per user
    max_len: int = 50  # L: behaviours fed to the extractor (the most recent ones)
    dynamic_interests: bool = True  # K'_u = max(1, min(K, log2 |history|)); False keeps all K
    profile_dim: int = 16  # embedding size of each profile field
    hidden: int = 256  # width of the first of the two ReLU layers after the capsules
    head_relu: bool = True  # a ReLU after the head's last layer too (the paper); False lets interests be signed
    dropout: float = 0.0  # dropout on the behaviour embeddings the extractor reads (training only)
    positions: bool = False  # learned recency embeddings (0 = the most recent behaviour) for the extractor to read
    attention: Literal["power", "hard", "max"] = "hard"  # label-aware attention: argmax, softmax(s^p), or
    # "max": every candidate (target and negatives) scored by its best interest, as the best-score merge serves
    # (MIND's default, MINDConfig; "hard" stays ComiRec-SA's, where "max" was not measured)
    pow: float = 2.0  # p of the label-aware attention: 0 = mean of interests, large = near hard
    sparse: bool = True  # sparse embedding gradients: a step costs O(batch), not O(vocabulary)
    seed: int = 0  # seeds the initialisation (and MIND's fixed routing draw at inference)
    hard_negatives: float = 0.0  # REMI's beta: negatives reweighted by exp(beta * logit); 0 = plain sampled softmax
    peak_penalty: float = 0.0  # REMI's lambda: routing regularisation on interests peaked on few behaviours

    def to_dict(self) -> dict:
        return asdict(self)


def recency(mask: Tensor) -> Tensor:
    """(B, L) int64 recency of each slot of left-aligned histories: 0 for the most recent real
    behaviour, n - 1 for the oldest; 0 on padding."""
    n = mask.sum(1, keepdim=True)  # (B, 1)
    slot = torch.arange(mask.shape[1], device=mask.device)[None, :]  # (1, L)
    return (n - 1 - slot).clamp(min=0) * mask


def interest_count(lengths: Tensor, k: int) -> Tensor:
    """K'_u = max(1, min(K, floor(log2 n))) for history lengths n >= 1."""
    n = lengths.clamp(min=1).to(torch.float64)
    return torch.floor(torch.log2(n)).to(torch.int64).clamp(min=1, max=k)


class InterestModel(nn.Module):
    """The item tower, the profile, the head and the training loss of a multi-interest retriever.

    A subclass builds its own parameters, initialises the embeddings with
    `reset_embeddings(generator)` and implements `extract(low, mask, active)`."""

    config: InterestConfig

    def __init__(self, config: InterestConfig, item_features: dict[str, Tensor] | None = None):
        super().__init__()
        c = self.config = config
        self.item_id = nn.Embedding(c.n_items + 1, c.dim, padding_idx=0, sparse=c.sparse)
        self.item_fields = nn.ModuleDict(
            {f: PooledEmbedding(n, c.dim, sparse=c.sparse) for f, n in c.item_feature_sizes.items()}
        )
        for f in c.item_feature_sizes:  # (N+1, M) value ids per item, part of the state
            table = item_features[f] if item_features else torch.zeros(c.n_items + 1, 1, dtype=torch.long)
            self.register_buffer(f"item_feat_{f}", table.long())
        self.user_fields = nn.ModuleDict(
            {f: PooledEmbedding(n, c.profile_dim, sparse=c.sparse) for f, n in c.user_feature_sizes.items()}
        )
        profile = c.profile_dim * len(c.user_feature_sizes)
        self.head = mlp([c.dim + profile, c.hidden, c.dim], final_activation=c.head_relu)
        # by recency, so the same slot means the same thing for a history of any length
        self.position = nn.Parameter(torch.zeros(c.max_len, c.dim)) if c.positions else None

    def reset_embeddings(self, g: torch.Generator) -> None:
        """Item, profile and recency embeddings ~ N(0, 1/D) from `g`, padding rows zero."""
        std = self.config.dim**-0.5
        with torch.no_grad():
            for emb in [self.item_id, *(m.emb for m in self.item_fields.values()),
                        *(m.emb for m in self.user_fields.values())]:
                emb.weight.normal_(0, std, generator=g)
                emb.weight[0] = 0
            if self.position is not None:
                self.position.normal_(0, std, generator=g)

    def recency_embedding(self, mask: Tensor) -> Tensor | None:
        """(B, L, D) the recency embedding of each real behaviour (zero on padding), None without positions."""
        if self.position is None:
            return None
        return self.position[recency(mask)] * mask.unsqueeze(-1)

    def extract(self, low: Tensor, mask: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Behaviour embeddings low (B, L, D), real behaviours mask (B, L), interests in use
        active (B, K) -> capsules (B, K, D) zero where inactive, mass (B, K), weights (B, K, L)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ items

    def item_embed(self, ids: Tensor) -> Tensor:
        """Item representation (..., D): id embedding and side-feature embeddings, mean-pooled.
        The same representation serves behaviours, targets and the index.

        A large call (a training batch's histories) encodes each distinct item once and
        gathers: pooling the side features per slot, and the sparse gradient rows it makes,
        cost far more than one sort. The values are the same either way."""
        if ids.numel() >= UNIQUE_FROM and self.item_fields:
            return encode_distinct(self._item_embed, ids)
        return self._item_embed(ids)

    def _item_embed(self, ids: Tensor) -> Tensor:
        parts = [self.item_id(ids)]
        for f, field_emb in self.item_fields.items():
            parts.append(field_emb(getattr(self, f"item_feat_{f}")[ids]))
        e = torch.stack(parts, 0).mean(0)
        return e * (ids != 0).unsqueeze(-1)  # padding stays exactly zero

    def item_vectors(self, chunk: int = 65536) -> Tensor:
        """(N, D) vectors of items 1..N, row i for item i+1."""
        ids = torch.arange(1, self.config.n_items + 1, device=self.item_id.weight.device)
        return torch.cat([self.item_embed(ids[i : i + chunk]) for i in range(0, len(ids), chunk)])

    # ------------------------------------------------------------------ users

    def profile(self, user_features: dict[str, Tensor], batch: int) -> Tensor:
        """(B, P) concatenated profile-field embeddings (P = 0 without a profile)."""
        if not self.user_fields:
            return self.item_id.weight.new_zeros(batch, 0)
        return torch.cat([m(user_features[f]) for f, m in self.user_fields.items()], dim=-1)

    def user_vectors(self, batch: Batch) -> Interests:
        """Interest vectors (B, K, D), which are active (B, K), their mass (B, K) and each
        behaviour's weight in each interest (B, K, L); inactive rows are zero."""
        c = self.config
        hist, mask = batch.history[:, : c.max_len], batch.mask[:, : c.max_len]
        B = hist.shape[0]
        lengths = mask.sum(1)  # (B,)
        k_used = interest_count(lengths, c.interests) if c.dynamic_interests else torch.full_like(lengths, c.interests)
        active = torch.arange(c.interests, device=hist.device)[None, :] < k_used[:, None]  # (B, K)
        low = self.item_embed(hist)  # (B, L, D)
        if c.dropout and self.training:
            low = F.dropout(low, c.dropout, training=True)
        caps, mass, weights = self.extract(low, mask, active)  # (B, K, D), (B, K), (B, K, L)
        prof = self.profile(batch.user_features, B)  # (B, P)
        x = torch.cat([caps, prof[:, None, :].expand(-1, c.interests, -1)], dim=-1)  # (B, K, D+P)
        vectors = self.head(x) * active.unsqueeze(-1)  # (B, K, D)
        return Interests(vectors, active, mass, weights)

    # ------------------------------------------------------------------ training

    def loss(self, batch: Batch, neg: Tensor, log_q: Tensor) -> Tensor:
        """Sampled-softmax loss of the label-aware user vector against the target, with REMI's
        hard-negative weighting (beta) and routing regularisation (lambda) when set."""
        c = self.config
        it = self.user_vectors(batch)
        pos_emb, neg_emb = self.item_embed(batch.target), self.item_embed(neg)  # (B, D), (S, D)
        if c.attention == "max":
            loss = best_interest_softmax_loss(it.vectors, it.active, batch.target, pos_emb, neg, neg_emb, log_q,
                                              c.hard_negatives)
        else:
            user = label_aware_attention(it.vectors, it.active, pos_emb, c.pow, hard=c.attention == "hard")
            loss = sampled_softmax_loss(user, batch.target, pos_emb, neg, neg_emb, log_q, c.hard_negatives)
        if c.peak_penalty:
            loss = loss + c.peak_penalty * peak_penalty(it.weights, batch.mask[:, : c.max_len], it.active)
        return loss
