"""What every ranker shares: the batch, the item and profile encoders, the MBA regulariser.

A ranker scores (history, candidate) pairs: `score(batch) -> (B,)` logits and
`loss(batch) -> ()`. Scoring batches may share histories between candidates (`RankBatch.rows`,
M candidates of one user): a model reads them through `batch.per_row()` unless it has a
shared-history path of its own (DIN, the base model). Item representations concatenate the id embedding with the pooled
side-feature embeddings (DIN's goods_id ⊕ cate_id), so D_item = dim * (1 + F).

Shapes: B batch, L history length, D dimension, S sessions, T items per session.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.layers import PooledEmbedding, distinct_rows, encode_distinct, gather_rows

TABLE_CACHE_BYTES = 256 * 2**20  # largest item table (N+1, D_item) kept for scoring (1M items × 64 floats)


@dataclass
class RankBatch:
    """Model input for the rankers; tensors on one device."""

    history: Tensor  # (B, L) int64 item indices, left-aligned (oldest first), 0-padded
    mask: Tensor  # (B, L) bool, True on real behaviours
    candidate: Tensor  # (B,) int64 item to score
    user_features: dict[str, Tensor]  # field -> (B, M) int64 value ids, 0-padded
    label: Tensor | None = None  # (B,) float 1 = clicked, 0 = not (training)
    neg_history: Tensor | None = None  # (B, L) int64 sampled non-clicked items beside each behaviour (aux losses)
    sessions: Tensor | None = None  # (B, S, T) int64 item indices per session (DSIN), 0-padded
    session_mask: Tensor | None = None  # (B, S, T) bool
    rows: Tensor | None = None  # (B,) int64: candidate b is scored against history rows[b]; None = its own row

    def per_row(self) -> "RankBatch":
        """The batch with one history per candidate. With `rows` (scoring M candidates of one
        history: history, mask, user_features and sessions then hold H distinct histories, and
        rows (B,) picks one for each candidate) the histories are gathered out to B rows; a
        model without a shared-history path calls this first. Itself when rows is None."""
        if self.rows is None:
            return self
        take = lambda t: None if t is None else t.index_select(0, self.rows)  # noqa: E731
        return RankBatch(history=take(self.history), mask=take(self.mask), candidate=self.candidate,
                         user_features={f: take(v) for f, v in self.user_features.items()}, label=self.label,
                         neg_history=take(self.neg_history), sessions=take(self.sessions),
                         session_mask=take(self.session_mask))


@dataclass
class RankerConfig:
    """Settings every ranker shares; each model extends it with its own fields."""

    n_items: int  # N: item indices 1..N, 0 is padding
    item_feature_sizes: dict[str, int] = field(default_factory=dict)  # item field -> vocabulary size
    user_feature_sizes: dict[str, int] = field(default_factory=dict)  # profile field -> vocabulary size
    dim: int = 16  # embedding size of each field (id, each item feature, each profile field)
    max_len: int = 50  # L: behaviours fed to the model (the most recent ones)
    hidden: tuple[int, ...] = (200, 80)  # final MLP widths
    act: str = "dice"  # activation of the MLPs: dice, prelu or relu
    l2: float = 0.0  # mini-batch-aware L2 strength on the embeddings (0 = off)
    retrieval_weight: float = 0.0  # w of the fused order logit + w × standardised retrieval score (scoring.fuse); chosen on validation users after training, 0 = the ranker alone

    def to_dict(self) -> dict:
        return asdict(self)


class ItemEncoder(nn.Module):
    """Item id embedding ⊕ pooled side-feature embeddings -> (..., dim * (1 + F))."""

    def __init__(self, config: RankerConfig, item_features: dict[str, Tensor] | None = None):
        super().__init__()
        c = config
        self.id = nn.Embedding(c.n_items + 1, c.dim, padding_idx=0)
        self.fields = nn.ModuleDict({f: PooledEmbedding(n, c.dim) for f, n in c.item_feature_sizes.items()})
        for f in c.item_feature_sizes:
            table = item_features[f] if item_features else torch.zeros(c.n_items + 1, 1, dtype=torch.long)
            self.register_buffer(f"feat_{f}", table.long())
        self.out_dim = c.dim * (1 + len(c.item_feature_sizes))
        for emb in [self.id, *(m.emb for m in self.fields.values())]:
            nn.init.normal_(emb.weight, 0, 0.05)
            with torch.no_grad():
                emb.weight[0] = 0
        # training frequency of every row of every table, for `mba_l2`; ones until `set_frequencies`
        self.register_buffer("count_id", torch.ones(c.n_items + 1))
        for f, n in c.item_feature_sizes.items():
            self.register_buffer(f"count_{f}", torch.ones(n))

    def forward(self, ids: Tensor) -> Tensor:
        """ids (...) item indices, 0 = padding -> (..., D_item), zero on padding.

        Each distinct item of the call is encoded once and then gathered (`encode_distinct`);
        when scoring, rows come from the cached table (`table`)."""
        table = self.table()
        if table is not None:
            return gather_rows(table, ids)
        return encode_distinct(self._encode, ids)

    def distinct(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The representation of each distinct item of `ids` (U, D_item) and each id's row
        (ids.shape): `layers.gather_rows(rows, inverse)` is forward(ids)."""
        table = self.table()
        if table is not None:
            return distinct_rows(lambda uniq: table.index_select(0, uniq), ids)
        return distinct_rows(self._encode, ids)

    def table(self) -> Tensor | None:
        """Every item's representation (N+1, D_item) when scoring (eval mode, no autograd) and
        the table fits `TABLE_CACHE_BYTES`; None otherwise (training, or too many items).

        A request then gathers its rows instead of looking up and pooling every field of every
        item again. The table is rebuilt whenever a parameter or feature table changed since it
        was built (an optimiser step, load_state_dict, .to(): their version counters or storage
        move), so validation between epochs never reads a stale one. The same rows as
        `_encode`: each row is computed alone, whatever else is in the batch."""
        if self.training or torch.is_grad_enabled():
            return None
        if (self.id.num_embeddings * self.out_dim * self.id.weight.element_size()) > TABLE_CACHE_BYTES:
            return None
        key = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        cached = self.__dict__.get("_table")
        if cached is None or cached[0] != key:
            ids = torch.arange(self.id.num_embeddings, device=self.id.weight.device)
            cached = (key, self._encode(ids))
            self.__dict__["_table"] = cached  # not a buffer: never saved, never moved by .to()
        return cached[1]

    def _encode(self, ids: Tensor) -> Tensor:
        parts = [self.id(ids)] + [m(getattr(self, f"feat_{f}")[ids]) for f, m in self.fields.items()]
        return torch.cat(parts, dim=-1) * (ids != 0).unsqueeze(-1)  # (..., D_item)

    def embedding_rows(self, ids: Tensor) -> list[tuple[nn.Embedding, Tensor]]:
        """(table, row ids) pairs that `ids` touches, for the mini-batch-aware regulariser."""
        rows = [(self.id, ids.reshape(-1))]
        for f, m in self.fields.items():
            rows.append((m.emb, getattr(self, f"feat_{f}")[ids].reshape(-1)))
        return rows

    def set_frequencies(self, item_counts: Tensor, feature_counts: dict[str, Tensor] | None = None) -> None:
        """Store the training frequency n_j of every embedding row, the 1/n_j of `mba_l2`.

        item_counts (N+1,): occurrences of each item id in the training data (index 0 ignored).
        feature_counts: item field -> (vocabulary size,) occurrences of each value; None derives
        them from item_counts and the item feature tables (`feature_frequencies`)."""
        if item_counts.shape != self.count_id.shape:
            raise ValueError(f"item_counts has shape {tuple(item_counts.shape)}; expected {tuple(self.count_id.shape)}")
        if feature_counts is None:
            tables = {f: getattr(self, f"feat_{f}") for f in self.fields}
            sizes = {f: len(getattr(self, f"count_{f}")) for f in self.fields}
            feature_counts = feature_frequencies(item_counts, tables, sizes)
        for f in self.fields:
            counts = getattr(self, f"count_{f}")
            if f not in feature_counts or feature_counts[f].shape != counts.shape:
                got = tuple(feature_counts[f].shape) if f in feature_counts else "nothing"
                raise ValueError(f"feature_counts[{f!r}]: got {got}; expected shape {tuple(counts.shape)}")
            counts.copy_(feature_counts[f])
        self.count_id.copy_(item_counts)

    def mba_l2(self, ids: Tensor) -> Tensor:
        """Mini-batch-aware L2 (DIN section 5.1) over the item tables: Σ_tables mba_l2(table, rows that
        `ids` touches, the table's frequencies). ids: any shape of item indices, 0 = padding."""
        counts = [self.count_id] + [getattr(self, f"count_{f}") for f in self.fields]
        return sum(mba_l2(table.weight, rows, n) for (table, rows), n in zip(self.embedding_rows(ids), counts))


class ProfileEncoder(nn.Module):
    """Concatenated profile-field embeddings -> (B, dim * F_user); (B, 0) without a profile."""

    def __init__(self, config: RankerConfig):
        super().__init__()
        self.fields = nn.ModuleDict({f: PooledEmbedding(n, config.dim) for f, n in config.user_feature_sizes.items()})
        self.out_dim = config.dim * len(config.user_feature_sizes)
        self.register_buffer("device_anchor", torch.zeros(0), persistent=False)  # follows .to(): where (B, 0) goes

    def forward(self, user_features: dict[str, Tensor], batch: int) -> Tensor:
        if not self.fields:
            return self.device_anchor.new_zeros(batch, 0)
        return torch.cat([m(user_features[f]) for f, m in self.fields.items()], dim=-1)


def feature_frequencies(
    item_counts: Tensor, item_features: dict[str, Tensor], sizes: dict[str, int] | None = None
) -> dict[str, Tensor]:
    """Training frequency of every value of every item feature: n_v = Σ_i item_counts[i] × (times
    v occurs in item i's row). item_counts (N+1,); item_features: field -> (N+1, M) value ids,
    0-padded; sizes: field -> vocabulary size (default: largest id + 1). Returns field ->
    (size,) float counts; the padding value 0 counts 0."""
    out = {}
    for f, table in item_features.items():
        table = table.long()
        size = sizes[f] if sizes else int(table.max()) + 1
        per_slot = item_counts.to(table.device, torch.float).unsqueeze(1).expand(table.shape)  # (N+1, M)
        n = torch.zeros(size, device=table.device).index_add_(0, table.reshape(-1), per_slot.reshape(-1))
        n[0] = 0
        out[f] = n
    return out


def mba_l2(weight: Tensor, ids: Tensor, counts: Tensor) -> Tensor:
    """Mini-batch-aware L2 (DIN, eq. 4) for one embedding table: Σ over the rows j that occur
    in the batch of ||w_j||² / n_j, n_j = the training frequency of id j (`counts`, (rows,)).
    Rows not in the batch, and the padding row 0, are never penalised."""
    uniq = torch.unique(ids)
    uniq = uniq[uniq != 0]
    n = counts[uniq].clamp(min=1).to(weight.dtype)
    return (weight[uniq].pow(2).sum(-1) / n).sum()


class ClickModel(nn.Module):
    """What every ranker shares around its own `score`: the frequency setter of the
    mini-batch-aware L2 and the click loss (BCE + optional auxiliary loss + MBA L2).

    A subclass builds its own layers after `super().__init__(config, item_features)` and
    implements `score(batch)` and `losses(batch)`, usually by calling `click_losses`."""

    def __init__(self, config: RankerConfig, item_features: dict[str, Tensor] | None = None):
        super().__init__()
        self.config = config
        self.items = ItemEncoder(config, item_features)  # (..., D_item) item representations
        self.profile = ProfileEncoder(config)  # (B, P) profile embedding

    def mlp_logit(self, parts: list[Tensor], batch: RankBatch) -> Tensor:
        """Logits (B,) of self.mlp over the parts ⊕ the profile embedding (when there is a profile;
        one per history, gathered by batch.rows when candidates share histories)."""
        if self.profile.out_dim:
            profile = self.profile(batch.user_features, len(batch.history))  # (H, dim * F_user)
            if batch.rows is not None:
                profile = profile.index_select(0, batch.rows)  # (B, dim * F_user)
            parts = [*parts, profile]
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)

    def set_frequencies(self, item_counts: Tensor, feature_counts: dict[str, Tensor] | None = None) -> None:
        """Training frequency of every item (N+1,) and, optionally, of every item-feature value
        (field -> (vocabulary,); derived from item_counts when None): the n_j of the MBA L2."""
        self.items.set_frequencies(item_counts, feature_counts)

    def click_losses(
        self, logits: Tensor, batch: RankBatch, ids: list[Tensor], aux: Tensor | None = None, aux_weight: float = 0.0
    ) -> dict[str, Tensor]:
        """{"total", "bce", "l2"} (and "aux" when given), each (): total = bce + aux_weight × aux +
        config.l2 × MBA-L2 over the item ids the batch touched (`ids`)."""
        if batch.label is None:
            raise ValueError("batch.label is None: the loss needs click labels")
        bce = F.binary_cross_entropy_with_logits(logits, batch.label.to(logits.dtype))
        l2 = self.items.mba_l2(torch.cat([i.reshape(-1) for i in ids])) if self.config.l2 else bce.new_zeros(())
        out = {"total": bce + self.config.l2 * l2, "bce": bce, "l2": l2}
        if aux is not None:
            out["aux"] = aux
            out["total"] = out["total"] + aux_weight * aux
        return out

    def loss(self, batch: RankBatch) -> Tensor:
        """Training loss ()."""
        return self.losses(batch)["total"]  # type: ignore[attr-defined]
