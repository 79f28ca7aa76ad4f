"""MIND: routing, dynamic interest count, label-aware attention, sampled softmax, determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

from retrieval.layers import (
    best_interest_softmax_loss,
    label_aware_attention,
    peak_penalty,
    sampled_softmax_loss,
    squash,
)
from retrieval.mind import (
    MIND,
    Batch,
    MINDConfig,
    b2i_routing,
    interest_count,
    log_expected_counts,
)

B, L, K, D = 5, 12, 4, 8


def _routing_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(B, L, D, generator=g)
    lengths = torch.tensor([12, 7, 3, 1, 9])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    low = low * mask.unsqueeze(-1)
    S = torch.randn(D, D, generator=g) / math.sqrt(D)
    active = torch.arange(K)[None, :] < interest_count(lengths, K)[:, None]
    init = torch.randn(B, K, L, generator=g)
    return low, mask, S, active, init


def test_routing_shapes_and_inactive_capsules_are_zero():
    low, mask, S, active, init = _routing_inputs()
    caps, mass, w = b2i_routing(low, mask, S, active, init, iters=3)
    assert caps.shape == (B, K, D) and mass.shape == (B, K) and w.shape == (B, K, L)
    assert torch.all(caps[~active] == 0)
    assert torch.all(caps[active].norm(dim=-1) > 0)
    assert torch.allclose(mass.sum(1), torch.ones(B))
    assert torch.all(mass[~active] == 0)
    # coupling: each real behaviour's weights sum to 1 over the active interests, padding and
    # inactive interests weigh nothing, and the mass is the mean coupling over real behaviours
    assert torch.allclose(w.sum(1)[mask], torch.ones(int(mask.sum())))
    assert torch.all(w.sum(1)[~mask] == 0) and torch.all(w[~active] == 0)
    assert torch.allclose(mass, w.sum(2) / mask.sum(1, keepdim=True), atol=1e-6)
    assert not w.requires_grad


def test_interest_count_is_log2_of_history_clamped():
    n = torch.tensor([1, 2, 3, 4, 7, 8, 15, 16, 50, 1000])
    assert interest_count(n, 4).tolist() == [1, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert interest_count(n, 2).tolist() == [1, 1, 1, 2, 2, 2, 2, 2, 2, 2]


def test_appending_padding_changes_nothing():
    low, mask, S, active, init = _routing_inputs()
    caps, mass, w = b2i_routing(low, mask, S, active, init, iters=3)
    pad = 5
    g = torch.Generator().manual_seed(1)
    low2 = torch.cat([low, torch.randn(B, pad, D, generator=g)], 1)  # garbage in padded slots
    mask2 = torch.cat([mask, torch.zeros(B, pad, dtype=torch.bool)], 1)
    init2 = torch.cat([init, torch.randn(B, K, pad, generator=g)], 2)
    caps2, mass2, w2 = b2i_routing(low2, mask2, S, active, init2, iters=3)
    assert torch.allclose(caps, caps2, atol=1e-6)
    assert torch.allclose(mass, mass2, atol=1e-6)
    assert torch.allclose(w, w2[:, :, : w.shape[2]], atol=1e-6) and torch.all(w2[:, :, w.shape[2] :] == 0)


def test_squash_keeps_norms_below_one_and_direction():
    z = torch.randn(1000, D) * torch.logspace(-3, 1, 1000)[:, None]
    s = squash(z)
    norms = s.norm(dim=-1)
    assert torch.all(norms < 1)
    # float32 rounds 1 - 1/||z||^2 to 1 for huge norms: never above it
    assert torch.all(squash(torch.randn(100, D) * 1e6).norm(dim=-1) <= 1 + 1e-6)
    expected = z.norm(dim=-1) ** 2 / (1 + z.norm(dim=-1) ** 2)
    assert torch.allclose(norms, expected, rtol=1e-4, atol=1e-7)
    cos = F.cosine_similarity(s, z, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


def test_routing_logits_get_no_gradient_but_s_and_behaviours_do():
    low, mask, S, active, init = _routing_inputs()
    low.requires_grad_(True)
    S.requires_grad_(True)
    init.requires_grad_(True)
    caps, _, _ = b2i_routing(low, mask, S, active, init, iters=3)
    caps.sum().backward()
    assert init.grad is None
    assert S.grad is not None and S.grad.abs().sum() > 0
    assert low.grad is not None and low.grad[mask].abs().sum() > 0
    assert torch.all(low.grad[~mask] == 0)


def test_routing_iterations_are_used():
    low, mask, S, active, init = _routing_inputs()
    one, _, _ = b2i_routing(low, mask, S, active, init, iters=1)
    three, _, _ = b2i_routing(low, mask, S, active, init, iters=3)
    assert not torch.allclose(one, three)
    with pytest.raises(ValueError):
        b2i_routing(low, mask, S, active, init, iters=0)


def test_label_aware_attention_p0_is_the_mean_of_active_interests():
    g = torch.Generator().manual_seed(0)
    V = torch.randn(3, K, D, generator=g)
    active = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    t = torch.randn(3, D, generator=g)
    out = label_aware_attention(V, active, t, pow=0)
    for b in range(3):
        assert torch.allclose(out[b], V[b, active[b]].mean(0), atol=1e-6)


def test_label_aware_attention_large_p_and_hard_pick_the_best_active_interest():
    V = torch.zeros(2, K, D)
    V[:, 0, 0], V[:, 1, 1], V[:, 2, 2], V[:, 3, 3] = 2.0, 3.0, 1.5, 9.0
    active = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)  # interest 3 inactive in row 0
    t = torch.ones(2, D)
    hard = label_aware_attention(V, active, t, pow=1, hard=True)
    assert torch.equal(hard[0], V[0, 1]) and torch.equal(hard[1], V[1, 3])
    soft = label_aware_attention(V, active, t, pow=30)
    assert torch.allclose(soft, hard, atol=1e-4)
    mild = label_aware_attention(V, active, t, pow=1)
    assert not torch.allclose(mild, hard, atol=1e-2)


def test_sampled_softmax_equals_full_softmax_when_every_item_is_sampled():
    g = torch.Generator().manual_seed(0)
    N = 7
    items = torch.randn(N + 1, D, generator=g)
    user = torch.randn(4, D, generator=g)
    pos = torch.tensor([1, 3, 7, 3])
    neg = torch.arange(1, N + 1)  # every item, the positives included (masked as accidental hits)
    freq = torch.zeros(N + 1)
    _, log_q = log_expected_counts(freq, num_neg=N, alpha=0.0)  # uniform: a constant that cancels
    loss = sampled_softmax_loss(user, pos, items[pos], neg, items[neg], log_q)
    full = F.cross_entropy(user @ items[1:].T, pos - 1)
    assert torch.allclose(loss, full, atol=1e-5)


def test_sampled_softmax_masks_accidental_hits_and_applies_log_q():
    items = torch.eye(3)
    user = torch.tensor([[0.0, 1.0, 0.0]])  # <user, item 1> = 1, <user, item 2> = 0
    pos = torch.tensor([1])
    neg = torch.tensor([1, 2])  # item 1 is the positive: must not count as a negative
    log_q = torch.tensor([0.0, 0.0, math.log(2.0)])
    loss = sampled_softmax_loss(user, pos, items[pos], neg, items[neg], log_q)
    # logits: positive 1 - 0; negative item 2: 0 - log 2; item 1 masked
    expected = -torch.log(torch.tensor(math.e / (math.e + 0.5)))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_hard_negative_weighting_is_remi_importance_weights_and_beta_0_is_the_plain_loss():
    items = torch.eye(3)
    user = torch.tensor([[1.0, 2.0, 0.0]])  # logits: item 0 -> 1 (the positive), item 1 -> 2, item 2 -> 0
    pos, neg = torch.tensor([0]), torch.tensor([1, 2])
    log_q = torch.zeros(3)
    plain = sampled_softmax_loss(user, pos, items[pos], neg, items[neg], log_q)
    assert torch.equal(sampled_softmax_loss(user, pos, items[pos], neg, items[neg], log_q, beta=0.0), plain)
    e = math.e
    assert math.isclose(plain.item(), -1 + math.log(e + e**2 + 1), rel_tol=1e-6)
    # beta = 1: weights 2 softmax([2, 0]) on the negatives' exp(logits)
    w1, w2 = 2 * e**2 / (e**2 + 1), 2 / (e**2 + 1)
    hard = sampled_softmax_loss(user, pos, items[pos], neg, items[neg], log_q, beta=1.0)
    assert math.isclose(hard.item(), -1 + math.log(e + w1 * e**2 + w2), rel_tol=1e-6)
    assert hard > plain  # the hard negative (item 1) weighs more
    # an accidental hit stays out: the one real negative gets weight 1, as without beta
    neg_hit = torch.tensor([0, 2])
    assert torch.allclose(sampled_softmax_loss(user, pos, items[pos], neg_hit, items[neg_hit], log_q, beta=5.0),
                          sampled_softmax_loss(user, pos, items[pos], neg_hit, items[neg_hit], log_q))


def test_peak_penalty_is_zero_when_spread_and_counts_only_real_behaviours_of_active_interests():
    mask = torch.tensor([[True, True, True, False]])
    w = torch.tensor([[[0.2, 0.2, 0.2, 9.0],  # spread evenly over the 3 real behaviours (padding ignored)
                       [0.0, 0.7, 0.0, 0.0],  # all on one behaviour
                       [0.0, 0.0, 0.3, 0.0]]])  # peaked too, but inactive
    active = torch.tensor([[True, True, False]])
    # one-hot over n = 3: sum_l (a_l - 1/3)^2 = (2/3)^2 + 2 (1/3)^2 = 2/3, squared 4/9
    assert math.isclose(peak_penalty(w, mask, active).item(), 4 / 9, rel_tol=1e-6)
    assert peak_penalty(w[:, :1], mask, active[:, :1]).item() < 1e-12
    two = torch.cat([w, w])  # a batch mean, not a sum
    assert math.isclose(peak_penalty(two, mask.expand(2, -1), active.expand(2, -1)).item(), 4 / 9, rel_tol=1e-6)


def test_routing_grad_changes_no_value_but_lets_the_couplings_train():
    low, mask, S, active, init = _routing_inputs()
    S.requires_grad_(True)
    plain = b2i_routing(low, mask, S, active, init, iters=3)
    through = b2i_routing(low, mask, S, active, init, iters=3, grad=True)
    for a, b in zip(plain, through):
        assert torch.allclose(a, b, atol=1e-6)
    assert not plain[2].requires_grad and through[2].requires_grad
    peak_penalty(through[2], mask, active).backward()
    assert S.grad is not None and S.grad.abs().sum() > 0


def test_the_peak_penalty_does_nothing_to_paper_routing_and_acts_with_routing_grad():
    """MIND's couplings carry no gradient (the paper): REMI's penalty on them changes no
    gradient unless routing_grad lets it through."""
    b = _batch()
    q, log_q = log_expected_counts(torch.ones(21), 10, 0.0)
    neg = torch.multinomial(q, 10, replacement=True, generator=torch.Generator().manual_seed(0))

    def s_grad(**kw) -> torch.Tensor:
        m = _model(sparse=False, **kw)
        m.eval()  # the fixed routing draw: the same forward pass in every call
        m.loss(b, neg, log_q).backward()
        return m.S.grad

    assert torch.equal(s_grad(peak_penalty=10.0), s_grad())
    assert not torch.allclose(s_grad(routing_grad=True, peak_penalty=10.0), s_grad(routing_grad=True))


def test_best_interest_softmax_scores_every_candidate_by_its_best_interest():
    interests = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2): A along x, B along y
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # item 1 the target, item 2 a negative
    pos, neg, log_q = torch.tensor([1]), torch.tensor([2]), torch.zeros(3)
    both = torch.tensor([[True, True]])
    e = math.e
    # target: max(1, 0) = 1 (A); negative: max(0, 2) = 2 (B retrieves it, so it counts)
    loss = best_interest_softmax_loss(interests, both, pos, items[pos], neg, items[neg], log_q)
    assert math.isclose(loss.item(), -1 + math.log(e + e**2), rel_tol=1e-6)
    # hard label-aware attention scores the negative by A alone: 0
    hard_user = label_aware_attention(interests, both, items[pos], pow=1, hard=True)
    hard = sampled_softmax_loss(hard_user, pos, items[pos], neg, items[neg], log_q)
    assert math.isclose(hard.item(), -1 + math.log(e + 1), rel_tol=1e-6)
    # an inactive interest takes no part, and one interest is the plain sampled softmax
    only_a = torch.tensor([[True, False]])
    assert torch.allclose(best_interest_softmax_loss(interests, only_a, pos, items[pos], neg, items[neg], log_q), hard)
    assert torch.allclose(best_interest_softmax_loss(interests[:, :1], only_a[:, :1], pos, items[pos], neg, items[neg],
                                                     log_q), hard)


def test_log_expected_counts_never_samples_padding():
    q, log_q = log_expected_counts(torch.tensor([0, 5, 0, 1]), num_neg=10, alpha=0.75)
    assert q[0] == 0 and torch.isclose(q.sum(), torch.tensor(1.0))
    assert torch.allclose(log_q[1:], torch.log(q[1:] * 10))


def _model(**kw) -> MIND:
    torch.manual_seed(0)  # the head's Linear layers draw from the global generator: same model in any test order
    cfg = MINDConfig(n_items=20, item_feature_sizes={"cat": 5}, user_feature_sizes={"age": 4}, dim=D,
                     interests=K, max_len=L, hidden=16, **kw)
    feats = {"cat": torch.randint(1, 5, (21, 2), generator=torch.Generator().manual_seed(0))}
    feats["cat"][0] = 0
    return MIND(cfg, feats)


def _batch() -> Batch:
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([12, 5, 1])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    hist = torch.randint(1, 21, (3, L), generator=g) * mask
    return Batch(hist, mask, {"age": torch.tensor([[1], [2], [3]])}, torch.tensor([4, 5, 6]))


def test_model_user_vectors_shapes_masks_and_eval_determinism():
    m = _model()
    m.eval()
    b = _batch()
    it = m.user_vectors(b)
    V, A = it.vectors, it.active
    assert V.shape == (3, K, D) and A.shape == (3, K) and it.mass.shape == (3, K) and it.weights.shape == (3, K, L)
    assert A.sum(1).tolist() == [3, 2, 1]  # log2 12 -> 3, log2 5 -> 2, 1 -> 1
    assert torch.all(V[~A] == 0) and torch.all(it.weights[~b.mask.unsqueeze(1).expand(-1, K, -1)] == 0)
    assert torch.equal(V, m.user_vectors(b).vectors)  # fixed routing draw at inference
    # a user's vectors do not depend on who else is in the batch
    one = Batch(b.history[1:2], b.mask[1:2], {"age": b.user_features["age"][1:2]})
    assert torch.allclose(m.user_vectors(one).vectors[0], V[1], atol=1e-6)


def test_model_training_draws_fresh_routing_logits():
    m = _model()
    m.train()
    torch.manual_seed(0)
    a = m.user_vectors(_batch()).vectors
    b = m.user_vectors(_batch()).vectors
    assert not torch.allclose(a, b)


def test_model_has_no_routing_logit_parameter_and_trains():
    m = _model(sparse=False)
    names = [n for n, _ in m.named_parameters()]
    assert "routing_init" not in names and all("logit" not in n for n in names)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    b = _batch()
    freq = torch.ones(21)
    q, log_q = log_expected_counts(freq, 10, 0.0)
    neg = torch.multinomial(q, 10, replacement=True, generator=torch.Generator().manual_seed(0))
    m.eval()  # fixed routing draw, so the two measurements are comparable
    first = m.loss(b, neg, log_q).item()
    m.train()
    for _ in range(60):
        opt.zero_grad()
        m.loss(b, neg, log_q).backward()
        opt.step()
    m.eval()
    assert m.loss(b, neg, log_q).item() < first * 0.5


def test_item_vectors_are_the_training_representation():
    m = _model()
    ids = torch.arange(1, 21)
    assert torch.allclose(m.item_vectors(), m.item_embed(ids))
    assert torch.all(m.item_embed(torch.tensor([0])) == 0)


def test_item_embed_of_a_large_call_equals_the_per_slot_embedding_and_its_gradients():
    """Above UNIQUE_FROM ids each distinct item is encoded once: same values, same gradients."""
    from retrieval import interests as mind_module

    ids = torch.randint(0, 21, (64, 40), generator=torch.Generator().manual_seed(1))  # 2560 ids, padding included
    assert ids.numel() >= mind_module.UNIQUE_FROM
    results = []
    for unique_from in (mind_module.UNIQUE_FROM, 10**9):  # the distinct-ids path, then the per-slot path
        model = _model(sparse=False)
        mind_module.UNIQUE_FROM, saved = unique_from, mind_module.UNIQUE_FROM
        try:
            e = model.item_embed(ids)
        finally:
            mind_module.UNIQUE_FROM = saved
        (e * torch.arange(e.numel()).reshape(e.shape).sin()).sum().backward()
        results.append((e.detach(), model.item_id.weight.grad.clone(), model.item_fields["cat"].emb.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(results[0][0][ids == 0], torch.zeros(int((ids == 0).sum()), D))


def test_head_relu_keeps_interests_non_negative_and_off_lets_them_be_signed():
    b = _batch()
    with_relu = _model().eval().user_vectors(b).vectors
    signed = _model(head_relu=False).eval().user_vectors(b).vectors
    assert torch.all(with_relu >= 0) and (signed < 0).any()


def test_dropout_acts_in_training_only():
    b = _batch()
    plain, dropped = _model(), _model(dropout=0.5)
    assert torch.equal(plain.eval().user_vectors(b).vectors, dropped.eval().user_vectors(b).vectors)
    plain.train(), dropped.train()
    torch.manual_seed(1)
    a = plain.user_vectors(b).vectors
    torch.manual_seed(1)
    assert not torch.allclose(a, dropped.user_vectors(b).vectors)


def test_recency_positions_enter_the_routing_and_keep_padding_inert():
    b = _batch()
    plain, timed = _model().eval(), _model(positions=True).eval()
    assert plain.position is None and timed.position.shape == (L, D)
    it = timed.user_vectors(b)
    assert not torch.allclose(it.vectors, plain.user_vectors(b).vectors)
    garbage = b.history.masked_fill(~b.mask, 7)  # padded slots hold a real item, still masked
    assert torch.allclose(timed.user_vectors(Batch(garbage, b.mask, b.user_features)).vectors, it.vectors, atol=1e-6)
    # a user's vectors do not depend on the batch's longest history (recency counts back from the last behaviour)
    one = Batch(b.history[1:2, :6], b.mask[1:2, :6], {"age": b.user_features["age"][1:2]})
    assert torch.allclose(timed.user_vectors(one).vectors[0], it.vectors[1], atol=1e-6)
