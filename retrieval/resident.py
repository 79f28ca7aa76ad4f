"""Training windows resident on the device: the stored sequences, the windows and the profile
tables as tensors there, and each batch's histories gathered there.

On a GPU, gathering a batch's histories in numpy and copying them over every step costs
more than the step itself at large batches; here the only per-step host work is slicing
the epoch's window order, which is itself on the device. `gather_histories` is the torch
twin of `retrieval.samples.gather_histories` (the same left-aligned (B, L) histories and
masks; tested equal), so a batch is the same on every device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from retrieval.data import Dataset
from retrieval.mind import Batch


def gather_histories(items: Tensor, offsets: Tensor, rows: Tensor, end: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """Histories of the behaviours before position `end` (B,) of each row's sequence, where row r's
    sequence is items[offsets[r]:offsets[r+1]]: (B, L) int64 item indices, oldest first then 0
    padding, and the (B, L) bool mask of real behaviours. All tensors on one device."""
    first = (end - max_len).clamp(min=0)  # (B,)
    length = end - first  # (B,)
    cols = torch.arange(max_len, device=items.device)[None, :]  # (1, L)
    mask = cols < length[:, None]  # (B, L)
    if items.numel() == 0:
        return torch.zeros(mask.shape, dtype=torch.int64, device=items.device), mask
    idx = (offsets[rows] + first)[:, None] + cols  # (B, L)
    hist = items[idx.clamp(max=items.numel() - 1)].long()  # (B, L); padded slots read a real cell, zeroed below
    return hist.masked_fill(~mask, 0), mask


class ResidentWindows:
    """Sequences (E,), offsets (U+1,), windows (W,) and profile tables (U, M) on one device;
    `batch(idx)` makes the training batch of windows idx without leaving the device."""

    def __init__(self, ds: Dataset, users: np.ndarray, positions: np.ndarray, device: torch.device):
        self.device = device
        self.items = torch.from_numpy(ds.items).to(device)  # (E,) int32
        self.offsets = torch.from_numpy(ds.offsets.astype(np.int64)).to(device)  # (U+1,)
        self.users = torch.from_numpy(users.astype(np.int64)).to(device)  # (W,)
        self.positions = torch.from_numpy(positions.astype(np.int64)).to(device)  # (W,)
        self.profiles = {f: torch.from_numpy(m.astype(np.int64)).to(device) for f, m in ds.user_features.items()}

    def order(self, order: np.ndarray) -> Tensor:
        """An epoch's window order (W',) on the device: one copy an epoch, sliced every step."""
        return torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64)).to(self.device)

    def batch(self, idx: Tensor, max_len: int) -> Batch:
        """The batch of windows idx (B,): history before each window's position, target at it."""
        user, end = self.users[idx], self.positions[idx]  # (B,), (B,)
        hist, mask = gather_histories(self.items, self.offsets, user, end, max_len)
        target = self.items[self.offsets[user] + end].long()  # (B,)
        return Batch(hist, mask, {f: m[user] for f, m in self.profiles.items()}, target)
