"""ComiRec-SA: the self-attentive multi-interest extractor of ComiRec (Cen et al., KDD 2020, arXiv:2005.09347).

K attention heads read the behaviour sequence: A = softmax_L(W2 tanh(W1 (H + P))), each
row of A (B, K, L) a distribution over the real behaviours, and the K interests are A H,
weighted sums of the behaviour embeddings H. Unlike B2I routing the weights are learned
end to end, so REMI's routing regularisation (`peak_penalty`) acts on them directly.
P are learned position embeddings (ComiRec's add_pos); here a behaviour's position is
its recency (0 = the most recent), so the same slot means the same thing for a history of
any length. Everything else (item tower, dynamic interest count, profile head,
label-aware attention, sampled softmax) is shared with MIND (interests.py).

Shapes: B batch, L history length, K interests, D dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from retrieval.interests import InterestConfig, InterestModel
from retrieval.layers import masked_softmax


@dataclass
class ComiRecConfig(InterestConfig):
    attention_hidden: int = 0  # d_a, width of the attention's tanh layer; 0 = 4 D (ComiRec's code)
    positions: bool = True  # learned recency embeddings added to the behaviours the attention reads (add_pos)


class ComiRecSA(InterestModel):
    config: ComiRecConfig

    def __init__(self, config: ComiRecConfig, item_features: dict[str, Tensor] | None = None):
        super().__init__(config, item_features)
        c = config
        d_a = c.attention_hidden or 4 * c.dim
        self.W1 = nn.Linear(c.dim, d_a, bias=False)
        self.W2 = nn.Linear(d_a, c.interests, bias=False)
        self.reset_embeddings(torch.Generator().manual_seed(c.seed))

    def extract(self, low: Tensor, mask: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention of the behaviours into capsules (B, K, D), their mass (B, K): the
        share of each behaviour's attention that goes to each interest, averaged over the
        real behaviours; and the attention (B, K, L), each active row summing to 1."""
        pos = self.recency_embedding(mask)  # (B, L, D) or None
        keys = low if pos is None else low + pos
        logits = self.W2(torch.tanh(self.W1(keys))).transpose(1, 2)  # (B, K, L)
        A = masked_softmax(logits, mask[:, None, :], dim=2) * active[:, :, None]  # (B, K, L)
        caps = A @ low  # (B, K, D), zero where inactive
        share = A / A.sum(1, keepdim=True).clamp(min=1e-12)  # (B, K, L) each behaviour's split over interests
        mass = share.sum(-1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, K)
        return caps, mass, A
