"""Ingestion: exact one-line errors on bad input, id vocabularies, sequences, side files, the split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from retrieval.data import PAD, UNKNOWN, DataSpec, load_dataset, split_users
from retrieval.errors import DataError

COLS = ["user_id", "item_id", "timestamp"]


def frame(rows: list[tuple], schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
    """An interactions frame from (user_id, item_id, timestamp) rows."""
    return pl.DataFrame(rows, schema=schema or COLS, orient="row")


def write(df: pl.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        df.write_parquet(path)
    else:
        df.write_csv(path)
    return path


def error(spec: DataSpec) -> str:
    """The message of the DataError that loading `spec` raises; always a single line."""
    with pytest.raises(DataError) as info:
        load_dataset(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


GOOD = [(1, 10, 100), (1, 11, 101), (2, 10, 102)]


# ---------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    assert error(DataSpec(p)) == f"{p}: file not found"


def test_missing_side_file(tmp_path: Path) -> None:
    p = write(frame(GOOD), tmp_path / "log.csv")
    items = tmp_path / "items.csv"
    assert error(DataSpec(p, items=items)) == f"{items}: file not found"


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    p.write_bytes(b"")
    assert error(DataSpec(p)) == f"{p}: file is empty"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_header_only(tmp_path: Path, suffix: str) -> None:
    p = write(frame([], {c: pl.Int64 for c in COLS}), tmp_path / f"log{suffix}")
    assert error(DataSpec(p)) == f"{p}: no interactions (the file has a header but no rows)"


def test_header_only_items_file(tmp_path: Path) -> None:
    p = write(frame(GOOD), tmp_path / "log.csv")
    items = write(pl.DataFrame(schema={"item_id": pl.Int64, "title": pl.String}), tmp_path / "items.csv")
    assert error(DataSpec(p, items=items)) == f"{items}: no items (the file has a header but no rows)"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_missing_column_lists_columns(tmp_path: Path, suffix: str) -> None:
    p = write(frame(GOOD, ["user_id", "item_id", "ts"]), tmp_path / f"log{suffix}")
    assert error(DataSpec(p)) == f"{p}: missing column 'timestamp' (columns: user_id, item_id, ts)"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_null_user_id_names_row(tmp_path: Path, suffix: str) -> None:
    p = write(frame([(1, 10, 100), (2, 11, 101), (None, 12, 102)]), tmp_path / f"log{suffix}")
    assert error(DataSpec(p)) == f"{p}: column 'user_id' has a null id at row 3"


def test_blank_user_id_is_null(tmp_path: Path) -> None:
    p = write(frame([("a", 10, 100), ("  ", 11, 101)]), tmp_path / "log.csv")
    assert error(DataSpec(p)) == f"{p}: column 'user_id' has a null id at row 2"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_null_item_id_names_row(tmp_path: Path, suffix: str) -> None:
    p = write(frame([(1, None, 100), (2, 11, 101)]), tmp_path / f"log{suffix}")
    assert error(DataSpec(p)) == f"{p}: column 'item_id' has a null id at row 1"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_null_timestamp_names_row(tmp_path: Path, suffix: str) -> None:
    p = write(frame([(1, 10, 100), (1, 11, None)]), tmp_path / f"log{suffix}")
    assert error(DataSpec(p)) == f"{p}: column 'timestamp' has a null timestamp at row 2"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_non_numeric_timestamp_names_value_and_row(tmp_path: Path, suffix: str) -> None:
    rows = [(1, 10, "100"), (1, 11, "101"), (2, 12, "yesterday")]
    p = write(frame(rows), tmp_path / f"log{suffix}")
    assert error(DataSpec(p)) == f"{p}: column 'timestamp' has a non-numeric timestamp 'yesterday' at row 3"


def test_out_of_range_timestamp(tmp_path: Path) -> None:
    p = write(frame([(1, 10, "100"), (1, 11, "1e30")]), tmp_path / "log.csv")
    assert error(DataSpec(p)) == f"{p}: column 'timestamp' has an out-of-range timestamp '1e30' at row 2"


def test_time_column_of_wrong_type(tmp_path: Path) -> None:
    p = write(frame([(1, 10, [1]), (1, 11, [2])]), tmp_path / "log.parquet")
    assert error(DataSpec(p)) == f"{p}: column 'timestamp' must hold numeric timestamps, found List(Int64)"


def test_unsupported_suffix(tmp_path: Path) -> None:
    p = write(frame(GOOD), tmp_path / "log.json")
    assert error(DataSpec(p)) == f"{p}: unsupported file type '.json'; use .csv, .tsv or .parquet"


def test_not_a_file(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    p.mkdir()
    assert error(DataSpec(p)) == f"{p}: not a file"


def test_ragged_csv_row(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id,timestamp\n1,10,100\n2,11,101,999\n")
    # the reason in parentheses is polars' own first line; ours is the frame around it
    message = error(DataSpec(p))
    assert message.startswith(f"{p}: cannot read (") and message.endswith(")")
    assert "fields" in message


def test_binary_garbage_csv(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    assert error(DataSpec(p)) == f"{p}: cannot read (binary data where the header should be; not a CSV file?)"


def test_binary_garbage_parquet(tmp_path: Path) -> None:
    p = tmp_path / "log.parquet"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    message = error(DataSpec(p))
    assert message.startswith(f"{p}: cannot read (parquet: ") and message.endswith(")")


def test_invalid_utf8_csv(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    p.write_bytes("user_id,item_id,timestamp\n1,caf\xe9,100\n".encode("latin-1"))
    message = error(DataSpec(p))
    assert message.startswith(f"{p}: cannot read (") and "utf-8" in message


def test_tab_separated_file_named_csv_lists_its_header(tmp_path: Path) -> None:
    """A readable header that lacks the columns is a missing column, not binary data."""
    p = tmp_path / "log.csv"
    p.write_text("user_id\titem_id\ttimestamp\n1\t10\t100\n")
    assert error(DataSpec(p)) == f"{p}: missing column 'user_id' (columns: user_id\titem_id\ttimestamp)"


def test_duplicate_item_id_in_items_file(tmp_path: Path) -> None:
    p = write(frame(GOOD), tmp_path / "log.csv")
    items = write(pl.DataFrame({"item_id": [10, 11, 10], "title": ["a", "b", "c"]}), tmp_path / "items.csv")
    assert error(DataSpec(p, items=items)) == f"{items}: column 'item_id' repeats the id '10'"


def test_duplicate_user_id_in_users_file(tmp_path: Path) -> None:
    p = write(frame(GOOD), tmp_path / "log.csv")
    users = write(pl.DataFrame({"user_id": ["2", "1", "2"], "age": [3, 4, 5]}), tmp_path / "users.parquet")
    assert error(DataSpec(p, users=users)) == f"{users}: column 'user_id' repeats the id '2'"


def test_requested_item_feature_missing(tmp_path: Path) -> None:
    p = write(frame(GOOD), tmp_path / "log.csv")
    items = write(pl.DataFrame({"item_id": [10, 11], "title": ["a", "b"], "genres": ["x", "y"]}), tmp_path / "items.csv")
    spec = DataSpec(p, items=items, item_features=("genres", "genre"))
    assert error(spec) == f"{items}: missing column 'genre' (columns: item_id, title, genres)"


def test_requested_user_feature_missing(tmp_path: Path) -> None:
    p = write(frame(GOOD), tmp_path / "log.csv")
    users = write(pl.DataFrame({"user_id": [1, 2], "age": [20, 30]}), tmp_path / "users.csv")
    assert error(DataSpec(p, users=users, user_features=("gender",))) == f"{users}: missing column 'gender' (columns: user_id, age)"


def test_items_file_without_id_column(tmp_path: Path) -> None:
    p = write(frame(GOOD), tmp_path / "log.csv")
    items = write(pl.DataFrame({"movie": [10, 11], "title": ["a", "b"]}), tmp_path / "items.csv")
    assert error(DataSpec(p, items=items)) == f"{items}: missing column 'item_id' (columns: movie, title)"


# ---------------------------------------------------------------------------- ids


def test_integer_ids_sort_numerically(tmp_path: Path) -> None:
    p = write(frame([(10, 9, 1), (9, 10, 2), (100, 2, 3), (2, 100, 4)]), tmp_path / "log.csv")
    ds = load_dataset(DataSpec(p))
    assert ds.item_ids.tolist() == [PAD, "2", "9", "10", "100"]
    assert ds.user_ids.tolist() == ["2", "9", "10", "100"]
    assert ds.user_index("10") == 2 and ds.user_index(10) == 2


def test_string_ids_sort_lexicographically(tmp_path: Path) -> None:
    rows = [("A2SUAM1J3GNN3B", "B9", 1), ("A10", "B10", 2), ("A9", "0001", 3), ("B1", "B10", 4)]
    ds = load_dataset(DataSpec(write(frame(rows), tmp_path / "log.csv")))
    assert ds.user_ids.tolist() == ["A10", "A2SUAM1J3GNN3B", "A9", "B1"]
    assert ds.item_ids.tolist() == [PAD, "0001", "B10", "B9"]


def test_mixed_ids_sort_as_strings(tmp_path: Path) -> None:
    ds = load_dataset(DataSpec(write(frame([(1, "9", 1), (1, "10", 2), (1, "x", 3)]), tmp_path / "log.csv")))
    assert ds.item_ids.tolist() == [PAD, "10", "9", "x"]


def test_ids_beyond_int64_do_not_crash(tmp_path: Path) -> None:
    rows = [(1, "99999999999999999999", 1), (1, "3", 2), (1, "10", 3)]
    ds = load_dataset(DataSpec(write(frame(rows), tmp_path / "log.csv")))
    assert ds.item_ids.tolist() == [PAD, "10", "3", "99999999999999999999"]


def test_equal_integer_ids_have_a_fixed_order(tmp_path: Path) -> None:
    """"7" and "007" are distinct ids with one numeric value: ties keep their string order."""
    rows = [(1, "7", 1), (1, "10", 2), (1, "007", 3), (1, "2", 4)]
    ds = load_dataset(DataSpec(write(frame(rows), tmp_path / "log.csv")))
    assert ds.item_ids.tolist() == [PAD, "2", "007", "7", "10"]


def test_unknown_user_lookup(tmp_path: Path) -> None:
    ds = load_dataset(DataSpec(write(frame(GOOD), tmp_path / "log.csv")))
    with pytest.raises(DataError) as info:
        ds.user_index("7")
    assert str(info.value) == "unknown user '7': not in the training log"


@pytest.mark.parametrize("string_ids", [False, True])
def test_csv_and_parquet_encode_identically(tmp_path: Path, string_ids: bool) -> None:
    rng = np.random.default_rng(3)
    n = 300
    users = rng.integers(1, 40, n)
    items = rng.integers(1, 120, n)
    df = pl.DataFrame({"user_id": users, "item_id": items, "timestamp": rng.integers(0, 50, n)})
    if string_ids:
        df = df.with_columns(
            pl.format("U{}", "user_id").alias("user_id"), pl.format("I{}", "item_id").alias("item_id")
        )
    a = load_dataset(DataSpec(write(df, tmp_path / "log.csv")))
    b = load_dataset(DataSpec(write(df, tmp_path / "log.parquet")))
    for name in ("item_ids", "user_ids", "offsets", "items", "times"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.items.dtype == np.int32 and a.offsets.dtype == np.int64 and a.times.dtype == np.int64
    assert a.n_users == len(np.unique(users)) and a.n_items == len(np.unique(items))


# ---------------------------------------------------------------------------- sequences


def test_sequences_sorted_by_time_then_item(tmp_path: Path) -> None:
    # file order is scrambled; user 7 has a tie at t=50 between items 10 and 9 (numeric: 9 first)
    rows = [(7, 10, 50), (3, 5, 9), (7, 2, 60), (7, 9, 50), (3, 1, 8), (7, 30, 10), (3, 4, 9), (5, 1, 1)]
    ds = load_dataset(DataSpec(write(frame(rows), tmp_path / "log.csv")))
    assert ds.user_ids.tolist() == ["3", "5", "7"]
    raw = {u: ds.item_ids[ds.sequence(i)].tolist() for i, u in enumerate(ds.user_ids)}
    assert raw == {"3": ["1", "4", "5"], "5": ["1"], "7": ["30", "9", "10", "2"]}
    assert ds.offsets.tolist() == [0, 3, 4, 8]
    assert ds.lengths().tolist() == [3, 1, 4]
    assert ds.times.tolist() == [8, 9, 9, 1, 10, 50, 50, 60]
    assert len(ds.items) == ds.offsets[-1] == len(rows)


def test_string_ids_break_ties_lexicographically(tmp_path: Path) -> None:
    rows = [("u", "b9", 5), ("u", "b10", 5), ("u", "a", 6)]
    ds = load_dataset(DataSpec(write(frame(rows), tmp_path / "log.csv")))
    assert ds.item_ids[ds.sequence(0)].tolist() == ["b10", "b9", "a"]


# ---------------------------------------------------------------------------- side files


@pytest.fixture
def side(tmp_path: Path) -> dict[str, Path]:
    """Log over items 1..4 (item 4 absent from the items file, item 5 never interacted with)
    and users 1..3 (user 3 absent from the users file, user 9 never in the log)."""
    log_df = frame([(1, 1, 1), (1, 2, 2), (2, 3, 3), (2, 4, 4), (3, 1, 5)])
    items = pl.DataFrame(
        {
            "item_id": [3, 1, 2, 5],
            "title": ["Three", "One", "Two", "Five"],
            "genres": ["b", "a|b|c", None, "c | d"],
            "year": [1995, 1990, None, 2001],
        }
    )
    users = pl.DataFrame({"user_id": [2, 1, 9], "age": [30, 20, 40], "gender": ["F", "M", "F"]})
    return {
        "interactions": write(log_df, tmp_path / "log.csv"),
        "items": write(items, tmp_path / "items.csv"),
        "users": write(users, tmp_path / "users.parquet"),
    }


def test_item_features_split_and_pool(side: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="retrieval.data"):
        ds = load_dataset(DataSpec(side["interactions"], items=side["items"]))
    # vocabulary: interacted items plus the never-touched item 5, which must be embedded and indexed
    assert ds.item_ids.tolist() == [PAD, "1", "2", "3", "4", "5"]
    assert set(ds.item_features) == {"genres", "year"}
    assert ds.item_feature_vocab["genres"] == [PAD, UNKNOWN, "a", "b", "c", "d"]
    # rows: pad, 1 = a|b|c, 2 = null, 3 = b, 4 = absent from the file, 5 = "c | d" (stripped)
    assert ds.item_features["genres"].tolist() == [[0, 0, 0], [2, 3, 4], [1, 0, 0], [3, 0, 0], [1, 0, 0], [4, 5, 0]]
    assert ds.item_features["genres"].dtype == np.int32
    assert ds.item_feature_vocab["year"] == [PAD, UNKNOWN, "1990", "1995", "2001"]
    assert ds.item_features["year"][:, 0].tolist() == [0, 2, 1, 3, 1, 4]
    assert ds.titles is not None and ds.titles.tolist() == ["", "One", "Two", "Three", "", "Five"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"1 items of {side['items']} are not in the interaction log; they are indexed without any behaviour",
        f"1 interacted items are not in {side['items']}; their features are 'unknown'",
    ]


def test_item_features_chosen(side: dict[str, Path]) -> None:
    ds = load_dataset(DataSpec(side["interactions"], items=side["items"], item_features=("year",)))
    assert set(ds.item_features) == {"year"}
    assert ds.item_features["year"].shape == (6, 1)


def test_no_warning_when_every_item_is_described(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = write(frame(GOOD), tmp_path / "log.csv")
    items = write(pl.DataFrame({"item_id": [11, 10], "title": ["b", "a"]}), tmp_path / "items.csv")
    with caplog.at_level(logging.WARNING, logger="retrieval.data"):
        ds = load_dataset(DataSpec(p, items=items))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert ds.titles.tolist() == ["", "a", "b"] and ds.item_features == {}


def test_user_profile_encoded(side: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="retrieval.data"):
        ds = load_dataset(DataSpec(side["interactions"], users=side["users"]))
    assert ds.user_ids.tolist() == ["1", "2", "3"]  # the log defines the users; 9 is not one
    assert ds.user_feature_vocab["gender"] == [PAD, UNKNOWN, "F", "M"]
    assert ds.user_features["gender"].tolist() == [[3], [2], [1]]
    assert ds.user_feature_vocab["age"] == [PAD, UNKNOWN, "20", "30"]  # 40 belonged to user 9 only
    assert ds.user_features["age"].tolist() == [[2], [3], [1]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"1 users of {side['users']} are not in the interaction log; they are ignored",
        f"1 users are not in {side['users']}; their profile is 'unknown'",
    ]


# ---------------------------------------------------------------------------- side-file ids


def _int_log(tmp_path: Path) -> Path:
    """Users 1..3 and items 1..4, integer ids."""
    return write(frame([(1, 1, 1), (1, 2, 2), (2, 3, 3), (2, 4, 4), (3, 1, 5)]), tmp_path / "log.csv")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_side_ids_are_read_with_the_log_id_type(tmp_path: Path, suffix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Float ids (`1.0` in a CSV, a float column in Parquet) are the log's integer items and users."""
    items = write(pl.DataFrame({"item_id": [4.0, 1.0, 2.0, 3.0], "genre": ["d", "a", "b", "c"]}), tmp_path / f"items{suffix}")
    users = write(pl.DataFrame({"user_id": [3.0, 1.0, 2.0], "age": [30, 10, 20]}), tmp_path / f"users{suffix}")
    with caplog.at_level(logging.WARNING, logger="retrieval.data"):
        ds = load_dataset(DataSpec(_int_log(tmp_path), items=items, users=users))
    assert ds.item_ids.tolist() == [PAD, "1", "2", "3", "4"]  # the catalogue does not double
    vocab = ds.item_feature_vocab["genre"]
    assert [vocab[v] for v in ds.item_features["genre"][1:, 0]] == ["a", "b", "c", "d"]
    assert [ds.user_feature_vocab["age"][v] for v in ds.user_features["age"][:, 0]] == ["10", "20", "30"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_side_ids_keep_the_log_spelling_and_only_integral_values_match(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    schema = {"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64}
    log_path = write(frame([("1", "007", 1), ("1", "12", 2), ("2", "3", 3)], schema=schema), tmp_path / "log.csv")
    items = write(pl.DataFrame({"item_id": ["7.0", "12", "3e0", "3.5"], "genre": ["a", "b", "c", "z"]}),
                  tmp_path / "items.csv")
    with caplog.at_level(logging.WARNING, logger="retrieval.data"):
        ds = load_dataset(DataSpec(log_path, items=items))
    # 7.0 is the log's 007 and 3e0 its 3; 3.5 is no item of the log, so a new one (and the ids no
    # longer all integers, they sort as strings)
    assert ds.item_ids.tolist() == [PAD, "007", "12", "3", "3.5"]
    vocab = ds.item_feature_vocab["genre"]
    assert [vocab[v] for v in ds.item_features["genre"][1:, 0]] == ["a", "b", "c", "z"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"1 items of {items} are not in the interaction log; they are indexed without any behaviour"
    ]


def test_a_side_file_of_mostly_other_ids_is_refused(tmp_path: Path) -> None:
    items = write(pl.DataFrame({"item_id": ["1.5", "2.5", "3", "x"]}), tmp_path / "items.csv")
    assert error(DataSpec(_int_log(tmp_path), items=items)) == (
        f"{items}: 3 of 4 ids in column 'item_id' match no item of the interaction log (e.g. '1.5'); "
        "the ids must be the log's"
    )
    users = write(pl.DataFrame({"user_id": ["u1", "u2", "3"]}), tmp_path / "users.csv")
    assert error(DataSpec(_int_log(tmp_path), users=users)) == (
        f"{users}: 2 of 3 ids in column 'user_id' match no user of the interaction log (e.g. 'u1'); "
        "the ids must be the log's"
    )


def test_a_catalogue_larger_than_the_log_is_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Most of the file's items were never touched, but it describes every item of the log: a
    catalogue with a long tail (the 1M-item benchmark log), not another log's file."""
    items = write(pl.DataFrame({"item_id": list(range(1, 15))}), tmp_path / "items.csv")
    with caplog.at_level(logging.WARNING, logger="retrieval.data"):
        ds = load_dataset(DataSpec(_int_log(tmp_path), items=items))
    assert ds.n_items == 14
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"10 items of {items} are not in the interaction log; they are indexed without any behaviour"
    ]


def test_float_ids_that_collide_are_a_repeated_id(tmp_path: Path) -> None:
    items = write(pl.DataFrame({"item_id": ["1", "1.0", "2"]}), tmp_path / "items.csv")
    assert error(DataSpec(_int_log(tmp_path), items=items)) == f"{items}: column 'item_id' repeats the id '1'"


def test_features_without_their_side_file_are_a_config_error(tmp_path: Path) -> None:
    from retrieval.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^user features age,gender need a users file \(--users\)$"):
        DataSpec(tmp_path / "log.csv", user_features=("age", "gender"))
    with pytest.raises(ConfigError, match=r"^item features genre need an items file \(--items\)$"):
        DataSpec(tmp_path / "log.csv", item_features=("genre",))


def test_split_needs_ten_users(tmp_path: Path) -> None:
    rows = [(u, 10 + u, 100 + u) for u in range(1, 10)]
    ds = load_dataset(DataSpec(write(frame(rows), tmp_path / "log.csv")))
    with pytest.raises(DataError, match="^the log has 9 users; the protocol's 80/10/10 user split needs at least 10"):
        split_users(ds)


# ---------------------------------------------------------------------------- split


def _log_with_users(tmp_path: Path, n_users: int, lengths: np.ndarray) -> DataSpec:
    """Users 1..n_users (written in scrambled order) where user u has lengths[u-1] items."""
    rows = [(u, 1000 + u * 10 + k, k) for u in range(1, n_users + 1) for k in range(lengths[u - 1])]
    order = np.random.default_rng(99).permutation(len(rows))
    return DataSpec(write(frame([rows[i] for i in order]), tmp_path / "log.csv"))


@pytest.mark.parametrize(("n_users", "seed"), [(47, 2026), (47, 2027), (10, 2026), (123, 2030)])
def test_split_matches_protocol_by_hand(tmp_path: Path, n_users: int, seed: int) -> None:
    lengths = np.array([1 + (u * 7) % 11 for u in range(1, n_users + 1)])  # 1..11 items
    ds = load_dataset(_log_with_users(tmp_path, n_users, lengths))
    split = split_users(ds, seed=seed)

    # the protocol, by hand
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.arange(1, n_users + 1))
    n_train, n_val = int(np.floor(0.8 * n_users)), int(np.floor(0.1 * n_users))
    train, val, test = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]

    raw = ds.user_ids.astype(int)
    assert raw[split.train_users].tolist() == sorted(train.tolist())
    assert raw[split.val_users].tolist() == sorted(val.tolist())
    assert raw[split.test_users].tolist() == sorted(test.tolist())
    assert split.users("validation") is split.val_users and split.seed == seed

    held = set(val.tolist()) | set(test.tolist())
    expected = [
        max(1, int(np.floor(0.8 * lengths[u - 1]))) if u in held else lengths[u - 1] for u in raw.tolist()
    ]
    assert split.history_len.tolist() == expected
    assert (split.history_len >= 1).all() and (split.history_len <= ds.lengths()).all()


def test_split_one_item_users_keep_their_item(tmp_path: Path) -> None:
    ds = load_dataset(_log_with_users(tmp_path, 20, np.ones(20, dtype=int)))
    split = split_users(ds, seed=2026)
    assert len(split.val_users) == 2 and len(split.test_users) == 2
    assert split.history_len.tolist() == [1] * 20


def test_split_history_lengths_worked_by_hand(tmp_path: Path) -> None:
    # 10 users all of length 5, 4, 2, 1 or 10 -> held-out history 4, 3, 1, 1, 8
    lengths = np.array([5, 4, 2, 1, 10, 5, 4, 2, 1, 10])
    ds = load_dataset(_log_with_users(tmp_path, 10, lengths))
    split = split_users(ds, seed=2026)
    held = np.concatenate([split.val_users, split.test_users])
    assert len(split.train_users) == 8 and len(held) == 2
    by_len = {5: 4, 4: 3, 2: 1, 1: 1, 10: 8}
    for u in held:
        assert split.history_len[u] == by_len[lengths[u]]
    for u in split.train_users:
        assert split.history_len[u] == lengths[u]


def test_split_unknown_part(tmp_path: Path) -> None:
    rows = [(u, 10 + u, 100 + u) for u in range(1, 11)]  # ten users: the fewest the split takes
    split = split_users(load_dataset(DataSpec(write(frame(rows), tmp_path / "log.csv"))))
    with pytest.raises(DataError) as info:
        split.users("val")
    assert str(info.value) == "unknown split part 'val'; use one of train, validation, test"


# ---------------------------------------------------------------------------- fingerprint


def test_fingerprint_follows_the_bytes(tmp_path: Path) -> None:
    p = write(frame(GOOD), tmp_path / "log.csv")
    first = load_dataset(DataSpec(p)).fingerprint
    assert len(first) == 64
    assert load_dataset(DataSpec(p)).fingerprint == first

    p.write_bytes(p.read_bytes())  # rewritten, same bytes, new mtime
    assert load_dataset(DataSpec(p)).fingerprint == first

    p.write_bytes(p.read_bytes().replace(b"102", b"103"))  # one timestamp changes
    changed = load_dataset(DataSpec(p)).fingerprint
    assert changed != first

    p.write_bytes(p.read_bytes().replace(b"103", b"102"))
    assert load_dataset(DataSpec(p)).fingerprint == first


def test_fingerprint_covers_side_files(tmp_path: Path) -> None:
    p = write(frame(GOOD), tmp_path / "log.csv")
    items = write(pl.DataFrame({"item_id": [10, 11], "title": ["a", "b"]}), tmp_path / "items.csv")
    with_items = load_dataset(DataSpec(p, items=items)).fingerprint
    assert with_items != load_dataset(DataSpec(p)).fingerprint
    write(pl.DataFrame({"item_id": [10, 11], "title": ["a", "B"]}), items)
    assert load_dataset(DataSpec(p, items=items)).fingerprint != with_items
