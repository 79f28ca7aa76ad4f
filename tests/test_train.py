"""The training step's pieces: the negative sampler, the row-sparse Adam, the target window, the
full softmax, determinism, and the search over the number of interests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.synthetic import SyntheticConfig, generate
from retrieval.data import DataSpec, load_dataset, split_users
from retrieval.errors import ConfigError
from retrieval.mind import log_expected_counts
import json

from retrieval.samples import make_batch
from retrieval.train import (
    NegativeSampler,
    RowSparseAdam,
    TrainConfig,
    model_config_for,
    search_interests,
    setup,
    train,
)


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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    cfg = SyntheticConfig(n_users=60, n_items=100, n_topics=5, n_categories=5, min_len=10, max_len=20,
                          mean_len=15.0, seed=4)
    paths = generate(tmp_path_factory.mktemp("tiny_train"), cfg)
    spec = DataSpec(paths["interactions"], paths["items"], paths["users"])
    ds = load_dataset(spec)
    return spec, ds, split_users(ds, 2026)


def test_target_window_draws_every_next_w_position_and_never_past_the_sequence(tiny) -> None:
    _, ds, split = tiny
    one = setup(ds, split, model_config_for(ds, dim=8, hidden=16), TrainConfig(negatives=8, seed=1))
    assert np.array_equal(one.targets(one.users, one.positions), one.positions)
    st = setup(ds, split, model_config_for(ds, dim=8, hidden=16), TrainConfig(negatives=8, seed=1, target_window=3))
    draws = np.stack([st.targets(st.users, st.positions) for _ in range(40)])  # (40, windows)
    offsets = draws - st.positions
    last = np.minimum(st.positions + 3, split.history_len[st.users]) - 1  # the furthest allowed target
    assert offsets.min() == 0 and np.all(draws <= last)
    assert np.array_equal(draws.max(0), last)  # every reachable offset is drawn (40 draws of at most 3)
    # the history stays the behaviours before the window's position; only the target moves
    idx = np.arange(8)
    u, p, t = st.users[idx], st.positions[idx], draws[0, idx]
    moved, plain = make_batch(ds, u, p, 10, with_target=True, target=t), make_batch(ds, u, p, 10, with_target=True)
    assert torch.equal(moved.history, plain.history)
    assert moved.target.tolist() == [int(ds.items[ds.offsets[a] + b]) for a, b in zip(u, t)]


def test_recent_targets_keeps_the_windows_of_the_latest_share_of_the_period(tiny) -> None:
    _, ds, split = tiny
    cfg = model_config_for(ds, dim=8, hidden=16)
    full = setup(ds, split, cfg, TrainConfig(negatives=8))
    half = setup(ds, split, cfg, TrainConfig(negatives=8, recent_targets=0.5))
    key = lambda st: st.users * 10_000 + st.positions  # noqa: E731  one number per window
    kept = np.isin(key(full), key(half))  # (S,) which of every window is still trained on
    assert kept.sum() == len(half.users)  # a subset of the windows, none moved or added
    t = ds.times[ds.offsets[full.users] + full.positions]  # (S,) each window's target time
    assert t[kept].min() >= t[~kept].max()  # split by the target's time: the latest kept
    assert 0.5 <= kept.mean() <= 0.5 + np.mean(t == t[kept].min())  # half, plus the ties at the cut
    # each kept window keeps its whole history: the behaviours before its target
    u, p = half.users[:8], half.positions[:8]
    b = make_batch(ds, u, p, 50, with_target=True)
    assert b.mask.sum(1).tolist() == np.minimum(p, 50).tolist()
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="recent_targets must be in"):
            setup(ds, split, cfg, TrainConfig(negatives=8, recent_targets=bad))


def test_zero_negatives_is_the_full_softmax_without_correction(tiny) -> None:
    _, ds, split = tiny
    st = setup(ds, split, model_config_for(ds, dim=8, hidden=16), TrainConfig(negatives=0))
    assert st.sampler is None
    assert torch.equal(st.negatives(), torch.arange(1, ds.n_items + 1))
    assert torch.equal(st.log_q, torch.zeros(ds.n_items + 1))
    r = train(ds, split, model_config_for(ds, dim=8, hidden=16),
              TrainConfig(epochs=1, batch_size=32, negatives=0, max_steps=2), show_progress=False)
    assert np.isfinite(r.history[0]["loss"]) and "val_ndcg@50" in r.history[0]


def test_search_interests_trains_each_k_keeps_the_best_and_records_them(tiny, tmp_path: Path) -> None:
    spec, ds, split = tiny
    tc = TrainConfig(epochs=1, batch_size=32, negatives=16, max_steps=3, seed=2)
    search = search_interests(ds, split, model_config_for(ds, dim=8, hidden=16), tc, ks=(1, 2, 4),
                              out=tmp_path / "b", data_spec=spec, show_progress=False)
    assert sorted(search.results) == [1, 2, 4]
    assert [search.results[k].model.config.interests for k in (1, 2, 4)] == [1, 2, 4]
    recall = {k: f["val_recall@50"] for k, f in search.figures.items()}
    assert recall == {k: r.best_recall for k, r in search.results.items()}
    assert recall[search.k] == max(recall.values())
    assert search.k == min(k for k in recall if recall[k] == max(recall.values()))  # a tie goes to fewer interests
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert config["model"]["interests"] == search.k
    assert manifest["interests_search"]["chosen"] == search.k
    assert sorted(manifest["interests_search"]["by_interests"]) == ["1", "2", "4"]
    assert manifest["val_recall@50"] == recall[search.k]
    with pytest.raises(ValueError):
        search_interests(ds, split, model_config_for(ds), tc, ks=(0, 2))
