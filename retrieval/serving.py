"""The serving object: a `Recommender` holds a bundle, its index and an optional ranker, and
answers a batch of requests. `retrieve query`, the HTTP server (retrieval/server) and the
serving benchmark all go through it.

A request names a user of the training log, a list of behaviours (raw item ids, oldest
first), or both: the user's stored behaviours with the new ones appended. Ids not in the
vocabulary are dropped and listed in the response; a request left with no known behaviour
(a new user whose clicks are all unknown, an anonymous visitor) gets the most popular
items, flagged as a fallback. The model reads the most recent L behaviours (L = the
bundle's max_len); every behaviour of the history, however old, is excluded from the results.

The two stages are each called from one method: `retrieve` (for every row of a batch at
once, through retrieval.channels.retrieve_batch, the function `query` and `evaluate` use:
the merged retriever, MIND + item prior + item-kNN, when the index holds channels, MIND
alone otherwise) and `rank` (the ranker's permutation of each row's candidates, which the retrieval score
and the interest follow). Lookups (raw id -> index, the popularity list) are built once,
never per request.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import orjson
import torch

from index.faiss_index import load_index
from index.torch_search import on_device
from retrieval.bundle import Bundle, load_bundle
from retrieval.channels import CHANNELS, Channels, load_channels, retrieve_batch
from retrieval.errors import ArtifactError, RetrievalError
from retrieval.explain import interest_groups, top_behaviours
from retrieval.mind import Interests
from retrieval.recommend import Merge, Recommendations
from retrieval.samples import Histories

log = logging.getLogger(__name__)

MAX_N = 1000  # most items one request may ask for
MAX_CANDIDATES = 1000  # most retrieval candidates one request may have reranked
MAX_HISTORY = 1000  # most behaviours one request may carry (the model reads the last L of stored + new)
EXPLAIN_BEHAVIOURS = 3  # behaviours named for each explained item
GROUP_BEHAVIOURS = 10  # behaviours listed per interest group
CHUNK = 1024  # requests answered per pass of a large batch (bounds the arrays of one pass)


class RequestError(RetrievalError):
    """A request that cannot be served as asked (a bad value); the server answers it with a 4xx."""


@dataclass
class Request:
    """One recommendation request."""

    user: str | None = None  # a user id of the training log (its stored behaviours); unknown = a new user
    history: list[str] | None = None  # new behaviours, raw item ids, oldest first (after the stored ones)
    times: list[int] | None = None  # their event times in the log's unit (seconds); None = the arrival time
    n: int = 10  # items to return, 1..MAX_N
    rank: bool = False  # rerank `candidates` retrieved items with the ranker
    candidates: int = 200  # M: candidates retrieved for the ranker, n..MAX_CANDIDATES
    explain: bool = False  # name the behaviours behind each item and the user's interests


@dataclass  # no slots: orjson encodes a dataclass 4x faster through its __dict__
class Behaviour:
    item: str  # raw item id
    title: str | None
    weight: float  # its routing weight into the interest


@dataclass
class Recommendation:
    rank: int  # 1-based position in the answer
    item: str  # raw item id
    title: str | None
    score: float | None  # retrieval score (inner product; the fused score with channels); None for the popularity fallback
    interest: int | None  # the interest that retrieved it; None for the fallback or another channel's item
    rank_score: float | None = None  # the ranker's logit, when reranked
    channel: str | None = None  # with channels: "mind", "popularity" or "item_knn" (retrieval.channels)
    because: list[Behaviour] | None = None  # with explain: the behaviours behind its interest


@dataclass
class InterestGroup:
    interest: int
    mass: float  # share of the behaviours routed to it
    behaviours: list[Behaviour]  # those routed to it more than to any other, strongest first


@dataclass
class Response:
    user: str | None  # as asked
    known_user: bool  # the user is in the training log (their stored behaviours were used)
    history: int  # known behaviours: stored + new in the vocabulary
    used: int  # the most recent of them that the model read (at most L)
    dropped: list[str]  # new behaviours not in the vocabulary, in request order
    fallback: bool  # no known behaviour: the most popular items
    ranked: bool  # reordered by the ranker
    items: list[Recommendation]
    interests: list[InterestGroup] | None = None  # with explain

    def to_dict(self) -> dict[str, Any]:
        """The response as JSON values (the HTTP API's body)."""
        return asdict(self)

    def to_json(self) -> bytes:
        """The response as compact JSON (UTF-8), as the HTTP API sends it."""
        return orjson.dumps(self)


class IdLookup:
    """Raw ids -> positions by binary search over a sorted copy, built once (a Python dict over
    a million ids would hold about 100 MB)."""

    def __init__(self, ids: np.ndarray):
        ids = np.asarray(ids)
        if ids.dtype.kind != "U":
            ids = ids.astype(str)
        self.order: np.ndarray | None = None
        if len(ids) > 1 and not bool((ids[:-1] <= ids[1:]).all()):
            self.order = np.argsort(ids, kind="stable")
            ids = ids[self.order]
        self.sorted = ids

    def find(self, raw: Sequence[str]) -> np.ndarray:
        """(len(raw),) int64 position of each id, -1 where absent."""
        if len(raw) == 0 or len(self.sorted) == 0:
            return np.full(len(raw), -1, dtype=np.int64)
        q = np.asarray(raw, dtype=str)
        pos = np.minimum(np.searchsorted(self.sorted, q), len(self.sorted) - 1)
        hit = self.sorted[pos] == q
        idx = pos if self.order is None else self.order[pos]
        return np.where(hit, idx, -1).astype(np.int64)


def set_threads(threads: int) -> None:
    """torch and FAISS (OpenMP) threads of the calling thread; torch's count is process-wide,
    FAISS's is per OS thread, so a worker thread calls this itself."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def _short(fingerprint: str | None) -> str | None:
    return fingerprint[:12] if fingerprint else None


def load_served_index(bundle: Bundle, index: Path, device: torch.device | None = None
                      ) -> tuple[Any, dict[str, Any], Channels | None]:
    """The index built from `bundle`, its manifest and the channels it holds (None: MIND
    alone), a flat index moved to `device` when that is a GPU (exact search there)."""
    idx, manifest = load_index(index, bundle.fingerprint)
    channels = load_channels(index, manifest)
    if device is not None:
        idx = on_device(idx, device)
    return idx, manifest, channels


class Recommender:
    """A loaded bundle, its index and an optional ranker, answering batches of requests."""

    def __init__(self, bundle: Bundle, index: faiss.Index, index_manifest: dict[str, Any],
                 ranker: Any = None, merge: Merge = "best", index_path: Path | None = None,
                 channels: Channels | None = None):
        if index_manifest.get("bundle_fingerprint") != bundle.fingerprint:
            raise ArtifactError(
                f"the index was built from another model bundle (index: {_short(index_manifest.get('bundle_fingerprint'))}, "
                f"bundle: {_short(bundle.fingerprint)}); rebuild it with build-index")
        if index.ntotal != bundle.dataset.n_items:
            raise ArtifactError(f"the index holds {index.ntotal} items, the bundle {bundle.dataset.n_items}")
        if ranker is not None and ranker.manifest.get("data_fingerprint") != bundle.manifest["data_fingerprint"]:
            raise ArtifactError(f"{ranker.path}: the ranker was trained on other data than the retrieval bundle")
        if merge not in ("best", "share"):
            raise RetrievalError(f"merge must be best or share, got {merge!r}")
        if channels is not None and merge != "best":
            raise RetrievalError("merge share applies to MIND alone; this index holds the merged retriever "
                                 "(built with --channels)")
        self.bundle, self.index, self.index_manifest, self.ranker, self.merge = bundle, index, index_manifest, ranker, merge
        self.channels = channels
        self.model, self.dataset = bundle.model, bundle.dataset
        self.index_path = index_path
        self.max_len = int(self.model.config.max_len)
        self.loaded_at = time.time()

    @classmethod
    def load(cls, bundle: Path, index: Path, ranker: Path | None = None, merge: Merge = "best",
             device: torch.device | None = None) -> Recommender:
        """Load and verify a bundle, the index built from it (with its channels, if it holds
        them) and a ranker trained beside it; the models on `device` (default: the CPU), a flat
        index searched there too (index.torch_search.on_device)."""
        b = load_bundle(bundle)
        idx, manifest, channels = load_served_index(b, index, device)
        r = None
        if ranker is not None:
            from retrieval.ranking.bundle import load_ranker

            r = load_ranker(ranker, b)
        if device is not None:
            b.model.to(device)
            if r is not None:
                r.model.to(device)
        return cls(b, idx, manifest, r, merge, index_path=Path(index), channels=channels)

    # ------------------------------------------------------------------ what is loaded

    def fingerprints(self) -> dict[str, str | None]:
        """The artifacts being served: bundle, index file and ranker fingerprints (sha256)."""
        return {
            "bundle": self.bundle.fingerprint,
            "index": self.index_manifest.get("index_sha256"),
            "ranker": self.ranker.manifest.get("bundle_fingerprint") if self.ranker is not None else None,
        }

    def info(self) -> dict[str, Any]:
        """What a client may want to know: sizes, paths, fingerprints, limits."""
        c = self.model.config
        return {
            "items": self.dataset.n_items, "users": self.dataset.n_users, "interests": int(c.interests),
            "max_len": self.max_len, "dim": int(c.dim), "merge": self.merge,
            "channels": self.channels.settings() if self.channels is not None else None,
            "index": {"factory": self.index_manifest.get("factory"), "search_param": self.index_manifest.get("search_param"),
                      "search_value": self.index_manifest.get("search_value")},
            "ranker": self.ranker.name if self.ranker is not None else None,
            "paths": {"bundle": str(self.bundle.path), "index": str(self.index_path) if self.index_path else None,
                      "ranker": str(self.ranker.path) if self.ranker is not None else None},
            "fingerprints": self.fingerprints(), "titles": self.dataset.titles is not None,
            "limits": {"n": MAX_N, "candidates": MAX_CANDIDATES, "history": MAX_HISTORY},
        }

    @functools.cached_property
    def _items(self) -> IdLookup:
        return IdLookup(self.dataset.item_ids[1:])  # position p is item index p + 1

    @functools.cached_property
    def _users(self) -> IdLookup:
        return IdLookup(self.dataset.user_ids)

    @functools.cached_property
    def _popular(self) -> np.ndarray:
        """(min(N, MAX_N),) item indices, most interactions first (ties: lower index)."""
        counts = np.bincount(self.dataset.items, minlength=self.dataset.n_items + 1)[1:]
        top = min(MAX_N, len(counts))
        head = np.argpartition(-counts, top - 1)[:top] if top < len(counts) else np.arange(len(counts))
        return (head[np.lexsort((head, -counts[head]))] + 1).astype(np.int64)

    def knows_user(self, user: str) -> bool:
        return bool(self._users.find([str(user)])[0] >= 0)

    def item_index(self, raw: Sequence[str]) -> np.ndarray:
        """(len(raw),) item indices 1..N, 0 where the id is not in the vocabulary."""
        return self._items.find(raw) + 1

    def warm(self) -> None:
        """Build the lookups and run every path once, so the first real request pays no first-call costs."""
        ds = self.dataset
        some_user, some_item = str(ds.user_ids[0]), str(ds.item_ids[1])
        reqs = [Request(user=some_user, n=10, explain=True), Request(history=[some_item], n=10),
                Request(history=[], n=10)]
        if self.ranker is not None:
            reqs.append(Request(user=some_user, n=10, rank=True, candidates=min(200, MAX_CANDIDATES)))
        self.recommend(reqs)
        self.recommend(reqs[:1])

    # ------------------------------------------------------------------ requests

    def check(self, req: Request) -> None:
        """RequestError naming the first bad value of a request."""
        if req.user is None and req.history is None:
            raise RequestError("give user, history or both")
        if not 1 <= req.n <= MAX_N:
            raise RequestError(f"n must be between 1 and {MAX_N}, got {req.n}")
        if req.rank:
            if self.ranker is None:
                raise RequestError("rank: no ranker is loaded (start the server with --ranker)")
            if not req.n <= req.candidates <= MAX_CANDIDATES:
                raise RequestError(f"candidates must be between n ({req.n}) and {MAX_CANDIDATES}, got {req.candidates}")
        history = req.history or []
        if len(history) > MAX_HISTORY:
            raise RequestError(f"history holds {len(history)} behaviours, at most {MAX_HISTORY}")
        if req.times is not None and len(req.times) != len(history):
            raise RequestError(f"times holds {len(req.times)} values for {len(history)} behaviours")

    def recommend(self, requests: Sequence[Request], now: float | None = None,
                  timings: dict[str, float] | None = None) -> list[Response]:
        """One response per request, in order. `now` (seconds) stamps behaviours sent without
        times; `timings`, when given, receives the seconds spent per stage."""
        for r in requests:
            self.check(r)
        if len(requests) > CHUNK:
            out: list[Response] = []
            for i in range(0, len(requests), CHUNK):
                out += self.recommend(requests[i : i + CHUNK], now, timings)
            return out
        clock = _Stages(timings)
        now_s = int(time.time() if now is None else now)
        hist, users, dropped = self._histories(requests, now_s)
        clock.lap("prepare")

        U = len(requests)
        lengths = hist.lengths()
        served = np.flatnonzero(lengths > 0)  # rows with a known behaviour; the rest fall back
        rank = np.array([r.rank for r in requests], dtype=bool)
        depth = np.array([r.candidates if r.rank else r.n for r in requests], dtype=np.int64)
        recs, interests, rank_scores = None, None, None
        if served.size:
            h = hist if served.size == U else hist.take(served)
            recs, interests = self.retrieve(h, depth[served])
            clock.lap("retrieve")
            to_rank = np.flatnonzero(rank[served])  # positions within `served`
            if to_rank.size:
                rank_scores = self._rerank(h, recs, to_rank, depth[served][to_rank])
                clock.lap("rank")
        out = self._responses(requests, hist, users, dropped, served, recs, interests, rank_scores)
        clock.lap("respond")
        return out

    def _histories(self, requests: Sequence[Request], now_s: int) -> tuple[Histories, np.ndarray, list[list[str]]]:
        """Each request's behaviours (stored, then the known new ones) with their times, each
        row's user index (-1 for none or unknown) and the dropped ids."""
        ds = self.dataset
        asked = [i for i, r in enumerate(requests) if r.user is not None]
        users = np.full(len(requests), -1, dtype=np.int64)
        if asked:
            users[asked] = self._users.find([str(requests[i].user) for i in asked])
        seqs, times, dropped = [], [], []
        for r, u in zip(requests, users):
            stored = slice(ds.offsets[u], ds.offsets[u + 1]) if u >= 0 else slice(0, 0)
            if not r.history:
                seqs.append(ds.items[stored])
                times.append(ds.times[stored])
                dropped.append([])
                continue
            raw = [str(x) for x in r.history]
            idx = self.item_index(raw)  # (h,) 0 = unknown
            keep = idx > 0
            dropped.append([x for x, k in zip(raw, keep) if not k])
            t = np.asarray(r.times, dtype=np.int64)[keep] if r.times is not None else np.full(int(keep.sum()), now_s)
            seqs.append(np.concatenate([ds.items[stored], idx[keep].astype(np.int32)]))
            times.append(np.concatenate([ds.times[stored], t]))
        return Histories.from_lists(seqs, users=users, times=times), users, dropped

    def retrieve(self, hist: Histories, depth: np.ndarray) -> tuple[Recommendations, Interests]:
        """The retrieval stage for a batch: the top depth[r] items of each history (U rows, every
        item of the history excluded), padded to the largest depth (item 0, score -inf,
        interest -1), and the interests that found them. One interest forward and one search
        for the whole batch at the largest depth (the top d of a deeper search is the top d),
        through the function `query` and `evaluate` use (retrieval.channels.retrieve_batch)."""
        rec, it = retrieve_batch(self.model, self.dataset, self.index, hist, int(depth.max()), self.merge,
                                 self.channels)  # (U, width) each
        short = depth < rec.items.shape[1]
        if short.any():  # a row asked for fewer: what lies past its depth is not its answer
            past = np.arange(rec.items.shape[1])[None, :] >= depth[:, None]  # (U, width)
            rec.items[past], rec.scores[past], rec.interest[past] = 0, -np.inf, -1
            if rec.channel is not None:
                rec.channel[past] = -1
        return rec, it

    def rank(self, hist: Histories, candidates: np.ndarray,
             retrieval_scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ranking stage: each history's candidates (R, M) item indices (0 = none) ordered
        by the ranker, its logits fused with the candidates' retrieval scores (R, M) when given
        and the ranker has a retrieval weight; the permutation (R, M) and the scores in that order."""
        from retrieval.ranking.scoring import rerank

        if self.ranker is None:
            raise RequestError("rank: no ranker is loaded")
        return rerank(self.ranker.model, self.dataset, hist, candidates, retrieval_scores)

    def _rerank(self, h: Histories, recs: Recommendations, rows: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Reorder rows of `recs` in place by the ranker (each row's first m[r] candidates);
        returns the logits (len(rows), width) in the new order."""
        width = int(m.max())
        cand = recs.items[rows, :width]  # entries past a row's own M are already 0
        order, logits = self.rank(h.take(rows), cand, recs.scores[rows, :width])  # (R, width)
        for name in ("items", "scores", "interest") + (("channel",) if recs.channel is not None else ()):
            x = getattr(recs, name)
            x[rows, :width] = np.take_along_axis(x[rows, :width], order, 1)
        return logits

    def _responses(self, requests: Sequence[Request], hist: Histories, users: np.ndarray, dropped: list[list[str]],
                   served: np.ndarray, recs: Recommendations | None, interests: Interests | None,
                   rank_scores: np.ndarray | None) -> list[Response]:
        """The answers; ids, titles and scores are looked up for the whole batch at once (columns),
        so a request costs one object per item and no numpy call of its own."""
        ds = self.dataset
        lengths = hist.lengths()
        row_of = np.full(len(requests), -1, dtype=np.int64)
        row_of[served] = np.arange(served.size)
        cols: dict[str, list[Any]] = {}
        if recs is not None:
            width = max(requests[i].n for i in served)
            block = recs.items[:, :width]  # (U', width) the answers, best first
            got = (block > 0).sum(1).tolist()  # fewer than n only for a tiny index
            cols = {"item": ds.item_ids[block].tolist(), "score": recs.scores[:, :width].tolist(),
                    "interest": recs.interest[:, :width].tolist(),
                    "channel": [[CHANNELS[c] if c >= 0 else None for c in row] for row in recs.channel[:, :width].tolist()]
                    if recs.channel is not None else None,
                    "title": ds.titles[block].tolist() if ds.titles is not None else None}
            if rank_scores is not None:  # rank_scores rows follow the ranked served rows
                ranked = [s for s, i in enumerate(served) if requests[i].rank]
                rs = rank_scores[:, :width].tolist()
                cols["rank_score"] = dict(zip(ranked, rs))
        explained = interests is not None and any(requests[i].explain for i in served)
        W = interests.weights.numpy() if explained else None  # type: ignore[union-attr]  # (U', K, L)
        out = []
        for i, r in enumerate(requests):
            s = int(row_of[i])
            base = dict(user=r.user, known_user=bool(users[i] >= 0), history=int(lengths[i]),
                        used=int(min(lengths[i], self.max_len)), dropped=dropped[i])
            if s < 0:
                idx = self._popular[: r.n]
                items = [Recommendation(p, it, t, None, None)
                         for p, it, t in zip(range(1, len(idx) + 1), ds.item_ids[idx].tolist(), self._titles(idx))]
                out.append(Response(**base, fallback=True, ranked=False, items=items, interests=[] if r.explain else None))
                continue
            k = min(r.n, got[s])
            titles = cols["title"][s] if cols["title"] is not None else [None] * k
            rank = cols["rank_score"][s] if r.rank else [None] * k
            channel = cols["channel"][s] if cols["channel"] is not None else [None] * k
            items = [Recommendation(p, it, t, sc, kk if kk >= 0 else None, rk, ch) for p, it, t, sc, kk, rk, ch in
                     zip(range(1, k + 1), cols["item"][s][:k], titles, cols["score"][s], cols["interest"][s], rank,
                         channel)]
            groups = None
            if r.explain and W is not None:
                seq = hist.items[hist.offsets[i] : hist.offsets[i + 1]]
                for rec in items:
                    if rec.interest is not None and rec.interest >= 0:
                        rec.because = self._behaviours(seq, top_behaviours(W[s], len(seq), rec.interest, EXPLAIN_BEHAVIOURS))
                groups = [InterestGroup(kk, mass, self._behaviours(seq, members))
                          for kk, mass, members in interest_groups(W[s], interests.active[s].numpy(),  # type: ignore[union-attr]
                                                                   interests.mass[s].numpy(), len(seq), GROUP_BEHAVIOURS)]  # type: ignore[union-attr]
            out.append(Response(**base, fallback=False, ranked=bool(r.rank), items=items, interests=groups))
        return out

    def _titles(self, idx: np.ndarray) -> list[str | None]:
        titles = self.dataset.titles
        return titles[idx].tolist() if titles is not None else [None] * len(idx)

    def _behaviours(self, seq: np.ndarray, positions: list[tuple[int, float]]) -> list[Behaviour]:
        idx = np.array([seq[p] for p, _ in positions], dtype=np.int64)
        return [Behaviour(item, title, round(w, 6)) for item, title, (_, w)
                in zip(self.dataset.item_ids[idx].tolist(), self._titles(idx), positions)]

    # ------------------------------------------------------------------ browsing (the explorer page)

    def sample_users(self, limit: int, seed: int | None = None) -> list[dict[str, Any]]:
        """Up to `limit` users with their history length: the first ones, or a seeded random draw."""
        ds = self.dataset
        limit = max(0, min(limit, ds.n_users))
        users = (np.arange(limit) if seed is None
                 else np.random.default_rng(seed).choice(ds.n_users, size=limit, replace=False))
        lengths = ds.lengths()
        return [{"user": str(ds.user_ids[u]), "history": int(lengths[u])} for u in users]

    def search_items(self, query: str, limit: int = 20) -> list[dict[str, Any]]:
        """Items whose id equals `query` or whose title contains it (case-insensitive), at most
        `limit`, in index order; one scan of a text built once on the first call."""
        ds = self.dataset
        q = query.strip()
        found: list[int] = []
        exact = int(self.item_index([q])[0]) if q else 0
        if exact:
            found.append(exact)
        if ds.titles is not None and q:
            text, ends = self._title_text
            needle, at = q.lower().replace("\n", " "), 0
            while len(found) < limit:
                at = text.find(needle, at)
                if at < 0:
                    break
                j = int(np.searchsorted(ends, at, side="right"))  # the match lies in title j, of item j + 1
                if j + 1 != exact:
                    found.append(j + 1)
                at = int(ends[j])  # on to the next title
        idx = np.array(found[:limit], dtype=np.int64)
        return [{"item": i, "title": t} for i, t in zip(ds.item_ids[idx].tolist(), self._titles(idx))]

    @functools.cached_property
    def _title_text(self) -> tuple[str, np.ndarray]:
        """All titles of items 1..N, lower-cased, each followed by a newline, and the (N,) offset
        just past each one's newline (title j, of item j + 1, ends before ends[j])."""
        titles = [str(t).lower().replace("\n", " ") for t in self.dataset.titles[1:].tolist()]  # type: ignore[index]
        ends = np.cumsum(np.array([len(t) + 1 for t in titles], dtype=np.int64))
        return "\n".join(titles) + "\n", ends


class _Stages:
    """Seconds per named stage, added into a caller's dict (nothing when it gives none)."""

    def __init__(self, into: dict[str, float] | None):
        self.into = into
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.into is None:
            return
        now = time.perf_counter()
        self.into[name] = self.into.get(name, 0.0) + now - self.last
        self.last = now

