"""MIND: Multi-Interest Network with Dynamic Routing (Li et al., CIKM 2019, arXiv:1904.08030).

A user's behaviour sequence becomes K interest vectors by behaviour-to-interest (B2I)
dynamic routing: one shared bilinear map S turns each behaviour embedding into a
low-level capsule, routing logits are drawn from N(0, sigma^2) (never learned), and
`routing_iters` rounds of softmax-over-interests, weighted sums and squash move each
behaviour toward the interests it agrees with. The item tower, the dynamic interest
count, the profile head, label-aware attention and the sampled softmax are shared by
every extractor (interests.py). With `positions`, each behaviour's learned recency
embedding is added to it before the routing (not in the paper), so order can shape the interests.

Training reads the interests with the best-interest softmax by default (`attention="max"`):
the target and every sampled negative are scored by their best interest, as the best-score
merge serves them. It departs from the paper, whose label-aware attention picks the interest
nearest the target alone (`attention="hard"`, p -> infinity) or mixes them (`"power"`); on
validation users it was the one change that lifted K=4 to or above K=1 on both real logs.

`routing_grad` departs from the paper: the routing logits are then updated from capsules
that keep their gradient, so the coupling coefficients (and REMI's penalty on them) train
S and the behaviour embeddings. In the paper, and by default, they carry no gradient.

Shapes: B batch, L history length, K interests, D dimension, N items, S sampled negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from retrieval.errors import ConfigError
from retrieval.interests import Batch, InterestConfig, InterestModel, Interests, interest_count
from retrieval.layers import squash

__all__ = ["MIND", "MINDConfig", "Batch", "Interests", "interest_count", "b2i_routing", "log_expected_counts"]


@dataclass
class MINDConfig(InterestConfig):
    # MIND trains with the best-interest softmax: the only setting that lifted K=4 to or above K=1 on
    # validation users of both real logs (ML-100K, Amazon Beauty; README). "hard" is the paper's p -> infinity.
    attention: Literal["power", "hard", "max"] = "max"
    routing_iters: int = 3  # rounds of B2I dynamic routing
    routing_sigma: float = 1.0  # std of the random routing-logit initialisation
    s_init_std: float = 1.0  # init std of S: large enough that agreement, not the random draw, drives routing
    routing_grad: bool = False  # not in the paper: gradients flow through the routing logits (REMI's penalty acts)


def b2i_routing(
    low: Tensor, mask: Tensor, S: Tensor, active: Tensor, init_logits: Tensor, iters: int, grad: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Behaviour-to-interest dynamic routing (MIND, Algorithm 1).

    low (B, L, D) behaviour embeddings; mask (B, L) real behaviours; S (D, D) the shared
    bilinear map; active (B, K) interests in use; init_logits (B, K, L) random logits.
    Returns squashed interest capsules (B, K, D), zero where not active, each interest's
    routing mass (B, K): the share of the behaviours routed to it (rows sum to 1), and the
    last round's coupling coefficients (B, K, L): how much of each behaviour went to each
    interest (zero on padding and inactive interests).

    As in the paper the logits carry no gradient: they start from a random draw and are
    updated from detached capsules; only the last round's weighted sum back-propagates,
    into S and the behaviour embeddings, and the couplings come back detached. With
    `grad` (not in the paper) the logits are updated from the capsules themselves, so the
    couplings and everything computed from them back-propagate too.
    """
    u_hat = low @ S  # (B, L, D)
    u_hat_fixed = u_hat if grad else u_hat.detach()
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
    if not grad:
        w = w.detach()
    mass = w.sum(-1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, K)
    return caps * interest, mass, w * interest


class MIND(InterestModel):
    config: MINDConfig

    def __init__(self, config: MINDConfig, item_features: dict[str, Tensor] | None = None):
        super().__init__(config, item_features)
        c = config
        self.S = nn.Parameter(torch.empty(c.dim, c.dim))  # shared bilinear map
        g = torch.Generator().manual_seed(c.seed)
        self.register_buffer("routing_init", torch.randn(c.interests, c.max_len, generator=g) * c.routing_sigma)
        self.reset_embeddings(g)
        with torch.no_grad():
            self.S.normal_(0, c.s_init_std, generator=g)

    def extract(self, low: Tensor, mask: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """B2I routing of the behaviours into capsules (B, K, D), their mass (B, K) and the
        coupling coefficients (B, K, L).

        In training mode the routing logits are drawn afresh; in eval mode they come from
        a fixed draw, so a user always gets the same interests."""
        c = self.config
        B, L, _ = low.shape
        pos = self.recency_embedding(mask)  # (B, L, D) or None: behaviours carry their recency into the routing
        if pos is not None:
            low = low + pos
        if self.training:
            init = torch.randn(B, c.interests, L, device=low.device) * c.routing_sigma
        else:
            init = self.routing_init[None, :, :L].expand(B, -1, -1)
        return b2i_routing(low, mask, self.S, active, init, c.routing_iters, grad=c.routing_grad)


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
