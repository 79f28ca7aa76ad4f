"""DIEN, DSIN and session division: the gates, the masks, the auxiliary loss, worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.ranking.common import RankBatch
from retrieval.ranking.dien import DIEN, AttentionGRUCell, DIENConfig
from retrieval.ranking.dsin import DSIN, BiasEncoding, DSINConfig
from retrieval.ranking.sessions import divide_sessions


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: one intra-op thread is several times faster than two on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


N_ITEMS = 40
DIM = 4  # D_item = DIM * (1 + one item feature) = 8


def item_features(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(1, 6, (N_ITEMS + 1, 1), generator=g)
    table[0] = 0
    return {"cat": table}


def common(**kw) -> dict:
    base = dict(
        n_items=N_ITEMS, item_feature_sizes={"cat": 6}, user_feature_sizes={"age": 5}, dim=DIM, hidden=(16, 8)
    )
    return base | kw


def dien(seed: int = 0, **kw) -> DIEN:
    torch.manual_seed(seed)
    return DIEN(DIENConfig(**common(**kw)), item_features())


def dsin(seed: int = 0, **kw) -> DSIN:
    torch.manual_seed(seed)
    return DSIN(DSINConfig(**common(sessions=4, session_len=3, **kw)), item_features())


def history_batch(lengths: list[int], L: int, seed: int = 0) -> RankBatch:
    """Left-aligned histories of the given lengths, 0-padded to L, with sampled negatives."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    history = torch.randint(1, N_ITEMS + 1, (B, L), generator=g) * mask
    neg = torch.randint(1, N_ITEMS + 1, (B, L), generator=g) * mask
    return RankBatch(
        history=history,
        mask=mask,
        candidate=torch.randint(1, N_ITEMS + 1, (B,), generator=g),
        user_features={"age": torch.randint(1, 5, (B, 1), generator=g)},
        label=torch.randint(0, 2, (B,), generator=g).float(),
        neg_history=neg,
    )


def session_batch(session_mask: torch.Tensor, seed: int = 0) -> RankBatch:
    g = torch.Generator().manual_seed(seed)
    B = session_mask.shape[0]
    sessions = torch.randint(1, N_ITEMS + 1, session_mask.shape, generator=g) * session_mask
    return RankBatch(
        history=torch.zeros(B, 1, dtype=torch.long),
        mask=torch.zeros(B, 1, dtype=torch.bool),
        candidate=torch.randint(1, N_ITEMS + 1, (B,), generator=g),
        user_features={"age": torch.randint(1, 5, (B, 1), generator=g)},
        label=torch.randint(0, 2, (B,), generator=g).float(),
        sessions=sessions,
        session_mask=session_mask,
    )


def replace(batch: RankBatch, **kw) -> RankBatch:
    return RankBatch(**(batch.__dict__ | kw))


# ---------------------------------------------------------------- DIEN: the evolving cell


def gru_cell_copy(cell: AttentionGRUCell) -> torch.nn.GRUCell:
    """torch's GRUCell with the same weights: its update gate z is 1 - u, so the u rows flip sign."""
    G = cell.h2g.in_features
    ref = torch.nn.GRUCell(cell.x2g.in_features, G)
    flip = torch.ones(3 * G, 1)
    flip[G : 2 * G] = -1
    with torch.no_grad():
        ref.weight_ih.copy_(cell.x2g.weight * flip)
        ref.bias_ih.copy_(cell.x2g.bias * flip[:, 0])
        ref.weight_hh.copy_(cell.h2g.weight * flip)
        ref.bias_hh.copy_(cell.h2g.bias * flip[:, 0])
    return ref


@pytest.mark.parametrize("kind", ["augru", "agru"])
def test_attention_zero_keeps_the_state(kind):
    torch.manual_seed(0)
    cell = AttentionGRUCell(5, 6, kind)
    x, h = torch.randn(4, 5), torch.randn(4, 6)
    assert torch.equal(cell(x, h, torch.zeros(4)), h)
    assert not torch.allclose(cell(x, h, torch.full((4,), 0.5)), h)


@pytest.mark.parametrize("kind", ["augru", "aigru"])
def test_attention_one_is_a_plain_gru_step(kind):
    torch.manual_seed(1)
    cell = AttentionGRUCell(5, 6, kind)
    x, h = torch.randn(4, 5), torch.randn(4, 6)
    torch.testing.assert_close(cell(x, h, torch.ones(4)), gru_cell_copy(cell)(x, h))


def test_augru_scales_the_update_gate_and_aigru_the_input():
    torch.manual_seed(2)
    augru = AttentionGRUCell(5, 6, "augru")
    aigru = AttentionGRUCell(5, 6, "aigru")
    aigru.load_state_dict(augru.state_dict())
    ref = gru_cell_copy(augru)
    x, h, a = torch.randn(4, 5), torch.randn(4, 6), torch.rand(4)
    # AIGRU: a plain GRU fed a_t x_t.
    torch.testing.assert_close(aigru(x, h, a), ref(a[:, None] * x, h))
    # AUGRU: h' = h + a u (h̃ - h), and the plain step is h + u (h̃ - h).
    plain = ref(x, h)
    u = torch.sigmoid(augru.x2g(x).chunk(3, -1)[1] + augru.h2g(h).chunk(3, -1)[1])
    cand = h + (plain - h) / u
    torch.testing.assert_close(augru(x, h, a), h + a[:, None] * u * (cand - h))


def test_agru_interpolates_with_the_attention():
    torch.manual_seed(3)
    cell = AttentionGRUCell(5, 6, "agru")
    x, h = torch.randn(4, 5), torch.randn(4, 6)
    a = torch.tensor([0.1, 0.3, 0.6, 0.9])
    full = cell(x, h, torch.ones(4))  # h̃: the attention replaced the whole update gate
    torch.testing.assert_close(cell(x, h, a), (1 - a[:, None]) * h + a[:, None] * full)


# ---------------------------------------------------------------- DIEN: masks and padding


def test_extractor_states_match_a_gru_on_each_real_prefix():
    model = dien()
    lengths = [5, 1, 3, 0]
    batch = history_batch(lengths, L=6)
    e = model.items(batch.history) * batch.mask[..., None]
    h = model.extract(e, batch.mask)
    for b, n in enumerate(lengths):
        if n:
            ref, _ = model.extractor(e[b : b + 1, :n])
            torch.testing.assert_close(h[b, :n], ref[0])
        assert torch.equal(h[b, n:], torch.zeros_like(h[b, n:]))


def test_extractor_rejects_a_right_aligned_history():
    model = dien()
    batch = history_batch([2, 3], L=4)
    flipped = replace(batch, history=batch.history.flip(1), mask=batch.mask.flip(1))
    with pytest.raises(ValueError, match="left-aligned"):
        model.score(flipped)


@pytest.mark.parametrize("evolution", ["augru", "aigru", "agru"])
def test_final_state_is_the_state_at_the_last_real_step(evolution):
    model = dien(evolution=evolution)
    lengths = [4, 2, 6, 0]
    torch.manual_seed(4)
    h, a = torch.randn(4, 6, 8), torch.rand(4, 6)
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    final = model.evolve(h, a, mask)
    for b, n in enumerate(lengths):
        state = torch.zeros(1, 8)
        for t in range(n):
            state = model.evolution(h[b : b + 1, t], state, a[b : b + 1, t])
        torch.testing.assert_close(final[b : b + 1], state)
    assert torch.equal(final[3], torch.zeros(8))


@pytest.mark.parametrize("attention", ["bilinear", "mlp"])
@pytest.mark.parametrize("evolution", ["augru", "aigru", "agru"])
def test_padding_never_changes_the_dien_score(evolution, attention):
    model = dien(evolution=evolution, attention=attention)
    batch = history_batch([5, 2, 6, 1], L=6)
    ref = model.score(batch)
    # Longer padding, and junk item ids under the padding of both histories.
    g = torch.Generator().manual_seed(9)
    mask = F.pad(batch.mask, (0, 3))
    junk = torch.randint(1, N_ITEMS + 1, mask.shape, generator=g)
    padded = replace(
        batch,
        mask=mask,
        history=torch.where(mask, F.pad(batch.history, (0, 3)), junk),
        neg_history=torch.where(mask, F.pad(batch.neg_history, (0, 3)), junk.flip(0)),
    )
    torch.testing.assert_close(model.score(padded), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.losses(padded)["aux"], model.losses(batch)["aux"], rtol=0, atol=1e-6)
    # A real behaviour does matter.
    history = batch.history.clone()
    history[1, 0] = history[1, 0] % N_ITEMS + 1
    assert not torch.allclose(model.score(replace(batch, history=history))[1], ref[1])


# ---------------------------------------------------------------- DIEN: the auxiliary loss


def test_aux_loss_by_hand():
    model = dien()
    D = 8
    unit = torch.eye(D)
    h = torch.zeros(2, 3, D)
    e = torch.zeros(2, 3, D)
    neg = torch.zeros(2, 3, D)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    h[0, 0], e[0, 1], neg[0, 1] = unit[0], 2 * unit[0], -unit[0]  # h·e = 2, h·ê = -1
    h[1, 0], e[1, 1], neg[1, 1] = unit[1], 0.5 * unit[1], 3 * unit[1]  # 0.5, 3
    h[1, 1], e[1, 2], neg[1, 2] = unit[2], -unit[2], unit[3]  # -1, 0
    h[0, 1], e[0, 2], neg[0, 2] = unit[4], 7 * unit[4], -7 * unit[4]  # step 2 is padding: ignored

    def term(pos: float, ng: float) -> float:
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        return -(math.log(sig(pos)) + math.log(1 - sig(ng)))

    expected = (term(2, -1) + term(0.5, 3) + term(-1, 0)) / 3  # mean over the 3 real (t, t+1) pairs
    assert model.aux_loss(h, e, neg, mask).item() == pytest.approx(expected, rel=1e-6)


def test_aux_loss_ignores_padded_negatives_and_reads_real_ones():
    model = dien()
    batch = history_batch([5, 2, 6, 1], L=6)
    aux = model.losses(batch)["aux"]
    neg = batch.neg_history.clone()
    neg[~batch.mask] = 7  # negatives beside padding
    neg[:, 0] = 9  # no step predicts position 0
    torch.testing.assert_close(model.losses(replace(batch, neg_history=neg))["aux"], aux, rtol=0, atol=0)
    neg[0, 3] = neg[0, 3] % N_ITEMS + 1  # a real negative
    assert model.losses(replace(batch, neg_history=neg))["aux"] != aux


def test_aux_weight_scales_and_zero_removes_the_aux_loss():
    batch = history_batch([5, 2, 6, 1], L=6)
    model = dien(aux_weight=0.5).eval()
    out = model.losses(batch)
    assert out["aux"] > 0
    torch.testing.assert_close(out["total"], out["bce"] + 0.5 * out["aux"])
    off = dien(aux_weight=0.0).eval()
    off_out = off.losses(replace(batch, neg_history=None))
    assert off_out["aux"] == 0
    bce = F.binary_cross_entropy_with_logits(off.score(batch), batch.label)
    torch.testing.assert_close(off_out["bce"], bce)
    torch.testing.assert_close(off.loss(batch), bce, rtol=0, atol=0)
    with pytest.raises(ValueError, match="neg_history"):
        model.losses(replace(batch, neg_history=None))


def test_l2_covers_the_rows_each_model_reads():
    batch = history_batch([3, 2], L=4)
    model = dien(l2=0.1).eval()
    model.set_frequencies(torch.randint(1, 50, (N_ITEMS + 1,), generator=torch.Generator().manual_seed(0)))
    out = model.losses(batch)
    clicked = torch.cat([batch.history[batch.mask], batch.candidate])
    torch.testing.assert_close(out["l2"], model.items.mba_l2(torch.cat([clicked, batch.neg_history[batch.mask]])))
    assert out["l2"] > model.items.mba_l2(clicked)  # the negatives' rows count
    torch.testing.assert_close(out["total"], out["bce"] + out["aux"] + 0.1 * out["l2"])

    model = dsin(l2=0.1).eval()
    mask = dsin_mask()
    batch = session_batch(mask)
    out = model.losses(batch)
    torch.testing.assert_close(out["l2"], model.items.mba_l2(torch.cat([batch.sessions[mask], batch.candidate])))
    torch.testing.assert_close(out["total"], out["bce"] + 0.1 * out["l2"])


# ---------------------------------------------------------------- session division


def naive_sessions(items, times, start, end, gap, S, T):
    """One row by hand: the reference divide_sessions must match."""
    sessions: list[list[int]] = []
    for i in range(start, end):
        if i == start or times[i] - times[i - 1] > gap:
            sessions.append([])
        sessions[-1].append(int(items[i]))
    kept = [s[-T:] for s in sessions[-S:]]
    out = np.zeros((S, T), dtype=np.int64)
    mask = np.zeros((S, T), dtype=bool)
    for k, s in enumerate(kept):
        slot = S - len(kept) + k
        out[slot, : len(s)] = s
        mask[slot, : len(s)] = True
    return out, mask


TIMELINE_ITEMS = np.array([11, 12, 13, 14, 15])
TIMELINE_TIMES = np.array([0, 60, 4000, 4100, 9000])


def one_row(gap=1800, S=3, T=2):
    return divide_sessions(TIMELINE_ITEMS, TIMELINE_TIMES, np.array([0]), np.array([5]), gap, S, T)


def test_sessions_split_at_gaps():
    sessions, mask = one_row(S=4, T=3)
    assert sessions[0].tolist() == [[0, 0, 0], [11, 12, 0], [13, 14, 0], [15, 0, 0]]
    assert mask[0].tolist() == [[False] * 3, [True, True, False], [True, True, False], [True, False, False]]


def test_sessions_keep_the_last_S():
    sessions, mask = one_row(S=2, T=2)
    assert sessions[0].tolist() == [[13, 14], [15, 0]]
    assert mask[0].tolist() == [[True, True], [True, False]]


def test_sessions_keep_the_last_T_of_a_session():
    items = np.array([1, 2, 3, 4, 5, 6])
    times = np.array([0, 10, 20, 30, 40, 5000])
    sessions, mask = divide_sessions(items, times, np.array([0]), np.array([6]), 1800, 2, 3)
    assert sessions[0].tolist() == [[3, 4, 5], [6, 0, 0]]
    assert mask[0].tolist() == [[True, True, True], [True, False, False]]


def test_session_gap_is_strict_and_configurable():
    times = np.array([0, 1800, 3601])
    sessions, _ = divide_sessions(np.array([1, 2, 3]), times, np.array([0]), np.array([3]), 1800, 2, 3)
    assert sessions[0].tolist() == [[1, 2, 0], [3, 0, 0]]  # 1800 apart: same session; 1801: new
    sessions, _ = one_row(gap=4000, S=2, T=4)  # gaps 60, 3940, 100, 4900
    assert sessions[0].tolist() == [[11, 12, 13, 14], [15, 0, 0, 0]]


def test_sessions_rows_are_independent_spans():
    items = np.array([1, 2, 3, 4, 5])
    times = np.array([0, 60, 100, 200, 300])  # all close together across the user boundary at 2
    offsets = np.array([0, 2, 2, 0])  # user A, user B, B before its last behaviour, A with no history
    ends = np.array([2, 3, 2, 0])  # history ends inside each user's sequence
    sessions, mask = divide_sessions(items, times, offsets, ends, 1800, 2, 3)
    assert sessions.tolist() == [
        [[0, 0, 0], [1, 2, 0]],
        [[0, 0, 0], [3, 4, 5]],
        [[0, 0, 0], [3, 4, 0]],
        [[0, 0, 0], [0, 0, 0]],
    ]
    assert mask.sum((1, 2)).tolist() == [2, 3, 2, 0]


def test_sessions_match_a_naive_reference():
    rng = np.random.default_rng(5)
    lengths = rng.integers(0, 40, size=30)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(1, 100, size=offsets[-1])
    steps = rng.choice([5, 100, 1000, 1800, 1801, 5000], size=offsets[-1])
    times = np.cumsum(steps)
    ends = rng.integers(0, lengths + 1)
    sessions, mask = divide_sessions(items, times, offsets[:-1], ends, 1800, 3, 4)
    for b in range(30):
        ref, ref_mask = naive_sessions(items, times, offsets[b], offsets[b] + ends[b], 1800, 3, 4)
        np.testing.assert_array_equal(sessions[b], ref)
        np.testing.assert_array_equal(mask[b], ref_mask)
    assert mask.any() and (~mask.any((1, 2))).any()  # the draw has full and empty rows


def test_sessions_reject_a_history_outside_the_log():
    with pytest.raises(ValueError, match="row 1"):
        divide_sessions(TIMELINE_ITEMS, TIMELINE_TIMES, np.array([0, 3]), np.array([2, 3]))


# ---------------------------------------------------------------- DSIN


def test_bias_encoding_is_a_sum_of_three_vectors():
    torch.manual_seed(0)
    be = BiasEncoding(4, 3, 8)()
    assert be.shape == (4, 3, 8)
    assert not torch.allclose(be[1], be[0])  # varies with the session
    assert not torch.allclose(be[:, 1], be[:, 0])  # with the position in the session
    assert not torch.allclose(be[..., 1], be[..., 0])  # with the embedding unit
    # Additive: BE(k, t, c) - BE(0, t, c) depends on k only, and likewise for t and c.
    dk = be - be[:1]
    torch.testing.assert_close(dk, dk[:, :1, :1].expand_as(dk))
    dt = be - be[:, :1]
    torch.testing.assert_close(dt, dt[:1, :, :1].expand_as(dt))


def test_bias_encoding_is_added_and_learned():
    model = dsin()
    mask = torch.ones(3, 4, 3, dtype=torch.bool)
    batch = session_batch(mask)
    model.loss(batch).backward()
    for p in (model.bias.wk, model.bias.wt, model.bias.wc):
        assert p.grad is not None and p.grad.abs().sum() > 0


def dsin_mask() -> torch.Tensor:
    """(B=5, S=4, T=3): empty sessions in front, in the middle, behind, and a row with none."""
    m = torch.zeros(5, 4, 3, dtype=torch.bool)
    m[0, 2:, :2] = True  # two newest sessions
    m[1, 0, :3] = m[1, 2, :1] = m[1, 3, :2] = True  # empty slot in the middle
    m[2, :2, :1] = True  # empties at the back
    m[3, :, :] = True  # all full
    return m  # row 4: no sessions


@pytest.mark.parametrize("attention,pool", [("bilinear", "mean"), ("mlp", "mean"), ("bilinear", "target")])
def test_empty_sessions_get_zero_weight_and_never_matter(attention, pool):
    model = dsin(attention=attention, session_pool=pool)  # training mode: Dice's batch statistics included
    mask = dsin_mask()
    batch = session_batch(mask)
    z = model.attend(batch)
    present = mask.any(-1)
    for w in (z["a_I"], z["a_H"]):
        assert torch.equal(w[~present], torch.zeros_like(w[~present]))
        assert (w[present] > 0).all()
        torch.testing.assert_close(w.sum(1), present.any(1).float())
    score = model.score(batch)
    assert torch.isfinite(score).all()
    # Junk ids under every mask-False slot, empty sessions included: the same scores.
    junk = torch.randint(1, N_ITEMS + 1, mask.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        model.score(replace(batch, sessions=torch.where(mask, batch.sessions, junk))), score, rtol=0, atol=1e-6
    )
    # A real behaviour does matter.
    sessions = batch.sessions.clone()
    sessions[1, 2, 0] = sessions[1, 2, 0] % N_ITEMS + 1
    assert not torch.allclose(model.score(replace(batch, sessions=sessions))[1], score[1])


def test_bilstm_runs_over_the_present_sessions_in_order():
    model = dsin()
    torch.manual_seed(6)
    interests = torch.randn(3, 4, 8)
    present = torch.tensor([[False, True, False, True], [True, True, True, True], [False, False, False, False]])
    H = model.interact(interests, present)
    ref, _ = model.lstm(interests[0:1, [1, 3]])
    torch.testing.assert_close(H[0, [1, 3]], ref[0])
    torch.testing.assert_close(H[1], model.lstm(interests[1:2])[0][0])
    assert torch.equal(H[0, [0, 2]], torch.zeros(2, 16)) and torch.equal(H[2], torch.zeros(4, 16))


def test_session_interest_is_the_mean_over_real_behaviours():
    model = dsin()
    mask = dsin_mask()
    batch = session_batch(mask)
    q = model.items(batch.sessions) + model.bias()
    out = model.extractor(q, mask)
    interests = model.session_interests(batch.sessions, mask)
    torch.testing.assert_close(interests[0, 3], out[0, 3, :2].mean(0))
    assert torch.equal(interests[4], torch.zeros(4, 8))
    # Self-attention inside a session: a padded key never reaches a real behaviour.
    junk = torch.where(mask, batch.sessions, torch.full_like(batch.sessions, 5))
    torch.testing.assert_close(model.session_interests(junk, mask), interests, rtol=0, atol=1e-6)


def test_dsin_checks_heads_and_session_shape():
    with pytest.raises(ValueError, match="heads=3"):
        dsin(heads=3)
    with pytest.raises(ValueError, match="session_pool='max'"):
        dsin(session_pool="max")
    for shape in ((2, 3, 3), (2, 4, 4)):  # other S, or more than T positions
        with pytest.raises(ValueError, match=r"\(B, 4, 3\)"):
            dsin().score(session_batch(torch.ones(*shape, dtype=torch.bool)))


def test_dsin_accepts_fewer_positions_than_t_when_they_are_padding():
    """make_rank_batch drops trailing positions that are padding in every session: same scores."""
    model = dsin().eval()
    mask = dsin_mask()
    mask[:, :, 2] = False  # the third position is padding everywhere
    batch = session_batch(mask)
    cut = replace(batch, sessions=batch.sessions[:, :, :2], session_mask=mask[:, :, :2])
    torch.testing.assert_close(model.score(cut), model.score(batch), rtol=0, atol=1e-6)


def test_session_transformer_runs_on_real_behaviours_like_the_dense_layer():
    """The position-wise layers on real behaviours only: the dense post-norm layer's values there."""
    from retrieval.layers import masked_softmax

    model = dsin()
    ext = model.extractor
    mask = dsin_mask()
    x = torch.randn(*mask.shape, 8, generator=torch.Generator().manual_seed(2))
    out = ext(x, mask)
    B, S, T, D = x.shape
    q, k, v = ext.qkv(x).view(B, S, T, 3, 2, D // 2).permute(3, 0, 1, 4, 2, 5)
    w = masked_softmax(q @ k.transpose(-1, -2) / (D // 2) ** 0.5, mask[:, :, None, None, :], dim=-1)
    h = ext.norm1(x + ext.out((w @ v).permute(0, 1, 3, 2, 4).reshape(B, S, T, D)))
    dense = ext.norm2(h + ext.ffn(h))
    torch.testing.assert_close(out[mask], dense[mask])
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))


def test_target_pooling_reads_a_single_session_per_candidate():
    """With one session, the paper's mean makes the session interest blind to the candidate;
    session_pool="target" makes it depend on the candidate (DIN's activation unit)."""
    mask = torch.zeros(1, 4, 3, dtype=torch.bool)
    mask[0, 3] = True  # one session of three behaviours
    batch = session_batch(mask)
    for pool, depends in (("mean", False), ("target", True)):
        model = dsin(session_pool=pool).eval()
        a = model.attend(replace(batch, candidate=torch.tensor([1])))
        b = model.attend(replace(batch, candidate=torch.tensor([2])))
        assert torch.allclose(a["I"], b["I"]) is not depends
        assert torch.allclose(a["U_I"], b["U_I"]) is not depends
        assert torch.equal(a["I"][0, :3], torch.zeros(3, 8))  # empty slots stay 0


# ---------------------------------------------------------------- both: they learn


def overfit(model, batch: RankBatch, steps: int = 50) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = last = None
    for _ in range(steps):
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    return first, last


def test_dien_overfits_a_tiny_problem():
    batch = history_batch([6, 3, 5, 1, 2, 6, 4, 6] * 2, L=6, seed=1)
    first, last = overfit(dien(), batch)
    assert last < first / 2


def test_dsin_overfits_a_tiny_problem():
    mask = dsin_mask().repeat(3, 1, 1)
    first, last = overfit(dsin(), session_batch(mask, seed=1))
    assert last < first / 2
