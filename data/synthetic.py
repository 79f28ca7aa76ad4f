"""Seeded synthetic behaviour logs with planted multiple interests.

Why: the quickstart must run without a download, and the claim the project rests on
(several interest vectors per user beat one, as in MIND, Li et al. 2019,
arXiv:1904.08030) needs data where a single vector is really not enough.

The planted structure:

- Items fall into `n_topics` equal-sized topics; each topic belongs to one of
  `n_categories` coarser categories (topic % n_categories), so a category is
  informative but does not name the topic. Within a topic, popularity follows a
  Zipf law over a random ranking, so popularity is a meaningful but weak baseline.
- Each user has 2-5 interest topics (most 3-4) with Dirichlet mixture weights,
  drawn with a weak preference that depends on the user's (age, gender) group.
- A timeline is a run of sessions. A session consumes items of one interest topic
  (a `noise` share are popular items from anywhere); the next session switches to
  another of the user's interests, drawn by weight. Items are drawn by popularity
  without replacement, so a user never repeats an item.
- Timestamps: 30 s - 10 min between items of a session, more than 30 min (median
  about 8 h, up to weeks) between sessions, starting in the first two weeks of 2024.

Everything comes from one `numpy.random.default_rng(seed)`, so a seed (and the method)
fixes the output byte for byte.

Two methods draw the same planted structure. `per_user` (the default, the quickstart
and test data) walks each user's timeline in Python: exact, but about 2.5 ms a user and
O(items) per user, so hopeless at a million users and items. `vectorised` draws every
user of a block of CHUNK_USERS at once with numpy (inverse-CDF lookups for topics and
items, a redraw loop for repeats): a 50M-interaction log in minutes. It needs every topic
to hold a whole timeline (max_len <= items per topic), so a topic never runs out and a
session always runs to its drawn length; otherwise the laws are the per-user method's.
Logs are written as CSV or Parquet (`fmt`), with the same content.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from retrieval.artifacts import atomic_dir, write_manifest

log = logging.getLogger(__name__)

AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_PROBS = (0.15, 0.30, 0.25, 0.15, 0.10, 0.05)
GENDERS = ("F", "M")
CATEGORY_NAMES = ("news", "sports", "music", "movies", "tech", "food", "travel", "fashion", "health", "finance")

WITHIN_GAP_S = (30, 600)  # seconds between items of one session, inclusive
SESSION_GAP_MIN_S = 1800  # every gap between sessions is longer than this (30 minutes)
KIND = "synthetic-data"  # the manifest kind of a generated data directory
CHUNK_USERS = 65_536  # users drawn at once by the vectorised method; part of what a seed produces

Method = Literal["per_user", "vectorised"]
Format = Literal["csv", "parquet"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and knobs of the synthetic log; the defaults make the quickstart data."""

    n_users: int = 2000  # users u00001 .. u{n_users}
    n_items: int = 3000  # items i00001 .. i{n_items}, all listed in items.csv
    n_topics: int = 40  # planted item clusters; items split evenly among them
    min_len: int = 20  # every user has at least this many behaviours
    max_len: int = 150  # and at most this many
    seed: int = 0  # the one seed of the whole log
    n_categories: int = 10  # coarse item categories; topic t belongs to category t % n_categories
    mean_len: float = 60.0  # mean of min_len + Exponential before clipping to max_len
    interest_counts: tuple[int, ...] = (2, 3, 4, 5)  # how many interest topics a user may have
    interest_count_probs: tuple[float, ...] = (0.1, 0.4, 0.4, 0.1)  # their probabilities
    interest_concentration: float = 4.0  # Dirichlet concentration of the weights; larger = more even
    session_mean: float = 4.0  # mean items per session (1 + Poisson(session_mean - 1))
    noise: float = 0.05  # share of behaviours that are popular items from any topic
    item_zipf: float = 1.0  # Zipf exponent of item popularity within a topic
    topic_zipf: float = 0.5  # Zipf exponent of topic popularity (how often a topic is an interest)
    profile_strength: float = 0.7  # how strongly (age, gender) tilts the choice of interests
    start_ts: int = 1704067200  # 2024-01-01T00:00:00Z; users start within 14 days after it
    method: Method = "per_user"  # per_user: exact Python walk per user; vectorised: numpy, for millions of users

    def __post_init__(self) -> None:
        """Validate where the config arrives, naming the bad value."""
        if self.n_users < 1:
            raise ValueError(f"n_users must be >= 1, got {self.n_users}")
        if not 1 <= self.n_topics <= self.n_items:
            raise ValueError(f"n_topics must be in [1, n_items={self.n_items}], got {self.n_topics}")
        if not 1 <= self.n_categories <= self.n_topics:
            raise ValueError(f"n_categories must be in [1, n_topics={self.n_topics}], got {self.n_categories}")
        if not 1 <= self.min_len <= self.max_len <= self.n_items:
            raise ValueError(
                f"need 1 <= min_len <= max_len <= n_items, got {self.min_len}, {self.max_len}, {self.n_items}"
            )
        if not self.min_len <= self.mean_len <= self.max_len:
            raise ValueError(f"mean_len must be in [min_len, max_len], got {self.mean_len}")
        if len(self.interest_counts) != len(self.interest_count_probs) or not self.interest_counts:
            raise ValueError(
                f"interest_counts {self.interest_counts} and interest_count_probs "
                f"{self.interest_count_probs} must be non-empty and of equal length"
            )
        if min(self.interest_counts) < 1 or max(self.interest_counts) > self.n_topics:
            raise ValueError(f"interest_counts must lie in [1, n_topics={self.n_topics}], got {self.interest_counts}")
        if abs(sum(self.interest_count_probs) - 1.0) > 1e-9 or min(self.interest_count_probs) < 0:
            raise ValueError(f"interest_count_probs must be a distribution, got {self.interest_count_probs}")
        capacity = min(self.interest_counts) * (self.n_items // self.n_topics)
        if self.min_len > capacity:
            raise ValueError(
                f"min_len={self.min_len} exceeds what the fewest interests hold "
                f"({min(self.interest_counts)} topics x {self.n_items // self.n_topics} items); "
                "use fewer topics or more items"
            )
        if self.session_mean < 1:
            raise ValueError(f"session_mean must be >= 1, got {self.session_mean}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise must be in [0, 1), got {self.noise}")
        if self.interest_concentration <= 0:
            raise ValueError(f"interest_concentration must be > 0, got {self.interest_concentration}")
        if self.method not in ("per_user", "vectorised"):
            raise ValueError(f"method must be 'per_user' or 'vectorised', got {self.method!r}")
        if self.method == "vectorised" and self.max_len > self.n_items // self.n_topics:
            raise ValueError(
                f"method='vectorised' needs max_len <= items per topic ({self.n_items // self.n_topics}), "
                f"got max_len={self.max_len}; use fewer topics or a shorter max_len"
            )


def user_id(i: int) -> str:
    """String id of the 0-based user index i: 'u00001' for 0."""
    return f"u{i + 1:05d}"


def item_id(j: int) -> str:
    """String id of the 0-based item index j: 'i00001' for 0."""
    return f"i{j + 1:05d}"


def _category_name(c: int) -> str:
    return CATEGORY_NAMES[c] if c < len(CATEGORY_NAMES) else f"category{c}"


def _gumbel_order(rng: np.random.Generator, log_w: np.ndarray) -> np.ndarray:
    """Positions of a weighted sample without replacement of all entries (Gumbel top-k trick)."""
    return np.argsort(-(log_w + rng.gumbel(size=log_w.shape)), kind="stable")


def _topic_members(item_topic: np.ndarray, n_topics: int) -> list[np.ndarray]:
    """Item indices of each topic, ascending: np.flatnonzero(item_topic == t) for every t,
    from one stable sort instead of n_topics scans of all items."""
    by_topic = np.argsort(item_topic, kind="stable")  # (N,)
    bounds = np.searchsorted(item_topic[by_topic], np.arange(n_topics + 1))  # (n_topics + 1,)
    return [by_topic[bounds[t] : bounds[t + 1]] for t in range(n_topics)]


def _plant_items(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Topic of each item (N,), log popularity within its topic (N,), topic popularity (n_topics,)."""
    item_topic = rng.permutation(cfg.n_items) % cfg.n_topics  # (N,) equal sizes, random membership
    log_w_in_topic = np.empty(cfg.n_items)  # (N,)
    for t, members in enumerate(_topic_members(item_topic, cfg.n_topics)):
        rank = rng.permutation(members.size)  # 0 = most popular
        log_w_in_topic[members] = -cfg.item_zipf * np.log1p(rank)
        log_w_in_topic[members] -= np.log(np.exp(log_w_in_topic[members]).sum())  # normalise per topic
    topic_pop = 1.0 / np.arange(1, cfg.n_topics + 1) ** cfg.topic_zipf
    topic_pop = rng.permutation(topic_pop / topic_pop.sum())  # (n_topics,)
    return item_topic, log_w_in_topic, topic_pop


def _plant_users(
    rng: np.random.Generator, cfg: SyntheticConfig, topic_pop: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Age index (U,), gender index (U,), interest topics per user, their weights per user."""
    age = rng.choice(len(AGE_BUCKETS), size=cfg.n_users, p=AGE_PROBS)  # (U,)
    gender = rng.integers(0, len(GENDERS), size=cfg.n_users)  # (U,)
    group = age * len(GENDERS) + gender  # (U,)
    tilt = cfg.profile_strength * rng.standard_normal((len(AGE_BUCKETS) * len(GENDERS), cfg.n_topics))
    log_p = np.log(topic_pop)[None, :] + tilt[group]  # (U, n_topics)
    order = np.argsort(-(log_p + rng.gumbel(size=log_p.shape)), axis=1, kind="stable")  # (U, n_topics)
    counts = rng.choice(np.asarray(cfg.interest_counts), size=cfg.n_users, p=cfg.interest_count_probs)
    topics, weights = [], []
    for u in range(cfg.n_users):
        w = rng.dirichlet(np.full(counts[u], cfg.interest_concentration))
        by_weight = np.argsort(-w, kind="stable")
        topics.append(order[u, : counts[u]][by_weight])
        weights.append(w[by_weight])
    return age, gender, topics, weights


def _pick(u: float, weights: list[float], allowed: list[bool]) -> int:
    """Index drawn by weight among the allowed entries with the uniform u; -1 if none is allowed."""
    total = sum(w for w, ok in zip(weights, allowed) if ok)
    if total <= 0:
        return -1
    acc = 0.0
    last = -1
    for i, (w, ok) in enumerate(zip(weights, allowed)):
        if ok:
            acc += w / total
            last = i
            if u < acc:
                return i
    return last


def _timeline(
    rng: np.random.Generator,
    cfg: SyntheticConfig,
    length: int,
    topic_items: list[np.ndarray],
    log_w_in_topic: np.ndarray,
    log_w_global: np.ndarray,
    topics: np.ndarray,
    weights: np.ndarray,
) -> tuple[list[int], list[int]]:
    """One user's item indices and session numbers, `length` long, no item twice."""
    k = len(topics)
    queues = [topic_items[t][_gumbel_order(rng, log_w_in_topic[topic_items[t]])].tolist() for t in topics]
    noise_queue = _gumbel_order(rng, log_w_global).tolist()
    n_sessions_max = length + k + 1  # every session but the <= k cut short by exhaustion holds an item
    session_len = (1 + rng.poisson(cfg.session_mean - 1, size=n_sessions_max)).tolist()
    switch_u = rng.random(n_sessions_max).tolist()
    is_noise = (rng.random(length) < cfg.noise).tolist()
    w = weights.tolist()

    used: set[int] = set()
    ptr = [0] * k
    noise_ptr = 0
    items: list[int] = []
    sessions: list[int] = []
    prev = -1
    s = 0
    while len(items) < length:
        live = [ptr[i] < len(queues[i]) for i in range(k)]
        allowed = [ok and i != prev for i, ok in enumerate(live)]
        t = _pick(switch_u[s], w, allowed) if any(allowed) else _pick(switch_u[s], w, live)
        for _ in range(session_len[s]):
            if len(items) >= length:
                break
            if t >= 0 and not is_noise[len(items)]:
                q = queues[t]
                while ptr[t] < len(q) and q[ptr[t]] in used:
                    ptr[t] += 1
                if ptr[t] == len(q):
                    break  # topic exhausted: the session ends here
                item = q[ptr[t]]
                ptr[t] += 1
            else:
                while noise_queue[noise_ptr] in used:
                    noise_ptr += 1
                item = noise_queue[noise_ptr]
            used.add(item)
            items.append(item)
            sessions.append(s)
        prev = t
        s += 1
    return items, sessions


def _timestamps(
    rng: np.random.Generator, cfg: SyntheticConfig, user: np.ndarray, session: np.ndarray, n_users: int
) -> np.ndarray:
    """Unix seconds per row (rows grouped by user 0..n_users-1, in order): short gaps in a
    session, long ones between."""
    n = user.size
    first = np.ones(n, dtype=bool)
    first[1:] = user[1:] != user[:-1]
    new_session = np.zeros(n, dtype=bool)
    new_session[1:] = session[1:] != session[:-1]
    within = rng.integers(WITHIN_GAP_S[0], WITHIN_GAP_S[1] + 1, size=n)
    between = SESSION_GAP_MIN_S + 1 + np.minimum(rng.lognormal(np.log(8 * 3600), 1.0, size=n), 30 * 86400)
    start = rng.integers(0, 14 * 86400, size=n_users)
    gap = np.where(new_session, between.astype(np.int64), within)
    gap[first] = start[user[first]]
    total = np.cumsum(gap)  # (n,) running sum over all users
    offset = np.maximum.accumulate(np.where(first, total - gap, 0))  # sum before each user's first row
    return cfg.start_ts + total - offset


# ---------------------------------------------------------------------------- the vectorised method


@dataclass(frozen=True)
class _Popularity:
    """Inverse-CDF tables to draw items by popularity, within one topic or over all items."""

    by_topic: np.ndarray  # (N,) item indices grouped by topic, ascending within a topic
    topic_start: np.ndarray  # (n_topics + 1,) where each topic's block starts in by_topic
    topic_cum: np.ndarray  # (N,) topic + cumulative within-topic probability, in by_topic order
    global_cum: np.ndarray  # (N,) cumulative popularity over all items, in item order; ends at 1


def _popularity(item_topic: np.ndarray, log_w_in_topic: np.ndarray, log_w_global: np.ndarray,
                n_topics: int) -> _Popularity:
    """Build the tables once: each topic's block of topic_cum runs over (t, t + 1], so a
    draw t + u, u ~ U[0, 1), lands in topic t and on item i with its popularity in t."""
    by_topic = np.argsort(item_topic, kind="stable")  # (N,)
    start = np.searchsorted(item_topic[by_topic], np.arange(n_topics + 1))  # (n_topics + 1,)
    sizes = np.diff(start)  # (n_topics,)
    w = np.exp(log_w_in_topic[by_topic])  # (N,)
    cum = np.cumsum(w)
    within = cum - np.repeat(cum[start[:-1]] - w[start[:-1]], sizes)  # restart the sum at each topic
    within /= np.repeat(within[start[1:] - 1], sizes)  # each topic's last entry is exactly 1
    g = np.cumsum(np.exp(log_w_global))
    return _Popularity(by_topic, start, item_topic[by_topic] + within, g / g[-1])


def _draw_items(rng: np.random.Generator, pop: _Popularity, topic: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """One item per row (R,): by popularity within the row's topic, or over all items where `noise`."""
    u = rng.random(topic.size)  # (R,)
    pos = np.searchsorted(pop.topic_cum, topic + u, side="right")
    pos = np.clip(pos, pop.topic_start[topic], pop.topic_start[topic + 1] - 1)  # guards float rounding
    item = pop.by_topic[pos]
    item[noise] = np.minimum(np.searchsorted(pop.global_cum, u[noise], side="right"), pop.global_cum.size - 1)
    return item


def _in_sorted(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(R,) bool: which keys occur in the sorted 1-D table."""
    if table.size == 0:
        return np.zeros(keys.size, dtype=bool)
    at = np.minimum(np.searchsorted(table, keys), table.size - 1)
    return table[at] == keys


def _items_without_repeats(
    rng: np.random.Generator, pop: _Popularity, user: np.ndarray, topic: np.ndarray, noise: np.ndarray
) -> np.ndarray:
    """Items for rows (user, topic, noise), never the same item twice for a user.

    Every row draws by popularity; a row that repeats an item an earlier row of its user
    holds draws again, until no repeat is left. A redraw that rejects the user's taken
    items samples from the popularity renormalised over the rest: the law of drawing
    without replacement. It ends because a topic holds a whole timeline (the config checks).
    """
    n_items = pop.by_topic.size
    item = _draw_items(rng, pop, topic, noise)  # (R,)
    key = user.astype(np.int64) * n_items + item  # (R,) one key per (user, item)
    taken, first = np.unique(key, return_index=True)  # sorted keys; the first row holding each
    redo = np.ones(key.size, dtype=bool)
    redo[first] = False
    todo = np.flatnonzero(redo)  # rows to draw again, in row order
    extra = np.zeros(0, dtype=np.int64)  # sorted keys taken by redraws
    while todo.size:
        item[todo] = _draw_items(rng, pop, topic[todo], noise[todo])
        k = user[todo].astype(np.int64) * n_items + item[todo]
        _, first = np.unique(k, return_index=True)  # among the redraws, the first row keeps a key
        keep = np.zeros(k.size, dtype=bool)
        keep[first] = True
        keep &= ~(_in_sorted(k, taken) | _in_sorted(k, extra))
        extra = np.sort(np.concatenate([extra, k[keep]]))
        todo = todo[~keep]
    return item


def _plant_users_vectorised(
    rng: np.random.Generator, cfg: SyntheticConfig, topic_pop: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Age (U,), gender (U,), interest topics (U, K) and weights (U, K), heaviest first; -1 / 0 pad.

    The per-user method's laws without a Python loop: topics are a weighted draw without
    replacement, done as repeated draws with replacement keeping first occurrences (the
    same law), from the (age, gender) group's distribution; weights are Dirichlet, drawn
    as normalised Gamma variables."""
    U, T = cfg.n_users, cfg.n_topics
    age = rng.choice(len(AGE_BUCKETS), size=U, p=AGE_PROBS)  # (U,)
    gender = rng.integers(0, len(GENDERS), size=U)  # (U,)
    group = age * len(GENDERS) + gender  # (U,)
    n_groups = len(AGE_BUCKETS) * len(GENDERS)
    tilt = cfg.profile_strength * rng.standard_normal((n_groups, T))
    p = topic_pop[None, :] * np.exp(tilt)  # (G, T) unnormalised
    cum = np.cumsum(p, axis=1)
    cum = (cum / cum[:, -1:] + np.arange(n_groups)[:, None]).ravel()  # (G T,) group g's block runs over (g, g + 1]
    counts = rng.choice(np.asarray(cfg.interest_counts), size=U, p=cfg.interest_count_probs)  # (U,)
    K = int(max(cfg.interest_counts))
    topics = np.full((U, K), -1, dtype=np.int64)
    have = np.zeros(U, dtype=np.int64)  # (U,) distinct topics chosen so far
    todo = np.arange(U)
    while todo.size:  # rounds of 3K draws; a user short of distinct topics goes again
        g = group[todo]
        draws = np.searchsorted(cum, g[:, None] + rng.random((todo.size, 3 * K)), side="right")
        draws = np.clip(draws - g[:, None] * T, 0, T - 1)  # (R, 3K) topic ids
        for j in range(3 * K):
            t = draws[:, j]
            new = (have[todo] < counts[todo]) & ~(topics[todo] == t[:, None]).any(1)
            rows = todo[new]
            topics[rows, have[rows]] = t[new]
            have[rows] += 1
        todo = todo[have[todo] < counts[todo]]
    used = np.arange(K)[None, :] < counts[:, None]  # (U, K)
    gam = rng.standard_gamma(cfg.interest_concentration, size=(U, K)) * used
    weights = gam / gam.sum(1, keepdims=True)  # (U, K) Dirichlet over the used slots
    by_weight = np.argsort(np.where(used, -weights, np.inf), axis=1, kind="stable")  # heaviest first, padding last
    topics = np.take_along_axis(topics, by_weight, 1)
    weights = np.take_along_axis(weights, by_weight, 1)
    return age, gender, topics, weights


def _sessions(rng: np.random.Generator, cfg: SyntheticConfig, lengths: np.ndarray) -> np.ndarray:
    """Session number (0, 1, ...) of each row, rows grouped by user: sessions of
    1 + Poisson(session_mean - 1) behaviours, the last cut at the user's length."""
    E = int(lengths.sum())
    size = 1 + rng.poisson(cfg.session_mean - 1, size=E)  # (E,) enough: every session holds a row
    first_row = np.cumsum(lengths) - lengths  # (U,)
    end = np.cumsum(size)
    end -= np.repeat(end[first_row] - size[first_row], lengths)  # running sum restarted per user
    start = end - size  # (E,) where each drawn session would start in its user's timeline
    real = start < np.repeat(lengths, lengths)
    flag = np.zeros(E, dtype=bool)  # (E,) True on the first row of a session
    flag[np.repeat(first_row, lengths)[real] + start[real]] = True
    c = np.cumsum(flag)
    return c - np.repeat(c[first_row], lengths)


def _session_topics(
    rng: np.random.Generator, n_sessions: np.ndarray, topics: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Topic of every session (sessions grouped by user, in order): the first by weight, each
    next one by weight among the user's other interests (the same one only for a user with one)."""
    U, K = weights.shape
    counts = (topics >= 0).sum(1)  # (U,)
    first = np.cumsum(n_sessions) - n_sessions  # (U,) index of each user's first session
    out = np.empty(int(n_sessions.sum()), dtype=np.int64)
    prev = np.full(U, -1)  # (U,) slot of the previous session's topic
    for j in range(int(n_sessions.max(initial=0))):
        act = np.flatnonzero(n_sessions > j)  # (A,) users with a j-th session
        w = weights[act].copy()  # (A, K)
        p = prev[act]
        other = np.flatnonzero((p >= 0) & (counts[act] > 1))
        w[other, p[other]] = 0.0  # switch to another interest
        cum = np.cumsum(w, axis=1)
        u = rng.random(act.size) * cum[:, -1]
        slot = np.minimum((cum <= u[:, None]).sum(1), counts[act] - 1)  # (A,) first slot with cum > u
        prev[act] = slot
        out[first[act] + j] = topics[act, slot]
    return out


def _vectorised_block(
    rng: np.random.Generator,
    cfg: SyntheticConfig,
    pop: _Popularity,
    lengths: np.ndarray,
    topics: np.ndarray,
    weights: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a block of users (local index 0..B-1): user (E,), item (E,), timestamp (E,)."""
    B = lengths.size
    user = np.repeat(np.arange(B), lengths)  # (E,)
    session = _sessions(rng, cfg, lengths)  # (E,)
    first_row = np.cumsum(lengths) - lengths
    n_sessions = session[first_row + lengths - 1] + 1  # (B,)
    session_topic = _session_topics(rng, n_sessions, topics, weights)  # (sum n_sessions,)
    first_session = np.cumsum(n_sessions) - n_sessions  # (B,)
    topic = session_topic[first_session[user] + session]  # (E,)
    noise = rng.random(user.size) < cfg.noise
    item = _items_without_repeats(rng, pop, user, topic, noise)
    ts = _timestamps(rng, cfg, user, session, B)
    return user, item, ts


# ---------------------------------------------------------------------------- one log, either method


@dataclass
class _Log:
    """A drawn log before it is written: rows grouped by user in time order, and the plants."""

    user: np.ndarray  # (E,) 0-based user index
    item: np.ndarray  # (E,) 0-based item index
    ts: np.ndarray  # (E,) int64 Unix seconds
    item_topic: np.ndarray  # (N,) planted topic of each item
    age: np.ndarray  # (U,) index into AGE_BUCKETS
    gender: np.ndarray  # (U,) index into GENDERS
    user_topics: list[list[int]]  # each user's interest topics, heaviest first


def _lengths(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    """(U,) timeline lengths: min_len + floor(Exponential), clipped to max_len."""
    raw_len = cfg.min_len + np.floor(rng.exponential(cfg.mean_len - cfg.min_len, size=cfg.n_users))
    return np.clip(raw_len, cfg.min_len, cfg.max_len).astype(np.int64)


def _per_user_log(rng: np.random.Generator, cfg: SyntheticConfig) -> _Log:
    """The exact method: each user's timeline walked in Python (the quickstart and test data)."""
    item_topic, log_w_in_topic, topic_pop = _plant_items(rng, cfg)
    log_w_global = log_w_in_topic + np.log(topic_pop)[item_topic]  # (N,)
    topic_items = _topic_members(item_topic, cfg.n_topics)
    age, gender, topics, weights = _plant_users(rng, cfg, topic_pop)
    lengths = _lengths(rng, cfg)
    users, items, sessions = [], [], []
    for u in range(cfg.n_users):
        capacity = sum(topic_items[t].size for t in topics[u])
        length = int(min(lengths[u], capacity))  # >= min_len, checked by the config
        its, ses = _timeline(rng, cfg, length, topic_items, log_w_in_topic, log_w_global, topics[u], weights[u])
        users.extend([u] * len(its))
        items.extend(its)
        sessions.extend(ses)
    user = np.asarray(users, dtype=np.int64)
    item = np.asarray(items, dtype=np.int64)
    ts = _timestamps(rng, cfg, user, np.asarray(sessions, dtype=np.int64), cfg.n_users)
    return _Log(user, item, ts, item_topic, age, gender, [t.tolist() for t in topics])


def _vectorised_log(rng: np.random.Generator, cfg: SyntheticConfig) -> _Log:
    """The same laws drawn with numpy, CHUNK_USERS users at a time, for logs of tens of millions of rows."""
    item_topic, log_w_in_topic, topic_pop = _plant_items(rng, cfg)
    log_w_global = log_w_in_topic + np.log(topic_pop)[item_topic]  # (N,)
    pop = _popularity(item_topic, log_w_in_topic, log_w_global, cfg.n_topics)
    age, gender, topics, weights = _plant_users_vectorised(rng, cfg, topic_pop)
    lengths = _lengths(rng, cfg)
    first_row = np.concatenate([[0], np.cumsum(lengths)])  # (U+1,) rows are filled block by block
    user = np.empty(first_row[-1], dtype=np.int32)  # (E,) 16 bytes a row in all, never copied
    item = np.empty(first_row[-1], dtype=np.int32)
    ts = np.empty(first_row[-1], dtype=np.int64)
    for lo in range(0, cfg.n_users, CHUNK_USERS):
        hi = min(lo + CHUNK_USERS, cfg.n_users)
        u, i, t = _vectorised_block(rng, cfg, pop, lengths[lo:hi], topics[lo:hi], weights[lo:hi])
        rows = slice(first_row[lo], first_row[hi])
        user[rows], item[rows], ts[rows] = u + lo, i, t
    user_topics = [[t for t in row if t >= 0] for row in topics.tolist()]
    return _Log(user, item, ts, item_topic, age, gender, user_topics)


# ---------------------------------------------------------------------------- writing


def _id(col: str, prefix: str) -> pl.Expr:
    """The raw id of a 0-based index column: prefix + the 1-based index zero-padded to 5 digits,
    the form of user_id() and item_id()."""
    return pl.concat_str(pl.lit(prefix), (pl.col(col).cast(pl.Int64) + 1).cast(pl.String).str.zfill(5))


def _write(frame: pl.LazyFrame, path: Path, fmt: Format) -> None:
    """Stream a frame to CSV or Parquet; string ids are formatted batch by batch, so a
    50M-row log never holds its id columns in memory at once."""
    try:
        if fmt == "csv":
            frame.sink_csv(path)
        else:
            frame.sink_parquet(path)
    except pl.exceptions.PolarsError as err:  # polars reports a failed write (a full disk) this way
        raise OSError(errno.EIO, " ".join(str(err).split())[:200], str(path)) from None


def generate(out_dir: Path, config: SyntheticConfig = SyntheticConfig(), fmt: Format = "csv") -> dict[str, Path]:
    """Write interactions, items and users (as .csv or .parquet, `fmt`) and planted.json into
    out_dir; return their paths by name.

    out_dir is written whole and atomically, with a manifest.json of kind "synthetic-data"
    (the config), so generating again replaces it, and a directory holding anything else is
    refused rather than mixed with a log.

    interactions holds user_id,item_id,timestamp grouped by user in time order;
    items item_id,title,category for every item; users user_id,age,gender;
    planted.json {"item_topic": {item_id: topic}, "user_topics": {user_id: [topics, heaviest first]}}.
    """
    cfg = config
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(cfg.seed)
    log_ = _per_user_log(rng, cfg) if cfg.method == "per_user" else _vectorised_log(rng, cfg)

    interactions = pl.LazyFrame({"u": log_.user, "i": log_.item, "timestamp": log_.ts}).select(
        _id("u", "u").alias("user_id"), _id("i", "i").alias("item_id"), pl.col("timestamp").cast(pl.Int64)
    )
    topic = pl.Series("topic", log_.item_topic, dtype=pl.Int64)
    names = pl.Series([_category_name(c) for c in range(cfg.n_categories)])
    items_df = pl.LazyFrame({"j": np.arange(cfg.n_items), "topic": topic}).select(
        _id("j", "i").alias("item_id"),
        pl.format("Item {} (topic {})", pl.col("j") + 1, pl.col("topic")).alias("title"),
        (pl.col("topic") % cfg.n_categories).replace_strict(range(cfg.n_categories), names).alias("category"),
    )
    users_df = pl.LazyFrame({"u": np.arange(cfg.n_users), "a": log_.age, "g": log_.gender}).select(
        _id("u", "u").alias("user_id"),
        pl.col("a").replace_strict(range(len(AGE_BUCKETS)), AGE_BUCKETS).alias("age"),
        pl.col("g").replace_strict(range(len(GENDERS)), GENDERS).alias("gender"),
    )
    user_ids = [user_id(u) for u in range(cfg.n_users)]
    item_ids = [item_id(j) for j in range(cfg.n_items)]
    planted = {
        "item_topic": dict(zip(item_ids, log_.item_topic.tolist())),
        "user_topics": dict(zip(user_ids, log_.user_topics)),
    }

    names = {"interactions": f"interactions.{fmt}", "items": f"items.{fmt}", "users": f"users.{fmt}",
             "planted": "planted.json"}
    with atomic_dir(out_dir, KIND) as tmp:
        _write(interactions, tmp / names["interactions"], fmt)
        _write(items_df, tmp / names["items"], fmt)
        _write(users_df, tmp / names["users"], fmt)
        (tmp / names["planted"]).write_text(json.dumps(planted) + "\n")
        write_manifest(tmp, {"kind": KIND, "format": fmt, "config": dataclasses.asdict(cfg), "files": names,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    paths = {name: out_dir / file for name, file in names.items()}
    log.info(
        "synthetic log (%s): %d users, %d items, %d interactions, mean length %.1f -> %s",
        cfg.method, cfg.n_users, cfg.n_items, log_.user.size, log_.user.size / cfg.n_users, out_dir,
    )
    return paths
