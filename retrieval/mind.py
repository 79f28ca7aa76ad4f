"""MIND: Multi-Interest Network with Dynamic Routing (Li et al., CIKM 2019, arXiv:1904.08030).

A user's behaviour sequence becomes K interest vectors by behaviour-to-interest (B2I)
dynamic routing: one shared bilinear map S turns each behaviour embedding into a
low-level capsule, routing logits are drawn from N(0, sigma^2) (never learned), and
`routing_iters` rounds of softmax-over-interests, weighted sums and squash move each
behaviour toward the interests it agrees with. The number of interests adapts to the
history: K'_u = max(1, min(K, floor(log2 |history|))). Each interest is joined with
the user's profile embedding and passed through two ReLU layers. Training uses
label-aware attention (power p) over the interests against the target item and a
sampled softmax with shared negatives and log-Q correction.

Shapes: B batch, L history length, K interests, D dimension, N items, S sampled negatives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.errors import ConfigError
from retrieval.layers import PooledEmbedding, encode_distinct, masked_softmax, mlp, squash

UNIQUE_FROM = 1024  # item_embed encodes distinct ids once from this many ids on (a sort pays off)


@dataclass
class MINDConfig:
    n_items: int  # N: item indices run 1..N, 0 is padding
    item_feature_sizes: dict[str, int] = field(default_factory=dict)  # item side field -> vocabulary size
    user_feature_sizes: dict[str, int] = field(default_factory=dict)  # profile field -> vocabulary size
    dim: int = 64  # D: item and interest vector size
    interests: int = 4  # K: most interest capsules per user
    max_len: int = 50  # L: behaviours fed to the routing (the most recent ones)
    routing_iters: int = 3  # rounds of B2I dynamic routing
    routing_sigma: float = 1.0  # std of the random routing-logit initialisation
    s_init_std: float = 1.0  # init std of S: large enough that agreement, not the random draw, drives routing
    dynamic_interests: bool = True  # K'_u = max(1, min(K, log2 |history|)); False keeps all K
    profile_dim: int = 16  # embedding size of each profile field
    hidden: int = 256  # width of the first of the two ReLU layers after the capsules
    attention: Literal["power", "hard"] = "hard"  # label-aware attention: argmax (best on validation) or softmax(s^p)
    pow: float = 2.0  # p of the label-aware attention: 0 = mean of interests, large = near hard
    sparse: bool = True  # sparse embedding gradients: a step costs O(batch), not O(vocabulary)
    seed: int = 0  # seeds the fixed routing initialisation used at inference

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Interests:
    """What an interest extractor makes of a batch of histories; every retriever returns it."""

    vectors: Tensor  # (B, K, D) interest vectors, zero where not active
    active: Tensor  # (B, K) bool, the interests in use (K'_u of them, the first ones)
    mass: Tensor  # (B, K) share of the behaviours each interest holds (rows sum to 1 over active ones)
    weights: Tensor  # (B, K, L) behaviour l's weight in interest k, zero on padding and inactive interests;
    # for routing the coupling coefficients (each behaviour's weights sum to 1 over interests)


@dataclass
class Batch:
    """Model input; tensors on one device."""

    history: Tensor  # (B, L) int64 item indices, left-aligned, 0-padded
    mask: Tensor  # (B, L) bool, True on real behaviours
    user_features: dict[str, Tensor]  # field -> (B, M) int64 value ids, 0-padded
    target: Tensor | None = None  # (B,) int64 next item (training only)


def interest_count(lengths: Tensor, k: int) -> Tensor:
    """K'_u = max(1, min(K, floor(log2 n))) for history lengths n >= 1."""
    n = lengths.clamp(min=1).to(torch.float64)
    return torch.floor(torch.log2(n)).to(torch.int64).clamp(min=1, max=k)


def b2i_routing(
    low: Tensor, mask: Tensor, S: Tensor, active: Tensor, init_logits: Tensor, iters: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Behaviour-to-interest dynamic routing (MIND, Algorithm 1).

    low (B, L, D) behaviour embeddings; mask (B, L) real behaviours; S (D, D) the shared
    bilinear map; active (B, K) interests in use; init_logits (B, K, L) random logits.
    Returns squashed interest capsules (B, K, D), zero where not active, each interest's
    routing mass (B, K): the share of the behaviours routed to it (rows sum to 1), and the
    last round's coupling coefficients (B, K, L), detached: how much of each behaviour went
    to each interest (zero on padding and inactive interests).

    The logits carry no gradient: they start from a random draw and are updated from
    detached capsules; only the last round's weighted sum back-propagates, into S and
    the behaviour embeddings.
    """
    u_hat = low @ S  # (B, L, D)
    u_hat_fixed = u_hat.detach()
    b = init_logits.detach()  # (B, K, L)
    behaviour = mask[:, None, :]  # (B, 1, L)
    interest = active[:, :, None]  # (B, K, 1)
    if iters < 1:
        raise ValueError(f"routing needs at least one iteration, got {iters}")
    for it in range(iters):
        # softmax over interests (at least one is active, K' >= 1), padded behaviours take no part
        w = torch.softmax(b.masked_fill(~interest, float("-inf")), dim=1) * behaviour  # (B, K, L)
        last = it == iters - 1
        z = w @ (u_hat if last else u_hat_fixed)  # (B, K, D)
        caps = squash(z)
        if not last:
            b = b + caps @ u_hat_fixed.transpose(1, 2)  # (B, K, L) agreement
    w = w.detach()
    mass = w.sum(-1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, K)
    return caps * interest, mass, w * interest


def label_aware_attention(
    interests: Tensor, active: Tensor, target: Tensor, pow: float, hard: bool = False
) -> Tensor:
    """One user vector per sample: interests (B, K, D) weighted by their match with target (B, D).

    Weights are softmax(sign(s) |s|^p) over the active interests, s = <interest, target>:
    p = 0 gives the mean, large p approaches the argmax, `hard` takes the argmax.
    """
    s = (interests @ target.unsqueeze(-1)).squeeze(-1)  # (B, K)
    if hard:
        best = s.masked_fill(~active, float("-inf")).argmax(dim=1)  # (B,)
        return interests[torch.arange(len(best), device=best.device), best]
    if pow == 0:
        w = active.to(interests.dtype) / active.sum(1, keepdim=True).clamp(min=1)
    else:
        w = masked_softmax(torch.sign(s) * s.abs().pow(pow), active, dim=1)  # (B, K)
    return (w.unsqueeze(-1) * interests).sum(1)  # (B, D)


def sampled_softmax_loss(
    user: Tensor, pos: Tensor, pos_emb: Tensor, neg: Tensor, neg_emb: Tensor, log_q: Tensor
) -> Tensor:
    """Sampled softmax with negatives shared across the batch and log-Q correction.

    user (B, D); pos (B,) target ids with embeddings pos_emb (B, D); neg (S,) sampled ids
    with neg_emb (S, D); log_q (N+1,) log expected count of each id in a draw of S.
    A sampled id equal to the row's target (an accidental hit) is masked out.
    """
    pos_logit = (user * pos_emb).sum(-1) - log_q[pos]  # (B,)
    neg_logit = user @ neg_emb.T - log_q[neg]  # (B, S)
    neg_logit = neg_logit.masked_fill(neg[None, :] == pos[:, None], float("-inf"))
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)  # (B, 1 + S)
    return F.cross_entropy(logits, torch.zeros_like(pos))


class MIND(nn.Module):
    def __init__(self, config: MINDConfig, item_features: dict[str, Tensor] | None = None):
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
        self.S = nn.Parameter(torch.empty(c.dim, c.dim))  # shared bilinear map
        self.head = mlp([c.dim + profile, c.hidden, c.dim], final_activation=True)
        g = torch.Generator().manual_seed(c.seed)
        self.register_buffer("routing_init", torch.randn(c.interests, c.max_len, generator=g) * c.routing_sigma)
        self._reset(g)

    def _reset(self, g: torch.Generator) -> None:
        std = self.config.dim**-0.5
        with torch.no_grad():
            for emb in [self.item_id, *(m.emb for m in self.item_fields.values())]:
                emb.weight.normal_(0, std, generator=g)
                emb.weight[0] = 0
            for m in self.user_fields.values():
                m.emb.weight.normal_(0, std, generator=g)
                m.emb.weight[0] = 0
            self.S.normal_(0, self.config.s_init_std, generator=g)

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
        ids = torch.arange(1, self.config.n_items + 1, device=self.S.device)
        return torch.cat([self.item_embed(ids[i : i + chunk]) for i in range(0, len(ids), chunk)])

    # ------------------------------------------------------------------ users

    def profile(self, user_features: dict[str, Tensor], batch: int) -> Tensor:
        """(B, P) concatenated profile-field embeddings (P = 0 without a profile)."""
        if not self.user_fields:
            return self.S.new_zeros(batch, 0)
        return torch.cat([m(user_features[f]) for f, m in self.user_fields.items()], dim=-1)

    def user_vectors(self, batch: Batch) -> Interests:
        """Interest vectors (B, K, D), which are active (B, K), their routing mass (B, K) and
        each behaviour's coupling to each interest (B, K, L); inactive rows are zero.

        In training mode the routing logits are drawn afresh; in eval mode they come from
        a fixed draw, so a user always gets the same interests."""
        c = self.config
        hist, mask = batch.history[:, : c.max_len], batch.mask[:, : c.max_len]
        B, L = hist.shape
        lengths = mask.sum(1)  # (B,)
        k_used = interest_count(lengths, c.interests) if c.dynamic_interests else torch.full_like(lengths, c.interests)
        active = torch.arange(c.interests, device=hist.device)[None, :] < k_used[:, None]  # (B, K)
        if self.training:
            init = torch.randn(B, c.interests, L, device=hist.device) * c.routing_sigma
        else:
            init = self.routing_init[None, :, :L].expand(B, -1, -1)
        low = self.item_embed(hist)  # (B, L, D)
        caps, mass, weights = b2i_routing(low, mask, self.S, active, init, c.routing_iters)  # (B, K, D), (B, K), (B, K, L)
        prof = self.profile(batch.user_features, B)  # (B, P)
        x = torch.cat([caps, prof[:, None, :].expand(-1, c.interests, -1)], dim=-1)  # (B, K, D+P)
        vectors = self.head(x) * active.unsqueeze(-1)  # (B, K, D)
        return Interests(vectors, active, mass, weights)

    # ------------------------------------------------------------------ training

    def loss(self, batch: Batch, neg: Tensor, log_q: Tensor) -> Tensor:
        """Sampled-softmax loss of the label-aware user vector against the target."""
        c = self.config
        it = self.user_vectors(batch)
        pos_emb = self.item_embed(batch.target)  # (B, D)
        user = label_aware_attention(it.vectors, it.active, pos_emb, c.pow, hard=c.attention == "hard")
        return sampled_softmax_loss(user, batch.target, pos_emb, neg, self.item_embed(neg), log_q)


def log_expected_counts(freq: Tensor, num_neg: int, alpha: float) -> tuple[Tensor, Tensor]:
    """Sampling distribution q ∝ (freq + 1)^alpha over items 1..N (0 never drawn) and
    log(S * q), the log-Q correction for a draw of S negatives. alpha = 0 is uniform."""
    w = (freq.to(torch.float64) + 1.0).pow(alpha)
    w[0] = 0.0
    q = w / w.sum()
    if not math.isfinite(alpha) or not bool(torch.isfinite(q).all()):
        raise ConfigError(f"negatives drawn with neg_alpha={alpha} have no usable distribution "
                          "(the item weights overflow); use a value such as 0, 0.75 or 1")
    log_q = torch.log(q * num_neg).to(torch.float32)
    log_q[0] = 0.0
    return q.to(torch.float32), log_q

