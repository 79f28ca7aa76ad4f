"""EarlyStopping: the best epoch, the patience count and the weights it keeps."""

from __future__ import annotations

import pytest
import torch

from retrieval.early_stopping import EarlyStopping


def test_stops_after_patience_epochs_without_a_strictly_better_value():
    stop = EarlyStopping(patience=2)
    seen = []
    for epoch, value in enumerate([0.5, 0.7, 0.7, 0.6, 0.9], 1):  # a tie is no improvement
        improved = stop.update(epoch, value)
        seen.append((improved, stop.stale, stop.should_stop))
        if stop.should_stop:
            break
    assert seen == [(True, 0, False), (True, 0, False), (False, 1, False), (False, 2, True)]
    assert (stop.best, stop.best_epoch) == (0.7, 2)


def test_an_improvement_resets_the_count_and_min_delta_must_be_exceeded():
    stop = EarlyStopping(patience=2, min_delta=0.01)
    stop.update(1, 0.50)
    assert not stop.update(2, 0.505)  # within min_delta: stale
    assert stop.update(3, 0.52) and stop.stale == 0 and stop.best_epoch == 3
    assert not stop.should_stop


def test_keeps_and_restores_the_weights_of_the_best_epoch():
    model = torch.nn.Linear(2, 1)
    stop = EarlyStopping(patience=3)
    with torch.no_grad():
        model.weight.fill_(1.0)
    stop.update(1, 0.8, model)
    with torch.no_grad():
        model.weight.fill_(2.0)  # a worse epoch: not kept
    stop.update(2, 0.7, model)
    stop.restore(model)
    assert torch.equal(model.weight, torch.ones(1, 2))
    # the copy is deep: training on after the best epoch does not move it
    with torch.no_grad():
        model.weight.fill_(3.0)
    stop.restore(model)
    assert torch.equal(model.weight, torch.ones(1, 2))


def test_bad_patience_and_restore_without_weights():
    with pytest.raises(ValueError, match="patience=0 must be at least 1"):
        EarlyStopping(patience=0)
    stop = EarlyStopping(patience=1)
    stop.update(1, 0.5)  # no model given: nothing to restore
    with pytest.raises(RuntimeError, match="no best weights to restore"):
        stop.restore(torch.nn.Linear(1, 1))
