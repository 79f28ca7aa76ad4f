"""Small pieces shared by the models: squash, masked softmax, the MLP, pooled embeddings, and the
retrievers' training pieces (label-aware attention, sampled softmax, routing regularisation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def squash(z: Tensor, dim: int = -1, eps: float = 1e-9) -> Tensor:
    """Capsule non-linearity: keeps the direction, maps the norm to ||z||^2 / (1 + ||z||^2) < 1."""
    sq = (z * z).sum(dim, keepdim=True)
    return z * (sq / (1.0 + sq) / torch.sqrt(sq + eps))


def masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over `dim` where mask is False weighs exactly zero (all-False slices give zeros)."""
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.softmax(logits, dim=dim)
    return torch.nan_to_num(out, nan=0.0)


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
    user: Tensor, pos: Tensor, pos_emb: Tensor, neg: Tensor, neg_emb: Tensor, log_q: Tensor, beta: float = 0.0
) -> Tensor:
    """Sampled softmax with negatives shared across the batch and log-Q correction.

    user (B, D); pos (B,) target ids with embeddings pos_emb (B, D); neg (S,) sampled ids
    with neg_emb (S, D); log_q (N+1,) log expected count of each id in a draw of S.
    A sampled id equal to the row's target (an accidental hit) is masked out.

    beta > 0: REMI's interest-aware hard negatives (Xie et al. 2023, and its released
    code): the negatives' sum of exp(x_j) becomes sum_j w_j exp(x_j) with importance weights
    w_j = S' softmax_j(beta x_j) (S' real negatives of the row), so negatives the user
    vector scores high count more. x_j is the log-Q-corrected logit, so with uniform
    negatives the weights are REMI's exp(beta s_j), and beta = 0 is the plain loss exactly.
    As in the released code, the weights are not detached.
    """
    return softmax_over_logits((user * pos_emb).sum(-1), user @ neg_emb.T, pos, neg, log_q, beta)


def best_interest_softmax_loss(
    interests: Tensor, active: Tensor, pos: Tensor, pos_emb: Tensor, neg: Tensor, neg_emb: Tensor, log_q: Tensor,
    beta: float = 0.0,
) -> Tensor:
    """The sampled softmax of `sampled_softmax_loss` with every candidate, the target and each
    negative alike, scored by its best active interest: max_k <interest_k, item>, the score
    the best-score merge serves. interests (B, K, D), active (B, K), the rest as there.

    Hard label-aware attention scores the target by its best interest but each negative only
    by that one interest, so an interest is never told about the negatives it would retrieve
    when another one wins the target; here every interest answers for what it retrieves."""
    # an inactive interest stands in for the first one (always active): the max is over the active ones
    # without masking a (B, K, S) tensor, and a copy that wins passes its gradient to the first interest
    v = torch.where(active[:, :, None], interests, interests[:, :1])  # (B, K, D)
    pos_logit = (v @ pos_emb.unsqueeze(-1)).squeeze(-1).amax(1)  # (B,)
    neg_logit = (v @ neg_emb.T).amax(1)  # (B, S)
    return softmax_over_logits(pos_logit, neg_logit, pos, neg, log_q, beta)


def softmax_over_logits(
    pos_score: Tensor, neg_score: Tensor, pos: Tensor, neg: Tensor, log_q: Tensor, beta: float = 0.0
) -> Tensor:
    """Cross-entropy of the target against the shared negatives from raw scores pos_score (B,)
    and neg_score (B, S): log-Q correction, accidental hits masked, REMI's weights with beta."""
    pos_logit = pos_score - log_q[pos]  # (B,)
    neg_logit = neg_score - log_q[neg]  # (B, S)
    hit = neg[None, :] == pos[:, None]  # (B, S) accidental hits
    neg_logit = neg_logit.masked_fill(hit, float("-inf"))
    if beta:
        real = (~hit).sum(1, keepdim=True).clamp(min=1).to(neg_logit.dtype)  # (B, 1)
        neg_logit = neg_logit + torch.log(real) + torch.log_softmax(beta * neg_logit, dim=1)
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)  # (B, 1 + S)
    return F.cross_entropy(logits, torch.zeros_like(pos))


def peak_penalty(weights: Tensor, mask: Tensor, active: Tensor) -> Tensor:
    """REMI's routing regularisation (Xie et al. 2023): () the batch mean of
    sum_k (sum_l (a_kl - 1/n)^2)^2, where a_k (L,) is interest k's weight over the user's n
    real behaviours, normalised to sum to 1. Zero when every interest spreads evenly over
    the behaviours, largest when each sits on one behaviour.

    weights (B, K, L) each behaviour's weight in each interest (routing couplings or
    attention), mask (B, L) real behaviours, active (B, K) interests in use. REMI's code
    takes the variance over all L slots (padding included), divides it by D and sums over
    its batch; here padding takes no part and the batch is averaged, so lambda does not
    depend on L, D or the batch size.
    """
    m = mask[:, None, :].to(weights.dtype)  # (B, 1, L)
    a = weights * m
    a = a / a.sum(-1, keepdim=True).clamp(min=1e-12)  # (B, K, L) rows sum to 1 over real behaviours
    n = m.sum(-1, keepdim=True).clamp(min=1)  # (B, 1, 1)
    var = (((a - 1.0 / n) * m) ** 2).sum(-1)  # (B, K)
    return ((var**2) * active).sum(1).mean()


def mlp(sizes: Sequence[int], final_activation: bool = True) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last one if `final_activation`)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def distinct_rows(encode: Callable[[Tensor], Tensor], ids: Tensor) -> tuple[Tensor, Tensor]:
    """encode() of each distinct id once: the rows (U, D) and, for every id, its row (ids.shape).

    A batch's histories repeat items, and encoding an item (its id and pooled side
    features) per slot costs far more than one sort. Anything linear in an item's
    representation can also be computed on the U rows and gathered (`gather_rows`)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)  # (U,), ids.shape
    return encode(uniq), inverse


def gather_rows(rows: Tensor, inverse: Tensor) -> Tensor:
    """rows (U, D) gathered at inverse (...) -> (..., D). index_select, not rows[inverse]: its
    backward (index_add) is deterministic on CPU, advanced indexing's (index_put with
    accumulate) is not with several threads."""
    return rows.index_select(0, inverse.reshape(-1)).reshape(*inverse.shape, rows.shape[-1])


def encode_distinct(encode: Callable[[Tensor], Tensor], ids: Tensor) -> Tensor:
    """encode(ids) (..., D) computed once per distinct id and gathered: the same values and
    gradients as encoding every slot."""
    return gather_rows(*distinct_rows(encode, ids))


class PooledEmbedding(nn.Module):
    """Embedding of a (possibly multi-valued) categorical field, mean-pooled over its values.

    Index 0 is padding: it has a zero vector and never counts in the mean.
    """

    def __init__(self, num: int, dim: int, sparse: bool = False):
        super().__init__()
        self.emb = nn.Embedding(num, dim, padding_idx=0, sparse=sparse)

    def forward(self, ids: Tensor) -> Tensor:  # (..., M) -> (..., D)
        if ids.shape[-1] == 1:  # single-valued field: the mean of one value is that value (or the zero row)
            return self.emb(ids[..., 0])
        e = self.emb(ids)  # (..., M, D)
        n = (ids != 0).sum(-1, keepdim=True).clamp(min=1)  # (..., 1)
        return e.sum(-2) / n


class Dice(nn.Module):
    """Dice activation (DIN, Zhou et al. 2018): f(s) = p(s) s + (1 - p(s)) alpha s with
    p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps)). E and Var are the mini-batch's in
    training and running averages in eval, as in batch normalisation."""

    def __init__(self, dim: int, eps: float = 1e-8, momentum: float = 0.01):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, s: Tensor) -> Tensor:  # (..., dim)
        if not self.training and not torch.is_grad_enabled():  # scoring: running statistics, one buffer, in place
            scale = (self.bn.running_var + self.bn.eps).rsqrt()  # (dim,) the normalisation as one affine map
            p = torch.addcmul(-self.bn.running_mean * scale, s, scale).sigmoid_()
            return p.mul_(1 - self.alpha).add_(self.alpha).mul_(s)
        shape = s.shape
        flat = s.reshape(-1, shape[-1])  # (B*, dim)
        p = torch.sigmoid(self.bn(flat)).reshape(shape)
        if torch.is_grad_enabled():
            return s * (self.alpha + p * (1 - self.alpha))  # = p s + (1 - p) alpha s, in three passes instead of five
        return p.mul_(1 - self.alpha).add_(self.alpha).mul_(s)  # the same, in place (no new buffers)


Activation = str  # "dice" | "prelu" | "relu" | "sigmoid"


def activation(name: Activation, dim: int) -> nn.Module:
    if name == "dice":
        return Dice(dim)
    if name == "prelu":
        return nn.PReLU(dim)
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":  # the DIN / DIEN / DMIN reference code's attention-unit activation
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {name!r}; use dice, prelu, relu or sigmoid")


def act_mlp(in_dim: int, hidden: Sequence[int], act: Activation, out_dim: int = 1) -> nn.Sequential:
    """Linear layers of widths `hidden`, each followed by `activation(act)`, then a linear
    output layer of `out_dim` (no activation): the rankers' final MLP (DIN: 200-80-1, Dice)."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), activation(act, h)]
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class ActivationUnit(nn.Module):
    """DIN's local activation unit: one weight per behaviour from an MLP over
    [behaviour, candidate, behaviour - candidate, behaviour * candidate].

    Weights are not normalised by a softmax (DIN keeps the intensity of interest);
    padded behaviours weigh exactly zero. With Dice the MLP sees only real positions in
    training, so its batch statistics never include padding; with a position-wise activation
    (sigmoid, PReLU, ReLU) it runs on every slot and padding is zeroed after, which is the same
    function without the gathers and scatters. The query is one candidate per row (B, D), or one
    query per behaviour (B, L, D) (DMIN's candidate ⊕ position encoding).

    The first layer is the paper's linear map of the 4D-wide input, W [k, q, k-q, k⊙q] + b,
    computed as (W_k + W_d) k + (W_q - W_d) q + W_p (k⊙q) + b: the same function and the
    same parameters, but the (B, L, 4D) input is never built, the q term is computed once
    per row, and the k term, which depends on the behaviour alone, can be computed once per
    distinct item and gathered (`key_term`, `forward(..., key_term=)`): only the k⊙q term
    is paid per (row, behaviour).
    """

    # pool_shared scores a history's queries in passes of at most this many (query, behaviour, H1)
    # values: 1 MB of float32, so the activation MLP's passes over them stay in the core's cache
    # instead of streaming a 3 MB buffer (200 × 50 × 80) through memory five times
    CHUNK_ELEMENTS = 2**18

    def __init__(self, dim: int, hidden: Sequence[int] = (36,), act: Activation = "dice"):
        super().__init__()
        self.dim = dim
        self.mlp = act_mlp(4 * dim, hidden, act)
        # Dice normalises by the batch's statistics, which must not see padding; every other
        # activation is position-wise, so training may run every slot and zero padding after
        self.batch_statistics = any(isinstance(m, Dice) for m in self.mlp)

    def _blocks(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        first: nn.Linear = self.mlp[0]  # type: ignore[assignment]
        Wk, Wq, Wd, Wp = first.weight.split(self.dim, dim=1)  # (H1, D) each: k, q, k - q, k ⊙ q blocks
        return Wk + Wd, Wq - Wd, Wp, first.bias

    def key_term(self, keys: Tensor) -> Tensor:
        """(W_k + W_d) k: keys (..., D) -> (..., H1), the first layer's part that depends on the
        behaviour alone."""
        return F.linear(keys, self._blocks()[0])

    def query_term(self, query: Tensor, bias: bool = True) -> Tensor:
        """(W_q - W_d) q (+ b): query (..., D) -> (..., H1), the first layer's part that depends on
        the query alone; linear, so a query that is a sum of parts may be given part by part."""
        _, Wqry, _, b = self._blocks()
        return F.linear(query, Wqry, b if bias else None)

    def forward(self, keys: Tensor, query: Tensor, mask: Tensor, key_term: Tensor | None = None,
                query_term: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """keys (B, L, D), query (B, D) or (B, L, D), mask (B, L) -> pooled (B, D), weights (B, L).
        key_term (B, L, H1): `key_term(keys)` computed beforehand (e.g. per distinct item), or None;
        query_term: `query_term(query)` ((B, H1) or (B, L, H1)) computed beforehand, or None."""
        Wkey, Wqry, Wp, bias = self._blocks()
        per_query = query_term if query_term is not None else F.linear(query, Wqry, bias)  # (B, H1) or (B, L, H1)
        if query.dim() == 2:
            query = query.unsqueeze(1)  # (B, 1, D)
        if per_query.dim() == 2:
            per_query = per_query.unsqueeze(1)  # (B, 1, H1)
        if not (self.training and self.batch_statistics):  # every slot alone, padding zeroed after (no gather/scatter)
            kt = key_term if key_term is not None else F.linear(keys, Wkey)  # (B, L, H1)
            h = F.linear(keys * query, Wp).add_(kt).add_(per_query)  # (B, L, H1)
            w = self.mlp[1:](h.flatten(0, -2)).view(mask.shape).masked_fill(~mask, 0.0)  # (B, L); rows for PReLU's channels
            return (w.unsqueeze(-1) * keys).sum(1), w
        k = keys[mask]  # (n_real, D)
        q = query.expand_as(keys)[mask]  # (n_real, D)
        kt = key_term[mask] if key_term is not None else F.linear(k, Wkey)  # (n_real, H1)
        h = F.linear(k * q, Wp) + kt + per_query.expand(*mask.shape, -1)[mask]  # (n_real, H1)
        w = keys.new_zeros(mask.shape)  # (B, L)
        w = w.masked_scatter(mask, self.mlp[1:](h).squeeze(-1).to(w.dtype))
        return (w.unsqueeze(-1) * keys).sum(1), w

    @torch.no_grad()
    def pool_shared(self, keys: Tensor, query: Tensor, mask: Tensor, rows: Tensor,
                    key_term: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Scoring (eval mode) of B queries against H shared histories: keys (H, L, D), query (B, D),
        mask (H, L), rows (B,) the history of each query -> pooled (B, D), weights (B, L): the
        values of forward() on the gathered histories, without the (B, L, D) copies.

        Per history g, the k⊙q term of its n_g queries is one matmul, q (n_g, D) against
        W_p ⊙ k_l for every behaviour l ((L·H1, D)), and the pooling is w (n_g, L) @ k (L, D)."""
        if self.training:
            raise RuntimeError("pool_shared is the scoring path; training uses forward()")
        Wkey, Wqry, Wp, bias = self._blocks()
        kt = key_term if key_term is not None else F.linear(keys, Wkey)  # (H, L, H1)
        qt = F.linear(query, Wqry, bias)  # (B, H1)
        H, L, D = keys.shape
        pooled = keys.new_zeros(len(query), D)  # (B, D)
        weights = keys.new_zeros(len(query), L)  # (B, L)
        chunk = max(1, self.CHUNK_ELEMENTS // (L * Wp.shape[0]))  # queries per pass
        for g in range(H):
            idx = (rows == g).nonzero().squeeze(1)  # (n_g,) queries of history g
            if len(idx) == 0:
                continue
            w_kq = (Wp.unsqueeze(0) * keys[g].unsqueeze(1)).reshape(L * Wp.shape[0], D)  # (L·H1, D): W_p ⊙ k_l
            for part in idx.split(chunk):
                h = F.linear(query[part], w_kq).view(len(part), L, -1).add_(kt[g]).add_(qt[part].unsqueeze(1))  # (n, L, H1)
                w = self.mlp[1:](h.flatten(0, 1)).view(len(part), L).masked_fill(~mask[g], 0.0)  # (n, L)
                pooled[part] = w @ keys[g]  # (n, D)
                weights[part] = w
        return pooled, weights


class TargetAttention(nn.Module):
    """Softmax attention of a sequence against a target (DIEN eq. 8, DSIN eqs. 9-10).

    "bilinear" (the papers' form): logit_l = k_l W q. "mlp" (the authors' released code):
    logit_l = MLP([k_l, q', k_l - q', k_l * q']), q' = q mapped to the key size when the
    sizes differ; the MLP only sees real positions, so Dice's batch statistics never
    include padding. Weights are a softmax over real positions: masked ones weigh exactly
    zero, and an all-masked row has zero weights and a zero pooled vector.
    """

    def __init__(
        self,
        key_dim: int,
        query_dim: int,
        kind: Literal["bilinear", "mlp"] = "bilinear",
        hidden: Sequence[int] = (80, 40),
        act: Activation = "dice",
    ):
        super().__init__()
        self.kind = kind
        if kind == "bilinear":
            self.W = nn.Parameter(torch.empty(key_dim, query_dim))
            nn.init.xavier_uniform_(self.W)
        elif kind == "mlp":
            self.q = nn.Identity() if key_dim == query_dim else nn.Linear(query_dim, key_dim, bias=False)
            self.mlp = act_mlp(4 * key_dim, hidden, act)
        else:
            raise ValueError(f"unknown attention {kind!r}; use bilinear or mlp")

    def forward(self, keys: Tensor, query: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """keys (B, L, Dk), query (B, Dq), mask (B, L) -> pooled (B, Dk), weights (B, L)."""
        if self.kind == "bilinear":
            logits = torch.einsum("bld,de,be->bl", keys, self.W, query)  # (B, L)
        else:
            q = self.q(query).unsqueeze(1).expand_as(keys)  # (B, L, Dk)
            x = torch.cat([keys, q, keys - q, keys * q], dim=-1)[mask]  # (n_real, 4Dk)
            logits = keys.new_full(mask.shape, float("-inf"))  # (B, L)
            logits = logits.masked_scatter(mask, self.mlp(x).squeeze(-1).to(logits.dtype))
        w = masked_softmax(logits, mask, dim=1)  # (B, L)
        return (w.unsqueeze(-1) * keys).sum(1), w
