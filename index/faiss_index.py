"""FAISS item index for multi-interest retrieval: build, save, load, search many interests, merge.

Items are indexed by inner product, faiss id = row position in the item matrix. A user's K
interest vectors are searched in one call over all users (`search_interests`), then each
user's K result lists are merged into one top-n list (`merge_interests`), the way
faiss.contrib.exhaustive_search merges result blocks: best score per item, duplicates and
-1 ids dropped. Names around faiss calls are faiss's own: nq, d, k, results D, I.

`search_top_n` is the serving call: it searches only as deep as the history exclusion
needs (n + a bounded slack, then a second call for the few interest lists that the
exclusion emptied), instead of n + the longest history for everyone.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from retrieval.artifacts import (
    MANIFEST,
    MANIFEST_CHECKSUM,
    atomic_dir,
    file_fingerprint,
    package_versions,
    read_manifest,
    write_manifest,
)
from retrieval.errors import ArtifactError, RetrievalError

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
KIND = "index"
METRIC = "inner_product"
_RESERVED = ("kind", "d", "ntotal", "metric", "packages", "created", "index_sha256", "files_sha256", MANIFEST_CHECKSUM)


def build_index(vectors: np.ndarray, factory: str = "Flat") -> faiss.Index:
    """Inner-product index over item vectors (N, d); faiss id = row position 0..N-1.

    `factory` is a faiss index_factory string ("Flat", "IVF64,Flat", "HNSW32", "IVF256,PQ16"...);
    the index is trained on the vectors when it needs training.
    """
    xb = _as_float32_2d(vectors, "vectors")
    N, d = xb.shape
    if N == 0:
        raise RetrievalError("cannot build an index over 0 item vectors")
    index = empty_index(factory, d)
    if not index.is_trained:
        nlist = _nlist(index)
        if nlist is not None and N < nlist:
            raise RetrievalError(
                f"index factory {factory!r} needs at least {nlist} vectors to train {nlist} lists, "
                f"got {N}"
            )
        try:
            index.train(xb)
        except RuntimeError as err:
            raise RetrievalError(
                f"index factory {factory!r} cannot be trained on {N} vectors: {_faiss_reason(err)}"
            ) from None
    index.add(xb)
    log.debug("built %s index over %d vectors of d=%d", factory, index.ntotal, d)
    return index


def empty_index(factory: str, d: int) -> faiss.Index:
    """The untrained, empty index of a factory string, refused (RetrievalError) unless the
    serving path can use it: inner product, and faiss ids that are row positions (no IDMap,
    which would need ids from the caller). Cheap: nothing is trained or added."""
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = _faiss_reason(err)
        if _builds(lambda: faiss.index_binary_factory(d, factory)):
            reason = "a binary index (Hamming distance) cannot serve inner-product queries"
        elif _builds(lambda: faiss.index_factory(d, factory, faiss.METRIC_L2)):
            reason = "this index supports only L2 distance, not the inner product the query path uses"
        raise RetrievalError(f"bad faiss index factory {factory!r} for d={d}: {reason}") from None
    reason = _unservable(index)
    if reason is not None:
        raise RetrievalError(f"index factory {factory!r} cannot serve queries: {reason}")
    return index


def _builds(make: Any) -> bool:
    try:
        make()
    except RuntimeError:
        return False
    return True


def _unservable(index: faiss.Index) -> str | None:
    """Why the query path cannot use `index`, or None when it can."""
    index = faiss.downcast_index(index)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return f"its metric is not inner product (faiss metric {index.metric_type})"
    while True:
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return "an IDMap takes its ids from the caller, but the query path reads faiss ids as item rows; drop the IDMap"
        if isinstance(index, faiss.IndexPreTransform):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        else:
            return None


def save_index(index: faiss.Index, out_dir: Path, manifest: dict[str, Any],
               files: dict[str, bytes] | None = None) -> None:
    """Atomically write out_dir/index.faiss, the extra `files` (name -> bytes) beside it and
    out_dir/manifest.json.

    The manifest holds kind "index", factory, d, ntotal, metric "inner_product", package
    versions, the created time, the index file's sha256 and each extra file's sha256
    (`files_sha256`, checked by load_index like the index's own), plus the caller's fields
    (e.g. bundle_fingerprint). `factory` is taken from the caller's fields when given (the
    string passed to build_index), else recovered from the index.
    """
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise RetrievalError(
            f"only inner-product indexes are saved, got faiss metric {index.metric_type}"
        )
    clash = sorted(set(manifest) & set(_RESERVED))
    if clash:
        raise ValueError(f"manifest fields {clash} are written by save_index itself")
    files = files or {}
    for name in files:
        if name in (INDEX_FILE, MANIFEST) or Path(name).name != name:
            raise ValueError(f"extra index file {name!r}: a plain file name other than {INDEX_FILE} and {MANIFEST}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, KIND) as tmp:
        # Through a Python file: faiss's own writer ignores a failed fclose, so a full disk can
        # leave a truncated index without an error; here every failed write raises OSError.
        try:
            with open(tmp / INDEX_FILE, "wb") as f:
                faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
        except RuntimeError as err:
            raise ArtifactError(f"{out_dir}: writing the index failed ({_faiss_reason(err)}); nothing was replaced") from None
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        write_manifest(
            tmp,
            {
                "kind": KIND,
                "factory": manifest.get("factory") or _factory_string(index),
                "d": int(index.d),
                "ntotal": int(index.ntotal),
                "metric": METRIC,
                "packages": package_versions(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "index_sha256": file_fingerprint(tmp / INDEX_FILE),
                **({"files_sha256": {name: file_fingerprint(tmp / name) for name in sorted(files)}} if files else {}),
                **{k: v for k, v in manifest.items() if k != "factory"},
            },
        )
    log.info("saved index (%d vectors) to %s", index.ntotal, out_dir)


def load_index(
    index_dir: Path, bundle_fingerprint: str | None = None
) -> tuple[faiss.Index, dict[str, Any]]:
    """Read an index written by save_index; check it is whole and, if asked, from that bundle."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir, KIND)
    if bundle_fingerprint is not None and manifest.get("bundle_fingerprint") != bundle_fingerprint:
        built_from = manifest.get("bundle_fingerprint")
        built_from = "none" if not built_from else str(built_from)[:12]
        raise ArtifactError(
            f"{index_dir}: the index was built from another model bundle "
            f"(index: {built_from}, bundle: {bundle_fingerprint[:12]}); rebuild it with build-index"
        )
    path = index_dir / INDEX_FILE
    if not path.is_file():
        raise ArtifactError(f"{index_dir}: incomplete index (no {INDEX_FILE})")
    expected = manifest.get("index_sha256")
    if expected is not None and file_fingerprint(path) != expected:
        raise ArtifactError(f"{path}: corrupt index (sha256 differs from the manifest)")
    for name, digest in (manifest.get("files_sha256") or {}).items():
        extra = index_dir / name
        if not extra.is_file():
            raise ArtifactError(f"{index_dir}: incomplete index (no {name})")
        if file_fingerprint(extra) != digest:
            raise ArtifactError(f"{extra}: corrupt index file (sha256 differs from the manifest)")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        raise ArtifactError(f"{path}: unreadable faiss index ({_faiss_reason(err)})") from None
    got = {"d": int(index.d), "ntotal": int(index.ntotal)}
    for name, value in got.items():
        if manifest.get(name) != value:
            raise ArtifactError(
                f"{path}: index has {name}={value}, manifest says {manifest.get(name)}"
            )
    reason = _unservable(index)
    if reason is not None:
        raise ArtifactError(f"{path}: the query path cannot use this index: {reason}")
    name, value = manifest.get("search_param"), manifest.get("search_value")
    if name is not None:  # the setting chosen by build-index --target-recall
        try:
            set_search_param(index, name, value)
        except RetrievalError as err:
            raise ArtifactError(f"{index_dir}: manifest {err}") from None
    return index, manifest


def set_search_param(index: faiss.Index, name: str, value: float) -> None:
    """Set a search-time parameter (nprobe for IVF, efSearch for HNSW) via faiss.ParameterSpace."""
    try:
        faiss.ParameterSpace().set_index_parameter(index, name, value)
    except RuntimeError:
        raise RetrievalError(
            f"search parameter {name}={value} does not apply to a {type(index).__name__} index"
        ) from None


def search_param_name(index: faiss.Index) -> str | None:
    """The search-time parameter that trades speed for recall: "nprobe" for an IVF index,
    "efSearch" for an HNSW index (inside any pre-transform or refinement), else None (Flat,
    PQ, ...: nothing to tune)."""
    if _nlist(index) is not None:
        return "nprobe"
    if isinstance(_innermost(index), faiss.IndexHNSW):
        return "efSearch"
    return None


def pad_queries(queries: np.ndarray, d: int) -> np.ndarray:
    """Queries (..., d') for an index of dimension d >= d': zeros appended. An index whose item
    vectors carry extra trailing coordinates (an item prior: retrieval.channels) is then
    searched by the plain inner product of the first d' coordinates."""
    queries = np.asarray(queries)
    extra = d - queries.shape[-1]
    if extra <= 0:
        return queries
    return np.concatenate([queries, np.zeros((*queries.shape[:-1], extra), dtype=queries.dtype)], axis=-1)


COARSE_BLOCK = 1024  # queries per matrix product of the coarse step: (1024, nlist) float32 scores at a time


@dataclass(frozen=True)
class _Centroids:
    """An IVF index's coarse centroids, laid out for one matrix product per block of queries."""

    quantizer: int  # address of the quantizer they were read from (a swapped quantizer is read again)
    by_ip: bool  # True: inner product, larger is nearer; False: L2, smaller is nearer
    ct: np.ndarray  # (d, nlist) float32, the centroids transposed
    sq: np.ndarray  # (nlist,) float32 squared norms (L2 only; empty for inner product)


_CENTROIDS: weakref.WeakKeyDictionary[faiss.Index, _Centroids] = weakref.WeakKeyDictionary()


def _centroids(index: faiss.Index) -> _Centroids | None:
    """The centroids of an IVF index with a flat (exhaustive) coarse quantizer, read once per
    index object and quantizer; None for any other index (HNSW quantizer, pre-transform, Flat,
    HNSW, PQ), which is searched by faiss alone."""
    if not isinstance(index, faiss.IndexIVF):
        return None
    quantizer = index.quantizer
    address = int(quantizer.this)
    cached = _CENTROIDS.get(index)
    if cached is not None and cached.quantizer == address and cached.ct.shape[1] == quantizer.ntotal:
        return cached
    quantizer = faiss.downcast_index(quantizer)
    metric = quantizer.metric_type
    if not isinstance(quantizer, faiss.IndexFlat) or metric not in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2):
        return None
    if quantizer.ntotal != index.nlist or quantizer.ntotal == 0:
        return None
    c = quantizer.reconstruct_n(0, quantizer.ntotal)  # (nlist, d)
    by_ip = metric == faiss.METRIC_INNER_PRODUCT
    sq = np.zeros(0, dtype=np.float32) if by_ip else (c * c).sum(1).astype(np.float32)
    entry = _Centroids(address, by_ip, np.ascontiguousarray(c.T), sq)
    _CENTROIDS[index] = entry
    return entry


def search_index(index: faiss.Index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """index.search(xq, k): D, I (nq, k) for contiguous float32 queries xq (nq, d).

    An IVF index with a flat coarse quantizer is searched in faiss's two steps, the first done
    here: each query's nprobe nearest centroids by one matrix product per block of queries,
    then faiss's search of those lists (IndexIVF.search_preassigned). faiss's flat quantizer
    scores the centroids one query at a time (its BLAS path starts at
    faiss.cvar.distance_compute_blas_threshold queries, 128,000 in faiss 1.15). On the 1M-item
    IVF4096,PQ32 index that made a served batch of 16 to 1,024 requests 20-30 % cheaper per
    request (Recommender.recommend, in process); a single request costs the same either way.
    Same centroids, same lists, same results: only the centroid scores' rounding differs (a
    different BLAS summation order), as it does between faiss's own batch sizes."""
    cent = _centroids(index)
    if cent is None:
        return index.search(xq, k)
    nprobe = max(1, min(int(index.nprobe), cent.ct.shape[1]))
    nq = xq.shape[0]
    Iq = np.empty((nq, nprobe), dtype=np.int64)
    Dq = np.empty((nq, nprobe), dtype=np.float32)
    for s in range(0, nq, COARSE_BLOCK):
        x = xq[s : s + COARSE_BLOCK]
        # nearer = larger: inner products, or -(||x - c||^2 - ||x||^2) = 2 x.c - ||c||^2
        near = x @ cent.ct if cent.by_ip else 2.0 * (x @ cent.ct) - cent.sq  # (b, nlist)
        if nprobe == 1:
            top = near.argmax(1)[:, None]  # (b, 1)
        else:
            top = np.argpartition(-near, nprobe - 1, axis=1)[:, :nprobe]  # (b, nprobe) unordered
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(near, top, 1), axis=1, kind="stable"), 1)
        score = np.take_along_axis(near, top, 1)  # (b, nprobe)
        Iq[s : s + len(x)] = top
        Dq[s : s + len(x)] = score if cent.by_ip else (x * x).sum(1, keepdims=True) - score  # L2: squared distances
    return index.search_preassigned(xq, k, Iq, Dq)


def search_interests(
    index: faiss.Index, queries: np.ndarray, mask: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items of every active interest vector, in one index.search call.

    queries: (U, K, d) float32; mask: (U, K) bool, False = inactive interest, never searched.
    Returns D (U, K, k) float32 (-inf where no result) and I (U, K, k) int64 (-1 where no
    result), best first; inactive rows are all -inf / -1. k is clipped to index.ntotal.
    """
    queries = np.asarray(queries)
    if queries.ndim != 3:
        raise ValueError(f"queries must be (U, K, d), got shape {queries.shape}")
    U, K, d = queries.shape
    if d != index.d:
        raise ValueError(f"queries have d={d}, the index has d={index.d}")
    mask = np.asarray(mask)
    if mask.shape != (U, K) or mask.dtype != bool:
        raise ValueError(f"mask must be a ({U}, {K}) bool array, got {mask.dtype} {mask.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(int(k), int(index.ntotal))
    active = mask.reshape(-1)  # (U*K,)
    searched = k > 0 and bool(active.any())
    if searched:
        everyone = bool(active.all())
        xq = queries.reshape(U * K, d) if everyone else queries.reshape(U * K, d)[active]
        xq = np.ascontiguousarray(xq, dtype=np.float32)  # (nq, d)
        if not np.isfinite(xq).all():
            raise ValueError("active interest vectors hold NaN or infinite values")
        Da, Ia = search_index(index, xq, k)  # (nq, k)
        Da[Ia < 0] = -np.inf  # faiss pads missing results with -FLT_MAX for inner product
        if everyone:  # faiss's own arrays, no scatter
            return Da.reshape(U, K, k), Ia.reshape(U, K, k)
    D = np.full((U * K, k), -np.inf, dtype=np.float32)
    I = np.full((U * K, k), -1, dtype=np.int64)
    if searched:
        D[active] = Da
        I[active] = Ia
    return D.reshape(U, K, k), I.reshape(U, K, k)


def search_top_n(
    index: faiss.Index,
    queries: np.ndarray,
    mask: np.ndarray,
    n: int,
    exclude: Sequence[np.ndarray] | None = None,
    strategy: Literal["best", "share"] = "best",
    weights: np.ndarray | None = None,
    slack: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-n merged results per user with exclude[u] removed, searching only as deep as needed.

    queries (U, K, d), mask (U, K) as search_interests; the rest and the results as
    merge_interests. Searching every interest n + |exclude[u]| deep always suffices (at most
    |exclude[u]| results are dropped), but then the longest history sets the depth of every
    search and the width of every merge. Instead all active interests are searched once for
    k = n + min(slack, longest exclusion) results (slack defaults to n). An interest list that
    was filled to k but keeps fewer than n allowed results scoring strictly above its last
    one may hide a top-n item below its cut: only the users with such a list are searched
    again, n + their longest exclusion deep. Where an index's top-k is a prefix of its
    top-k' (Flat, IVF at a fixed nprobe, PQ) the result is exactly that of the deep search,
    ties included; HNSW searches with ef = max(efSearch, k), so there k is part of the setting.
    """
    queries = np.asarray(queries)
    U = queries.shape[0]
    longest = max((len(e) for e in exclude), default=0) if exclude is not None else 0
    slack = n if slack is None else slack
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    k = n + min(slack, longest)
    D, I = search_interests(index, queries, mask, k)  # (U, K, k)
    k = D.shape[2]  # clipped to ntotal
    dropped = _dropped(I, exclude)  # (U, K, k)
    ids, scores, interest = _merge(D, I, dropped, n, strategy, weights)
    if exclude is None or k >= index.ntotal:
        return ids, scores, interest
    above = ~dropped & (D > D[:, :, -1:])  # (U, K, k) allowed results strictly above the cut
    short = (above.sum(axis=2) < n) & (I[:, :, -1] >= 0)  # (U, K) full lists left short
    again = np.flatnonzero(short.any(axis=1))
    if again.size:
        sub = [exclude[u] for u in again]
        D2, I2 = search_interests(index, queries[again], np.asarray(mask)[again], n + max(map(len, sub)))
        w2 = None if weights is None else np.asarray(weights)[again]
        ids[again], scores[again], interest[again] = _merge(D2, I2, _dropped(I2, sub), n, strategy, w2)
        log.debug("searched %d of %d users again past k=%d", again.size, U, k)
    return ids, scores, interest


def merge_interests(
    D: np.ndarray,
    I: np.ndarray,
    n: int,
    exclude: Sequence[np.ndarray] | None = None,
    strategy: Literal["best", "share"] = "best",
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge each user's K result lists (D, I: (U, K, k)) into one top-n list.

    -1 ids and the ids in exclude[u] (e.g. the user's history) are dropped.
    'best': each item keeps its best score over the interests (ties: lower interest index),
    then the top n by score.
    'share': interest j gets a share of the n slots proportional to weights[u, j] (U, K)
    (e.g. routing mass, zero for inactive interests; largest-remainder rounding so the shares
    sum to n), filled from its own list in its own order, skipping items already taken or
    excluded (an item both interests want goes to the one that scores it higher); slots an
    interest cannot fill go to the others' next best. A user whose weights are all zero gets
    equal shares.
    Both return ids (U, n) int64 (-1 padded), scores (U, n) float32 (-inf padded) and
    interest (U, n) int64 (the interest that retrieved the item, -1 padded), ordered by
    score descending (ties: lower interest, then lower id).
    """
    D = np.asarray(D)
    I = np.asarray(I)
    if D.ndim != 3 or D.shape != I.shape:
        raise ValueError(f"D and I must be (U, K, k) of one shape, got {D.shape} and {I.shape}")
    return _merge(D, I, _dropped(I, exclude), n, strategy, weights)


def _dropped(I: np.ndarray, exclude: Sequence[np.ndarray] | None) -> np.ndarray:
    """(U, K, k) bool: no result (-1) or an excluded id."""
    U, K, k = I.shape
    return (I < 0) | _excluded(I.reshape(U, K * k), exclude).reshape(U, K, k)


def _merge(
    D: np.ndarray,
    I: np.ndarray,
    dropped: np.ndarray,
    n: int,
    strategy: str,
    weights: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """merge_interests once the dropped entries (U, K, k) are known."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    U, K, k = I.shape
    if strategy == "best":
        if weights is not None:
            raise ValueError("weights apply only to strategy='share'")
        if U == 1:
            return _merge_best_one(D, I, dropped, n)
        if int(I.max(initial=-1)) < (1 << _id_bits(K)) - 1:
            return _merge_best_packed(D, I, dropped, n)
    elif strategy == "share":
        if weights is None:
            raise ValueError("strategy='share' needs weights (U, K)")
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (U, K) or not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(
                f"weights must be ({U}, {K}), finite and non-negative, got shape {weights.shape}"
            )
    else:
        raise ValueError(f"strategy must be 'best' or 'share', got {strategy!r}")

    # Flatten each user's K lists and sort by (score desc, interest asc, id asc).
    ids = I.reshape(U, K * k).astype(np.int64)  # (U, K*k)
    scores = D.reshape(U, K * k).astype(np.float32)  # (U, K*k)
    interest = np.broadcast_to(np.repeat(np.arange(K, dtype=np.int64), k), (U, K * k))  # (U, K*k)
    order = np.lexsort((ids, interest, -scores), axis=-1)  # (U, K*k)
    ids = np.take_along_axis(ids, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    interest = np.take_along_axis(interest, order, axis=1)
    keep = ~np.take_along_axis(dropped.reshape(U, K * k), order, axis=1)  # (U, K*k)

    if strategy == "best":  # only for ids too large to pack
        keep &= _first_of_each_id(ids, keep)
    else:
        for u in range(U):
            keep[u] = _share_one(ids[u], interest[u], keep[u], weights[u], n, K)

    out_ids = np.full((U, n), -1, dtype=np.int64)
    out_scores = np.full((U, n), -np.inf, dtype=np.float32)
    out_interest = np.full((U, n), -1, dtype=np.int64)
    slot = np.cumsum(keep, axis=1) - 1  # (U, K*k) output position of each kept entry
    rows, cols = np.nonzero(keep & (slot < n))
    out_ids[rows, slot[rows, cols]] = ids[rows, cols]
    out_scores[rows, slot[rows, cols]] = scores[rows, cols]
    out_interest[rows, slot[rows, cols]] = interest[rows, cols]
    return out_ids, out_scores, out_interest


_NONE = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # sorts after every packed result


def _id_bits(K: int) -> int:
    """Bits left for the item id beside the interest number in the low 32 bits of a packed key;
    ids up to 2^bits - 2 fit (all ones is what a dropped entry decodes to)."""
    return 32 - max(1, (K - 1).bit_length())


def _flip(bits: np.ndarray) -> np.ndarray:
    """float32 bit patterns (as int32) <-> uint32-ascending-in-descending-score codes, both ways:
    a positive float's 31 low bits are inverted, a negative float's kept, so an ascending sort
    of the codes as unsigned is a descending sort of the floats."""
    return bits ^ (~(bits >> 31) & np.int32(0x7FFF_FFFF))


def _merge_best_packed(
    D: np.ndarray, I: np.ndarray, dropped: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 'best' merge by sorting one 64-bit key per result instead of a three-key lexsort.

    key = [score code: 32 bits][interest][id], so an ascending sort of each user's keys is
    (score desc, interest asc, id asc) and the key alone gives back score, interest and id.
    The first occurrence of an id in that order is its best; later copies are found by a
    sort of (id, position) keys, dropped, and the keys sorted again. Needs ids < 2^_id_bits(K) - 1.
    """
    U, K, k = I.shape
    M = K * k
    id_bits = _id_bits(K)
    id_mask = np.uint64((1 << id_bits) - 1)
    scores = D.reshape(U, M).astype(np.float32) + np.float32(0.0)  # -0.0 -> +0.0: equal scores, equal codes
    key = _flip(scores.view(np.int32)).view(np.uint32).astype(np.uint64)  # (U, M)
    key <<= np.uint64(32)
    key |= np.repeat(np.arange(K, dtype=np.uint64), k) << np.uint64(id_bits)  # interest of each column
    key |= I.reshape(U, M).astype(np.uint64) & id_mask  # -1 ids are dropped below
    key[dropped.reshape(U, M)] = _NONE
    key.sort(axis=1)  # (U, M) best first, dropped last

    # later copies of an id: sort (id, position) pairs; an id equal to its predecessor's is one
    # (dropped entries decode to id_mask, never a real id, and are already dropped)
    by_id = (key & id_mask) << np.uint64(32)
    by_id |= np.arange(M, dtype=np.uint64)
    by_id.sort(axis=1)
    rows, cols = np.nonzero((by_id[:, 1:] >> np.uint64(32)) == (by_id[:, :-1] >> np.uint64(32)))
    key[rows, (by_id[rows, cols + 1] & np.uint64(0xFFFF_FFFF)).astype(np.int64)] = _NONE
    key.sort(axis=1)

    head = key[:, :n]  # (U, min(n, M))
    got = head != _NONE
    w = head.shape[1]
    out_ids = np.full((U, n), -1, dtype=np.int64)
    out_scores = np.full((U, n), -np.inf, dtype=np.float32)
    out_interest = np.full((U, n), -1, dtype=np.int64)
    out_ids[:, :w] = np.where(got, (head & id_mask).astype(np.int64), -1)
    codes = (head >> np.uint64(32)).astype(np.uint32).view(np.int32)
    out_scores[:, :w] = np.where(got, _flip(codes).view(np.float32), -np.inf)
    interest = (head >> np.uint64(id_bits)) & np.uint64((1 << (32 - id_bits)) - 1)
    out_interest[:, :w] = np.where(got, interest.astype(np.int64), -1)
    return out_ids, out_scores, out_interest


def _merge_best_one(
    D: np.ndarray, I: np.ndarray, dropped: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 'best' merge of one user (D, I, dropped: (1, K, k)): a request's merge, in as few
    numpy calls as it takes, since at that size their overhead is the cost."""
    _, K, k = I.shape
    keep = ~dropped.reshape(-1)  # (K*k,)
    ids = I.reshape(-1)[keep].astype(np.int64)  # (m,)
    scores = D.reshape(-1)[keep].astype(np.float32)
    interest = np.repeat(np.arange(K, dtype=np.int64), k)[keep]
    order = np.lexsort((ids, interest, -scores))  # (score desc, interest asc, id asc)
    ids, scores, interest = ids[order], scores[order], interest[order]
    first = np.unique(ids, return_index=True)[1]  # each id's first, i.e. best, entry
    first.sort()
    first = first[:n]
    w = first.size
    out_ids = np.full((1, n), -1, dtype=np.int64)
    out_scores = np.full((1, n), -np.inf, dtype=np.float32)
    out_interest = np.full((1, n), -1, dtype=np.int64)
    out_ids[0, :w], out_scores[0, :w], out_interest[0, :w] = ids[first], scores[first], interest[first]
    return out_ids, out_scores, out_interest


def _first_of_each_id(ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(U, m) bool: the entry is the first of its id in its row (rows in score order)."""
    # a stable sort by id puts the first occurrence first among its duplicates
    by_id = np.argsort(ids, axis=1, kind="stable")  # (U, m)
    sorted_ids = np.take_along_axis(ids, by_id, axis=1)
    first = np.ones_like(keep)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    np.put_along_axis(first, by_id, first.copy(), axis=1)  # back to score order
    return first


def _share_one(
    ids: np.ndarray, interest: np.ndarray, valid: np.ndarray, w: np.ndarray, n: int, K: int
) -> np.ndarray:
    """One user's 'share' selection over entries already in score order; returns the kept mask."""
    present = np.bincount(interest[valid], minlength=K) > 0  # interests with any usable result
    if w.sum() <= 0:
        w = present.astype(np.float64)
    if w.sum() <= 0:
        return np.zeros_like(valid)
    quota = n * w / w.sum()
    slots = np.floor(quota).astype(np.int64)
    rest = n - int(slots.sum())
    # largest remainder; equal remainders go to the lower interest
    slots[np.argsort(-(quota - slots), kind="stable")[:rest]] += 1

    keep = np.zeros_like(valid)
    taken: set[int] = set()
    # Pass 1: each interest takes its own list in order up to its quota.
    for pos in np.flatnonzero(valid):
        item, j = int(ids[pos]), int(interest[pos])
        if slots[j] > 0 and item not in taken:
            keep[pos] = True
            taken.add(item)
            slots[j] -= 1
    # Pass 2: slots left unfilled go to the next best results of any interest.
    left = n - len(taken)
    for pos in np.flatnonzero(valid & ~keep):
        if left == 0:
            break
        item = int(ids[pos])
        if item not in taken:
            keep[pos] = True
            taken.add(item)
            left -= 1
    return keep


def _excluded(ids: np.ndarray, exclude: Sequence[np.ndarray] | None) -> np.ndarray:
    """(U, m) bool: ids[u, j] is in exclude[u] (and not -1).

    One boolean mark per id that can occur in the results, set for a user's exclusions, read
    at their results and cleared: O(|exclude[u]| + m) per user, no sort of anyone's list."""
    U = ids.shape[0]
    out = np.zeros(ids.shape, dtype=bool)
    if exclude is None:
        return out
    if len(exclude) != U:
        raise ValueError(f"exclude has {len(exclude)} users, the results have {U}")
    span = int(ids.max(initial=-1)) + 1  # exclusions at or beyond span can never match a result
    mark = np.zeros(span + 1, dtype=bool)  # mark[span] (= mark[-1]): where every out-of-range id lands
    for u in range(U):
        e = np.minimum(np.maximum(exclude[u], -1), span)  # np.clip's Python wrapper costs ~10x these two ufuncs
        mark[e] = True
        out[u] = mark[ids[u]]  # a -1 result reads mark[span]: cleared by the last line
        mark[e] = False
    out &= ids >= 0
    return out


def _as_float32_2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be a 2-D float array (N, d), got {x.ndim}-D {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} hold NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


def _innermost(index: faiss.Index) -> faiss.Index:
    """The index inside any pre-transform (OPQ, PCA), refinement or id map, downcast."""
    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap)):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        else:
            return index


def _nlist(index: faiss.Index) -> int | None:
    """The number of inverted lists of an IVF index (inside any pre-transform), else None."""
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return None


def _factory_string(index: faiss.Index) -> str:
    from faiss.contrib.factory_tools import reverse_index_factory

    try:
        return reverse_index_factory(index)
    except (NotImplementedError, RuntimeError, AttributeError):
        return type(index).__name__


def _faiss_reason(err: RuntimeError) -> str:
    """A faiss C++ exception's message without its 'Error in <function> at <file:line>:' frame."""
    msg = str(err).strip()
    m = re.match(r"Error in .*? at \S+:\d+: (.*)", msg, flags=re.DOTALL)
    if m:
        msg = m.group(1)
    msg = re.sub(r"^Error: '.*?' failed: ", "", msg, flags=re.DOTALL)
    return " ".join(msg.split())
