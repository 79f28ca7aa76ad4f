"""Session division for DSIN (Feng et al., IJCAI 2019, arXiv:1905.06482, section 4.1).

A user's behaviour sequence is cut into sessions wherever two consecutive behaviours lie
more than `gap` seconds apart (the paper: 30 minutes). DSIN reads the last S sessions, each
cut to its most recent T behaviours, as a (B, S, T) tensor.

Layout of the result (the ranker accepts any layout, since it reads the mask):
- sessions run oldest -> newest and are right-aligned: slot S - 1 always holds the most
  recent session, so DSIN's session bias w_k^K is a recency index with one meaning for
  every user; a user with fewer than S sessions has empty (all-False) slots at the front;
- behaviours inside a session are left-aligned, oldest first: position t = 0 is the first
  kept behaviour, padding (item 0, mask False) comes after, as in RankBatch.history.

Everything is vectorised over the concatenated histories of the batch; no Python loop
over users or behaviours.

Shapes: B batch (rows, one history each), S sessions, T items per session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from retrieval.data import Dataset

DEFAULT_GAP = 1800  # seconds: a new session starts after more than 30 minutes of silence


def divide_sessions(
    items: np.ndarray,
    times: np.ndarray,
    offsets: np.ndarray,
    ends: np.ndarray,
    gap: float = DEFAULT_GAP,
    S: int = 5,
    T: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Split each row's history into sessions and keep the last S, each its last T behaviours.

    items, times: flat per-behaviour arrays of a CSR log (users' sequences concatenated,
    each sorted by time). offsets[b]: where row b's user sequence starts in them;
    ends[b]: the history's end inside that sequence, exclusive (the target's position, as
    `samples.gather_histories` reads `end`). Row b's history is
    items[offsets[b] : offsets[b] + ends[b]], all of it (only the last S sessions survive).
    A behaviour opens a new session when its time exceeds the previous one's by more than
    `gap` (strictly).

    Returns sessions (B, S, T) int64 item ids, 0-padded, and mask (B, S, T) bool; see the
    module docstring for the layout (sessions right-aligned, behaviours left-aligned).
    """
    items = np.asarray(items)
    times = np.asarray(times)
    offsets = np.asarray(offsets, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    if items.shape != times.shape or items.ndim != 1:
        raise ValueError(f"items {items.shape} and times {times.shape} must be equal 1-d arrays")
    if offsets.shape != ends.shape or offsets.ndim != 1:
        raise ValueError(f"offsets {offsets.shape} and ends {ends.shape} must be equal 1-d arrays")
    if S < 1 or T < 1:
        raise ValueError(f"S={S} and T={T} must be at least 1")
    n = ends  # (B,) history length of each row
    bad = (n < 0) | (offsets < 0) | (offsets + n > len(items))
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        raise ValueError(f"row {b}: history [{offsets[b]}, {offsets[b]} + {ends[b]}) is not inside 0..{len(items)}")

    B = len(n)
    sessions = np.zeros((B, S, T), dtype=np.int64)
    mask = np.zeros((B, S, T), dtype=bool)
    total = int(n.sum())
    if total == 0:
        return sessions, mask

    # Flat positions of every row's history, concatenated: (total,)
    row = np.repeat(np.arange(B), n)  # (total,) the row of each behaviour
    first = np.cumsum(n) - n  # (B,) where each row begins in the concatenation
    pos = offsets[row] + np.arange(total) - first[row]  # (total,) index into items / times
    t = times[pos]

    # A session opens at each row's first behaviour and after every gap > `gap`.
    opens = np.ones(total, dtype=bool)
    opens[1:] = np.diff(t) > gap
    opens[first[n > 0]] = True
    sid = np.cumsum(opens) - 1  # (total,) global session id
    sess_start = np.flatnonzero(opens)  # (n_sessions,) concatenated position of each session's start
    sess_len = np.diff(np.append(sess_start, total))  # (n_sessions,)

    # Session index inside the row, counted from the row's newest session (0 = newest).
    row_last_sid = sid[first[n > 0] + n[n > 0] - 1]  # (rows with history,)
    last_sid = np.full(B, -1)
    last_sid[n > 0] = row_last_sid
    from_newest = last_sid[row] - sid  # (total,)

    # Position inside the session, and its slot among the session's last T behaviours.
    within = np.arange(total) - sess_start[sid]  # (total,)
    drop = np.maximum(sess_len[sid] - T, 0)  # (total,) oldest behaviours cut from the session
    keep = (from_newest < S) & (within >= drop)

    k = S - 1 - from_newest[keep]  # session slot, right-aligned
    p = within[keep] - drop[keep]  # position slot, left-aligned
    r = row[keep]
    sessions[r, k, p] = items[pos[keep]]
    mask[r, k, p] = True
    return sessions, mask


def session_statistics(ds: "Dataset", max_len: int = 50, gap: float = DEFAULT_GAP, T: int = 10) -> dict[str, float]:
    """How much session structure a log has for DSIN, over every user's whole sequence:
    sessions per user, behaviours per session, the share of users with one session, the share
    of behaviours in sessions longer than T, and within each user's last `max_len`
    behaviours (what the rankers read) the sessions and the behaviours that S = 5 sessions of
    T keep. Also the share of consecutive behaviours with the same timestamp (their order
    inside a session is then the log's tie-break, not the user's)."""
    lengths = ds.lengths()
    users = np.arange(ds.n_users)
    whole, _ = _session_sizes(ds.times, ds.offsets[:-1], lengths, gap)
    first = np.maximum(lengths - max_len, 0)
    per_user = sessions_in_history(ds, users, lengths, max_len, gap)  # (U,) sessions in the last max_len
    _, kept = divide_sessions(ds.items, ds.times, ds.offsets[users] + first, lengths - first, gap, 5, T)
    within = np.ones(max(len(ds.times) - 1, 0), dtype=bool)  # consecutive pairs inside one user's sequence
    within[ds.offsets[1:-1][(ds.offsets[1:-1] > 0) & (ds.offsets[1:-1] < len(ds.times))] - 1] = False
    same = (np.diff(ds.times) == 0)[within]
    counts_whole = np.bincount(whole[1], minlength=ds.n_users)
    return {
        "gap_s": float(gap),
        "users": int(ds.n_users),
        "sessions_per_user_mean": float(counts_whole.mean()),
        "sessions_per_user_median": float(np.median(counts_whole)),
        "users_with_one_session": float((counts_whole == 1).mean()),
        "behaviours_per_session_mean": float(whole[0].mean()),
        "behaviours_per_session_median": float(np.median(whole[0])),
        f"behaviours_in_sessions_longer_than_{T}": float(whole[0][whole[0] > T].sum() / whole[0].sum()),
        f"sessions_in_last_{max_len}_mean": float(per_user.mean()),
        f"behaviours_in_last_{max_len}_mean": float((lengths - first).mean()),
        f"behaviours_kept_by_5_sessions_of_{T}_mean": float(kept.sum((1, 2)).mean()),
        "same_timestamp_as_previous": float(same.mean()) if len(same) else 0.0,
    }


def sessions_in_history(ds: "Dataset", users: np.ndarray, ends: np.ndarray, max_len: int = 50,
                        gap: float = DEFAULT_GAP) -> np.ndarray:
    """(U,) the number of sessions among the last `max_len` behaviours of each history
    sequence[:end] (what a ranker reads); 0 for an empty history. Splits evaluation users into
    those DSIN's session structure can help (several sessions) and those it cannot (one)."""
    users, ends = np.asarray(users, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    first = np.maximum(ends - max_len, 0)
    out = np.zeros(len(users), dtype=np.int64)
    some = ends > first
    if some.any():
        _, out[some] = _session_sizes(ds.times, ds.offsets[users[some]] + first[some], (ends - first)[some], gap)
    return out


def _session_sizes(times: np.ndarray, starts: np.ndarray, n: np.ndarray, gap: float
                   ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Sizes of every session of the spans times[starts[u] : starts[u] + n[u]] (spans with
    n >= 1): ((sizes, owner of each session), sessions per span)."""
    n = np.asarray(n, dtype=np.int64)
    total = int(n.sum())
    row = np.repeat(np.arange(len(n)), n)
    begin = np.cumsum(n) - n
    t = times[starts[row] + np.arange(total) - begin[row]]
    opens = np.ones(total, dtype=bool)
    opens[1:] = np.diff(t) > gap
    opens[begin[n > 0]] = True
    sid = np.cumsum(opens) - 1
    sizes = np.bincount(sid)
    owner = row[np.flatnonzero(opens)]
    return (sizes, owner), np.bincount(owner, minlength=len(n))
