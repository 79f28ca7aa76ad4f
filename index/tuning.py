"""Tune an approximate index's search-time parameter to a target recall against exact search.

An IVF index trades recall for speed through nprobe (inverted lists visited per query), an
HNSW index through efSearch (the width of the graph search). The recall that matters is
that of what a user is served: the merged top-n of all their interest vectors, history
excluded. So a setting is measured by running the serving call (search_top_n) on sampled
users' interest vectors, once on the index and once on an exact IndexFlatIP over the same
item vectors, and taking the mean over users of |approximate ∩ exact| / |exact|.

The parameter is doubled from its smallest value until that recall reaches the target,
then bisected between the last value that missed and the first that reached it, so the
choice is the smallest value that reaches the target (recall is taken to grow with the
parameter, as it does for nprobe and, up to noise, for efSearch). HNSW searches with
ef = max(efSearch, k), k the serving depth (n + min(n, history length)), so every efSearch
below k searches alike; the smallest of them that reaches the target is the one reported.
The users come from the protocol's validation users (tune_on_validation): test users never
choose a setting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from index.faiss_index import pad_queries, search_param_name, search_top_n, set_search_param
from retrieval.bundle import Bundle
from retrieval.errors import RetrievalError
from retrieval.evaluate import held_out_users
from retrieval.recommend import history_rows, interest_vectors
from retrieval.samples import Histories

log = logging.getLogger(__name__)

MAX_EF_SEARCH = 4096  # the largest efSearch tried: beyond it HNSW costs as much as exact search


class TargetNotReached(RetrievalError):
    """The target recall is out of reach; the best value tried and its recall come with it."""

    def __init__(self, message: str, best_value: int | None, best_recall: float, trials: list[tuple[int, float]]):
        super().__init__(message)
        self.best_value, self.best_recall, self.trials = best_value, best_recall, trials


@dataclass
class Tuning:
    """The chosen search setting and the recall measured at it."""

    search_param: str | None  # "nprobe", "efSearch", or None: the index has nothing to tune
    search_value: int | None  # the chosen value (None without a parameter)
    recall: float  # mean recall@n of the served top-n against exact search, at that value
    target_recall: float  # the recall asked for
    n: int  # N of recall@N
    users: int  # users the recall is averaged over
    trials: list[tuple[int, float]] = field(default_factory=list)  # (value, recall) in the order tried
    seconds: float = 0.0  # wall time of the whole tuning
    part: str | None = None  # the split part the users came from ("validation"), when known

    def manifest(self) -> dict[str, Any]:
        """Fields for the index manifest: search_param and search_value, which load_index applies,
        and the measurement behind them."""
        tuning = {k: v for k, v in asdict(self).items() if k not in ("search_param", "search_value")}
        tuning["trials"] = [list(t) for t in self.trials]
        return {"search_param": self.search_param, "search_value": self.search_value, "tuning": tuning}


def recall_against(ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over users of |ids[u] ∩ exact_ids[u]| / |exact_ids[u]| (ids (U, n), -1 padded);
    users with no exact result are left out (recall 1.0 if none has one)."""
    scores = []
    for got, want in zip(ids, exact_ids, strict=True):
        want = want[want >= 0]
        if want.size:
            scores.append(np.intersect1d(got[got >= 0], want).size / want.size)
    return float(np.mean(scores)) if scores else 1.0


def exact_top_n(
    xb: np.ndarray, queries: np.ndarray, mask: np.ndarray, n: int, exclude: Sequence[np.ndarray] | None
) -> np.ndarray:
    """The served top-n ids (U, n) on an exact IndexFlatIP over the item vectors xb (N, d)."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    return search_top_n(flat, queries, mask, n, exclude)[0]


def candidate_values(index: faiss.Index, name: str) -> list[int]:
    """The doubling ladder of values tried: nprobe 1, 2, 4 ... nlist; efSearch 16, 32 ... 4096."""
    if name == "nprobe":
        top = int(faiss.extract_index_ivf(index).nlist)
        start = 1
    else:
        top, start = MAX_EF_SEARCH, 16
    values = []
    v = start
    while v < top:
        values.append(v)
        v *= 2
    return values + [top]


def tune_search_param(
    index: faiss.Index,
    xb: np.ndarray,
    queries: np.ndarray,
    mask: np.ndarray,
    n: int,
    target: float,
    exclude: Sequence[np.ndarray] | None = None,
) -> Tuning:
    """Set the index's search parameter to the smallest value whose recall@n reaches `target`.

    index: the approximate index over xb (N, d), the same item vectors in the same order;
    queries (U, K, d) float32 and mask (U, K) the sampled users' interest vectors and active
    interests; exclude[u] the ids the serving path drops for user u (the history). Returns
    the choice with the recall measured at it, the index left set to it. An index without a
    search parameter (Flat, PQ ...) is measured once and accepted if it reaches the target.
    RetrievalError if target is outside (0, 1] or there are no users; TargetNotReached (a
    RetrievalError) if the largest value still misses the target, with the best recall
    reached in its message and attributes.
    """
    check_target_recall(target)
    U = len(queries)
    if U == 0 or not np.asarray(mask).any():
        raise RetrievalError("no users with an active interest to tune the index on")
    t0 = time.perf_counter()
    name = search_param_name(index)
    want = exact_top_n(xb, queries, mask, n, exclude)  # (U, n)

    def measure(value: int | None) -> float:
        if value is not None:
            set_search_param(index, name, value)  # type: ignore[arg-type]
        got = search_top_n(index, queries, mask, n, exclude)[0]  # (U, n)
        recall = recall_against(got, want)
        log.info("recall@%d %.4f at %s=%s (%d users)", n, recall, name, value, U)
        return recall

    if name is None:
        recall = measure(None)
        if recall < target:
            raise TargetNotReached(
                f"target recall {target} not reached: recall@{n} is {recall:.4f} and the index has "
                "no search parameter (nprobe or efSearch) to raise",
                None, recall, [],
            )
        return Tuning(None, None, recall, target, n, U, [], time.perf_counter() - t0)

    trials: list[tuple[int, float]] = []
    below, above = None, None  # the largest value that missed, the smallest that reached
    for value in candidate_values(index, name):
        trials.append((value, measure(value)))
        if trials[-1][1] >= target:
            above = value
            break
        below = value
    if above is None:
        best_value, best = max(trials, key=lambda t: t[1])
        raise TargetNotReached(
            f"target recall {target} not reached: best recall@{n} {best:.4f} at {name}={best_value} "
            f"(tried up to {name}={trials[-1][0]})",
            best_value, best, trials,
        )
    lo = above if below is None else below
    while above - lo > 1:  # bisect for the smallest value that reaches the target
        mid = (lo + above) // 2
        trials.append((mid, measure(mid)))
        if trials[-1][1] >= target:
            above = mid
        else:
            lo = mid
    set_search_param(index, name, above)
    recall = dict(trials)[above]
    return Tuning(name, above, recall, target, n, U, trials, time.perf_counter() - t0)


def check_target_recall(target: float) -> None:
    """RetrievalError unless 0 < target <= 1 (checked before an index is built, not after)."""
    if not 0 < target <= 1:
        raise RetrievalError(f"target recall must be in (0, 1], got {target}")


def tune_on_validation(
    index: faiss.Index,
    bundle: Bundle,
    xb: np.ndarray,
    target: float,
    n: int = 50,
    max_users: int = 1000,
    seed: int = 0,
    prior_weight: float = 0.0,
) -> Tuning:
    """tune_search_param on up to max_users validation users of the bundle's split (sampled
    with default_rng(seed)), each with the protocol's history and that history excluded,
    as `evaluate` serves them. Test users never choose a setting. An index of the merged
    retriever (item vectors, prior, padding) is searched as it serves: each interest with
    the chosen `prior_weight` after it."""
    check_target_recall(target)
    users, ends, _ = held_out_users(bundle.dataset, bundle.split, "validation")
    if len(users) > max_users:
        pick = np.sort(np.random.default_rng(seed).choice(len(users), max_users, replace=False))
        users, ends = users[pick], ends[pick]
    if len(users) == 0:
        raise RetrievalError("no validation users to tune the index on (the split has none with a ground truth)")
    hist = Histories.of(bundle.dataset, users, ends)
    it = interest_vectors(bundle.model, bundle.dataset, hist)
    queries = it.vectors.numpy()  # (U, K, D)
    if index.d > queries.shape[-1]:  # the merged retriever's index: [u_k, w, 0...] as served
        weight = np.full((*queries.shape[:-1], 1), prior_weight, dtype=queries.dtype)
        queries = pad_queries(np.concatenate([queries, weight], axis=-1), index.d)
    tuning = tune_search_param(index, xb, queries, it.active.numpy(), n, target, exclude=history_rows(hist))
    tuning.part = "validation"
    return tuning
