"""The synthetic generator: determinism, id forms, session timing and the planted interests,
for both methods (per-user walk and vectorised), and CSV against Parquet output."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from data.synthetic import SESSION_GAP_MIN_S, WITHIN_GAP_S, SyntheticConfig, generate
from retrieval.artifacts import read_manifest

SMALL = SyntheticConfig(n_users=200, n_items=500, n_topics=20, max_len=80, mean_len=40.0, seed=1)
# The vectorised method needs a topic to hold a whole timeline: 100 items per topic >= max_len.
VECTORISED = replace(SMALL, n_items=2000, method="vectorised")
CONFIGS = {"per_user": SMALL, "vectorised": VECTORISED}
FILES = ("interactions", "items", "users", "planted")


@pytest.fixture(scope="module", params=list(CONFIGS))
def cfg(request: pytest.FixtureRequest) -> SyntheticConfig:
    return CONFIGS[request.param]


@pytest.fixture(scope="module")
def small(cfg: SyntheticConfig, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("synthetic"), cfg)


@pytest.fixture(scope="module")
def log(small: dict[str, Path]) -> pl.DataFrame:
    """Interactions with each item's planted topic, in file order."""
    item_topic = json.loads(small["planted"].read_text())["item_topic"]
    return pl.read_csv(small["interactions"]).with_columns(
        pl.col("item_id").replace_strict(item_topic, return_dtype=pl.Int64).alias("topic")
    )


@pytest.fixture(scope="module")
def per_user(log: pl.DataFrame) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """(user_id, item ids, topics, timestamps) per user, in file order."""
    grouped = log.group_by("user_id", maintain_order=True).agg("item_id", "topic", "timestamp")
    return [(u, items, np.asarray(t), np.asarray(ts)) for u, items, t, ts in grouped.iter_rows()]


def _bytes(paths: dict[str, Path]) -> dict[str, bytes]:
    return {name: paths[name].read_bytes() for name in FILES}


def test_writes_the_four_files_and_a_manifest(small: dict[str, Path]) -> None:
    assert set(small) == set(FILES)
    out_dir = small["interactions"].parent
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "interactions.csv", "items.csv", "manifest.json", "planted.json", "users.csv"
    ]
    assert read_manifest(out_dir, "synthetic-data")["files"]["interactions"] == "interactions.csv"
    assert small["interactions"].read_text().splitlines()[0] == "user_id,item_id,timestamp"
    assert small["items"].read_text().splitlines()[0] == "item_id,title,category"
    assert small["users"].read_text().splitlines()[0] == "user_id,age,gender"


def test_same_seed_same_bytes_other_seed_other_bytes(
    tmp_path: Path, cfg: SyntheticConfig, small: dict[str, Path]
) -> None:
    again = _bytes(generate(tmp_path / "again", cfg))
    assert again == _bytes(small)
    other = _bytes(generate(tmp_path / "other", replace(cfg, seed=2)))
    for name in FILES:
        assert other[name] != again[name], name


def test_ids_have_the_documented_form(log: pl.DataFrame, cfg: SyntheticConfig, small: dict[str, Path]) -> None:
    users = pl.read_csv(small["users"])
    items = pl.read_csv(small["items"])
    assert users["user_id"].to_list() == [f"u{i:05d}" for i in range(1, cfg.n_users + 1)]
    assert items["item_id"].to_list() == [f"i{j:05d}" for j in range(1, cfg.n_items + 1)]
    assert sorted(log["user_id"].unique().to_list()) == users["user_id"].to_list()
    assert log["item_id"].str.contains(r"^i\d{5}$").all()
    assert log["timestamp"].dtype == pl.Int64


def test_every_user_long_enough_and_never_repeats(per_user: list, cfg: SyntheticConfig) -> None:
    assert len(per_user) == cfg.n_users
    lengths = [len(items) for _, items, _, _ in per_user]
    assert min(lengths) >= cfg.min_len
    assert max(lengths) <= cfg.max_len
    assert len(set(lengths)) > 10  # lengths really vary
    for u, items, _, _ in per_user:
        assert len(set(items)) == len(items), u


def test_timestamps_separate_sessions_by_more_than_30_minutes(per_user: list) -> None:
    first = np.array([ts[0] for _, _, _, ts in per_user])
    assert first.min() >= 1704067200  # 2024-01-01
    assert first.max() < 1704067200 + 14 * 86400
    gaps = np.concatenate([np.diff(ts) for _, _, _, ts in per_user])
    assert (gaps >= 0).all()  # non-decreasing per user
    within = gaps[gaps <= WITHIN_GAP_S[1]]
    between = gaps[gaps > WITHIN_GAP_S[1]]
    assert within.min() >= WITHIN_GAP_S[0]
    assert between.min() > SESSION_GAP_MIN_S  # nothing between 10 and 30 minutes
    assert between.size > 0.1 * gaps.size and within.size > 0.5 * gaps.size
    assert np.median(between) > 3600  # hours to days, not minutes


def test_a_session_stays_on_one_topic_and_sessions_switch(per_user: list) -> None:
    purity, switched = [], []
    for _, _, topics, ts in per_user:
        sessions = np.split(topics, np.flatnonzero(np.diff(ts) > SESSION_GAP_MIN_S) + 1)
        modes = [np.bincount(s).argmax() for s in sessions]
        purity.extend(np.bincount(s).max() / s.size for s in sessions)
        switched.extend(a != b for a, b in zip(modes, modes[1:]))
    assert np.mean(purity) > 0.9
    assert np.mean(switched) > 0.8


def test_users_concentrate_on_several_planted_topics(per_user: list, small: dict[str, Path]) -> None:
    user_topics = json.loads(small["planted"].read_text())["user_topics"]
    in_planted, n_strong = [], []
    for u, _, topics, _ in per_user:
        assert 2 <= len(user_topics[u]) <= 5
        in_planted.append(np.isin(topics, user_topics[u]).mean())
        shares = np.bincount(topics) / topics.size
        n_strong.append(int((shares >= 0.1).sum()))
    in_planted_a, n_strong_a = np.array(in_planted), np.array(n_strong)
    assert (in_planted_a >= 0.8).mean() >= 0.95
    assert in_planted_a.mean() >= 0.9
    assert (n_strong_a >= 3).mean() >= 0.7  # a single vector per user would not do


def test_popularity_is_skewed_within_a_topic(log: pl.DataFrame) -> None:
    counts = log.group_by("topic", "item_id").len().sort("len", descending=True)
    top_fifth = counts.group_by("topic").agg(pl.col("len").head(pl.len() // 5).sum() / pl.col("len").sum())
    # The top fifth of a topic's items would hold about 25% (20% plus sampling noise) were
    # popularity flat (item_zipf=0); Zipf(1) drawn without repeats gives about 36%.
    assert top_fifth["len"].median() > 0.31


def test_items_list_every_item_with_consistent_title_and_category(cfg: SyntheticConfig, small: dict[str, Path]) -> None:
    items = pl.read_csv(small["items"])
    item_topic = json.loads(small["planted"].read_text())["item_topic"]
    assert items.height == cfg.n_items == len(item_topic)
    category_of_topic: dict[int, str] = {}
    for item, title, category in items.iter_rows():
        match = re.fullmatch(r"Item (\d+) \(topic (\d+)\)", title)
        assert match is not None, title
        assert int(match.group(1)) == int(item[1:])
        topic = int(match.group(2))
        assert topic == item_topic[item]
        assert category_of_topic.setdefault(topic, category) == category  # a topic has one category
    assert len(category_of_topic) == cfg.n_topics
    assert len(set(category_of_topic.values())) == cfg.n_categories


def test_users_have_a_profile(small: dict[str, Path]) -> None:
    users = pl.read_csv(small["users"])
    assert set(users["gender"].unique().to_list()) == {"F", "M"}
    assert set(users["age"].unique().to_list()) <= {"18-24", "25-34", "35-44", "45-54", "55-64", "65+"}
    assert users["age"].n_unique() >= 4


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"min_len": 0}, "min_len"),
        ({"max_len": 10}, "min_len"),
        ({"n_topics": 400}, "min_len=20"),  # topics of 1 item cannot hold 20 behaviours
        ({"noise": 1.0}, "noise"),
        ({"interest_count_probs": (0.5, 0.5, 0.5, 0.5)}, "interest_count_probs"),
        ({"method": "vectorised"}, "max_len <= items per topic (25)"),  # 500 items / 20 topics < max_len 80
        ({"method": "loop"}, "method"),
    ],
)
def test_config_rejects_bad_values_by_name(bad: dict, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        replace(SMALL, **bad)


def test_parquet_holds_what_csv_holds(tmp_path: Path) -> None:
    """The same seed written both ways: identical frames, column types included."""
    csv = generate(tmp_path / "csv", VECTORISED)
    parquet = generate(tmp_path / "parquet", VECTORISED, fmt="parquet")
    assert sorted(p.name for p in (tmp_path / "parquet").iterdir()) == [
        "interactions.parquet", "items.parquet", "manifest.json", "planted.json", "users.parquet"
    ]
    for name in ("interactions", "items", "users"):
        assert_frame_equal(pl.read_parquet(parquet[name]), pl.read_csv(csv[name]))
    assert parquet["planted"].read_bytes() == csv["planted"].read_bytes()
    with pytest.raises(ValueError, match="fmt"):
        generate(tmp_path / "bad", VECTORISED, fmt="tsv")  # type: ignore[arg-type]


def test_heavier_interests_get_more_behaviours(per_user: list, small: dict[str, Path]) -> None:
    """Interests are listed heaviest first: on average a user's first interest holds a larger
    share of their behaviours than their last one."""
    user_topics = json.loads(small["planted"].read_text())["user_topics"]
    first, last = [], []
    for u, _, topics, _ in per_user:
        first.append(np.mean(topics == user_topics[u][0]))
        last.append(np.mean(topics == user_topics[u][-1]))
    assert np.mean(first) > np.mean(last) + 0.1
