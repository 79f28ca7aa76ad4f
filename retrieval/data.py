"""Behaviour-log ingestion: polars lazy scans, validation on arrival, id vocabularies, the user split.

Every retrieval and ranking figure rests on this module, so bad input stops here with
one line that names the file, the column and the bad value (`DataError`), and the
split follows `shared/eval-protocol.md` exactly.

Rows repeated exactly (same user, item and timestamp) are dropped, with one log line
saying how many; the same item again at another time is a real repeat and is kept.
Side files' ids are read with the log's id type: when the log's ids are integers, a
side id `1.0` (or a float column of a Parquet file) is the item `1`; when most ids of a
side file match nothing in the log, the file is refused (DataError) rather than every
item losing its features.

Encoding: items get indices 1..N in the sorted order of their raw ids (0 is padding);
users get 0..U-1 likewise. Raw ids are kept as strings; when every id of a column is an
integer the sort is numeric, so MovieLens ids sort as numbers and the protocol's
`rng.permutation(sorted_user_ids)` is reproduced by permuting user indices.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from retrieval.artifacts import file_fingerprint
from retrieval.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PAD = "<pad>"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class DataSpec:
    """Where the behaviour log and its side files are, and which columns mean what."""

    interactions: Path  # CSV or Parquet: one row per behaviour
    items: Path | None = None  # optional item side file (title, category, genres ...)
    users: Path | None = None  # optional user-profile file (age, gender ...)
    user_col: str = "user_id"  # user id column (interactions and users file)
    item_col: str = "item_id"  # item id column (interactions and items file)
    time_col: str = "timestamp"  # numeric event time (Unix seconds), orders a user's sequence
    title_col: str = "title"  # item title shown by `query`, never a feature; ignored if absent
    item_features: tuple[str, ...] | None = None  # item feature columns; None = every other column
    user_features: tuple[str, ...] | None = None  # profile columns; None = every other column
    separator: str = "|"  # multi-valued features are joined by this (MovieLens genres)

    def __post_init__(self) -> None:
        for features, side, what in ((self.item_features, self.items, "item features {} need an items file (--items)"),
                                     (self.user_features, self.users, "user features {} need a users file (--users)")):
            if features and side is None:
                raise ConfigError(what.format(",".join(features)))


@dataclass
class Dataset:
    """An encoded behaviour log: per-user sequences in CSR form plus vocabularies and features."""

    item_ids: np.ndarray  # (N+1,) str raw item ids; [0] is padding
    user_ids: np.ndarray  # (U,) str raw user ids
    offsets: np.ndarray  # (U+1,) int64: user u's sequence is items[offsets[u]:offsets[u+1]]
    items: np.ndarray  # (E,) int32 item indices, each user's sorted by (time, item id)
    times: np.ndarray  # (E,) int64 event times
    item_features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N+1, M) int32, 0 pad
    item_feature_vocab: dict[str, list[str]] = field(default_factory=dict)  # name -> values; [0] pad
    user_features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (U, M) int32, 0 pad
    user_feature_vocab: dict[str, list[str]] = field(default_factory=dict)
    titles: np.ndarray | None = None  # (N+1,) str or None
    fingerprint: str = ""  # sha256 over the input files' bytes and the spec

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def user_index(self, raw_id: str) -> int:
        """Index of a raw user id; DataError if unknown."""
        if not hasattr(self, "_user_lookup"):
            self._user_lookup = {u: i for i, u in enumerate(self.user_ids.tolist())}
        try:
            return self._user_lookup[str(raw_id)]
        except KeyError:
            raise DataError(f"unknown user {raw_id!r}: not in the training log") from None


SplitKind = Literal["user", "time"]
SPLITS: tuple[str, ...] = ("user", "time")


@dataclass
class Split:
    """Which part of each user's sequence is training data and which users are held out.

    The user split (the protocol's default): train users give their whole sequence,
    val/test users only their first 80 % as history. The temporal split: every user gives
    the interactions before the cut time T as training data, and the users with
    interactions on both sides of T are held out with that training period as history.
    Either way the training data is the first history_len[u] items of each train user,
    which is all that training, the negative sampler and the baselines read."""

    seed: int
    train_users: np.ndarray  # (U_train,) int64 user indices whose first history_len items are training data
    val_users: np.ndarray
    test_users: np.ndarray
    history_len: np.ndarray  # (U,) items of each user's sequence the model may see
    kind: SplitKind = "user"  # "user" (by user) or "time" (before / after the cut T)
    cut: float | None = None  # T of the temporal split: interactions at times < T are training data

    def users(self, part: str) -> np.ndarray:
        parts = {"train": self.train_users, "validation": self.val_users, "test": self.test_users}
        if part not in parts:
            raise DataError(f"unknown split part {part!r}; use one of {', '.join(parts)}")
        return parts[part]


# ---------------------------------------------------------------------------- reading


def _scan(path: Path, string_cols: list[str]) -> pl.LazyFrame:
    """Lazy scan of a CSV or Parquet file, with the named columns read as strings."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            lf = pl.scan_parquet(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            head = pl.read_csv(path, n_rows=0, separator="\t" if suffix == ".tsv" else ",")
            overrides = {c: pl.String for c in string_cols if c in head.columns}
            lf = pl.scan_csv(
                path,
                separator="\t" if suffix == ".tsv" else ",",
                schema_overrides=overrides,
                infer_schema_length=10_000,
            )
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .parquet")
        lf.collect_schema()
    except DataError:
        raise
    except (pl.exceptions.PolarsError, OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read ({_first_line(err)})") from None
    return lf


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _require_columns(lf: pl.LazyFrame, path: Path, cols: list[str]) -> None:
    names = lf.collect_schema().names()
    if any(c not in names for c in cols) and not all(_is_text(n) for n in names):
        raise DataError(f"{path}: cannot read (binary data where the header should be; not a CSV file?)")
    for c in cols:
        if c not in names:
            raise DataError(f"{path}: missing column {c!r} (columns: {', '.join(names)})")


def _is_text(name: str) -> bool:
    """False for a header cell that is binary data decoded lossily (control bytes, U+FFFD)."""
    return "\ufffd" not in name and all(ch.isprintable() or ch == "\t" for ch in name)


def _collect(lf: pl.LazyFrame, path: Path, streaming: bool = False) -> pl.DataFrame:
    """Collect a scan; `streaming` runs polars' streaming engine, which reads the file in
    batches instead of materialising every raw column before the projection."""
    try:
        return lf.collect(engine="streaming" if streaming else "auto")
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"{path}: cannot read ({_first_line(err)})") from None


def _first_bad(df: pl.DataFrame, bad: pl.Expr, col: str) -> tuple[int, object]:
    """Row number (1-based, data rows) and value of the first row where `bad` holds."""
    row = df.with_row_index("_row").filter(bad).select("_row", col).row(0)
    return int(row[0]) + 1, row[1]


def _string_ids(df: pl.DataFrame, col: str, path: Path) -> pl.DataFrame:
    """Check an id column has no nulls or blanks and cast it to strings."""
    s = df.get_column(col)
    if s.dtype != pl.String:
        df = df.with_columns(pl.col(col).cast(pl.String))
    df = df.with_columns(pl.col(col).str.strip_chars())
    bad = pl.col(col).is_null() | (pl.col(col) == "")
    if df.select(bad.any()).item():
        row, _ = _first_bad(df, bad, col)
        raise DataError(f"{path}: column {col!r} has a null id at row {row}")
    return df


def _numeric_ids(raw: pl.Series) -> bool:
    return raw.str.contains(r"^-?\d+$").all()


def _sorted_vocab(raw: pl.Series) -> pl.Series:
    """Distinct raw ids in sort order: numeric when every id is an integer, else lexicographic."""
    uniq = raw.unique().sort()  # lexicographic; also the tie order of "7" and "007" below
    if _numeric_ids(uniq):
        ints = uniq.cast(pl.Int64, strict=False)  # null where an id overflows int64
        if ints.null_count() == 0:
            uniq = uniq.gather(np.argsort(ints.to_numpy(), kind="stable"))
    return uniq


def _positions(ids: pl.Series, vocab: pl.Series, start: int) -> np.ndarray:
    """(len(ids),) int64 index of each id in the vocabulary, counted from `start`; -1 where absent.

    A hash join in polars: a Python dict over a million-id vocabulary costs seconds."""
    table = pl.DataFrame({"id": vocab, "idx": np.arange(start, start + len(vocab), dtype=np.int64)})
    found = pl.DataFrame({"id": ids}).join(table, on="id", how="left", maintain_order="left")
    return found.get_column("idx").fill_null(-1).to_numpy()


def _clean_id(col: str) -> pl.Expr:
    """An id column as stripped strings (integers and strings alike)."""
    return pl.col(col).cast(pl.String).str.strip_chars()


def _time_seconds(col: str, dtype: pl.DataType, path: Path) -> pl.Expr:
    """A timestamp column as Float64 seconds: numbers as they are, strings parsed (null where not a number)."""
    if dtype == pl.String:
        return pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
    if dtype.is_numeric():
        return pl.col(col).cast(pl.Float64)
    raise DataError(f"{path}: column {col!r} must hold numeric timestamps, found {dtype}")


def _null_id(col: str) -> pl.Expr:
    return pl.col(col).is_null() | (pl.col(col) == "")


def _bad_time(col: str) -> pl.Expr:
    return pl.col(col).is_null() | pl.col(col).is_nan() | pl.col(col).is_infinite()


def _huge_time(col: str) -> pl.Expr:
    return pl.col(col).abs() >= 2.0**63  # would overflow int64 seconds


def read_interactions(spec: DataSpec) -> pl.DataFrame:
    """Validated interactions as (user: str, item: str, time: int64), in file order.

    One streaming query reads, strips and parses the three columns, and one pass of
    `any()` checks validates them, so a 10M-row log holds little more than its three
    columns at once; only a bad file goes through `_first_error` to name the row."""
    path = Path(spec.interactions)
    cols = [spec.user_col, spec.item_col, spec.time_col]
    lf = _scan(path, cols)
    _require_columns(lf, path, cols)
    time_expr = _time_seconds(spec.time_col, lf.collect_schema()[spec.time_col], path)
    df = _collect(
        lf.select(_clean_id(spec.user_col).alias("user"), _clean_id(spec.item_col).alias("item"),
                  time_expr.alias("_t")),
        path,
        streaming=True,
    )
    if df.height == 0:
        raise DataError(f"{path}: no interactions (the file has a header but no rows)")
    flags = df.select(_null_id("user").any(), _null_id("item").any(), (_bad_time("_t") | _huge_time("_t")).any())
    if any(flags.row(0)):
        del df
        _first_error(lf, spec, path, time_expr)
    return df.select("user", "item", pl.col("_t").cast(pl.Int64).alias("time"))


def _first_error(lf: pl.LazyFrame, spec: DataSpec, path: Path, time_expr: pl.Expr) -> None:
    """Raise the DataError that names the first bad row: null ids first, then bad timestamps."""
    t = spec.time_col
    df = _collect(lf.select(spec.user_col, spec.item_col, time_expr.alias("_t"), pl.col(t).alias("_raw")), path)
    for col in (spec.user_col, spec.item_col):
        df = df.with_columns(_clean_id(col))
        if df.select(_null_id(col).any()).item():
            row, _ = _first_bad(df, _null_id(col), col)
            raise DataError(f"{path}: column {col!r} has a null id at row {row}")
    if df.select(_bad_time("_t").any()).item():
        row, value = _first_bad(df, _bad_time("_t"), "_raw")
        what = "a null timestamp" if value is None else f"a non-numeric timestamp {value!r}"
        raise DataError(f"{path}: column {t!r} has {what} at row {row}")
    row, value = _first_bad(df, _huge_time("_t"), "_raw")
    raise DataError(f"{path}: column {t!r} has an out-of-range timestamp {value!r} at row {row}")


def _read_side(path: Path, id_col: str, kind: str, log_ids: pl.Series) -> pl.DataFrame:
    """A side file with its ids in the log's form (`log_ids`: the log's distinct ids of that
    column); DataError when most of its ids match nothing in the log and it describes less than
    half of the log's ids (a catalogue larger than the log is fine)."""
    lf = _scan(path, [id_col])
    _require_columns(lf, path, [id_col])
    df = _collect(lf, path)
    if df.height == 0:
        raise DataError(f"{path}: no {kind} (the file has a header but no rows)")
    df = _string_ids(df, id_col, path)
    df = _as_log_ids(df, id_col, log_ids)
    dup = df.get_column(id_col).is_duplicated()
    if dup.any():
        raise DataError(f"{path}: column {id_col!r} repeats the id {df.get_column(id_col).filter(dup)[0]!r}")
    unmatched = ~df.get_column(id_col).is_in(log_ids.implode())
    n_unmatched = int(unmatched.sum())
    covered = df.height - n_unmatched  # log ids the file describes (ids are distinct)
    if 2 * n_unmatched > df.height and 2 * covered < len(log_ids):
        # most of the file is foreign AND it describes less than half of the log: another log's
        # file. A catalogue larger than the log (items nobody touched yet) covers the log: kept.
        example = df.get_column(id_col).filter(unmatched)[0]
        raise DataError(
            f"{path}: {n_unmatched} of {df.height} ids in column {id_col!r} match no {kind[:-1]} of the interaction "
            f"log (e.g. {example!r}); the ids must be the log's"
        )
    if n_unmatched:
        fate = "indexed without any behaviour" if kind == "items" else "ignored"
        log.warning("%d %s of %s are not in the interaction log; they are %s", n_unmatched, kind, path, fate)
    return df


def _as_log_ids(df: pl.DataFrame, col: str, log_ids: pl.Series) -> pl.DataFrame:
    """Rewrite a side file's id column (strings) in the log's id form. When every log id is an
    integer, a side id that is an integral number ("1.0", "1e3", " 7") becomes the log's
    spelling of that integer; anything else (an exact match, "1.5", a non-integer log) is
    left as it is, to match as a string or not at all."""
    if not _numeric_ids(log_ids):
        return df
    log_keys = log_ids.cast(pl.Int64, strict=False)
    if log_keys.null_count():  # an id beyond int64: compare as strings
        return df
    spelled = pl.DataFrame({"_key": log_keys, "_log": log_ids}).filter(~pl.col("_key").is_duplicated())
    f = pl.col(col).cast(pl.Float64, strict=False)
    integral = f.is_finite() & (f == f.floor()) & (f.abs() < 2.0**53)
    key = pl.coalesce(pl.col(col).cast(pl.Int64, strict=False), pl.when(integral).then(f.cast(pl.Int64)))
    df = df.with_columns(key.alias("_key")).join(spelled, on="_key", how="left", maintain_order="left")
    exact = pl.col(col).is_in(log_ids.implode())
    new = pl.when(exact).then(pl.col(col)).otherwise(pl.coalesce("_log", pl.col("_key").cast(pl.String), pl.col(col)))
    return df.with_columns(new.alias(col)).drop("_key", "_log")


def _feature_columns(df: pl.DataFrame, path: Path, chosen: tuple[str, ...] | None, skip: set[str]) -> list[str]:
    if chosen is None:
        return [c for c in df.columns if c not in skip]
    for c in chosen:
        if c not in df.columns:
            raise DataError(f"{path}: missing column {c!r} (columns: {', '.join(df.columns)})")
    return list(chosen)


def _encode_feature(values: pl.Series, n_rows: int, row_index: np.ndarray, sep: str) -> tuple[np.ndarray, list[str]]:
    """Encode one (possibly multi-valued) feature column into an (n_rows, M) int32 matrix.

    `row_index[i]` is the output row of values[i]; rows without a value get 'unknown'.
    Vocabulary: [0] padding, [1] 'unknown', then the sorted distinct values.
    """
    s = values.cast(pl.String).fill_null("")
    lists = s.str.split(sep).list.eval(pl.element().str.strip_chars()).list.eval(
        pl.element().filter(pl.element() != "")
    )
    flat = lists.explode().drop_nulls()  # (F,) every value, row by row
    vocab = [PAD, UNKNOWN] + sorted(set(flat.unique().to_list()) - {UNKNOWN})
    lens = lists.list.len().to_numpy().astype(np.int64)  # (R,) values per row
    width = max(1, int(lens.max()) if len(lens) else 1)
    out = np.zeros((n_rows, width), dtype=np.int32)
    out[:, 0] = 1  # unknown unless the file says otherwise
    codes = _positions(flat, pl.Series(vocab[1:], dtype=pl.String), 1).astype(np.int32)  # (F,) distinct keys from 1
    rows = np.repeat(row_index, lens)  # (F,)
    starts = np.cumsum(lens) - lens
    cols = np.arange(len(flat), dtype=np.int64) - np.repeat(starts, lens)  # (F,) slot within the row
    has = lens > 0
    out[row_index[has], 0] = 0
    out[rows, cols] = codes
    return out, vocab


def load_dataset(spec: DataSpec, seconds: dict[str, float] | None = None) -> Dataset:
    """Read, validate and encode a behaviour log and its optional side files.

    `seconds`, when given, receives the wall time of each stage (read, side files,
    vocabularies, encode, features): the ingestion benchmark reads it."""
    clock = _Stages(seconds)
    inter = read_interactions(spec)
    clock.lap("read_validate")
    raw_items = inter.get_column("item").unique()  # distinct first: no copy of the E-row column
    items_df = _read_side(spec.items, spec.item_col, "items", raw_items) if spec.items else None
    users_df = _read_side(spec.users, spec.user_col, "users", inter.get_column("user").unique()) if spec.users else None
    clock.lap("read_side_files")

    # Item vocabulary: every interacted item plus every item of the side file.
    if items_df is not None:
        raw_items = pl.concat([raw_items, items_df.get_column(spec.item_col)])
    item_vocab = _sorted_vocab(raw_items)
    user_vocab = _sorted_vocab(inter.get_column("user"))
    del raw_items
    clock.lap("vocabularies")
    ds = encode_interactions(inter, item_vocab, user_vocab)
    del inter
    clock.lap("encode_ids_sort")
    if items_df is not None:
        _attach_item_side(ds, items_df, spec, item_vocab)
    if users_df is not None:
        _attach_user_side(ds, users_df, spec, user_vocab)
    ds.fingerprint = _fingerprint(spec)
    clock.lap("features_fingerprint")
    log.info("loaded %d interactions, %d users, %d items from %s", len(ds.items), ds.n_users, ds.n_items, spec.interactions)
    return ds


class _Stages:
    """Records the wall time since the previous lap under a stage name, when asked to."""

    def __init__(self, seconds: dict[str, float] | None):
        self.seconds, self.t = seconds, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.seconds is not None:
            now = time.perf_counter()
            self.seconds[name] = now - self.t
            self.t = now


def encode_interactions(inter: pl.DataFrame, item_vocab: pl.Series, user_vocab: pl.Series) -> Dataset:
    """Encode validated interactions (user, item, time) into per-user CSR sequences sorted by
    (time, item index): items get 1..N in vocabulary order, users 0..U-1. Rows repeated
    exactly (user, item and time) are dropped, and the count logged; an item repeated at
    another time is a real repeat behaviour and is kept.

    Ids become indices by hash joins against the vocabularies, then one sort; memory stays
    a few columns of E rows (int32 ids, int64 times)."""
    item_map = pl.DataFrame({"item": item_vocab, "item_idx": np.arange(1, len(item_vocab) + 1, dtype=np.int32)})
    user_map = pl.DataFrame({"user": user_vocab, "user_idx": np.arange(len(user_vocab), dtype=np.int32)})
    enc = (
        inter.lazy()
        .join(user_map.lazy(), on="user")
        .join(item_map.lazy(), on="item")
        .select("user_idx", "item_idx", "time")
        .sort(["user_idx", "time", "item_idx"])
        .collect()
    )
    users = enc.get_column("user_idx").to_numpy()  # (E,) sorted, so exact repeats are neighbours
    items = enc.get_column("item_idx").to_numpy().astype(np.int32)
    times = enc.get_column("time").to_numpy().astype(np.int64)
    del enc
    repeat = np.zeros(len(users), dtype=bool)
    repeat[1:] = (users[1:] == users[:-1]) & (items[1:] == items[:-1]) & (times[1:] == times[:-1])
    n_repeat = int(repeat.sum())
    if n_repeat:
        keep = ~repeat
        users, items, times = users[keep], items[keep], times[keep]
        log.info("dropped %d duplicate rows (same user, item and timestamp); repeats at other times are kept", n_repeat)
    counts = np.bincount(users, minlength=len(user_vocab))
    offsets = np.zeros(len(user_vocab) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Dataset(
        item_ids=np.concatenate([[PAD], item_vocab.to_numpy()]).astype(str),
        user_ids=user_vocab.to_numpy().astype(str),
        offsets=offsets,
        items=items,
        times=times,
    )


def _attach_item_side(ds: Dataset, df: pl.DataFrame, spec: DataSpec, item_vocab: pl.Series) -> None:
    path = Path(spec.items)
    rows = _positions(df.get_column(spec.item_col), item_vocab, 1)  # every side id is in the vocabulary
    interacted = np.zeros(ds.n_items + 1, dtype=bool)
    interacted[ds.items] = True
    described = np.zeros(ds.n_items + 1, dtype=bool)
    described[rows] = True
    missing = int((interacted & ~described).sum())
    if missing:
        log.warning("%d interacted items are not in %s; their features are %r", missing, path, UNKNOWN)
    if spec.title_col in df.columns:
        titles = np.full(ds.n_items + 1, "", dtype=object)
        titles[rows] = df.get_column(spec.title_col).cast(pl.String).fill_null("").to_numpy()
        ds.titles = titles.astype(str)
    for col in _feature_columns(df, path, spec.item_features, {spec.item_col, spec.title_col}):
        mat, vocab = _encode_feature(df.get_column(col), ds.n_items + 1, rows, spec.separator)
        mat[0] = 0
        ds.item_features[col], ds.item_feature_vocab[col] = mat, vocab


def _attach_user_side(ds: Dataset, df: pl.DataFrame, spec: DataSpec, user_vocab: pl.Series) -> None:
    path = Path(spec.users)
    rows = _positions(df.get_column(spec.user_col), user_vocab, 0)  # -1: a user not in the log
    keep = rows >= 0
    df, rows = df.filter(pl.Series(keep)), rows[keep]
    missing = ds.n_users - len(rows)
    if missing:
        log.warning("%d users are not in %s; their profile is %r", missing, path, UNKNOWN)
    for col in _feature_columns(df, path, spec.user_features, {spec.user_col}):
        mat, vocab = _encode_feature(df.get_column(col), ds.n_users, rows, spec.separator)
        ds.user_features[col], ds.user_feature_vocab[col] = mat, vocab


def _fingerprint(spec: DataSpec) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in (spec.interactions, spec.items, spec.users):
        h.update(file_fingerprint(Path(p)).encode() if p else b"-")
    for name in ("user_col", "item_col", "time_col", "title_col", "item_features", "user_features", "separator"):
        h.update(repr(getattr(spec, name)).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- split


def split_users(ds: Dataset, seed: int = 2026) -> Split:
    """Split users as the protocol says: 80/10/10 by a seeded permutation of sorted user ids;
    val/test users keep the first floor(0.8 n) items (at least 1) as history."""
    n = ds.n_users
    if n < 10:
        raise DataError(f"the log has {n} users; the protocol's 80/10/10 user split needs at least 10 "
                        "(one validation and one test user)")
    order = np.random.default_rng(seed).permutation(n)  # same draw as permuting the sorted ids
    n_train, n_val = (8 * n) // 10, n // 10  # floor(0.8 n), floor(0.1 n) in exact integers
    train, val, test = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    lengths = ds.lengths()
    history_len = lengths.copy()
    held = np.concatenate([val, test])
    history_len[held] = np.maximum(1, (4 * lengths[held]) // 5)  # floor(0.8 n), at least 1
    return Split(seed, np.sort(train), np.sort(val), np.sort(test), history_len)


def split_time(ds: Dataset, seed: int = 2026, quantile: float = 0.8) -> Split:
    """The protocol's temporal split: T = the `quantile` of all timestamps; interactions before
    T are the training period (every user's, as training data); the users with interactions
    on both sides of T are held out, history = their training period, the first half of a
    seeded permutation of them validating and the rest testing.

    Sequences are sorted by time, so each user's training period is a prefix: history_len."""
    if not 0.0 < quantile < 1.0:
        raise DataError(f"the temporal split's quantile must lie in (0, 1), got {quantile}")
    cut = float(np.quantile(ds.times, quantile))
    owner = np.repeat(np.arange(ds.n_users), ds.lengths())  # (E,) user of each interaction
    history_len = np.bincount(owner, weights=ds.times < cut, minlength=ds.n_users).astype(np.int64)  # (U,)
    del owner
    lengths = ds.lengths()
    evaluated = np.flatnonzero((history_len > 0) & (history_len < lengths))  # sorted user indices
    if len(evaluated) < 2:
        raise DataError(f"the temporal split at T={cut:g} leaves {len(evaluated)} users with interactions "
                        "on both sides of T; it needs at least 2 (one to validate, one to test)")
    order = evaluated[np.random.default_rng(seed).permutation(len(evaluated))]
    half = len(order) // 2
    train = np.flatnonzero(history_len > 0)
    return Split(seed, train, np.sort(order[:half]), np.sort(order[half:]), history_len, kind="time", cut=cut)


def make_split(ds: Dataset, kind: str = "user", seed: int = 2026) -> Split:
    """The split named `kind` ("user" or "time") with the given seed."""
    if kind == "user":
        return split_users(ds, seed)
    if kind == "time":
        return split_time(ds, seed)
    raise DataError(f"unknown split {kind!r}; use one of {', '.join(SPLITS)}")


def within_prefix(ds: Dataset, ends: np.ndarray) -> np.ndarray:
    """(E,) bool: whether each interaction is among its user's first ends[u] (ends (U,), e.g. a
    split's history_len: its training data)."""
    lengths = ds.lengths()
    pos = np.arange(len(ds.items), dtype=np.int64) - np.repeat(ds.offsets[:-1], lengths)  # (E,) place in its sequence
    return pos < np.repeat(ends, lengths)


def item_counts(ds: Dataset, users: np.ndarray, ends: np.ndarray | None = None) -> np.ndarray:
    """(N+1,) how many times each item occurs in the given users' sequences (index 0 stays 0);
    with `ends` (U,) (e.g. a split's history_len), only in each user's first ends[u] items."""
    if ends is None:
        chosen = np.zeros(ds.n_users, dtype=bool)
        chosen[users] = True
        in_users = np.repeat(chosen, ds.lengths())  # (E,) bool: one byte a row, not an int64 owner
        return np.bincount(ds.items[in_users], minlength=ds.n_items + 1)
    lengths = ds.lengths()
    if np.array_equal(ends[users], lengths[users]):  # whole sequences (the user split's train users)
        return item_counts(ds, users)
    take = np.zeros(ds.n_users, dtype=np.int64)
    take[users] = ends[users]
    return np.bincount(ds.items[within_prefix(ds, take)], minlength=ds.n_items + 1)


def training_counts(ds: Dataset, split: Split) -> np.ndarray:
    """(N+1,) how often each item occurs in the split's training data (train users' first
    history_len items): what popularity, item-kNN and the negative sampler count."""
    return item_counts(ds, split.train_users, split.history_len)


def held_out_users(ds: Dataset, split: Split, part: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Users of `part` with a non-empty ground truth, their history ends, and their ground truths.

    User split: the ground truth is the rest of the sequence after the history. Temporal
    split: the evaluation-period items that are not in the history (a user with none left
    has nothing to find and is not evaluated)."""
    users = split.users(part)
    users = users[split.history_len[users] < ds.lengths()[users]]
    ends = split.history_len[users]
    if split.kind == "time":
        truth = [np.setdiff1d(ds.sequence(u)[e:], ds.sequence(u)[:e]) for u, e in zip(users, ends)]
        keep = np.array([len(t) > 0 for t in truth], dtype=bool)
        if not keep.all():
            users, ends, truth = users[keep], ends[keep], [t for t, k in zip(truth, keep) if k]
        return users, ends, truth
    truth = [ds.sequence(u)[e:] for u, e in zip(users, ends)]
    return users, ends, truth
