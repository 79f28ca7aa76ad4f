"""DIEN: Deep Interest Evolution Network for Click-Through Rate Prediction
(Zhou et al., AAAI 2019, arXiv:1809.03672).

1. Interest extractor (section 4.2): a GRU over the behaviour embeddings e_1..e_L gives
   one interest state h_t per behaviour. Histories are left-aligned, so the GRU meets every
   real behaviour before any padding: its states at real steps are exactly those of the
   unpadded sequence (no packing needed), and the states at padded steps are zeroed.
2. Auxiliary loss (eq. 6): h_t must score the real next behaviour e_{t+1} above a
   sampled behaviour the user never touched ê_{t+1} (batch.neg_history):
   L_aux = -mean over t with t, t+1 real of [log σ(h_t·e_{t+1}) + log(1 - σ(h_t·ê_{t+1}))].
   h_t is mapped linearly to the item size when the GRU size differs.
3. Interest evolving layer (section 4.3): attention of each h_t against the candidate e_a,
   a_t = softmax over real steps of h_t W e_a (eq. 8; "mlp" uses the released code's MLP
   instead), drives a second GRU, one of
   - AIGRU: the input is scaled, i'_t = a_t h_t, into a plain GRU;
   - AGRU: the attention replaces the update gate, h'_t = (1 - a_t) h'_{t-1} + a_t h̃'_t;
   - AUGRU: the update gate is scaled, u'_t = a_t u_t,
     h'_t = (1 - u'_t) ⊙ h'_{t-1} + u'_t ⊙ h̃'_t (the paper's choice).
   Its state at each row's last real behaviour is the final interest.
4. final interest ⊕ candidate ⊕ profile ⊕ sum-pooled behaviours -> MLP -> logit.
   loss = BCE-with-logits + aux_weight × L_aux (eq. 7, α = aux_weight) + l2 × DIN's
   mini-batch-aware L2 on the item tables (off by default; see `set_frequencies`).

GRU convention (the paper's, eqs. 1-4): u = σ(W^u i + U^u h + b^u),
r = σ(W^r i + U^r h + b^r), h̃ = tanh(W^h i + r ⊙ (U^h h + b^h) + b'^h),
h_new = (1 - u) ⊙ h + u ⊙ h̃. torch.nn.GRUCell is the same cell with its update gate
z = 1 - u (weights negated).

Shapes: B batch, L history length, D item size (D_item), G GRU size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.layers import TargetAttention, act_mlp
from retrieval.ranking.common import ClickModel, RankBatch, RankerConfig

Evolution = Literal["augru", "aigru", "agru"]


@dataclass
class DIENConfig(RankerConfig):
    gru_hidden: int | None = None  # G: size of both GRUs; None = the item size D_item
    evolution: Evolution = "augru"  # interest-evolving GRU: AUGRU (paper's best), AIGRU or AGRU
    aux_weight: float = 1.0  # α of eq. 7: weight of the auxiliary loss; 0 switches it off
    attention: Literal["bilinear", "mlp"] = "bilinear"  # eq. 8's h_t W e_a, or the released code's MLP
    attention_hidden: tuple[int, ...] = (80, 40)  # widths of the attention MLP ("mlp" only)


class AttentionGRUCell(nn.Module):
    """One step of the interest-evolving GRU with explicit gates (DIEN eqs. 1-4, 9-12).

    Gates are stored as two linear maps producing [reset, update, candidate] blocks.
    `forward(x, h, a)` takes one step; `step(xg, h, a)` the same from precomputed input
    gates xg = x2g(x) (x already scaled by a for AIGRU), so a loop over time does one
    input matmul for all steps.
    """

    def __init__(self, input_dim: int, hidden: int, kind: Evolution):
        super().__init__()
        if kind not in ("augru", "aigru", "agru"):
            raise ValueError(f"unknown evolution {kind!r}; use augru, aigru or agru")
        self.kind = kind
        self.x2g = nn.Linear(input_dim, 3 * hidden)  # W^r, W^u, W^h and their biases
        self.h2g = nn.Linear(hidden, 3 * hidden)  # U^r, U^u, U^h and their biases

    def forward(self, x: Tensor, h: Tensor, a: Tensor) -> Tensor:
        """x (B, Din), h (B, G), a (B,) attention score -> next state (B, G)."""
        if self.kind == "aigru":
            x = a.unsqueeze(-1) * x  # i'_t = a_t h_t
        return self.step(self.x2g(x), h, a)

    def step(self, xg: Tensor, h: Tensor, a: Tensor) -> Tensor:
        """xg (B, 3G) input gates, h (B, G), a (B,) -> (B, G)."""
        return self.update(xg, h, None if self.kind == "aigru" else a.unsqueeze(-1))

    def update(self, xg: Tensor, h: Tensor, w: Tensor | None) -> Tensor:
        """One step whose update gate is scaled by w (B, 1): AUGRU's a_t, and a padded step's 0,
        which keeps the state; for AGRU w replaces the gate; None scales nothing (AIGRU).
        h + g ⊙ (h̃ - h) is (1 - g) ⊙ h + g ⊙ h̃ in fewer operations: the evolving loop runs
        it L times per batch, forward and backward."""
        xr, xu, xh = xg.chunk(3, dim=-1)  # (B, G) each
        hr, hu, hh = self.h2g(h).chunk(3, dim=-1)  # (B, G) each
        r = torch.sigmoid(xr + hr)  # reset gate
        cand = torch.tanh(xh + r * hh)  # h̃_t
        if self.kind == "agru":
            g = w  # (B, 1): the attention replaces the update gate
        else:
            u = torch.sigmoid(xu + hu)  # update gate
            g = u if w is None else w * u  # (B, G): u'_t = a_t u_t (AUGRU)
        return h + g * (cand - h)


class DIEN(ClickModel):
    """Interest extractor GRU + auxiliary loss + attention-driven interest-evolving GRU + MLP."""

    def __init__(self, config: DIENConfig, item_features: dict[str, Tensor] | None = None):
        super().__init__(config, item_features)
        c = config
        D = self.items.out_dim
        G = c.gru_hidden or D
        self.extractor = nn.GRU(D, G, batch_first=True)
        self.to_item = nn.Identity() if G == D else nn.Linear(G, D, bias=False)  # h_t -> item space (aux loss)
        self.attention = TargetAttention(G, D, c.attention, c.attention_hidden, c.act)
        self.evolution = AttentionGRUCell(G, G, c.evolution)
        self.head = act_mlp(G + D + self.profile.out_dim + D, c.hidden, c.act)


    def extract(self, e: Tensor, mask: Tensor) -> Tensor:
        """Interest extractor: e (B, L, D), left-aligned mask (B, L) -> h (B, L, G), 0 on padding."""
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("history mask must be left-aligned: real behaviours first, padding after")
        h, _ = self.extractor(e)  # (B, L, G): real steps come first, so padding cannot reach them
        return h * mask.unsqueeze(-1)  # (B, L, G)

    def evolve(self, h: Tensor, a: Tensor, mask: Tensor) -> Tensor:
        """Interest evolving GRU: h (B, L, G), a (B, L), mask (B, L) -> state at the last real step (B, G).

        A masked step scales its update gate by 0 and keeps the state exactly (h' + 0 ⊙ (h̃ - h')),
        so padding anywhere never moves it; an empty row stays at the zero initial state.
        """
        kind = self.evolution.kind
        x = a.unsqueeze(-1) * h if kind == "aigru" else h  # (B, L, G)
        xg = self.evolution.x2g(x)  # (B, L, 3G)
        m = mask.to(h.dtype)  # (B, L)
        w = (m if kind == "aigru" else a * m).unsqueeze(-1)  # (B, L, 1): the gate's scale, 0 on padding
        state = h.new_zeros(h.shape[0], h.shape[2])  # (B, G)
        # unbind once: indexing [:, t] in the loop would make each step's backward write a
        # zero (B, L, ·) gradient, O(L²) work that took most of a training step
        for xg_t, w_t in zip(xg.unbind(1), w.unbind(1)):  # (B, 3G), (B, 1)
            state = self.evolution.update(xg_t, state, w_t)
        return state

    def aux_loss(self, h: Tensor, e: Tensor, neg: Tensor, mask: Tensor) -> Tensor:
        """Eq. 6: h (B, L, G) states, e (B, L, D) clicked and neg (B, L, D) sampled behaviour
        embeddings, mask (B, L) -> mean over the pairs (t, t+1) of real steps."""
        hp = self.to_item(h[:, :-1])  # (B, L-1, D)
        pos = (hp * e[:, 1:]).sum(-1)  # (B, L-1)
        ng = (hp * neg[:, 1:]).sum(-1)  # (B, L-1)
        valid = (mask[:, :-1] & mask[:, 1:]).to(h.dtype)  # (B, L-1)
        nll = -(F.logsigmoid(pos) + F.logsigmoid(-ng))  # log(1 - σ(x)) = log σ(-x)
        return (nll * valid).sum() / valid.sum().clamp(min=1)

    def _forward(self, batch: RankBatch) -> tuple[Tensor, Tensor, Tensor]:
        """-> logits (B,), interest states h (H, L, G) and behaviour embeddings e (H, L, D) of the
        batch's H distinct histories (H = B without batch.rows).

        Where candidates share a history (batch.rows: a positive and its negatives in training,
        a user's M candidates when scoring) the embedding, the extractor GRU and the pooling run
        once per history; only the attention and the evolving GRU, which depend on the
        candidate, run per candidate."""
        mask = batch.mask  # (H, L)
        e = self.items(batch.history.masked_fill(~mask, 0))  # (H, L, D), zero on padding
        h = self.extract(e, mask)  # (H, L, G)
        pooled = e.sum(1)  # (H, D)
        profile = self.profile(batch.user_features, len(mask))  # (H, P)
        h_b, mask_b = h, mask
        if batch.rows is not None:  # out to one row per candidate
            h_b, mask_b = h.index_select(0, batch.rows), mask.index_select(0, batch.rows)  # (B, L, G), (B, L)
            pooled, profile = pooled.index_select(0, batch.rows), profile.index_select(0, batch.rows)  # (B, D), (B, P)
        cand = self.items(batch.candidate)  # (B, D)
        _, a = self.attention(h_b, cand, mask_b)  # (B, L), 0 on padding
        final = self.evolve(h_b, a, mask_b)  # (B, G)
        x = torch.cat([final, cand, profile.to(cand), pooled], dim=-1)  # (B, G + D + P + D)
        return self.head(x).squeeze(-1), h, e

    def score(self, batch: RankBatch) -> Tensor:
        """Click logits (B,)."""
        return self._forward(batch)[0]

    def losses(self, batch: RankBatch) -> dict[str, Tensor]:
        """{"total", "bce", "aux", "l2"}, each (); total = bce + aux_weight × aux + l2 × l2
        (aux = 0 when aux_weight = 0, l2 = 0 when config.l2 = 0). The auxiliary loss is the mean
        over the distinct histories: a training step's groups all have 1 + k rows (a positive
        and its k negatives), so it equals the mean over the rows."""
        c = self.config
        if batch.label is None:
            raise ValueError("batch.label is None: the loss needs click labels")
        logits, h, e = self._forward(batch)
        ids = [batch.history.masked_fill(~batch.mask, 0), batch.candidate]
        aux = logits.new_zeros(())
        if c.aux_weight:
            if batch.neg_history is None:
                raise ValueError(f"batch.neg_history is None: aux_weight={c.aux_weight} needs sampled negatives")
            negatives = batch.neg_history.masked_fill(~batch.mask, 0)  # (H, L)
            aux = self.aux_loss(h, e, self.items(negatives), batch.mask)
            ids.append(negatives)
        return self.click_losses(logits, batch, ids, aux, c.aux_weight)
