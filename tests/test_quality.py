"""Quality checks on real and planted data: short training runs that must beat simple baselines.

These train for a few epochs only; the figures in the README come from `retrieve experiment`.
"""

import numpy as np
import pytest
from conftest import ML100K

from data.synthetic import SyntheticConfig, generate
from retrieval.channels import DECAYS, KNN_K
from retrieval.data import DataSpec, load_dataset, split_users
from retrieval.evaluate import evaluate_models
from retrieval.train import TrainConfig, model_config_for, train



def test_mind_separates_planted_interests(tmp_path):
    """Users with several planted interests: K=4 must clearly beat K=1 on held-out behaviour."""
    paths = generate(tmp_path, SyntheticConfig(n_users=600, n_items=1200, n_topics=24, max_len=100, seed=1))
    ds = load_dataset(DataSpec(paths["interactions"], paths["items"], paths["users"]))
    split = split_users(ds, 2026)
    tc = TrainConfig(epochs=4, batch_size=256, negatives=256, patience=4, seed=0)
    models = {}
    for k in (4, 1):
        models[k] = train(ds, split, model_config_for(ds, interests=k, dim=32), tc, show_progress=False).model
    report = evaluate_models(ds, split, models[4], mind_k1=models[1], part="test")
    res = report["models"]
    assert res["mind"]["recall@50"] > res["mind_k1"]["recall@50"] + 0.03, res
    assert res["mind"]["recall@50"] > 2 * res["popularity"]["recall@50"], res
    # the report lists every setting of the merged retriever tried on validation users, the chosen one among them
    tried = report["channels"]["validation_settings"]
    assert [(t["knn_k"], t["decay"]) for t in tried[:len(KNN_K)]] == [(k, 1.0) for k in KNN_K]
    assert [t["decay"] for t in tried[len(KNN_K):]] == list(DECAYS)
    chosen = [t for t in tried if t["kept"]][-1]  # the last setting that was clearly better than the one kept
    assert (report["channels"]["knn_k"], report["channels"]["decay"]) == (chosen["knn_k"], chosen["decay"])


@pytest.mark.integration
@pytest.mark.skipif(not ML100K.is_dir(), reason="../shared/datasets/ml-100k not present")
def test_mind_beats_popularity_on_movielens():
    spec = DataSpec(ML100K / "interactions.csv", ML100K / "items.csv", ML100K / "users.csv",
                    user_features=("age", "gender", "occupation"))
    ds = load_dataset(spec)
    assert (ds.n_users, ds.n_items, len(ds.items)) == (943, 1682, 100_000)
    split = split_users(ds, 2026)
    tc = TrainConfig(epochs=2, batch_size=512, seed=0)
    model = train(ds, split, model_config_for(ds, interests=4), tc, show_progress=False).model
    res = evaluate_models(ds, split, model, part="test")["models"]
    assert res["mind"]["recall@50"] > res["popularity"]["recall@50"] + 0.02, res
    assert np.isfinite(res["item_knn"]["recall@50"])
