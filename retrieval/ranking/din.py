"""DIN: Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018
(arXiv:1706.06978).

The user's interest is pooled from the behaviours with weights that depend on the candidate
(section 4.3, eq. 3, Fig. 2 right):

    v_U(A) = Σ_l a(e_l, v_A) e_l,   a = MLP([e_l, v_A, e_l - v_A, e_l ⊙ v_A]) -> 1

The local activation unit's weights are NOT softmax-normalised: "normalization with softmax
on the output of a(·) is abandoned ... to reserve the intensity of user interests", so a
user who clicked many related items gets a larger interest vector. Padded behaviours weigh
exactly 0. Then

    logit = MLP([v_U(A) ⊕ v_A ⊕ profile])

with Dice (section 5.2) or PReLU activations in the final MLP (`config.act`) and in the
activation unit (`config.att_act`; Fig. 2 draws PReLU/Dice there, the authors' code uses
sigmoid, also accepted).

Training: loss = BCE-with-logits + config.l2 × the mini-batch-aware L2 (section 5.1),
Σ over the item tables and the rows j that occur in the batch (history and candidate items,
and their feature values) of ||w_j||² / n_j, n_j = the row's training frequency. Give the
frequencies with `set_frequencies` before training with l2 > 0 (all 1 until then: plain L2
on the rows in the batch).

Shapes: B batch, L history length, D = dim * (1 + F) item representation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from retrieval.layers import ActivationUnit, act_mlp, gather_rows
from retrieval.ranking.common import ClickModel, RankBatch, RankerConfig


@dataclass
class DINConfig(RankerConfig):
    """RankerConfig plus the local activation unit."""

    att_hidden: tuple[int, ...] = (80, 40)  # activation-unit MLP widths (the authors' code: 80, 40)
    att_act: str = "dice"  # activation inside the activation unit: dice, prelu, relu or sigmoid


class DIN(ClickModel):
    """Deep Interest Network: candidate-activated sum of behaviours -> MLP -> one logit."""

    def __init__(self, config: DINConfig, item_features: dict[str, Tensor] | None = None):
        super().__init__(config, item_features)
        D = self.items.out_dim
        self.attention = ActivationUnit(D, config.att_hidden, config.att_act)
        self.mlp = act_mlp(2 * D + self.profile.out_dim, config.hidden, config.act)


    def interest(self, batch: RankBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Candidate-activated interest (B, D), activation weights (B, L) (0 on padding, not
        normalised), candidate representation (B, D).

        Scoring many candidates of one history (batch.rows, eval mode: validation, evaluation and
        serving's rerank, all through `scoring.score_pairs`) takes the unit's shared-history path:
        each history's behaviours are encoded once and never copied per candidate."""
        if batch.rows is not None and not self.training:
            history = batch.history.masked_fill(~batch.mask, 0)  # (H, L) distinct histories
            rows, inverse = self.items.distinct(history)  # (U, D), (H, L)
            e = gather_rows(rows, inverse)  # (H, L, D)
            key_term = gather_rows(self.attention.key_term(rows), inverse)  # (H, L, H1)
            cand = self.items(batch.candidate)  # (B, D)
            pooled, w = self.attention.pool_shared(e, cand, batch.mask, batch.rows, key_term)  # (B, D), (B, L)
            return pooled, w, cand
        batch = batch.per_row()
        history = batch.history.masked_fill(~batch.mask, 0)  # (B, L), padding -> item 0
        rows, inverse = self.items.distinct(history)  # (U, D) each distinct behaviour once, (B, L)
        e = gather_rows(rows, inverse)  # (B, L, D), zero on padding
        key_term = gather_rows(self.attention.key_term(rows), inverse)  # (B, L, H1) per distinct item, gathered
        cand = self.items(batch.candidate)  # (B, D)
        pooled, w = self.attention(e, cand, batch.mask, key_term)  # (B, D), (B, L)
        return pooled, w, cand

    def score(self, batch: RankBatch) -> Tensor:
        """Click logits (B,)."""
        pooled, _, cand = self.interest(batch)
        return self.mlp_logit([pooled, cand], batch)

    def losses(self, batch: RankBatch) -> dict[str, Tensor]:
        """{"total", "bce", "l2"}, each (); total = bce + config.l2 × l2 (l2 = 0 when config.l2 = 0)."""
        return self.click_losses(self.score(batch), batch, [batch.history.masked_fill(~batch.mask, 0), batch.candidate])
