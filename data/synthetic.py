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

Everything comes from one `numpy.random.default_rng(seed)`, so a seed fixes the
output byte for byte.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from retrieval.artifacts import atomic_write_bytes

log = logging.getLogger(__name__)

AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_PROBS = (0.15, 0.30, 0.25, 0.15, 0.10, 0.05)
GENDERS = ("F", "M")
CATEGORY_NAMES = ("news", "sports", "music", "movies", "tech", "food", "travel", "fashion", "health", "finance")

WITHIN_GAP_S = (30, 600)  # seconds between items of one session, inclusive
SESSION_GAP_MIN_S = 1800  # every gap between sessions is longer than this (30 minutes)


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


def _plant_items(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Topic of each item (N,), log popularity within its topic (N,), topic popularity (n_topics,)."""
    item_topic = rng.permutation(cfg.n_items) % cfg.n_topics  # (N,) equal sizes, random membership
    log_w_in_topic = np.empty(cfg.n_items)  # (N,)
    for t in range(cfg.n_topics):
        members = np.flatnonzero(item_topic == t)
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


def _timestamps(rng: np.random.Generator, cfg: SyntheticConfig, user: np.ndarray, session: np.ndarray) -> np.ndarray:
    """Unix seconds per row (rows grouped by user, in order): short gaps in a session, long ones between."""
    n = user.size
    first = np.ones(n, dtype=bool)
    first[1:] = user[1:] != user[:-1]
    new_session = np.zeros(n, dtype=bool)
    new_session[1:] = session[1:] != session[:-1]
    within = rng.integers(WITHIN_GAP_S[0], WITHIN_GAP_S[1] + 1, size=n)
    between = SESSION_GAP_MIN_S + 1 + np.minimum(rng.lognormal(np.log(8 * 3600), 1.0, size=n), 30 * 86400)
    start = rng.integers(0, 14 * 86400, size=cfg.n_users)
    gap = np.where(new_session, between.astype(np.int64), within)
    gap[first] = start[user[first]]
    total = np.cumsum(gap)  # (n,) running sum over all users
    offset = np.maximum.accumulate(np.where(first, total - gap, 0))  # sum before each user's first row
    return cfg.start_ts + total - offset


def _csv(df: pl.DataFrame) -> bytes:
    return df.write_csv().encode()


def generate(out_dir: Path, config: SyntheticConfig = SyntheticConfig()) -> dict[str, Path]:
    """Write interactions.csv, items.csv, users.csv and planted.json into out_dir; return their paths by name.

    interactions.csv holds user_id,item_id,timestamp grouped by user in time order;
    items.csv item_id,title,category for every item; users.csv user_id,age,gender;
    planted.json {"item_topic": {item_id: topic}, "user_topics": {user_id: [topics, heaviest first]}}.
    """
    cfg = config
    out_dir = Path(out_dir)
    rng = np.random.default_rng(cfg.seed)

    item_topic, log_w_in_topic, topic_pop = _plant_items(rng, cfg)
    log_w_global = log_w_in_topic + np.log(topic_pop)[item_topic]  # (N,)
    topic_items = [np.flatnonzero(item_topic == t) for t in range(cfg.n_topics)]
    age, gender, topics, weights = _plant_users(rng, cfg, topic_pop)

    raw_len = cfg.min_len + np.floor(rng.exponential(cfg.mean_len - cfg.min_len, size=cfg.n_users))
    lengths = np.clip(raw_len, cfg.min_len, cfg.max_len).astype(np.int64)  # (U,)
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
    ts = _timestamps(rng, cfg, user, np.asarray(sessions, dtype=np.int64))

    user_ids = [user_id(u) for u in range(cfg.n_users)]
    item_ids = [item_id(j) for j in range(cfg.n_items)]
    interactions = pl.DataFrame({"u": user, "i": item, "timestamp": ts}).select(
        pl.col("u").replace_strict(range(cfg.n_users), user_ids, return_dtype=pl.String).alias("user_id"),
        pl.col("i").replace_strict(range(cfg.n_items), item_ids, return_dtype=pl.String).alias("item_id"),
        pl.col("timestamp"),
    )
    items_df = pl.DataFrame(
        {
            "item_id": item_ids,
            "title": [f"Item {j + 1} (topic {t})" for j, t in enumerate(item_topic.tolist())],
            "category": [_category_name(t % cfg.n_categories) for t in item_topic.tolist()],
        }
    )
    users_df = pl.DataFrame(
        {
            "user_id": user_ids,
            "age": [AGE_BUCKETS[a] for a in age.tolist()],
            "gender": [GENDERS[g] for g in gender.tolist()],
        }
    )
    planted = {
        "item_topic": dict(zip(item_ids, item_topic.tolist())),
        "user_topics": {user_ids[u]: topics[u].tolist() for u in range(cfg.n_users)},
    }

    paths = {
        "interactions": out_dir / "interactions.csv",
        "items": out_dir / "items.csv",
        "users": out_dir / "users.csv",
        "planted": out_dir / "planted.json",
    }
    atomic_write_bytes(paths["interactions"], _csv(interactions))
    atomic_write_bytes(paths["items"], _csv(items_df))
    atomic_write_bytes(paths["users"], _csv(users_df))
    atomic_write_bytes(paths["planted"], (json.dumps(planted) + "\n").encode())
    log.info(
        "synthetic log: %d users, %d items, %d interactions, mean length %.1f -> %s",
        cfg.n_users, cfg.n_items, user.size, user.size / cfg.n_users, out_dir,
    )
    return paths
