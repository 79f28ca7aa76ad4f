"""Explanations: which of a user's behaviours built the interest that retrieved an item.

MIND's routing gives every behaviour a coupling weight into each interest (`Interests.weights`,
(K, L) per history: behaviour l's share in interest k; over the active interests each
behaviour's weights sum to 1). An item retrieved by interest k is explained by the
behaviours with the largest weight into k, and the interests themselves are shown as
groups of behaviours, each behaviour in the interest it routes to most.

The L axis holds only the model's window, the LAST L behaviours of a history,
left-aligned: position l is behaviour `start + l` of the whole history, with
start = max(0, length - L). Older behaviours took no part in the interests and are never
named. Functions here return positions in the whole history; the caller names the items.
"""

from __future__ import annotations

import numpy as np


def window_start(length: int, max_len: int) -> int:
    """Position in the whole history of the first behaviour the model read (its last L)."""
    return max(0, int(length) - int(max_len))


def top_behaviours(weights: np.ndarray, length: int, interest: int, m: int) -> list[tuple[int, float]]:
    """The m behaviours with the largest weight into `interest`, as (position in the whole
    history, weight), largest first; equal weights: the more recent first. Behaviours with
    zero weight (padding, or an inactive interest) are never returned.

    weights: (K, L) one history's routing weights; length: that history's whole length."""
    L = weights.shape[1]
    start = window_start(length, L)
    used = min(int(length), L)
    w = np.asarray(weights[interest, :used], dtype=np.float64)  # (used,)
    order = np.lexsort((-np.arange(used), -w))[:m]  # weight desc, then recency desc
    return [(start + int(l), float(w[l])) for l in order if w[l] > 0]


def interest_groups(
    weights: np.ndarray, active: np.ndarray, mass: np.ndarray, length: int, m: int
) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """Each active interest as (interest, routing mass, behaviours), the behaviours being those
    that route to it more than to any other interest (ties: the lower interest), at most m,
    largest weight first, as (position in the whole history, weight).

    weights (K, L), active (K,), mass (K,) of one history; length its whole length."""
    K, L = weights.shape
    start = window_start(length, L)
    used = min(int(length), L)
    w = np.where(np.asarray(active, bool)[:, None], np.asarray(weights[:, :used], np.float64), -1.0)  # (K, used)
    home = w.argmax(axis=0) if used else np.zeros(0, np.int64)  # (used,) each behaviour's strongest interest
    groups = []
    for k in np.flatnonzero(active):
        mine = np.flatnonzero(home == k)
        order = mine[np.lexsort((-mine, -w[k, mine]))][:m]
        groups.append((int(k), float(mass[k]), [(start + int(l), float(w[k, l])) for l in order]))
    return groups
