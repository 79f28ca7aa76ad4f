"""Base model (Embedding & MLP) of DIN: Zhou et al., "Deep Interest Network for Click-Through
Rate Prediction", KDD 2018 (arXiv:1706.06978), section 4.2 and Fig. 2 (left).

Every behaviour is embedded like an item (id ⊕ side features), the history is sum-pooled
into one fixed-length vector whatever the candidate, and

    logit = MLP([Σ_l e_l ⊕ e_candidate ⊕ profile])

with the MLP's activation `config.act` (the paper: PReLU, Dice in its ablation). This is the
baseline DIN improves on: the user vector does not depend on the candidate.

loss = BCE-with-logits + config.l2 × DIN's mini-batch-aware L2 (section 5.1) on the item
tables (rows of the items and feature values in the batch, each over its training frequency,
see `set_frequencies`).

Shapes: B batch, L history length, D = dim * (1 + F) item representation.
"""

from __future__ import annotations

from torch import Tensor

from retrieval.layers import act_mlp
from retrieval.ranking.common import ClickModel, RankBatch, RankerConfig


class EmbeddingMLP(ClickModel):
    """DIN's Base model: sum-pooled history ⊕ candidate ⊕ profile -> MLP -> one logit."""

    def __init__(self, config: RankerConfig, item_features: dict[str, Tensor] | None = None):
        super().__init__(config, item_features)
        D = self.items.out_dim
        self.mlp = act_mlp(2 * D + self.profile.out_dim, config.hidden, config.act)


    def score(self, batch: RankBatch) -> Tensor:
        """Click logits (B,)."""
        history = batch.history.masked_fill(~batch.mask, 0)  # (H, L), padding -> item 0 (H = B without rows)
        pooled = self.items(history).sum(1)  # (H, D): each history once
        if batch.rows is not None:
            pooled = pooled.index_select(0, batch.rows)  # (B, D)
        cand = self.items(batch.candidate)  # (B, D)
        return self.mlp_logit([pooled, cand], batch)

    def losses(self, batch: RankBatch) -> dict[str, Tensor]:
        """{"total", "bce", "l2"}, each (); total = bce + config.l2 × l2."""
        return self.click_losses(self.score(batch), batch, [batch.history.masked_fill(~batch.mask, 0), batch.candidate])
