"""Base (Embedding & MLP), DIN and DMIN rankers, Dice and the mini-batch-aware L2.

Tiny seeded problems; hand-computed values where the papers define one.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from retrieval.layers import ActivationUnit, Dice, activation
from retrieval.ranking.base import EmbeddingMLP
from retrieval.ranking.common import RankBatch, RankerConfig, feature_frequencies, mba_l2
from retrieval.ranking.dien import DIEN, DIENConfig
from retrieval.ranking.din import DIN, DINConfig
from retrieval.ranking.dmin import DMIN, DMINConfig, attention_mask, auxiliary_loss, multi_head_attention

N_ITEMS, N_CATS = 24, 4


def item_features() -> dict[str, torch.Tensor]:
    """Item i has category (i % 4) + 1; item 0 (padding) has none."""
    cat = (torch.arange(N_ITEMS + 1) % N_CATS + 1).unsqueeze(1)  # (N+1, 1)
    cat[0] = 0
    return {"cat": cat}


def small(cls, **kw):
    """A tiny config of `cls` (dim 8 -> D = 16 with the category)."""
    base = dict(n_items=N_ITEMS, item_feature_sizes={"cat": N_CATS + 1}, user_feature_sizes={"g": 3},
                dim=8, max_len=6, hidden=(32, 16))
    if cls is DINConfig:
        base["att_hidden"] = (16, 8)
    if cls is DMINConfig:
        base.update(att_hidden=(16, 8), refiner_heads=2, extractor_heads=4)
    base.update(kw)
    return cls(**base)


def problem(seed: int, B: int = 64, L: int = 6) -> RankBatch:
    """Label = 1 iff the candidate's category occurs among the real behaviours (separable)."""
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, N_ITEMS + 1, (B, L), generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L) left-aligned
    history = history.masked_fill(~mask, 0)
    candidate = torch.randint(1, N_ITEMS + 1, (B,), generator=g)
    cat = item_features()["cat"][:, 0]
    label = ((cat[history] == cat[candidate].unsqueeze(1)) & mask).any(1).float()
    return RankBatch(
        history=history, mask=mask, candidate=candidate,
        user_features={"g": torch.randint(1, 3, (B, 1), generator=g)}, label=label,
        neg_history=torch.randint(1, N_ITEMS + 1, (B, L), generator=g).masked_fill(~mask, 0),
    )


def with_padding_ids(batch: RankBatch, seed: int) -> RankBatch:
    """The same batch with random non-zero item ids (and negatives) in the padded slots."""
    g = torch.Generator().manual_seed(seed)
    junk = torch.randint(1, N_ITEMS + 1, batch.history.shape, generator=g)
    return replace(
        batch,
        history=torch.where(batch.mask, batch.history, junk),
        neg_history=torch.where(batch.mask, batch.neg_history, junk.flip(1)),
    )


# ---------------------------------------------------------------- Dice, activations


def test_dice_train_mode_uses_the_batch_mean_and_variance():
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.1, -0.2, 0.5]))
    s = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1  # (B, L, dim)
    flat = s.reshape(-1, 3)  # statistics over all B * L rows
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    p = torch.sigmoid((s - mean) / torch.sqrt(var + 1e-8))
    expected = p * s + (1 - p) * dice.alpha * s
    dice.train()
    torch.testing.assert_close(dice(s), expected)
    # the running averages move by momentum 0.01 (variance unbiased, as batch norm keeps it)
    torch.testing.assert_close(dice.bn.running_mean, 0.01 * mean)
    torch.testing.assert_close(dice.bn.running_var, 0.99 + 0.01 * flat.var(0, unbiased=True))


def test_dice_eval_mode_uses_the_running_statistics():
    dice = Dice(2)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.25, -1.0]))
        dice.bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        dice.bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    dice.eval()
    s = torch.tensor([[3.0, -2.0], [-1.0, -1.5]])
    # row 0: p = sigmoid((3-1)/2) = sigmoid(1), sigmoid((-2+2)/0.5) = 0.5
    p0 = torch.tensor([1 / (1 + math.exp(-1)), 0.5])
    # row 1: p = sigmoid((-1-1)/2) = sigmoid(-1), sigmoid((-1.5+2)/0.5) = sigmoid(1)
    p1 = torch.tensor([1 / (1 + math.exp(1)), 1 / (1 + math.exp(-1))])
    p = torch.stack([p0, p1])
    alpha = torch.tensor([0.25, -1.0])
    expected = p * s + (1 - p) * alpha * s
    torch.testing.assert_close(dice(s), expected, atol=1e-6, rtol=1e-6)
    # eval output of a row does not depend on the other rows
    torch.testing.assert_close(dice(s[:1]), expected[:1], atol=1e-6, rtol=1e-6)


def test_prelu_is_selectable_instead_of_dice():
    assert isinstance(activation("prelu", 4), nn.PReLU)
    assert isinstance(activation("dice", 4), Dice)
    with pytest.raises(ValueError, match="swish"):
        activation("swish", 4)
    dice_model = DIN(small(DINConfig), item_features())
    assert sum(isinstance(m, Dice) for m in dice_model.mlp.modules()) == 2
    assert sum(isinstance(m, Dice) for m in dice_model.attention.modules()) == 2
    prelu_model = DIN(small(DINConfig, act="prelu", att_act="prelu"), item_features())
    assert not any(isinstance(m, Dice) for m in prelu_model.modules())
    assert sum(isinstance(m, nn.PReLU) for m in prelu_model.modules()) == 4
    assert prelu_model.score(problem(0, B=8)).shape == (8,)
    # scoring (eval mode) too: PReLU's channels are the last dimension, whatever the history length
    batch = problem(0, B=8)
    train_scores = prelu_model.score(batch)
    assert torch.allclose(prelu_model.eval().score(batch), train_scores, atol=1e-5)  # no batch statistics in PReLU


# ---------------------------------------------------------------- mini-batch-aware L2


def test_mba_l2_penalises_rows_in_the_batch_over_their_frequency():
    weight = torch.tensor([[5.0, 5.0], [1.0, 2.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]], requires_grad=True)
    counts = torch.tensor([7.0, 2.0, 9.0, 4.0, 1.0])
    ids = torch.tensor([[0, 1, 1], [3, 0, 1]])  # rows 1 (twice, counted once) and 3; 0 is padding
    value = mba_l2(weight, ids, counts)
    assert value.item() == pytest.approx((1 + 4) / 2 + 4 / 4)
    value.backward()
    grad = weight.grad
    assert torch.equal(grad[[0, 2, 4]], torch.zeros(3, 2))  # padding and absent rows: no gradient
    torch.testing.assert_close(grad[1], 2 * weight[1].detach() / 2)
    torch.testing.assert_close(grad[3], 2 * weight[3].detach() / 4)


def test_feature_frequencies_count_each_value_by_its_items_frequency():
    item_counts = torch.tensor([5.0, 3.0, 1.0, 2.0])  # item 0 is padding
    table = torch.tensor([[0, 0], [1, 2], [2, 0], [1, 1]])  # item 3 has value 1 twice
    n = feature_frequencies(item_counts, {"f": table}, {"f": 4})["f"]
    assert n.tolist() == [0.0, 3.0 + 2 * 2.0, 3.0 + 1.0, 0.0]


def test_model_l2_uses_the_frequencies_and_skips_padding():
    model = DIN(small(DINConfig, l2=0.5, user_feature_sizes={}), item_features())
    item_counts = torch.arange(N_ITEMS + 1, dtype=torch.float)  # item i seen i times
    model.set_frequencies(item_counts)
    # items 2 (cat 3) and 7 (cat 4); slot 2 holds item 9 but is padding; candidate 6 (cat 3)
    batch = RankBatch(
        history=torch.tensor([[2, 7, 9]]), mask=torch.tensor([[True, True, False]]),
        candidate=torch.tensor([6]), user_features={}, label=torch.tensor([1.0]),
    )
    cat_counts = feature_frequencies(item_counts, item_features(), {"cat": N_CATS + 1})["cat"]
    W, C = model.items.id.weight, model.items.fields["cat"].emb.weight
    expected = sum(W[i].pow(2).sum() / i for i in (2, 6, 7))
    expected = expected + C[3].pow(2).sum() / cat_counts[3] + C[4].pow(2).sum() / cat_counts[4]
    model.eval()  # one row: Dice must use running statistics
    out = model.losses(batch)
    torch.testing.assert_close(out["l2"], expected)
    torch.testing.assert_close(out["total"], out["bce"] + 0.5 * out["l2"])
    out["l2"].backward()
    assert torch.equal(W.grad[9], torch.zeros(8)) and torch.equal(W.grad[0], torch.zeros(8))
    assert W.grad[2].abs().sum() > 0 and W.grad[6].abs().sum() > 0
    with pytest.raises(ValueError, match="item_counts"):
        model.set_frequencies(torch.ones(3))


# ---------------------------------------------------------------- DIN


def test_din_padding_weighs_zero_and_padded_ids_change_nothing():
    model = DIN(small(DINConfig), item_features())
    batch = problem(1, B=16)
    assert not batch.mask.all()
    noisy = with_padding_ids(batch, seed=2)
    assert not torch.equal(noisy.history, batch.history)
    for train in (True, False):  # train: Dice's batch statistics must not see padding either
        model.train(train)
        _, w, _ = model.interest(noisy)
        assert w.shape == (16, 6)
        assert torch.equal(w[~batch.mask], torch.zeros(int((~batch.mask).sum())))
        assert (w[batch.mask] != 0).all()
        torch.testing.assert_close(model.score(noisy), model.score(batch), rtol=0, atol=0)
        assert model.score(batch).shape == (16,)


def test_din_weights_are_not_softmax_normalised():
    model = DIN(small(DINConfig), item_features()).eval()
    once = RankBatch(history=torch.tensor([[5, 0, 0], [5, 9, 0]]), mask=torch.tensor([[1, 0, 0], [1, 1, 0]]).bool(),
                     candidate=torch.tensor([3, 3]), user_features={"g": torch.tensor([[1], [1]])})
    twice = replace(once, history=torch.tensor([[5, 5, 0], [5, 9, 0]]),
                    mask=torch.tensor([[1, 1, 0], [1, 1, 0]]).bool())
    p1, w1, _ = model.interest(once)
    p2, w2, _ = model.interest(twice)
    assert w1[0, 0] != 1.0  # a lone behaviour keeps its own intensity, not a softmax 1
    assert not torch.allclose(w2.sum(1), torch.ones(2))
    torch.testing.assert_close(w2[0, 1], w2[0, 0])  # the same behaviour, the same weight
    torch.testing.assert_close(p2[0], 2 * p1[0])  # clicking it twice doubles the interest


def concatenated_input_weights(unit: ActivationUnit, keys, query, mask):
    """The weights (B, L) by the paper's formula: the unit's MLP over [k, q, k-q, k⊙q] of the real slots."""
    q = query.unsqueeze(1).expand_as(keys) if query.dim() == 2 else query  # (B, L, D)
    x = torch.cat([keys, q, keys - q, keys * q], dim=-1)[mask]  # (n_real, 4D)
    return keys.new_zeros(mask.shape).masked_scatter(mask, unit.mlp(x).squeeze(-1))


@pytest.mark.parametrize("act", ["dice", "sigmoid"])
@pytest.mark.parametrize("per_behaviour_query", [False, True])
def test_activation_unit_equals_the_mlp_over_the_concatenated_input(act, per_behaviour_query):
    """The split first layer is the paper's W [k, q, k-q, k⊙q] + b, in train and eval mode."""
    torch.manual_seed(0)
    unit = ActivationUnit(8, (12, 6), act)
    keys = torch.randn(5, 7, 8)
    query = torch.randn(5, 7, 8) if per_behaviour_query else torch.randn(5, 8)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    for train in (True, False):
        unit.train(train)
        _, w = unit(keys, query, mask)
        torch.testing.assert_close(w, concatenated_input_weights(unit, keys, query, mask), rtol=1e-5, atol=1e-6)
        assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))


# ---------------------------------------------------------------- DMIN


def test_auxiliary_loss_by_hand():
    states = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]],
                           [[1.0, 1.0], [1.0, -1.0], [0.0, 0.0]]])  # (B=2, L=3, D=2)
    clicked = torch.tensor([[[7.0, 7.0], [2.0, 0.0], [5.0, 5.0]],
                            [[3.0, 3.0], [0.5, 0.5], [1.0, 0.0]]])
    sampled = torch.tensor([[[7.0, 7.0], [0.0, 1.0], [5.0, 5.0]],
                            [[3.0, 3.0], [-1.0, 0.0], [0.0, -1.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    sp = torch.nn.functional.softplus  # -log σ(x) = softplus(-x); -log(1 - σ(x)) = softplus(x)
    # row 0: only t = 0 is valid (t = 1 is followed by padding): z_0 · e_1 = 2, z_0 · ê_1 = 0
    # row 1: t = 0: z·e = 1, z·ê = -1; t = 1: z·e = 1, z·ê = 1
    terms = [sp(torch.tensor(-2.0)) + sp(torch.tensor(0.0)),
             sp(torch.tensor(-1.0)) + sp(torch.tensor(-1.0)),
             sp(torch.tensor(-1.0)) + sp(torch.tensor(1.0))]
    value = auxiliary_loss(states, clicked, sampled, mask)
    assert value.shape == ()
    torch.testing.assert_close(value, sum(terms) / 3)
    # the behaviour at padded position 2 of row 0 is never read
    states2, clicked2 = states.clone(), clicked.clone()
    states2[0, 2], clicked2[0, 2] = 100.0, -100.0
    torch.testing.assert_close(auxiliary_loss(states2, clicked2, sampled, mask), value)


def test_auxiliary_loss_without_valid_pairs_is_zero_not_nan():
    states = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    value = auxiliary_loss(states, torch.randn(2, 3, 4), torch.randn(2, 3, 4), mask)
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(states.grad).all()
    single = torch.ones(1, 1, dtype=torch.bool)  # L = 1: no next behaviour at all
    assert auxiliary_loss(torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.randn(1, 1, 4), single).item() == 0.0


def test_dmin_losses_ignore_padded_ids():
    model = DMIN(small(DMINConfig, l2=0.1), item_features())
    batch = problem(5, B=16)
    noisy = with_padding_ids(batch, seed=6)
    for train in (True, False):
        model.train(train)
        clean, dirty = model.losses(batch), model.losses(noisy)
        assert set(clean) == {"total", "bce", "aux", "l2"} and all(v.shape == () for v in clean.values())
        assert clean["aux"] > 0
        for k in clean:
            torch.testing.assert_close(dirty[k], clean[k], rtol=0, atol=0)
        torch.testing.assert_close(clean["total"], clean["bce"] + clean["aux"] + 0.1 * clean["l2"])
    # real negatives do matter
    moved = replace(batch, neg_history=torch.where(batch.mask, batch.neg_history % N_ITEMS + 1, 0))
    assert model.losses(moved)["aux"] != model.losses(batch)["aux"]


def test_dmin_training_loss_and_gradients_ignore_padded_slots():
    """The refiner, the heads and the sigmoid unit run on every slot in training and zero the
    padding after: padded columns added to the batch change neither the loss nor any gradient."""
    model = DMIN(small(DMINConfig, max_len=9), item_features()).train()
    batch = problem(9, B=12)
    wide = replace(with_padding_ids(batch, seed=3),  # 3 more columns, all padding, with junk ids
                   history=torch.cat([batch.history, torch.randint(1, N_ITEMS + 1, (12, 3))], 1),
                   mask=torch.cat([batch.mask, torch.zeros(12, 3, dtype=torch.bool)], 1),
                   neg_history=torch.cat([batch.neg_history, torch.randint(1, N_ITEMS + 1, (12, 3))], 1))
    grads = []
    for b in (batch, wide):
        model.zero_grad()
        loss = model.loss(b)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() if p.grad is not None else None for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-7)
    for name, (a, b) in zip([n for n, _ in model.named_parameters()], zip(grads[0][1], grads[1][1])):
        if name == "extractor.position.weight":  # the padded columns' position rows get no gradient
            torch.testing.assert_close(b[:6], a[:6], rtol=1e-5, atol=1e-6)
            assert torch.equal(b[6:], torch.zeros_like(b[6:]))
            continue
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    z_wide, z = model.refine(wide), model.refine(batch)  # (B, 9, D), (B, 6, D)
    assert torch.equal(z_wide[~wide.mask], torch.zeros(int((~wide.mask).sum()), 16))  # zero on padding
    torch.testing.assert_close(z_wide[:, :6], z, rtol=1e-5, atol=1e-6)
    ex = model.extractor
    h = multi_head_attention(z_wide, ex.qkv, ex.n_heads, attention_mask(wide.mask))  # (B, H_E, 9, D/H_E)
    for k, head in enumerate(ex.heads):
        i = head.encode(h[:, k], z_wide, wide.mask)  # (B, 9, D)
        assert torch.equal(i[~wide.mask], torch.zeros(int((~wide.mask).sum()), 16))


def test_dmin_all_padding_and_single_behaviour_rows_stay_finite():
    model = DMIN(small(DMINConfig), item_features())
    batch = problem(7, B=6)
    mask = batch.mask.clone()
    mask[0] = False  # no behaviour at all
    mask[1] = False
    mask[1, 0] = True  # one behaviour
    batch = replace(batch, mask=mask, history=batch.history.masked_fill(~mask, 0))
    out = model.losses(batch)
    assert all(torch.isfinite(v) for v in out.values())
    out["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    interests, weights = model.interests(batch)
    assert interests.shape == (6, 4, 16) and weights.shape == (6, 4, 6)
    assert torch.equal(interests[0], torch.zeros(4, 16)) and torch.equal(weights[0], torch.zeros(4, 6))
    torch.testing.assert_close(weights[1, :, 0], torch.ones(4))  # softmax over one behaviour
    real = batch.mask.sum(1) > 0
    torch.testing.assert_close(weights[real].sum(-1), torch.ones(int(real.sum()), 4))  # reference: softmax
    assert torch.equal(weights[~batch.mask.unsqueeze(1).expand_as(weights)], torch.zeros(int((~batch.mask).sum()) * 4))


def test_dmin_raw_weights_option_keeps_din_intensities():
    model = DMIN(small(DMINConfig, att_norm="none"), item_features()).eval()
    batch = problem(8, B=8)
    _, weights = model.interests(batch)
    assert torch.equal(weights[~batch.mask.unsqueeze(1).expand_as(weights)], torch.zeros(int((~batch.mask).sum()) * 4))
    assert not torch.allclose(weights.sum(-1), torch.ones(8, 4))


def test_dmin_refiner_is_causal():
    model = DMIN(small(DMINConfig), item_features()).eval()
    batch = problem(9, B=8)
    full = replace(batch, mask=torch.ones_like(batch.mask), history=torch.randint(1, N_ITEMS + 1, (8, 6)))
    changed = replace(full, history=full.history.clone())
    changed.history[:, 3] = changed.history[:, 3] % N_ITEMS + 1
    z, z2 = model.refine(full), model.refine(changed)
    assert z.shape == (8, 6, 16)
    torch.testing.assert_close(z2[:, :3], z[:, :3], rtol=0, atol=0)  # the past never sees the future
    assert not torch.allclose(z2[:, 3], z[:, 3])
    # query i sees real keys j <= i, and itself (a padded query too, so no row is empty)
    assert attention_mask(torch.tensor([[True, False, True, False]])).tolist() == [
        [[True, False, False, False], [True, True, False, False],
         [True, False, True, False], [True, False, True, True]]]


def test_dmin_needs_heads_that_divide_d_and_negatives_for_aux():
    with pytest.raises(ValueError, match="extractor_heads=3"):
        DMIN(small(DMINConfig, extractor_heads=3), item_features())
    batch = replace(problem(10, B=8), neg_history=None)
    with pytest.raises(ValueError, match="neg_history"):
        DMIN(small(DMINConfig), item_features()).loss(batch)
    out = DMIN(small(DMINConfig, aux_weight=0.0), item_features()).losses(batch)
    assert out["aux"].item() == 0.0 and torch.equal(out["total"], out["bce"])
    with pytest.raises(ValueError, match="label"):
        DIN(small(DINConfig), item_features()).loss(replace(batch, label=None))


# ---------------------------------------------------------------- every model


def shared_scoring_batch() -> RankBatch:
    """3 histories, 12 candidates scored against them (RankBatch.rows): a user's candidates."""
    hist = problem(21, B=3)
    rows = torch.tensor([2, 0, 1, 1, 0, 2, 2, 2, 0, 1, 0, 2])
    candidate = torch.randint(1, N_ITEMS + 1, (12,), generator=torch.Generator().manual_seed(5))
    return replace(hist, candidate=candidate, rows=rows, label=None, neg_history=None)


MODELS = [(EmbeddingMLP, RankerConfig), (DIN, DINConfig), (DMIN, DMINConfig), (DIEN, DIENConfig)]


@pytest.mark.parametrize("model_cls, config_cls", MODELS)
def test_model_ignores_padded_ids_and_scores_rows_alone_in_eval(model_cls, config_cls):
    torch.manual_seed(0)
    model = model_cls(small(config_cls), item_features())
    batch = problem(12, B=8)
    model.train()
    torch.testing.assert_close(model.score(with_padding_ids(batch, 13)), model.score(batch), rtol=0, atol=0)
    model.loss(problem(3))  # move Dice's running statistics away from their start
    model.eval()
    full = model.score(batch)
    assert full.shape == (8,)
    torch.testing.assert_close(model.score(with_padding_ids(batch, 14)), full, rtol=0, atol=0)
    torch.testing.assert_close(model.score(batch), full, rtol=0, atol=0)  # deterministic
    alone = model.score(replace(batch, history=batch.history[2:3], mask=batch.mask[2:3],
                                candidate=batch.candidate[2:3], user_features={"g": batch.user_features["g"][2:3]}))
    torch.testing.assert_close(alone, full[2:3])  # eval: no batch statistics


@pytest.mark.parametrize("model_cls, config_cls", MODELS)
def test_model_overfits_a_tiny_separable_problem(model_cls, config_cls):
    torch.manual_seed(0)
    model = model_cls(small(config_cls), item_features())
    batch = problem(11, B=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.losses(batch)
    for _ in range(50):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = model.losses(batch)  # still in train mode: Dice on batch statistics
    assert last["total"] < 0.5 * first["total"], (first, last)
    assert last["bce"] < 0.5 * first["bce"], (first, last)


@pytest.mark.parametrize("model_cls, config_cls", MODELS)
def test_candidates_of_shared_histories_score_as_their_own_rows(model_cls, config_cls):
    """RankBatch.rows: 3 histories, 12 candidates scored against them (DIN's and the base's
    shared-history path, or per_row() for DMIN) give each candidate the score of its own row."""
    torch.manual_seed(0)
    model = model_cls(small(config_cls), item_features())
    model.loss(problem(3))  # move Dice's running statistics away from their start
    model.eval()
    shared = shared_scoring_batch()
    rows = shared.rows
    own = shared.per_row()
    assert own.rows is None and own.history.shape == (12, 6)
    assert torch.equal(own.history, shared.history[rows]) and torch.equal(own.user_features["g"], shared.user_features["g"][rows])
    torch.testing.assert_close(model.score(shared), model.score(own), rtol=1e-5, atol=1e-6)
    if model_cls is DIN:  # the weights too
        _, w_shared, _ = model.interest(shared)
        _, w_own, _ = model.interest(own)
        torch.testing.assert_close(w_shared, w_own, rtol=1e-5, atol=1e-6)
        assert torch.equal(w_shared == 0, ~own.mask)
    with pytest.raises(RuntimeError, match="scoring path"):
        ActivationUnit(4).train().pool_shared(torch.zeros(1, 2, 4), torch.zeros(3, 4), torch.ones(1, 2, dtype=torch.bool),
                                              torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("model_cls, config_cls", MODELS)
def test_scoring_reads_the_item_table_and_rebuilds_it_after_an_update(model_cls, config_cls, monkeypatch):
    """Scoring (eval, no autograd) gathers item rows from a cached table: the same scores as
    encoding every item again, a new table after any in-place update of the weights (an
    optimiser step), none in training or above the size budget."""
    torch.manual_seed(0)
    model = model_cls(small(config_cls), item_features())
    assert model.items.table() is None  # training mode
    model.loss(problem(3))  # move Dice's running statistics away from their start
    model.eval()
    batch = shared_scoring_batch()
    assert model.items.table() is None  # autograd on: nothing cached
    encoded = model.score(batch)  # every item encoded again
    with torch.no_grad():
        table = model.items.table()
        assert table is not None and table.shape == (N_ITEMS + 1, model.items.out_dim)
        assert torch.equal(table, model.items._encode(torch.arange(N_ITEMS + 1)))
        assert model.items.table() is table  # built once
        torch.testing.assert_close(model.score(batch), encoded, rtol=0, atol=0)
        model.items.fields["cat"].emb.weight.mul_(3)  # an in-place update, as an optimiser step makes
        assert model.items.table() is not table
        updated = model.score(batch)
    assert not torch.allclose(updated, encoded)
    torch.testing.assert_close(updated, model.score(batch), rtol=0, atol=0)  # = encoding afresh
    monkeypatch.setattr("retrieval.ranking.common.TABLE_CACHE_BYTES", 0)
    with torch.no_grad():
        assert model.items.table() is None
        torch.testing.assert_close(model.score(batch), updated, rtol=0, atol=0)


@pytest.mark.parametrize("elements", [1, 16 * 6 * 5, ActivationUnit.CHUNK_ELEMENTS])
def test_din_scores_a_historys_candidates_in_passes_of_any_size(elements, monkeypatch):
    """pool_shared scores a history's candidates in passes (CHUNK_ELEMENTS): one candidate per
    pass, 5 per pass, or all at once give the same scores and weights as each candidate's own row."""
    torch.manual_seed(0)
    model = DIN(small(DINConfig), item_features())
    model.loss(problem(3))
    model.eval()
    batch = shared_scoring_batch()
    with torch.no_grad():
        _, w_own, _ = model.interest(batch.per_row())
        own = model.score(batch.per_row())
        monkeypatch.setattr(ActivationUnit, "CHUNK_ELEMENTS", elements)
        _, w, _ = model.interest(batch)
        torch.testing.assert_close(model.score(batch), own, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, w_own, rtol=1e-5, atol=1e-6)
    assert torch.equal(w == 0, ~batch.per_row().mask)


@pytest.mark.parametrize("model_cls, config_cls", MODELS)
def test_training_loss_of_shared_histories_is_the_loss_of_their_own_rows(model_cls, config_cls):
    """A training step's groups (a positive and its negatives share one history, RankBatch.rows,
    every group the same size) give the loss, auxiliary loss included, and the gradients of the
    same rows with a history each (DMIN refines each distinct history once)."""
    hist = problem(31, B=3)
    rows = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])  # 3 groups of 4
    candidate = torch.randint(1, N_ITEMS + 1, (12,), generator=torch.Generator().manual_seed(6))
    label = (torch.arange(12) < 3).float()
    shared = replace(hist, candidate=candidate, rows=rows, label=label)
    own = shared.per_row()
    assert torch.equal(own.neg_history, hist.neg_history[rows])
    config = small(config_cls)
    if hasattr(config, "aux_weight"):
        config = replace(config, aux_weight=1.0)
    torch.manual_seed(0)
    model = model_cls(config, item_features()).train()
    got, want = model.losses(shared), model.losses(own)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    if "aux" in want:
        assert want["aux"] > 0
    grads = torch.autograd.grad(got["total"], list(model.parameters()), allow_unused=True)
    ref = torch.autograd.grad(model.losses(own)["total"], list(model.parameters()), allow_unused=True)
    for g, r in zip(grads, ref):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
