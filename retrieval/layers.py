"""Small pieces shared by the models: squash, masked softmax, the MLP, pooled embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def squash(z: Tensor, dim: int = -1, eps: float = 1e-9) -> Tensor:
    """Capsule non-linearity: keeps the direction, maps the norm to ||z||^2 / (1 + ||z||^2) < 1."""
    sq = (z * z).sum(dim, keepdim=True)
    return z * (sq / (1.0 + sq) / torch.sqrt(sq + eps))


def masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over `dim` where mask is False weighs exactly zero (all-False slices give zeros)."""
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.softmax(logits, dim=dim)
    return torch.nan_to_num(out, nan=0.0)


def mlp(sizes: Sequence[int], final_activation: bool = True) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last one if `final_activation`)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PooledEmbedding(nn.Module):
    """Embedding of a (possibly multi-valued) categorical field, mean-pooled over its values.

    Index 0 is padding: it has a zero vector and never counts in the mean.
    """

    def __init__(self, num: int, dim: int, sparse: bool = False):
        super().__init__()
        self.emb = nn.Embedding(num, dim, padding_idx=0, sparse=sparse)

    def forward(self, ids: Tensor) -> Tensor:  # (..., M) -> (..., D)
        e = self.emb(ids)  # (..., M, D)
        n = (ids != 0).sum(-1, keepdim=True).clamp(min=1)  # (..., 1)
        return e.sum(-2) / n
