"""The training step's pieces: the negative sampler, the row-sparse Adam, and determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.synthetic import SyntheticConfig, generate
from retrieval.data import DataSpec, load_dataset, split_users
from retrieval.mind import log_expected_counts
from retrieval.train import NegativeSampler, RowSparseAdam, TrainConfig, model_config_for, train


def test_sampler_draws_follow_q_and_never_padding_or_zero_weight_items() -> None:
    q = torch.tensor([0.0, 0.5, 0.0, 0.1, 0.25, 0.15])  # items 0 (padding) and 2 weigh nothing
    sampler = NegativeSampler(q, num=50_000, seed=0)
    draws = torch.cat([sampler.draw() for _ in range(4)])  # (200_000,)
    assert draws.dtype == torch.int64
    counts = torch.bincount(draws, minlength=len(q)).double()
    assert counts[0] == 0 and counts[2] == 0
    freq = counts / counts.sum()
    sd = (q.double() * (1 - q.double()) / counts.sum()).sqrt()  # binomial standard error per item
    assert torch.all((freq - q.double()).abs() <= 5 * sd + 1e-12), (freq, q)


def test_sampler_matches_the_log_q_correction_it_is_used_with() -> None:
    """q from log_expected_counts: frequencies ∝ (count + 1)^alpha, log_q = log(S q)."""
    freq = torch.tensor([0, 9, 0, 3, 1])  # (N+1,)
    q, log_q = log_expected_counts(freq, num_neg=64, alpha=1.0)
    draws = torch.cat([NegativeSampler(q, 64, seed=s).draw() for s in range(2000)])  # (128_000,)
    counts = torch.bincount(draws, minlength=5).double()
    expected = torch.tensor([0.0, 10, 1, 4, 2]) / 17
    assert torch.allclose(counts / counts.sum(), expected.double(), atol=0.01)
    assert torch.allclose(log_q[1:], torch.log(expected[1:] * 64), atol=1e-5)


def test_sampler_is_seeded() -> None:
    q = torch.full((1001,), 1 / 1000)
    q[0] = 0
    a, b, c = NegativeSampler(q, 512, 7), NegativeSampler(q, 512, 7), NegativeSampler(q, 512, 8)
    first = a.draw()
    assert torch.equal(first, b.draw()) and not torch.equal(first, c.draw())
    assert not torch.equal(first, a.draw())  # a fresh draw every step
    assert int(first.min()) >= 1 and int(first.max()) <= 1000


def _embedding_steps(opt_class: type, steps: int = 5) -> torch.Tensor:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 4, sparse=True)
    opt = opt_class(list(emb.parameters()), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 30, (20,), generator=g)  # rows 30..49 never touched; repeats within a step
        target = torch.randn(20, 4, generator=g)
        opt.zero_grad()
        ((emb(ids) - target) ** 2).sum().backward()
        opt.step()
    return emb.weight.detach()


def test_row_sparse_adam_is_sparse_adam() -> None:
    torch.manual_seed(0)
    start = torch.nn.Embedding(50, 4, sparse=True).weight.detach().clone()
    ours, theirs = _embedding_steps(RowSparseAdam), _embedding_steps(torch.optim.SparseAdam)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(ours[30:], start[30:])  # rows outside every gradient never move
    assert not torch.allclose(ours[:30], start[:30])


def test_row_sparse_adam_refuses_dense_gradients() -> None:
    w = torch.nn.Parameter(torch.zeros(3, 2))
    w.sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        RowSparseAdam([w]).step()


def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_users=60, n_items=100, n_topics=5, n_categories=5, min_len=10, max_len=20,
                          mean_len=15.0, seed=4)
    paths = generate(tmp_path, cfg)
    ds = load_dataset(DataSpec(paths["interactions"], paths["items"], paths["users"]))
    split = split_users(ds, 2026)
    tc = TrainConfig(epochs=2, batch_size=32, negatives=16, max_steps=4, seed=3)
    runs = [train(ds, split, model_config_for(ds, dim=8, hidden=16), tc, show_progress=False) for _ in range(2)]
    losses = [[h["loss"] for h in r.history] for r in runs]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert all(np.isfinite(losses[0]))
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b)
