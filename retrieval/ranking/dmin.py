"""DMIN: Xiao, Yang, Jiang, Wei, Hu, Wang, "Deep Multi-Interest Network for Click-through Rate
Prediction", CIKM 2020 (doi:10.1145/3340531.3412092); reference implementation
github.com/mengxiaozhibo/DMIN (TensorFlow, on the DIEN code base).

1. Behaviour Refiner Layer: H_R-head self-attention over the behaviour embeddings e_1..e_L
   gives refined behaviours z_1..z_L. As in the reference code: Q, K, V projections,
   scaled dot-product attention, output projection, residual + LayerNorm, then a
   position-wise FFN (D -> 2D ReLU -> D) with a residual (no second LayerNorm).
2. Auxiliary loss (DIEN's, applied by the paper to the refiner): z_t must tell the next clicked
   behaviour e_{t+1} from a sampled non-clicked item ê_{t+1} (batch.neg_history):
       L_aux = mean over t with behaviours t and t+1 both real of
               -[log σ(z_t · e_{t+1}) + log(1 - σ(z_t · ê_{t+1}))].
   z_t lives in the item space (D), so no projection is needed.
3. Multi-Interest Extractor Layer: H_E-head self-attention over z; each head h keeps its
   own output (no merging): per head an output projection d_h -> D, residual with z +
   LayerNorm, and an FFN with residual give I_h (B, L, D). One DIN-style attention unit per
   head against the candidate x_t with a learnable position encoding p_j gives one interest
       interest_h = Σ_j w_hj I_hj,   w_hj from MLP([q_j, I_hj, q_j - I_hj, q_j ⊙ I_hj]),
       q_j = W_h [x_t ⊕ p_j].
4. logit = MLP([interest_1 ⊕ .. ⊕ interest_{H_E} ⊕ x_t ⊕ profile]) (Dice by default).
   loss = BCE + aux_weight × L_aux (+ l2 × DIN's mini-batch-aware L2, as in din.py).

Choices where the short paper is ambiguous, each the reference implementation's:
- Both self-attentions are causal (position t attends to behaviours ≤ t; the code's
  lower-triangular key mask). This matters: without it z_t could read e_{t+1} and the
  auxiliary loss would be solved by copying. Keys that are padding are masked too, and each
  position may always attend to itself, so padded or all-padding rows give finite values
  that never reach a real position.
- The position encoding is concatenated to the candidate and projected to D before the
  attention unit (din_attention_new: dense([query ⊕ position])), so the values pooled are
  the head outputs alone. p_j indexes the j-th oldest behaviour (histories are
  left-aligned, oldest first, as in the reference data).
- The unit's weights are softmax-normalised over real behaviours (`att_norm="softmax"`,
  the code's default); `att_norm="none"` keeps DIN's unnormalised weights. The unit's
  hidden activation is sigmoid (80-40), as in the code.
- The aux loss uses the inner product (DIEN paper; the DIEN code uses a small MLP) and is
  averaged over valid positions (the code averages over all, padding counted as 0).
- The final MLP input is interests ⊕ target ⊕ profile; the reference code also feeds
  DIEN's sum-pooled history and its product with the target, left out here.

Shapes: B batch, L history length, D = dim * (1 + F) item representation, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.layers import ActivationUnit, act_mlp, masked_softmax
from retrieval.ranking.common import ClickModel, RankBatch, RankerConfig


@dataclass
class DMINConfig(RankerConfig):
    """RankerConfig plus the refiner, the extractor and the auxiliary loss."""

    refiner_heads: int = 2  # H_R: heads of the behaviour refiner's self-attention (must divide D)
    extractor_heads: int = 4  # H_E: heads of the extractor = number of interests (must divide D)
    aux_weight: float = 1.0  # weight of the auxiliary next-behaviour loss (0 = off; then neg_history is not read)
    position: bool = True  # learnable position encoding (size D) in every extractor attention unit
    att_hidden: tuple[int, ...] = (80, 40)  # attention-unit MLP widths (the reference code: 80, 40)
    att_act: str = "sigmoid"  # attention-unit activation: sigmoid (reference code), dice, prelu or relu
    att_norm: Literal["softmax", "none"] = "softmax"  # softmax over real behaviours (reference code) or DIN's raw


def attention_mask(mask: Tensor) -> Tensor:
    """(B, L) real behaviours -> (B, L, L): True where query i may attend to key j, i.e. j ≤ i
    and j real, or j = i (so no row of the attention is empty)."""
    L = mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()  # (L, L)
    eye = torch.eye(L, dtype=torch.bool, device=mask.device)  # (L, L)
    return (causal & mask.unsqueeze(1)) | eye  # (B, L, L)


def multi_head_attention(x: Tensor, qkv: nn.Linear, heads: int, allowed: Tensor) -> Tensor:
    """Scaled dot-product self-attention per head: x (B, L, D), qkv D -> 3D, allowed (B, L, L)
    -> (B, H, L, D/H), the heads not merged."""
    B, L, D = x.shape
    q, k, v = qkv(x).view(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # 3 × (B, H, L, D/H)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))  # (B, H, L, D/H)


def auxiliary_loss(states: Tensor, clicked: Tensor, sampled: Tensor, mask: Tensor) -> Tensor:
    """DIEN's auxiliary loss: states (B, L, D) z_t; clicked, sampled (B, L, D) embeddings of the
    behaviour and of the sampled non-clicked item at each position; mask (B, L).

    -[log σ(z_t · e_{t+1}) + log(1 - σ(z_t · ê_{t+1}))] averaged over the t where behaviours t
    and t + 1 are both real; 0 when there is no such t. -> ()"""
    z = states[:, :-1]  # (B, L-1, D)
    valid = mask[:, :-1] & mask[:, 1:]  # (B, L-1)
    pos = (z * clicked[:, 1:]).sum(-1)  # (B, L-1)
    neg = (z * sampled[:, 1:]).sum(-1)  # (B, L-1)
    per = -(F.logsigmoid(pos) + F.logsigmoid(-neg))  # (B, L-1)
    return per.masked_fill(~valid, 0.0).sum() / valid.sum().clamp(min=1)


class BehaviourRefiner(nn.Module):
    """z = A + FFN(A), A = LayerNorm(e + W_O [head_1 ⊕ .. ⊕ head_H]) (causal, padding-masked)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, e: Tensor, allowed: Tensor, mask: Tensor) -> Tensor:
        """e (B, L, D), allowed (B, L, L), mask (B, L) -> z (B, L, D), 0 on padding. The layers are
        position-wise and every padded position's attention is finite (it attends to itself), so
        they run on every slot and padding is zeroed after: cheaper than gathering the real ones."""
        B, L, D = e.shape
        h = multi_head_attention(e, self.qkv, self.heads, allowed)  # (B, H_R, L, D/H_R)
        a = self.norm(e + self.out(h.transpose(1, 2).reshape(B, L, D)))  # (B, L, D) heads concatenated
        return (a + self.ffn(a)) * mask.unsqueeze(-1)  # (B, L, D)


class InterestHead(nn.Module):
    """One extractor head after its attention: I = LayerNorm(z + W head), I += FFN(I), then the
    head's attention unit against W_q [candidate ⊕ position] pools I into one interest."""

    def __init__(self, head_dim: int, dim: int, pos_dim: int, config: DMINConfig):
        super().__init__()
        self.out = nn.Linear(head_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.query = nn.Linear(dim + pos_dim, dim)
        self.unit = ActivationUnit(dim, config.att_hidden, config.att_act)
        self.att_norm = config.att_norm

    def attention_query(self, cand: Tensor, position: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """W_q [x_t ⊕ p_j] + b as its two parts: W_c x_t + b per row (B, D) and W_p p_j per
        position (L, D) (None without positions); the query of row b at position j is their sum,
        so the (B, L, D + P) concatenation is never built."""
        D = cand.shape[-1]
        q = F.linear(cand, self.query.weight[:, :D], self.query.bias)  # (B, D)
        if position is None:
            return q, None
        return q, F.linear(position, self.query.weight[:, D:])  # (B, D), (L, D)

    def encode(self, head: Tensor, z: Tensor, mask: Tensor) -> Tensor:
        """The head's candidate-free part: head (H, L, D/H_E), z (H, L, D), mask (H, L) -> I (H, L, D),
        zero on padding (position-wise layers on every slot, padding zeroed after, as in the refiner)."""
        i = self.norm(z + self.out(head))  # (H, L, D)
        return (i + self.ffn(i)) * mask.unsqueeze(-1)  # (H, L, D)

    def pool(self, i: Tensor, cand: Tensor, position: Tensor | None, mask: Tensor,
             key_term: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """i (B, L, D) the head's outputs, cand (B, D), position (L, P) encodings or None, mask
        (B, L), key_term (B, L, H1) the unit's `key_term(i)` or None -> interest (B, D), weights
        (B, L) (0 on padding)."""
        q_row, q_pos = self.attention_query(cand, position)  # (B, D), (L, D) or None
        if q_pos is None:
            query, query_term = q_row, None
        else:  # the unit's query term is linear: per row + per position, never (B, L, D) x (D, H1)
            L = i.shape[1]
            query = q_row.unsqueeze(1) + q_pos[:L].unsqueeze(0)  # (B, L, D)
            query_term = self.unit.query_term(q_row).unsqueeze(1) + self.unit.query_term(q_pos[:L], bias=False)
        interest, w = self.unit(i, query, mask, key_term=key_term, query_term=query_term)  # (B, D), (B, L)
        if self.att_norm == "softmax":
            w = masked_softmax(w, mask, dim=1)  # (B, L)
            interest = (w.unsqueeze(-1) * i).sum(1)  # (B, D)
        return interest, w


class MultiInterestExtractor(nn.Module):
    """H_E-head causal self-attention over z; each head -> `InterestHead` -> one interest."""

    def __init__(self, dim: int, config: DMINConfig):
        super().__init__()
        H = config.extractor_heads
        self.n_heads = H
        self.qkv = nn.Linear(dim, 3 * dim)
        self.position = nn.Embedding(config.max_len, dim) if config.position else None
        pos_dim = dim if config.position else 0
        self.heads = nn.ModuleList([InterestHead(dim // H, dim, pos_dim, config) for _ in range(H)])

    def forward(self, z: Tensor, cand: Tensor, mask: Tensor, allowed: Tensor,
                rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z (H, L, D) refined histories, cand (B, D), mask (H, L), allowed (H, L, L), rows (B,)
        the history of each candidate (None: H = B, one each) -> interests (B, H_E, D), weights
        (B, H_E, L). The self-attention, each head's layers and its unit's behaviour term never
        see the candidate, so they run once per history and are gathered per candidate."""
        L = z.shape[1]
        h = multi_head_attention(z, self.qkv, self.n_heads, allowed)  # (H, H_E, L, D/H_E)
        position = self.position.weight[:L] if self.position is not None else None  # (L, P)
        take = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))  # noqa: E731
        out = []
        for k, head in enumerate(self.heads):
            i = head.encode(h[:, k], z, mask)  # (H, L, D)
            out.append(head.pool(take(i), cand, position, take(mask), key_term=take(head.unit.key_term(i))))
        return torch.stack([o[0] for o in out], 1), torch.stack([o[1] for o in out], 1)


class DMIN(ClickModel):
    """Deep Multi-Interest Network: refiner (+ aux loss) -> H_E interests -> MLP -> one logit."""

    def __init__(self, config: DMINConfig, item_features: dict[str, Tensor] | None = None):
        super().__init__(config, item_features)
        D = self.items.out_dim
        for name, heads in [("refiner_heads", config.refiner_heads), ("extractor_heads", config.extractor_heads)]:
            if heads < 1 or D % heads:
                raise ValueError(f"{name}={heads} must divide the item representation size D={D}")
        if config.att_norm not in ("softmax", "none"):
            raise ValueError(f"att_norm={config.att_norm!r}; use softmax or none")
        self.refiner = BehaviourRefiner(D, config.refiner_heads)
        self.extractor = MultiInterestExtractor(D, config)
        self.mlp = act_mlp((config.extractor_heads + 1) * D + self.profile.out_dim, config.hidden, config.act)


    def _refine(self, batch: RankBatch) -> tuple[Tensor, Tensor, Tensor]:
        """-> behaviour embeddings e (H, L, D), refined behaviours z (H, L, D) (0 on padding) and the
        attention mask (H, L, L) of the H histories the batch holds (shared by `rows` or not)."""
        L = batch.history.shape[1]
        if self.extractor.position is not None and L > self.config.max_len:
            raise ValueError(f"history length {L} exceeds max_len={self.config.max_len} (position table)")
        history = batch.history.masked_fill(~batch.mask, 0)  # (B, L), padding -> item 0
        allowed = attention_mask(batch.mask)  # (B, L, L)
        e = self.items(history)  # (B, L, D), zero on padding
        return e, self.refiner(e, allowed, batch.mask), allowed

    def _logit(self, shared: RankBatch, z: Tensor, allowed: Tensor) -> Tensor:
        """shared: the batch as given (histories shared by `rows` or not), z (H, L, D) and allowed
        (H, L, L) of its histories -> click logits (B,)."""
        cand = self.items(shared.candidate)  # (B, D)
        interests, _ = self.extractor(z, cand, shared.mask, allowed, shared.rows)  # (B, H_E, D)
        return self.mlp_logit([interests.flatten(1), cand], shared)  # (B, H_E * D), (B, D)

    def refine(self, batch: RankBatch) -> Tensor:
        """Refined behaviours z (B, L, D) (0 at padded positions), one history per candidate."""
        z = self._refine(batch)[1]  # (H, L, D)
        return z if batch.rows is None else z.index_select(0, batch.rows)

    def interests(self, batch: RankBatch) -> tuple[Tensor, Tensor]:
        """The H_E candidate-activated interests (B, H_E, D) and their weights (B, H_E, L)."""
        _, z, allowed = self._refine(batch)
        return self.extractor(z, self.items(batch.candidate), batch.mask, allowed, batch.rows)

    def score(self, batch: RankBatch) -> Tensor:
        """Click logits (B,). The refiner and the extractor's candidate-free layers run once per
        distinct history (`RankBatch.rows`)."""
        _, z, allowed = self._refine(batch)
        return self._logit(batch, z, allowed)

    def losses(self, batch: RankBatch) -> dict[str, Tensor]:
        """{"total", "bce", "aux", "l2"}, each (); total = bce + aux_weight × aux + l2 × l2.

        With shared histories (`RankBatch.rows`, a positive and its negatives) the auxiliary
        loss is taken over the distinct histories: every group has the same number of rows in
        training, so its mean is the per-row one."""
        c = self.config
        if batch.label is None:
            raise ValueError("batch.label is None: the loss needs click labels")
        shared, batch = batch, batch.per_row()  # batch: one history per candidate, for the regulariser's ids
        e, z_shared, allowed = self._refine(shared)  # (H, L, D) twice, (H, L, L)
        logits = self._logit(shared, z_shared, allowed)
        ids = [batch.history.masked_fill(~batch.mask, 0), batch.candidate]
        aux = logits.new_zeros(())
        if c.aux_weight:
            if shared.neg_history is None:
                raise ValueError("batch.neg_history is None: DMIN's auxiliary loss needs sampled negatives")
            negatives = shared.neg_history.masked_fill(~shared.mask, 0)  # (H, L)
            aux = auxiliary_loss(z_shared, e, self.items(negatives), shared.mask)
            ids.append(batch.neg_history.masked_fill(~batch.mask, 0))  # (B, L): the regulariser's ids per row
        return self.click_losses(logits, batch, ids, aux, c.aux_weight)
