"""Multi-channel retrieval: MIND's interests, item-kNN over the history and an item-popularity
prior, merged into one list, as MIND's own deployment used several candidate generators.

The signals are complementary: MIND generalises through embeddings, item-kNN keeps exact
co-occurrence of rare items that short histories leave to chance, and popularity carries
what training's log-Q correction removes from the learned scores. One score per item:

    fused(i) = z_u( max_k u_k·v_i + w log(1 + f_i) ) + a z_u( knn_u(i) )

- `w log(1 + f_i)` is the item prior (f: the item's training frequency, optionally
  recency-weighted). It is exact inside the FAISS search: the index holds each item as
  [v_i, log(1 + f_i)] and each interest queries [u_k, w], so with w = 0 the same index
  serves MIND alone.
- knn_u(i) = Σ_{j < L} γ^j sim(h_j, i) over the last L behaviours (h_0 the most recent; γ = 1
  a plain sum) from the sparse neighbour table (retrieval/neighbours.py): only items near
  the history have a score above 0.
- z_u standardises a score over all items for that user: the MIND term by the mean and
  std of a fixed sample of items, the kNN term exactly (its sum and sum of squares over
  all N items, zeros included). Standardising makes one weight `a` fit users whose MIND
  scores are spread differently (the quick score-level fusion that the issue measured).

The top n of fused is exact (for an exact index): an item outside MIND's top-n list and
outside the kNN support has a kNN term no larger than any listed item's and a smaller MIND
term, so it cannot enter. Candidates are therefore MIND's FAISS top n (prior included) and
every item of the kNN support, all rescored. Each returned item names the channel whose
standardised contribution put it there (relative to an average item): "mind", "popularity"
or "item_knn"; an item from MIND's channel also names its best interest.

The weights (w, a) are chosen on validation users (`tune_channels`): w alone first (that
is MIND with the prior), a alone (MIND with item-kNN), then a given w and w again given a.
The table size, the prior's half-life and γ are chosen there too (`choose_channels`), a
later setting replacing the first only when clearly better (the one-standard-error rule).
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from index.faiss_index import build_index, empty_index, pad_queries, search_top_n
from retrieval.data import Dataset, Split, held_out_users
from retrieval.errors import ArtifactError, RetrievalError
from retrieval.metrics import mean_metrics, topn_metrics
from retrieval.neighbours import ItemNeighbours, NeighbourScores, build_neighbours, neighbour_scores
from retrieval.mind import Interests
from retrieval.recommend import Merge, Recommendations, history_rows, interest_vectors, recommend_batch
from retrieval.retrievers import Retriever
from retrieval.samples import Histories

log = logging.getLogger(__name__)

CHANNELS = ("mind", "popularity", "item_knn")  # Recommendations.channel codes 0, 1, 2 (-1 = no item)
CHANNELS_FILE = "channels.npz"
SAMPLE = 2048  # items whose MIND scores standardise a user's MIND term
KNN_K = (50, 100, 200)  # neighbours per item in the item-kNN table: tried, chosen on validation
HALFLIVES = (0.02, 0.1)  # temporal split: recency half-lives of the prior's frequency tried beside plain counts,
# as fractions of the training period (a prior that follows what is popular now)
DECAYS = (0.9, 0.8, 0.7, 0.5)  # the kNN term's weight per step back in the history, tried beside 1 (a plain sum)
PRIOR_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)  # w in units of median std(u·v) / std(log f)
KNN_GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)  # a: kNN weight beside MIND's (both standardised)
ENTRY_CHUNK = 65536  # candidates scored against their user's interests at a time


@dataclass
class ChannelWeights:
    prior: float = 0.0  # w: MIND's score is u·v + w log(1 + f) (0 = no prior)
    item_knn: float = 0.0  # a: weight of the standardised kNN score beside the standardised MIND score (0 = off)


@dataclass
class Channels:
    """What the merged retriever needs beside the model and the index."""

    log_freq: np.ndarray  # (N+1,) float32 log(1 + training frequency of each item); [0] = 0
    neighbours: ItemNeighbours  # top-k item neighbours over the training data
    sample: np.ndarray  # (S,) int64 items whose MIND scores standardise each user's MIND term
    weights: ChannelWeights = field(default_factory=ChannelWeights)
    max_len: int = 50  # L: the last L behaviours whose neighbours are summed
    halflife: float | None = None  # recency weighting of the frequency (timestamp units), None = plain counts
    decay: float = 1.0  # the kNN term sums the j-th most recent behaviour's neighbours times decay^j (1 = plain sum)
    prior_only: float = 0.0  # the prior weight chosen with the kNN channel off (MIND with the prior, reported beside)

    def settings(self) -> dict[str, Any]:
        """The manifest entry: everything but the arrays."""
        return {"weights": asdict(self.weights), "prior_only": self.prior_only, "knn_k": self.neighbours.k,
                "max_len": self.max_len, "halflife": self.halflife, "decay": self.decay, "sample": len(self.sample),
                "file": CHANNELS_FILE}


def item_log_frequency(ds: Dataset, split: Split, halflife: float | None = None) -> np.ndarray:
    """(N+1,) log(1 + f_i), f_i the item's count in the training data (train users' first
    history_len items); with `halflife`, each interaction counts 0.5^((t_end - t) / halflife),
    t_end the last training time, so recent interactions weigh more."""
    users = split.train_users
    lengths = split.history_len[users]
    starts = np.repeat(ds.offsets[users], lengths)
    pos = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    idx = starts + pos  # (E_train,) positions of the training data in the log
    items = ds.items[idx]
    if halflife is None:
        weights = None
    else:
        if halflife <= 0:
            raise RetrievalError(f"halflife must be positive, got {halflife}")
        t = ds.times[idx].astype(np.float64)
        weights = np.exp2(-(t.max(initial=0.0) - t) / halflife)
    f = np.bincount(items, weights=weights, minlength=ds.n_items + 1).astype(np.float64)
    out = np.log1p(f).astype(np.float32)
    out[0] = 0.0
    return out


def build_channels(ds: Dataset, split: Split, k: int = 50, max_len: int = 50, halflife: float | None = None,
                   seed: int = 0, decay: float = 1.0) -> Channels:
    """The channels' data from the split's training data; weights start at 0 (MIND alone)."""
    nb = build_neighbours(ds, split, k=k)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(np.arange(1, ds.n_items + 1), size=min(SAMPLE, ds.n_items), replace=False))
    return Channels(item_log_frequency(ds, split, halflife), nb, sample.astype(np.int64), max_len=max_len,
                    halflife=halflife, decay=decay)


def prior_vectors(item_vectors: np.ndarray, channels: Channels, width: int | None = None) -> np.ndarray:
    """(N, width) item vectors with log(1 + f) appended (width D+1 unless given): what the index
    of a merged retriever holds. A wider index (a PQ whose M must divide the width) holds zeros
    after the prior, which the queries' zeros meet (pad_queries)."""
    vectors = np.hstack([np.asarray(item_vectors, dtype=np.float32), channels.log_freq[1:, None]])
    return pad_queries(vectors, width) if width is not None else vectors


def prior_width(factory: str, d: int) -> int:
    """The narrowest width >= d + 1 (the item vectors and the prior) that `factory` can index:
    d + 1 for Flat, IVF and HNSW; for a product quantizer with M sub-quantizers the next
    multiple of M (its codes keep M bytes; the padding coordinates are zeros)."""
    empty_index(factory, d)  # a factory wrong in itself is refused as for MIND alone
    for width in range(d + 1, 2 * (d + 1) + 1):
        try:
            empty_index(factory, width)
        except RetrievalError:
            continue
        return width
    empty_index(factory, d + 1)  # raises with faiss's reason
    return d + 1


def prior_index(model: Retriever, channels: Channels, factory: str = "Flat") -> faiss.Index:
    """An index over the model's item vectors with the prior coordinate (exact with "Flat")."""
    vectors = model.item_vectors().detach().numpy()
    return build_index(prior_vectors(vectors, channels, prior_width(factory, vectors.shape[1])), factory)


# ---------------------------------------------------------------------------- artifact


def channel_files(channels: Channels) -> dict[str, bytes]:
    """The files that go beside index.faiss (save_index's `files`)."""
    buf = io.BytesIO()
    np.savez(buf, log_freq=channels.log_freq, nbr_ids=channels.neighbours.ids, nbr_sims=channels.neighbours.sims,
             sample=channels.sample)
    return {CHANNELS_FILE: buf.getvalue()}


def load_channels(index_dir: Path, manifest: dict[str, Any]) -> Channels | None:
    """The channels stored with an index (its manifest's "channels" entry), or None for an index
    without them. The file's checksum was verified by load_index."""
    entry = manifest.get("channels")
    if entry is None:
        return None
    path = Path(index_dir) / entry.get("file", CHANNELS_FILE)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        nb = ItemNeighbours(arrays["nbr_ids"], arrays["nbr_sims"])
        ch = Channels(arrays["log_freq"], nb, arrays["sample"], ChannelWeights(**entry["weights"]),
                      max_len=int(entry["max_len"]), halflife=entry.get("halflife"),
                      decay=float(entry.get("decay", 1.0)),
                      prior_only=float(entry.get("prior_only", 0.0)))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: unreadable channels ({err})") from None
    if len(ch.log_freq) - 1 != manifest.get("ntotal"):
        raise ArtifactError(f"{path}: channels cover {len(ch.log_freq) - 1} items, the index {manifest.get('ntotal')}")
    return ch


# ---------------------------------------------------------------------------- retrieval


@dataclass
class Prepared:
    """What the merge needs of a batch of histories, independent of the channel weights."""

    vectors: np.ndarray  # (U, K, D) interest vectors
    active: np.ndarray  # (U, K) bool
    exclude: list[np.ndarray]  # U arrays of FAISS ids (item - 1) of each history
    knn: NeighbourScores  # each history's positive kNN scores, history excluded
    sample_scores: np.ndarray  # (U, S) max_k u_k·v over the channels' item sample
    embed: Callable[[np.ndarray], np.ndarray]  # item indices (E,) -> (E, D) vectors
    interests: Interests  # the model's interests (vectors above, plus mass and behaviour weights: explanations)
    # Work that does not depend on the kNN weight, kept for the next `fuse` of the same batch (tuning tries
    # many weights): MIND's top n per (index, prior weight, n), and the MIND score and best interest of
    # every kNN entry.
    searched: dict[tuple[int, float, int], np.ndarray] = field(default_factory=dict, repr=False)
    knn_mind: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)


@torch.inference_mode()
def prepare(model: Retriever, ds: Dataset, hist: Histories, channels: Channels) -> Prepared:
    """Interests, kNN scores and the sample scores of a batch of histories."""
    it = interest_vectors(model, ds, hist)
    vectors, active = it.vectors.numpy(), it.active.numpy()
    rows = hist.rows()
    knn = neighbour_scores(channels.neighbours, [r[-channels.max_len :] for r in rows], rows, channels.decay)

    def embed(items: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.item_embed(torch.from_numpy(np.asarray(items, dtype=np.int64))).numpy()

    sample_scores = _best_interest(vectors, active, embed(channels.sample))  # (U, S)
    return Prepared(vectors, active, history_rows(hist), knn, sample_scores, embed, it)


def _best_interest(vectors: np.ndarray, active: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(U, S) max over active interests of u_k·v_s for items (S, D) shared by every user."""
    s = np.einsum("ukd,sd->uks", vectors, items)  # (U, K, S)
    s[~active] = -np.inf
    return s.max(axis=1)


def _mind_scores(p: Prepared, rows: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each (row, item) entry's MIND score max_k u_k·v_i over the row's active interests, and that k."""
    uniq, inv = np.unique(items, return_inverse=True)
    item_vec = p.embed(uniq)  # (I, D)
    mind = np.empty(len(rows), dtype=np.float32)
    best = np.empty(len(rows), dtype=np.int64)
    for s in range(0, len(rows), ENTRY_CHUNK):
        r, v = rows[s : s + ENTRY_CHUNK], item_vec[inv[s : s + ENTRY_CHUNK]]
        sc = np.einsum("ekd,ed->ek", p.vectors[r], v)  # (E', K)
        sc[~p.active[r]] = -np.inf
        best[s : s + ENTRY_CHUNK] = sc.argmax(1)
        mind[s : s + ENTRY_CHUNK] = sc.max(1)
    return mind, best


def fuse(p: Prepared, index: faiss.Index, channels: Channels, weights: ChannelWeights, n: int) -> Recommendations:
    """The top n of the fused score per history (module docstring), with each item's channel."""
    U, K, D = p.vectors.shape
    w, a = float(weights.prior), float(weights.item_knn)
    if index.d > D:
        queries = np.concatenate([p.vectors, np.full((U, K, 1), w, dtype=np.float32)], axis=2)  # (U, K, D+1)
        queries = pad_queries(queries, index.d)  # (U, K, width): zeros where a PQ index holds padding
    elif index.d == D and w == 0:
        queries = p.vectors
    else:
        raise RetrievalError(f"the index has d={index.d}; a prior needs the item vectors (d={D}) plus the prior "
                             "coordinate: build the index with --channels")
    key = (id(index), w, n)
    if key not in p.searched:
        p.searched[key] = search_top_n(index, queries, p.active, n, exclude=p.exclude, strategy="best")[0]  # (U, n)
    ids = p.searched[key]
    rows = np.repeat(np.arange(U, dtype=np.int64), n)
    items = ids.reshape(-1) + 1
    keep = items > 0
    rows, items = rows[keep], items[keep]
    span = np.int64(len(channels.log_freq))
    knn_on = a > 0 and len(p.knn.items) > 0
    if knn_on:  # the kNN entries (unique, each scored once per batch) and MIND's top n outside them
        if p.knn_mind is None:
            p.knn_mind = _mind_scores(p, p.knn.rows, p.knn.items)
        knn_keys = p.knn.rows * span + p.knn.items  # sorted: by row, then item
        m_keys = rows * span + items
        pos = np.minimum(np.searchsorted(knn_keys, m_keys), len(knn_keys) - 1)
        m_keys = np.unique(m_keys[knn_keys[pos] != m_keys])
        m_mind, m_best = _mind_scores(p, m_keys // span, m_keys % span)
        keys = np.concatenate([knn_keys, m_keys])
        mind, best = np.concatenate([p.knn_mind[0], m_mind]), np.concatenate([p.knn_mind[1], m_best])
        knn = np.concatenate([p.knn.scores, np.zeros(len(m_keys), dtype=p.knn.scores.dtype)])
    else:
        keys = np.unique(rows * span + items)  # (E,) candidates, sorted by row then item
        mind, best = _mind_scores(p, keys // span, keys % span)
        knn = np.zeros(len(keys))  # no kNN entry in play: every candidate's kNN score is 0
    rows, items = keys // span, keys % span
    lf = channels.log_freq[items]

    # standardisation: MIND (+ prior) over the item sample, kNN over all items
    lf_s = channels.log_freq[channels.sample]  # (S,)
    with_prior = p.sample_scores + w * lf_s[None, :]  # (U, S)
    mu, sd = with_prior.mean(1), with_prior.std(1)
    sd = np.where(sd > 0, sd, 1.0)
    mind_mu = p.sample_scores.mean(1)
    c_mind = (mind - mind_mu[rows]) / sd[rows]
    c_pop = w * (lf - lf_s.mean()) / sd[rows]
    fused = (mind + w * lf - mu[rows]) / sd[rows]
    c_knn = np.full(len(keys), -np.inf, dtype=np.float64)
    if a > 0:
        n_items = len(channels.log_freq) - 1
        s1, s2 = p.knn.sums()
        k_mu = s1 / n_items
        k_sd = np.sqrt(np.maximum(s2 / n_items - k_mu**2, 0.0))
        ok = k_sd[rows] > 0
        c_knn = np.where(ok, a * (knn - k_mu[rows]) / np.where(ok, k_sd[rows], 1.0), 0.0)
        fused = fused + c_knn
    contrib = np.stack([c_mind, c_pop if w != 0 else np.full(len(keys), -np.inf), c_knn], axis=1)  # (E, 3)
    channel = contrib.argmax(1)

    # top n per row: by fused descending, ties by item index
    order = np.lexsort((items, -fused, rows))
    rows_o = rows[order]
    first = np.searchsorted(rows_o, np.arange(U))
    rank = np.arange(len(order)) - first[rows_o]
    top = order[rank < n]
    r, c = rows[top], rank[rank < n]
    out_items = np.zeros((U, n), dtype=np.int64)
    out_scores = np.full((U, n), -np.inf, dtype=np.float32)
    out_interest = np.full((U, n), -1, dtype=np.int64)
    out_channel = np.full((U, n), -1, dtype=np.int64)
    out_items[r, c] = items[top]
    out_scores[r, c] = fused[top]
    out_channel[r, c] = channel[top]
    out_interest[r, c] = np.where(channel[top] == 0, best[top], -1)
    return Recommendations(out_items, out_scores, out_interest, out_channel)


def retrieve_batch(
    model: Retriever,
    ds: Dataset,
    index: faiss.Index,
    hist: Histories,
    n: int,
    merge: Merge = "best",
    channels: Channels | None = None,
) -> tuple[Recommendations, Interests]:
    """Top-n items of one batch of histories from every channel, merged (the module
    docstring), with the model's interests (what explanations read); without channels, MIND
    alone (retrieval.recommend.recommend_batch). The merged list ranks MIND's interests by
    their best score: `merge` must be "best" when channels are given. `query`, `evaluate`
    and the server (retrieval.serving) all retrieve through here."""
    if channels is None:
        return recommend_batch(model, ds, index, hist, n, merge=merge)
    if merge != "best":
        raise RetrievalError(f"the merged retriever ranks interests by their best score; merge {merge!r} applies "
                             "to MIND alone (an index without channels)")
    p = prepare(model, ds, hist, channels)
    return fuse(p, index, channels, channels.weights, n), p.interests


def retrieve(
    model: Retriever,
    ds: Dataset,
    index: faiss.Index,
    hist: Histories,
    n: int,
    merge: Merge = "best",
    channels: Channels | None = None,
    batch_size: int = 1024,
) -> Recommendations:
    """Top-n items per history (`retrieve_batch` over batches of `batch_size` histories)."""
    parts = [retrieve_batch(model, ds, index, h, n, merge, channels)[0] for h in hist.batches(batch_size)]
    if len(parts) == 1:
        return parts[0]
    fields = ("items", "scores", "interest") + (("channel",) if channels is not None else ())
    return Recommendations(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


# ---------------------------------------------------------------------------- tuning


@dataclass
class Tuned:
    prior_only: ChannelWeights  # the best w with the kNN channel off: MIND with the prior
    knn_only: ChannelWeights  # the best a with the prior off: MIND with item-kNN (the ablation)
    merged: ChannelWeights  # the best (w, a)
    objective: str  # what was maximised on validation users
    trials: list[dict[str, float]]  # every (prior, item_knn, figures) tried, in order
    users: int  # validation users
    best: float  # the objective at `merged`
    per_user: np.ndarray  # (U,) each validation user's recall@n + ndcg@n at `merged`: paired comparisons


def _objective(rec: Recommendations, truth: list[np.ndarray], n: int) -> tuple[dict[str, float], np.ndarray]:
    """The mean figures, and each user's recall@n + ndcg@n (U,)."""
    per = topn_metrics(np.where(rec.items > 0, rec.items, -1), truth, (n,))
    return mean_metrics(per), per[f"recall@{n}"] + per[f"ndcg@{n}"]


def tune_channels(model: Retriever, ds: Dataset, split: Split, index: faiss.Index, channels: Channels,
                  n: int = 50, part: str = "validation") -> Tuned:
    """Choose the prior weight w and the kNN weight a on the split's validation users, by
    Recall@n + NDCG@n (both matter): w alone, a alone (the ablations), then a given w, then
    w again given a (the merged retriever: the best of all that was tried)."""
    users, ends, truth = held_out_users(ds, split, part)
    if len(users) == 0:
        raise RetrievalError(f"no {part} users with a ground truth to choose the channel weights on")
    p = prepare(model, ds, Histories.of(ds, users, ends), channels)
    lf_s = channels.log_freq[channels.sample]
    unit = float(np.median(p.sample_scores.std(1)) / max(float(lf_s.std()), 1e-6))
    trials: list[dict[str, float]] = []
    seen: dict[tuple[float, float], float] = {}
    per_user: dict[tuple[float, float], np.ndarray] = {}
    goal = f"recall@{n}+ndcg@{n}"

    def score(w: float, a: float) -> float:
        if (w, a) not in seen:
            figures, per_user[(w, a)] = _objective(fuse(p, index, channels, ChannelWeights(w, a), n), truth, n)
            seen[(w, a)] = figures[f"recall@{n}"] + figures[f"ndcg@{n}"]
            trials.append({"prior": w, "item_knn": a, **figures})
        return seen[(w, a)]

    def best_of(cands: list[tuple[float, float]]) -> tuple[float, float]:
        return max(cands, key=lambda c: (score(*c), -c[0], -c[1]))  # ties: the smaller weights

    prior_grid = [round(r * unit, 6) for r in PRIOR_GRID]
    w, _ = best_of([(x, 0.0) for x in prior_grid])
    prior_only = ChannelWeights(w, 0.0)
    knn_only = ChannelWeights(0.0, best_of([(0.0, x) for x in KNN_GRID])[1])
    _, a = best_of([(w, x) for x in KNN_GRID])
    w, _ = best_of([(x, a) for x in prior_grid])
    w, a = best_of([(w, a), (knn_only.prior, knn_only.item_knn)])
    log.info("channel weights on %d %s users: prior %.4g alone; prior %.4g + item-kNN %.3g (%s %.4f)",
             len(users), part, prior_only.prior, w, a, goal, seen[(w, a)])
    return Tuned(prior_only, knn_only, ChannelWeights(w, a), goal, trials, len(users), seen[(w, a)],
                 per_user[(w, a)])


# ---------------------------------------------------------------------------- choice


@dataclass
class Chosen:
    """The merged retriever as chosen on validation users."""

    channels: Channels  # weights set to the merged ones (0, 0: MIND alone, when there are no validation users)
    index: faiss.Index  # exact index over the item vectors and the chosen prior (width D+1)
    tuned: Tuned | None  # None without validation users
    settings: list[dict[str, Any]]  # each (knn_k, halflife, decay) tried: objective, gain, se, kept


def training_span(ds: Dataset, split: Split) -> float:
    """Length of the training period in timestamp units (last minus first training time)."""
    lengths = split.history_len[split.train_users]
    if not lengths.sum():
        return 0.0
    first = ds.times[ds.offsets[split.train_users][lengths > 0]]
    last = ds.times[ds.offsets[split.train_users][lengths > 0] + lengths[lengths > 0] - 1]
    return float(last.max() - first.min())


def paired_gain(new: np.ndarray, old: np.ndarray) -> tuple[float, float]:
    """The mean per-user gain of `new` over `old` (the same users) and its standard error
    (std of the differences, ddof 1, over sqrt(U); 0 for one user). A setting is clearly
    better when the gain exceeds the standard error (the one-standard-error rule)."""
    d = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)  # (U,)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se


def choose_channels(model: Retriever, ds: Dataset, split: Split, sizes: int | Sequence[int] = KNN_K,
                    max_len: int = 50, n: int = 50, require_validation: bool = False,
                    on_setting: Callable[[int, int], None] | None = None) -> Chosen:
    """Every choice of the merged retriever on the split's validation users, one after the
    other: the neighbour table's size (each of `sizes`, in order), on the temporal split the
    prior's recency half-life (HALFLIVES of the training period, beside plain counts), the kNN
    term's recency decay (DECAYS, beside a plain sum), and for each setting the weights
    (tune_channels). The first setting is kept, and a later one replaces the kept one only
    when its gain is larger than one standard error (`paired_gain`): with few validation
    users (54 on ML-100K's temporal split) the largest of many noisy figures is not the best
    setting. Without validation users the first setting is kept with weights 0 (MIND alone),
    or RetrievalError when `require_validation`. `on_setting(done, total)` reports progress."""
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    v_users = held_out_users(ds, split, "validation")[0]
    if not len(v_users) and require_validation:
        raise RetrievalError("no validation users with a ground truth to choose the merged retriever's weights on")
    period = training_span(ds, split) if split.kind == "time" else 0.0
    halflives = [f * period for f in HALFLIVES] if period > 0 else []
    total = len(sizes) + len(halflives) + len(DECAYS)
    best: tuple[Tuned, Channels, faiss.Index] | None = None
    tried: list[dict[str, Any]] = []

    def trial(ch: Channels, ch_index: faiss.Index) -> Chosen | None:
        nonlocal best
        setting = {"knn_k": ch.neighbours.k, "halflife": ch.halflife, "decay": ch.decay}
        if not len(v_users):
            return Chosen(ch, ch_index, None, [setting])
        t = tune_channels(model, ds, split, ch_index, ch, n=n)
        gain, se = (0.0, 0.0) if best is None else paired_gain(t.per_user, best[0].per_user)
        kept = best is None or gain > se
        log.info("setting knn_k=%d halflife=%s decay=%g: %s %.4f, gain %+.4f (se %.4f) over the kept one: %s",
                 ch.neighbours.k, ch.halflife, ch.decay, t.objective, t.best, gain, se, "kept" if kept else "not kept")
        tried.append({**setting, t.objective: round(t.best, 6), "gain": round(gain, 6), "se": round(se, 6),
                      "kept": kept})
        if on_setting is not None:
            on_setting(len(tried), total)
        if kept:
            best = (t, ch, ch_index)
        return None

    for k in sizes:
        ch = build_channels(ds, split, k=k, max_len=max_len)
        if (alone := trial(ch, prior_index(model, ch))) is not None:
            return alone
    for halflife in halflives:  # the same table, another prior
        ch = dataclasses.replace(best[1], log_freq=item_log_frequency(ds, split, halflife), halflife=halflife)  # type: ignore[index]
        trial(ch, prior_index(model, ch))
    for decay in DECAYS:  # the same table and prior: the same index
        trial(dataclasses.replace(best[1], decay=decay), best[2])  # type: ignore[index]
    tuned, channels, index = best  # type: ignore[misc]
    channels.weights, channels.prior_only = tuned.merged, tuned.prior_only.prior
    return Chosen(channels, index, tuned, tried)
