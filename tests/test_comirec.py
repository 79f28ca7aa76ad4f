"""ComiRec-SA: attention shapes and masks, recency positions, padding invariance, training, the registry."""

import torch

from retrieval.comirec import ComiRecConfig, ComiRecSA
from retrieval.interests import recency
from retrieval.interests import Batch
from retrieval.mind import MINDConfig, log_expected_counts
from retrieval.retrievers import build_retriever, retriever_name

B, L, K, D = 3, 12, 4, 8


def _model(**kw) -> ComiRecSA:
    torch.manual_seed(0)
    cfg = ComiRecConfig(n_items=20, item_feature_sizes={"cat": 5}, user_feature_sizes={"age": 4}, dim=D,
                        interests=K, max_len=L, hidden=16, **kw)
    feats = {"cat": torch.randint(1, 5, (21, 2), generator=torch.Generator().manual_seed(0))}
    feats["cat"][0] = 0
    return ComiRecSA(cfg, feats)


def _batch(lengths=(12, 5, 1)) -> Batch:
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor(lengths)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    hist = torch.randint(1, 21, (len(lengths), L), generator=g) * mask
    return Batch(hist, mask, {"age": torch.tensor([[1], [2], [3]])[: len(lengths)]}, torch.tensor([4, 5, 6])[: len(lengths)])


def test_recency_counts_back_from_the_last_real_behaviour():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert recency(mask).tolist() == [[2, 1, 0, 0], [0, 0, 0, 0], [3, 2, 1, 0]]


def test_attention_rows_are_distributions_over_real_behaviours_of_active_interests():
    m = _model()
    m.eval()
    b = _batch()
    it = m.user_vectors(b)
    assert it.vectors.shape == (B, K, D) and it.weights.shape == (B, K, L) and it.mass.shape == (B, K)
    assert it.active.sum(1).tolist() == [3, 2, 1]  # the dynamic interest count, as MIND
    A = it.weights
    assert torch.allclose(A.sum(2)[it.active], torch.ones(int(it.active.sum())), atol=1e-6)
    assert torch.all(A[~it.active] == 0) and torch.all(A.masked_select(~b.mask[:, None, :]) == 0)
    assert torch.all(it.vectors[~it.active] == 0)
    assert torch.allclose(it.mass.sum(1), torch.ones(B), atol=1e-6) and torch.all(it.mass[~it.active] == 0)
    # one active interest holds every behaviour
    assert it.mass[2, 0] == 1.0


def test_padding_slots_change_nothing_and_users_are_independent():
    m = _model()
    m.eval()
    b = _batch()
    it = m.user_vectors(b)
    garbage = b.history.masked_fill(~b.mask, 7)  # padded slots hold a real item id, still masked
    again = m.user_vectors(Batch(garbage, b.mask, b.user_features))
    assert torch.allclose(it.vectors, again.vectors, atol=1e-6)
    one = m.user_vectors(Batch(b.history[1:2], b.mask[1:2], {"age": b.user_features["age"][1:2]}))
    assert torch.allclose(one.vectors[0], it.vectors[1], atol=1e-6)


def test_positions_are_by_recency_so_the_last_behaviour_keeps_its_embedding_as_history_grows():
    """The most recent behaviour always reads position 0: adding an older one before it moves nothing."""
    m = _model()
    p = m.position
    mask_short = torch.tensor([[True, True, False]])
    mask_long = torch.tensor([[True, True, True]])
    assert torch.equal(p[recency(mask_short)][0, 1], p[0]) and torch.equal(p[recency(mask_long)][0, 2], p[0])
    assert not torch.allclose(_model(positions=False).user_vectors(_batch()).vectors,
                              _model().user_vectors(_batch()).vectors)


def test_trains_and_the_peak_penalty_reaches_the_attention():
    m = _model(sparse=False, peak_penalty=1.0)
    b = _batch()
    q, log_q = log_expected_counts(torch.ones(21), 10, 0.0)
    neg = torch.multinomial(q, 10, replacement=True, generator=torch.Generator().manual_seed(0))
    m.loss(b, neg, log_q).backward()
    with_penalty = m.W1.weight.grad.clone()
    m.zero_grad()
    m.config.peak_penalty = 0.0
    m.loss(b, neg, log_q).backward()
    assert not torch.allclose(with_penalty, m.W1.weight.grad)
    m.config.peak_penalty = 1.0
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = m.loss(b, neg, log_q).item()
    for _ in range(60):
        opt.zero_grad()
        m.loss(b, neg, log_q).backward()
        opt.step()
    assert m.loss(b, neg, log_q).item() < first * 0.5


def test_the_registry_builds_and_names_each_extractor():
    sa = ComiRecConfig(n_items=10, dim=4, interests=2, max_len=5, hidden=8)
    routing = MINDConfig(n_items=10, dim=4, interests=2, max_len=5, hidden=8)
    assert isinstance(build_retriever(sa), ComiRecSA) and retriever_name(sa) == "self-attention"
    assert retriever_name(routing) == "routing"
