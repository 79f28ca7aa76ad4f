"""DSIN: Deep Session Interest Network for Click-Through Rate Prediction
(Feng et al., IJCAI 2019, arXiv:1905.06482).

1. Session division (section 4.1, `sessions.divide_sessions`): the history is cut at gaps
   of more than 30 minutes; the last S sessions of at most T behaviours arrive as
   batch.sessions (B, S, T) with batch.session_mask.
2. Bias encoding (eq. 2): BE(k, t, c) = w^K_k + w^T_t + w^C_c for session k, position t
   in the session and embedding unit c; a learnable (S, T, D) tensor built from three
   vectors, added to the session embeddings: Q = E + BE.
3. Session interest extractor (eqs. 3-5): one transformer layer shared by all sessions,
   multi-head self-attention (H heads, keys restricted to the session's real behaviours)
   then a position-wise feed-forward network, each with a residual connection and layer
   normalisation (Vaswani et al.'s post-norm layer); the outputs are averaged over the
   session's real behaviours: I_k (B, S, D). An empty session gives I_k = 0, never NaN.
   `session_pool="target"` pools them instead with DIN's activation unit against the
   candidate (see below).
4. Session interest interacting layer (eq. 6): a bidirectional LSTM over the non-empty
   sessions, oldest to newest (packed, so empty sessions never move it):
   H_k = →h_k ⊕ ←h_k (B, S, 2·hidden).
5. Session interest activating layer (eqs. 7-10): two softmax attentions against the
   candidate X^I, a^I_k ∝ exp(I_k W^I X^I) over the session interests and
   a^H_k ∝ exp(H_k W^H X^I) over the LSTM states; empty sessions weigh exactly zero.
   U^I = Σ_k a^I_k I_k, U^H = Σ_k a^H_k H_k.
6. U^I ⊕ U^H ⊕ candidate ⊕ profile -> MLP -> logit; loss = BCE-with-logits (+ l2 × DIN's
   mini-batch-aware L2 on the item tables, off by default; see `set_frequencies`).

The model reads only the mask, so it accepts any layout of sessions and positions (the
bias encoding indexes the slots as given; divide_sessions right-aligns the sessions so
that slot S - 1 is always the newest). Only the non-empty sessions and, inside the
transformer's position-wise layers, only their real behaviours are computed; a batch whose
sessions are all shorter than T may come with fewer than T positions (T' <= T).

Where sessions are few and long (MovieLens: users rated in bursts; 60 % of users have a
single 30-minute session), the paper's model has little to work with: the mean over one
session does not depend on the candidate, so with one session DSIN's user vector is as
blind to the candidate as the embedding + MLP base model's, and T = 10 keeps only the 10
latest behaviours of a 50-behaviour burst. `session_pool="target"` (our change, not the
paper's) replaces the mean by DIN's activation unit over the session's transformer outputs,
so with one session DSIN reads its behaviours as DIN does, and with several sessions it
keeps the Bi-LSTM and the attention over sessions; `session_len` = L lets one session hold
every behaviour DIN reads.

Shapes: B batch, S sessions, T items per session, D item size (D_item), H heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from retrieval.layers import ActivationUnit, TargetAttention, masked_softmax, act_mlp
from retrieval.ranking.common import ClickModel, RankBatch, RankerConfig
from retrieval.ranking.sessions import DEFAULT_GAP


@dataclass
class DSINConfig(RankerConfig):
    sessions: int = 5  # S: most recent sessions fed to the model
    session_len: int = 10  # T: most recent behaviours kept per session
    heads: int = 2  # H: self-attention heads; must divide the item size D_item
    gap: int = DEFAULT_GAP  # seconds of silence that open a new session (read by the data side)
    ffn_mult: int = 4  # the transformer feed-forward width is ffn_mult × D_item
    lstm_hidden: int | None = None  # size of each LSTM direction; None = D_item
    attention: Literal["bilinear", "mlp"] = "bilinear"  # eqs. 7-9's I_k W X^I, or a DIN-style MLP
    attention_hidden: tuple[int, ...] = (64, 16)  # widths of the attention MLPs ("mlp" only)
    session_pool: Literal["mean", "target"] = "mean"  # I_k: mean over the session (paper, eq. 5) or DIN's activation unit against the candidate
    pool_hidden: tuple[int, ...] = (36,)  # activation-unit widths of session_pool="target"


class BiasEncoding(nn.Module):
    """BE(k, t, c) = w^K_k + w^T_t + w^C_c (DSIN eq. 2) -> (S, T, D)."""

    def __init__(self, S: int, T: int, D: int, std: float = 0.05):
        super().__init__()
        self.wk = nn.Parameter(torch.randn(S) * std)  # session bias w^K
        self.wt = nn.Parameter(torch.randn(T) * std)  # position-in-session bias w^T
        self.wc = nn.Parameter(torch.randn(D) * std)  # embedding-unit bias w^C

    def forward(self) -> Tensor:
        return self.wk[:, None, None] + self.wt[None, :, None] + self.wc[None, None, :]  # (S, T, D)


class SessionTransformer(nn.Module):
    """One post-norm transformer layer applied to every session independently (DSIN eqs. 3-4).

    Self-attention keys are the session's real behaviours only; an empty session's
    attention weights are all zero (masked_softmax), so its outputs stay finite. The
    position-wise layers (projections, layer norms, feed-forward network) run on the real
    behaviours alone; outputs at padded positions are 0.
    """

    def __init__(self, D: int, heads: int, ffn_mult: int = 4):
        super().__init__()
        if D % heads:
            raise ValueError(f"heads={heads} must divide the item size D_item={D}")
        self.heads = heads
        self.qkv = nn.Linear(D, 3 * D)  # W^Q, W^K, W^V of all heads
        self.out = nn.Linear(D, D)  # W^O
        self.norm1 = nn.LayerNorm(D)
        self.ffn = nn.Sequential(nn.Linear(D, ffn_mult * D), nn.ReLU(), nn.Linear(ffn_mult * D, D))
        self.norm2 = nn.LayerNorm(D)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (..., T, D), mask (..., T) -> (..., T, D), 0 at padded positions."""
        *lead, T, D = x.shape
        H = self.heads
        real = x[mask]  # (n, D) the real behaviours
        qkv = x.new_zeros(*lead, T, 3 * D).masked_scatter(mask.unsqueeze(-1), self.qkv(real))  # (..., T, 3D)
        q, k, v = qkv.view(*lead, T, 3, H, D // H).movedim(-3, 0).transpose(-2, -3)  # each (..., H, T, D/H)
        logits = q @ k.transpose(-1, -2) / (D // H) ** 0.5  # (..., H, T, T)
        w = masked_softmax(logits, mask.unsqueeze(-2).unsqueeze(-2), dim=-1)  # (..., H, T, T)
        heads = (w @ v).transpose(-2, -3).reshape(*lead, T, D)[mask]  # (n, D) Concat(head_1..head_H)
        y = self.norm1(real + self.out(heads))  # (n, D)
        y = self.norm2(y + self.ffn(y))  # (n, D)
        return x.new_zeros(x.shape).masked_scatter(mask.unsqueeze(-1), y)


class DSIN(ClickModel):
    """Bias encoding + per-session transformer + Bi-LSTM over sessions + two target attentions + MLP."""

    def __init__(self, config: DSINConfig, item_features: dict[str, Tensor] | None = None):
        super().__init__(config, item_features)
        c = config
        D = self.items.out_dim
        Hl = c.lstm_hidden or D
        self.bias = BiasEncoding(c.sessions, c.session_len, D)
        self.extractor = SessionTransformer(D, c.heads, c.ffn_mult)
        self.lstm = nn.LSTM(D, Hl, batch_first=True, bidirectional=True)
        if c.session_pool not in ("mean", "target"):
            raise ValueError(f"session_pool={c.session_pool!r}; use mean or target")
        self.pool = ActivationUnit(D, c.pool_hidden, c.act) if c.session_pool == "target" else None
        self.att_interest = TargetAttention(D, D, c.attention, c.attention_hidden, c.act)
        self.att_lstm = TargetAttention(2 * Hl, D, c.attention, c.attention_hidden, c.act)
        self.head = act_mlp(D + 2 * Hl + D + self.profile.out_dim, c.hidden, c.act)


    def session_interests(self, sessions: Tensor, mask: Tensor, cand: Tensor | None = None) -> Tensor:
        """sessions, mask (B, S, T') -> I (B, S, D): each non-empty session's transformer outputs
        averaged over its real behaviours, or (session_pool="target") pooled by the activation
        unit against the candidate cand (B, D); 0 for an empty session."""
        B, S, T = mask.shape
        present = mask.any(-1)  # (B, S)
        row, slot = present.nonzero(as_tuple=True)  # (P,) each non-empty session's row and slot
        m = mask[row, slot]  # (P, T')
        q = self.items(sessions[row, slot].masked_fill(~m, 0)) + self.bias()[slot, :T]  # (P, T', D)
        out = self.extractor(q, m)  # (P, T', D), 0 on padding
        if self.pool is None:
            pooled = out.sum(1) / m.sum(1, keepdim=True).to(out.dtype)  # (P, D)
        else:
            if cand is None:
                raise ValueError('session_pool="target" needs the candidate')
            pooled, _ = self.pool(out, cand[row], m)  # (P, D)
        return out.new_zeros(B, S, out.shape[-1]).index_put((row, slot), pooled)  # (B, S, D)

    def interact(self, interests: Tensor, present: Tensor) -> Tensor:
        """Bi-LSTM over the non-empty sessions in slot order: interests (B, S, D),
        present (B, S) -> H (B, S, 2·hidden), 0 at empty sessions."""
        # Gather the non-empty sessions to the front (stable: order kept), pack, scatter back.
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)  # (B, S)
        x = interests.gather(1, order.unsqueeze(-1).expand_as(interests))  # (B, S, D)
        lengths = present.sum(1).clamp(min=1).cpu()  # a row without sessions runs one masked step
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=x.shape[1])  # (B, S, 2Hl)
        back = torch.argsort(order, dim=1)  # inverse permutation
        h = h.gather(1, back.unsqueeze(-1).expand_as(h))  # (B, S, 2Hl) in slot order
        return h * present.unsqueeze(-1)

    def attend(self, batch: RankBatch) -> dict[str, Tensor]:
        """The layers up to the activating units: interests I (B, S, D), LSTM states H
        (B, S, 2·hidden), their weights (B, S) and pooled vectors U^I (B, D), U^H (B, 2·hidden)."""
        batch = batch.per_row()
        sessions, mask = batch.sessions, batch.session_mask
        if sessions is None or mask is None:
            raise ValueError("DSIN needs batch.sessions and batch.session_mask (see sessions.divide_sessions)")
        S, T = self.config.sessions, self.config.session_len
        if sessions.dim() != 3 or sessions.shape[1] != S or sessions.shape[2] > T or sessions.shape != mask.shape:
            got = f"sessions {tuple(sessions.shape)} / session_mask {tuple(mask.shape)}"
            raise ValueError(f"{got} must be (B, {S}, {T}) (or fewer than {T} positions)")
        cand = self.items(batch.candidate)  # (B, D)
        present = mask.any(-1)  # (B, S) non-empty sessions
        I = self.session_interests(sessions, mask, cand)  # (B, S, D)
        Hk = self.interact(I, present)  # (B, S, 2Hl) the paper's H_k
        UI, aI = self.att_interest(I, cand, present)  # (B, D), (B, S)
        UH, aH = self.att_lstm(Hk, cand, present)  # (B, 2Hl), (B, S)
        return {"cand": cand, "I": I, "H": Hk, "a_I": aI, "a_H": aH, "U_I": UI, "U_H": UH}

    def score(self, batch: RankBatch) -> Tensor:
        """Click logits (B,)."""
        batch = batch.per_row()
        z = self.attend(batch)
        profile = self.profile(batch.user_features, len(z["cand"])).to(z["cand"])  # (B, P)
        x = torch.cat([z["U_I"], z["U_H"], z["cand"], profile], dim=-1)  # (B, D + 2Hl + D + P)
        return self.head(x).squeeze(-1)

    def losses(self, batch: RankBatch) -> dict[str, Tensor]:
        """{"total", "bce", "l2"}, each (); total = bce + config.l2 × l2 (l2 = 0 when config.l2 = 0)."""
        batch = batch.per_row()
        if batch.label is None:
            raise ValueError("batch.label is None: the loss needs click labels")
        ids = [batch.sessions.masked_fill(~batch.session_mask, 0), batch.candidate]
        return self.click_losses(self.score(batch), batch, ids)
