"""Throughput beside public implementations: our rankers and MIND against torch-rechub 0.9.0
and deepctr-torch on the same batches, in the same process, with the same thread count.

Run it with the throwaway environment's python (neither library is a dependency):

    bash bench/public_env.sh /work/bench-venv
    /work/bench-venv/bin/python bench/bench_public.py --scale full --out-dir runs/bench

What is measured, everything on batches built once by our own pipeline (ML-100K, protocol
split seed 2026) or drawn synthetically for the 1M-item shapes, then converted to each
library's input format before any clock starts:

- DIN: train samples/s (forward + backward + Adam step, same lr, warm-up steps excluded) and
  scoring candidates/s (eval mode, no grad, large batches) for ours (and every other ranker
  of ours) beside torch-rechub's and deepctr-torch's DIN; then each DIN trained for the same
  epochs on identical rows (step by step in turn) and scored on the protocol's test pairs
  (AUC / GAUC), so "faster without losing AUC" is shown on one run.
- MIND: train samples/s of ours (sampled softmax as in retrieval/train.py) beside
  torch-rechub's MIND (list-wise softmax over the positive and the negatives it is given) at
  ML-100K shapes and at batch 1024, L 50, D 64 with 1K and 1M items.

Timings are interleaved: every round runs each contender for the same steps, the order
rotating between rounds, and the report keeps every round and their median. Model
configurations and the differences that remain are in the report's "notes" and in
`table()`; the JSON records the package versions.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval.artifacts import atomic_write_json  # noqa: E402
from retrieval.data import Dataset, DataSpec, Split, item_counts, load_dataset, split_users  # noqa: E402
from retrieval.metrics import auc, gauc  # noqa: E402
from retrieval.mind import MIND, Batch, MINDConfig, log_expected_counts  # noqa: E402
from retrieval.ranking.common import RankBatch  # noqa: E402
from retrieval.ranking.data import TouchedItems, make_rank_batch, protocol_pairs  # noqa: E402
from retrieval.ranking.models import NAMES as RANKERS  # noqa: E402
from retrieval.ranking.models import build_ranker, needs  # noqa: E402
from retrieval.ranking.scoring import pair_metrics  # noqa: E402
from retrieval.ranking.train import RankTrainConfig, training_pairs  # noqa: E402
from retrieval.samples import make_batch, training_positions  # noqa: E402
from retrieval.train import NegativeSampler, TrainConfig, _optimizers, train_step  # noqa: E402


def _import_public() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """torch-rechub and deepctr-torch. deepctr-torch starts a thread at import that asks PyPI
    for its latest version; a stand-in `requests` keeps that offline (and silent)."""
    offline = types.ModuleType("requests")
    offline.get = lambda *a, **k: types.SimpleNamespace(status_code=None)  # type: ignore[attr-defined]
    offline.codes = types.SimpleNamespace(ok=200)  # type: ignore[attr-defined]
    before = sys.modules.get("requests")
    sys.modules["requests"] = offline
    try:
        import deepctr_torch.inputs as dc_inputs
        import deepctr_torch.models as dc_models
    finally:
        if before is None:
            sys.modules.pop("requests", None)
        else:
            sys.modules["requests"] = before
    import torch_rechub  # noqa: F401
    return torch_rechub, dc_models, dc_inputs


torch_rechub, dc_models, dc_inputs = _import_public()
from torch_rechub.basic.features import SequenceFeature, SparseFeature  # noqa: E402
from torch_rechub.models.matching import MIND as RechubMIND  # noqa: E402
from torch_rechub.models.ranking import DIN as RechubDIN  # noqa: E402

log = logging.getLogger("bench_public")

ML100K = REPO.parent / "shared" / "datasets" / "ml-100k"
USER_FIELDS = ("age", "gender", "occupation")


# ---------------------------------------------------------------------------- scales


@dataclass
class MindShape:
    name: str  # label in the report
    source: str  # "ml100k" (our windows of the real log) or "synthetic" (Zipf item ids)
    batch: int  # B
    n_items: int = 0  # N of a synthetic shape (ML-100K: the dataset's)


@dataclass
class Scale:
    threads: int = 1  # torch threads, the same for every contender
    repeats: int = 5  # interleaved timing rounds; the report keeps each and their median
    # DIN and our other rankers
    din_batch: int = 256  # RankTrainConfig.batch_size
    din_steps: int = 20  # timed training steps per round and contender
    din_warmup: int = 3  # untimed steps per contender before the first round
    score_batch: int = 4096  # candidates per scoring call
    score_steps: int = 4  # scoring calls per round and contender
    rankers: tuple[str, ...] = RANKERS  # ours timed beside the public DINs
    auc_epochs: int = 2  # epochs of the AUC comparison (identical rows for every DIN)
    auc_max_steps: int = 0  # cap on steps per epoch (0 = the whole epoch)
    auc_test_rows: int = 0  # subsample of the protocol's test pairs (0 = all)
    # MIND
    mind_shapes: tuple[MindShape, ...] = (
        MindShape("ml100k B=256", "ml100k", 256),
        MindShape("synthetic N=1K B=1024", "synthetic", 1024, 1_000),
        MindShape("synthetic N=1M B=1024", "synthetic", 1024, 1_000_000),
    )
    mind_steps: int = 10  # timed steps per round and contender
    mind_warmup: int = 2
    mind_batches: int = 8  # distinct batches cycled through (per shape)
    negatives: int = 512  # S of our sampled softmax (TrainConfig.negatives)
    rechub_example_negatives: int = 3  # neg_ratio of torch-rechub's own ML MIND example


SCALES = {
    "full": Scale(),
    "smoke": Scale(
        repeats=2, din_steps=3, din_warmup=1, score_batch=512, score_steps=2, rankers=("base", "din"),
        auc_epochs=1, auc_max_steps=6, auc_test_rows=1024,
        mind_shapes=(
            MindShape("ml100k B=64", "ml100k", 64),
            MindShape("synthetic N=1K B=64", "synthetic", 64, 1_000),
            MindShape("synthetic N=20K B=64", "synthetic", 64, 20_000),
        ),
        mind_steps=2, mind_warmup=1, mind_batches=2, negatives=64,
    ),
}


# ---------------------------------------------------------------------------- timing


@dataclass
class Contender:
    """One model in a comparison: how to convert our batch, train on it and score it."""

    model: nn.Module
    convert: Callable[[Any], Any]  # our batch -> the library's input (never timed)
    step: Callable[[Any], float]  # one training step (forward, backward, optimizer) -> loss
    score: Callable[[Any], Tensor] | None = None  # (B,) scores; called in eval mode under no_grad
    config: dict[str, Any] = field(default_factory=dict)  # how it was configured, for the report


def interleaved(fns: dict[str, Callable[[int], int]], warmup: int, steps: int, repeats: int) -> dict[str, list[float]]:
    """Rows per second of each contender, one figure per round.

    fns[name](k) runs step k (every contender gets the same k sequence, so the same batches)
    and returns the rows it processed. `warmup` untimed steps each first; then `repeats`
    rounds, each timing `steps` steps of every contender, the order rotating between rounds."""
    names = list(fns)
    for name in names:
        for k in range(warmup):
            fns[name](k)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            rows, t0 = 0, time.perf_counter()
            for i in range(steps):
                rows += fns[name](warmup + r * steps + i)
            rates[name].append(rows / (time.perf_counter() - t0))
    return rates


def train_fn(c: Contender, xs: list[Any], rows: int) -> Callable[[int], int]:
    """Step k of training: c's training step on xs[k mod len(xs)] (rows of them)."""

    def run(k: int) -> int:
        c.model.train()
        c.step(xs[k % len(xs)])
        return rows
    return run


def score_fn(c: Contender, xs: list[Any]) -> Callable[[int], int]:
    """Call k of scoring: c's scores of xs[k mod len(xs)] in eval mode, no grad."""
    assert c.score is not None
    score = c.score

    def run(k: int) -> int:
        c.model.eval()
        with torch.no_grad():
            return len(score(xs[k % len(xs)]))
    return run


def summary(rates: list[float]) -> dict[str, Any]:
    return {"median": float(np.median(rates)), "min": float(min(rates)), "max": float(max(rates)),
            "rounds": [round(x, 1) for x in rates]}


# ---------------------------------------------------------------------------- DIN


def _first_values(ds: Dataset) -> dict[str, Tensor]:
    """Item field -> (N+1,) its first value per item: the single-valued stand-in the public
    DINs need for a multi-valued field (genres), as torch-rechub's own ML example does."""
    return {f: torch.from_numpy(m[:, 0].astype(np.int64)) for f, m in ds.item_features.items()}


def _public_columns(ds: Dataset, b: RankBatch, first: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our batch as named columns: user_<f> (B,), item_id and item fields (B,), hist_* (B, L),
    seq_length (B,)."""
    hist = b.history.masked_fill(~b.mask, 0)
    cols = {f"user_{f}": b.user_features[f][:, 0] for f in ds.user_features}
    cols["item_id"], cols["hist_item_id"] = b.candidate, hist
    for f, table in first.items():
        cols[f], cols[f"hist_{f}"] = table[b.candidate], table[hist]
    cols["seq_length"] = b.mask.sum(1)
    return cols


def ours_ranker(name: str, ds: Dataset, split: Split, cfg: RankTrainConfig) -> Contender:
    model = build_ranker(name, ds, split.train_users, dim=cfg.dim, max_len=cfg.max_len, **cfg.settings)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def step(b: RankBatch) -> float:
        loss = model.loss(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return Contender(model, lambda b: b, step, model.score, {"config": _jsonable(model.config.to_dict())})


def rechub_din(ds: Dataset, cfg: RankTrainConfig, first: dict[str, Tensor]) -> Contender:
    d, L = cfg.dim, cfg.max_len
    users = [SparseFeature(f"user_{f}", len(ds.user_feature_vocab[f]), d, padding_idx=0) for f in ds.user_features]
    sizes = {"item_id": ds.n_items + 1, **{f: len(ds.item_feature_vocab[f]) for f in first}}
    target = [SparseFeature(f, n, d, padding_idx=0) for f, n in sizes.items()]
    history = [SequenceFeature(f"hist_{f}", n, d, pooling="concat", shared_with=f, padding_idx=0) for f, n in sizes.items()]
    mlp = {"dims": [200, 80]}  # activation is fixed to torch-rechub's Dice by its DIN
    att = {"dims": [80, 40], "activation": "dice", "use_softmax": False}
    model = RechubDIN(users, history, target, mlp_params=mlp, attention_mlp_params=att)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)  # CTRTrainer's optimizer, without its weight decay
    bce = nn.BCELoss()  # CTRTrainer's criterion

    def convert(b: RankBatch) -> tuple[dict[str, Tensor], Tensor | None]:
        cols = _public_columns(ds, b, first)
        cols.pop("seq_length")
        return cols, b.label

    def step(xy: tuple[dict[str, Tensor], Tensor]) -> float:  # CTRTrainer.train_one_epoch's step
        x, y = xy
        loss = bce(model(x), y)
        model.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    config = {"embed_dim": d, "history_len": L, "mlp_params": mlp, "attention_mlp_params": att,
              "features": [f.name for f in users + target + history], "optimizer": f"Adam(lr={cfg.lr})",
              "loss": "BCELoss on sigmoid outputs (CTRTrainer)"}
    return Contender(model, convert, step, lambda xy: model(xy[0]), config)


def deepctr_din(ds: Dataset, cfg: RankTrainConfig, first: dict[str, Tensor], seed: int) -> Contender:
    d, L = cfg.dim, cfg.max_len
    SparseFeat, VarLenSparseFeat = dc_inputs.SparseFeat, dc_inputs.VarLenSparseFeat
    users = [SparseFeat(f"user_{f}", len(ds.user_feature_vocab[f]), d) for f in ds.user_features]
    sizes = {"item_id": ds.n_items + 1, **{f: len(ds.item_feature_vocab[f]) for f in first}}
    target = [SparseFeat(f, n, d) for f, n in sizes.items()]
    history = [VarLenSparseFeat(SparseFeat(f"hist_{f}", n, d, embedding_name=f), maxlen=L, length_name="seq_length")
               for f, n in sizes.items()]
    columns = users + target + history
    settings = dict(dnn_hidden_units=(200, 80), dnn_activation="prelu", att_hidden_size=(80, 40),
                    att_activation="Dice", att_weight_normalization=False, l2_reg_embedding=0.0, dnn_dropout=0.0)
    model = dc_models.DIN(columns, list(sizes), seed=seed, device="cpu", **settings)
    index = dc_inputs.build_input_features(columns)  # name -> (start, end) column range of X
    width = max(e for _, e in index.values())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def convert(b: RankBatch) -> tuple[Tensor, Tensor | None]:
        cols = _public_columns(ds, b, first)
        X = torch.zeros(len(b.candidate), width)
        for name, (s, e) in index.items():
            X[:, s:e] = cols[name].reshape(len(X), e - s).float()
        return X, b.label

    def step(xy: tuple[Tensor, Tensor]) -> float:  # BaseModel.fit's step
        X, y = xy
        y_pred = model(X).squeeze(-1)
        opt.zero_grad()
        loss = F.binary_cross_entropy(y_pred, y, reduction="sum")
        total = loss + model.get_regularization_loss() + model.aux_loss
        total.backward()
        opt.step()
        return loss.item()

    config = {"embedding_dim": d, "maxlen": L, **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
              "features": [f.name for f in columns], "optimizer": f"Adam(lr={cfg.lr})",
              "loss": "binary_cross_entropy(reduction='sum') + regularization (0) as in BaseModel.fit"}
    return Contender(model, convert, step, lambda xy: model(xy[0]).squeeze(-1), config)


def _rank_rows(ds: Dataset, split: Split, touched: TouchedItems, n: int, seed: int):
    """n training rows (positives and uniform negatives) in training order."""
    rng = np.random.default_rng(seed)
    rows = training_pairs(ds, split, touched, 1, rng)
    return rows.take(rng.permutation(len(rows))[:n])


def bench_din(ds: Dataset, split: Split, scale: Scale, seed: int) -> dict[str, Any]:
    cfg = RankTrainConfig()  # dim 16, L 50, batch 256, lr 1e-3: our ranker training's settings
    first = _first_values(ds)
    touched = TouchedItems(ds)
    n_train = scale.din_batch * (scale.din_warmup + scale.din_steps * scale.repeats)
    train_rows = _rank_rows(ds, split, touched, n_train, seed)
    score_rows = _rank_rows(ds, split, touched, scale.score_batch * scale.score_steps, seed + 1)

    def batches(rows, size: int, model: nn.Module | None) -> list[RankBatch]:
        spec = needs(model) if model is not None else None
        out = []
        for i in range(0, len(rows), size):
            p = rows.take(np.arange(i, min(i + size, len(rows))))
            out.append(make_rank_batch(ds, touched, p.users, p.ends, p.candidates, p.labels, cfg.max_len,
                                       np.random.default_rng(seed + i), neg_history=bool(spec and spec.neg_history),
                                       sessions=spec.sessions if spec else None))
        return out

    torch.manual_seed(seed)
    contenders = {f"ours {n}": ours_ranker(n, ds, split, cfg) for n in scale.rankers}
    torch.manual_seed(seed)
    contenders["torch-rechub DIN"] = rechub_din(ds, cfg, first)
    torch.manual_seed(seed)
    contenders["deepctr-torch DIN"] = deepctr_din(ds, cfg, first, seed)

    train_in, score_in = {}, {}
    for name, c in contenders.items():
        ours = c.model if name.startswith("ours") else None
        train_in[name] = [c.convert(b) for b in batches(train_rows, scale.din_batch, ours)]
        score_in[name] = [c.convert(b) for b in batches(score_rows, scale.score_batch, ours)]

    log.info("DIN: timing training (%d rounds x %d steps of %d rows)", scale.repeats, scale.din_steps, scale.din_batch)
    train = interleaved({n: train_fn(c, train_in[n], scale.din_batch) for n, c in contenders.items()},
                        scale.din_warmup, scale.din_steps, scale.repeats)
    log.info("DIN: timing scoring (%d rounds x %d calls of %d candidates)", scale.repeats, scale.score_steps, scale.score_batch)
    score = interleaved({n: score_fn(c, score_in[n]) for n, c in contenders.items()}, 1, scale.score_steps,
                        scale.repeats)
    throughput = {n: {"train_samples_per_s": summary(train[n]), "score_candidates_per_s": summary(score[n])}
                  for n in contenders}
    for n, t in throughput.items():
        log.info("  %-20s train %8.0f samples/s   score %9.0f candidates/s", n,
                 t["train_samples_per_s"]["median"], t["score_candidates_per_s"]["median"])
    return {"train_config": asdict(cfg), "throughput": throughput,
            "configs": {n: c.config for n, c in contenders.items()}}


def din_auc(ds: Dataset, split: Split, scale: Scale, seed: int, epochs: int) -> dict[str, Any]:
    """Ours, torch-rechub's and deepctr-torch's DIN trained in turn on identical rows (each
    step's batch goes to all three, order rotating), then scored on the same test pairs."""
    cfg = RankTrainConfig()
    first = _first_values(ds)
    touched = TouchedItems(ds)
    torch.manual_seed(seed)
    contenders = {"ours din": ours_ranker("din", ds, split, cfg)}
    torch.manual_seed(seed)
    contenders["torch-rechub DIN"] = rechub_din(ds, cfg, first)
    torch.manual_seed(seed)
    contenders["deepctr-torch DIN"] = deepctr_din(ds, cfg, first, seed)
    names = list(contenders)
    seconds = dict.fromkeys(names, 0.0)
    losses: dict[str, list[float]] = {n: [] for n in names}
    rng = np.random.default_rng(seed)
    n_rows = 0
    for epoch in range(1, epochs + 1):
        rows = training_pairs(ds, split, touched, cfg.negatives, rng)  # fresh negatives each epoch
        order = rng.permutation(len(rows))
        steps = (len(order) + cfg.batch_size - 1) // cfg.batch_size
        if scale.auc_max_steps:
            steps = min(steps, scale.auc_max_steps)
        sums = dict.fromkeys(names, 0.0)
        for s in range(steps):
            p = rows.take(order[s * cfg.batch_size : (s + 1) * cfg.batch_size])
            b = make_rank_batch(ds, touched, p.users, p.ends, p.candidates, p.labels, cfg.max_len)
            n_rows += len(p)
            for name in names[s % len(names):] + names[: s % len(names)]:
                c = contenders[name]
                x = c.convert(b)
                c.model.train()
                t0 = time.perf_counter()
                sums[name] += c.step(x)
                seconds[name] += time.perf_counter() - t0
        for n in names:
            losses[n].append(sums[n] / steps)
        log.info("DIN AUC run: epoch %d done (%d steps)", epoch, steps)

    test = protocol_pairs(ds, split, "test")
    if scale.auc_test_rows and scale.auc_test_rows < len(test):
        test = test.take(np.sort(np.random.default_rng(seed).choice(len(test), scale.auc_test_rows, replace=False)))
    scores: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(test), 4096):
        p = test.take(np.arange(i, min(i + 4096, len(test))))
        b = make_rank_batch(ds, touched, p.users, p.ends, p.candidates, None, cfg.max_len)
        for n, c in contenders.items():
            assert c.score is not None
            c.model.eval()
            with torch.no_grad():
                scores[n].append(c.score(c.convert(b)).double().numpy())
    out: dict[str, Any] = {"epochs": epochs, "train_rows": n_rows, "test_rows": len(test), "models": {}}
    for n in names:
        s = np.concatenate(scores[n])
        out["models"][n] = {"test_auc": auc(test.labels, s), "test_gauc": gauc(test.users, test.labels, s),
                            "train_samples_per_s": n_rows / seconds[n], "loss_per_epoch": losses[n]}
    # ours through the project's own evaluation path as well: it must agree with the above
    out["models"]["ours din"]["pair_metrics"] = pair_metrics(contenders["ours din"].model, ds, test)
    for n, m in out["models"].items():
        log.info("  %-20s test AUC %.4f  GAUC %.4f  (%.0f samples/s over the run)", n, m["test_auc"],
                 m["test_gauc"], m["train_samples_per_s"])
    return out


# ---------------------------------------------------------------------------- MIND


@dataclass
class MindBatches:
    batches: list[tuple[Batch, Tensor]]  # (batch with target, (S,) shared negatives)
    q: Tensor  # (N+1,) the negatives' sampling distribution
    log_q: Tensor  # (N+1,) its log-Q correction
    n_items: int
    item_features: dict[str, Tensor]  # item field -> (N+1, M) (empty for synthetic shapes)
    item_feature_sizes: dict[str, int]
    user_feature_sizes: dict[str, int]


def mind_batches_ml100k(ds: Dataset, split: Split, shape: MindShape, scale: Scale, seed: int) -> MindBatches:
    """Our training windows of ML-100K, shuffled as retrieval/train.py does, with negatives
    drawn as it does (q ∝ train frequency + 1, 512 shared)."""
    rng = np.random.default_rng(seed)
    users, positions = training_positions(ds, split.train_users, split.history_len)
    idx = rng.permutation(len(users))[: shape.batch * scale.mind_batches].reshape(scale.mind_batches, shape.batch)
    q, log_q = log_expected_counts(torch.from_numpy(item_counts(ds, split.train_users)), scale.negatives,
                                   TrainConfig.neg_alpha)
    sampler = NegativeSampler(q, scale.negatives, seed)
    batches = [(make_batch(ds, users[i], positions[i], 50, with_target=True), sampler.draw()) for i in idx]
    feats = {f: torch.from_numpy(m.astype(np.int64)) for f, m in ds.item_features.items()}
    return MindBatches(batches, q, log_q, ds.n_items, feats, {f: len(v) for f, v in ds.item_feature_vocab.items()},
                       {f: len(v) for f, v in ds.user_feature_vocab.items()})


def mind_batches_synthetic(shape: MindShape, scale: Scale, seed: int, L: int = 50) -> MindBatches:
    """Synthetic windows over N items with Zipf(1) popularity (ids shuffled, so popular items
    are spread over the table); history lengths min(L, U[1, 4L]) (3/4 full, as on a log whose
    users have long histories); three profile fields sized like ML-100K's."""
    rng = np.random.default_rng(seed)
    N = shape.n_items
    p = 1.0 / np.arange(1, N + 1)
    p /= p.sum()
    ids = rng.permutation(N) + 1  # popularity rank -> item id
    cdf = np.cumsum(p)

    def draw(size: Any) -> np.ndarray:
        return ids[np.minimum(np.searchsorted(cdf, rng.random(size)), N - 1)]

    freq = np.zeros(N + 1)
    freq[ids] = np.floor(p * 1e8)  # a log of 1e8 behaviours
    q, log_q = log_expected_counts(torch.from_numpy(freq), scale.negatives, TrainConfig.neg_alpha)
    sampler = NegativeSampler(q, scale.negatives, seed)
    profile = {"age": 63, "gender": 4, "occupation": 23}
    batches = []
    for _ in range(scale.mind_batches):
        B = shape.batch
        length = np.minimum(L, rng.integers(1, 4 * L + 1, B))
        mask = np.arange(L)[None, :] < length[:, None]
        hist = np.where(mask, draw((B, L)), 0)
        feats = {f: torch.from_numpy(rng.integers(1, n, (B, 1))) for f, n in profile.items()}
        b = Batch(torch.from_numpy(hist), torch.from_numpy(mask), feats, torch.from_numpy(draw(B)))
        batches.append((b, sampler.draw()))
    return MindBatches(batches, q, log_q, N, {}, {}, profile)


def ours_mind(mb: MindBatches, with_item_features: bool, lr: float, seed: int) -> Contender:
    feats = mb.item_features if with_item_features else {}
    config = MINDConfig(n_items=mb.n_items, item_feature_sizes=mb.item_feature_sizes if with_item_features else {},
                        user_feature_sizes=mb.user_feature_sizes, dim=64, interests=4, max_len=50, seed=seed)
    model = MIND(config, feats)
    opts = _optimizers(model, lr)

    def step(x: tuple[Batch, Tensor]) -> float:  # retrieval/train.py's own step
        return train_step(model, opts, x[0], x[1], mb.log_q)

    return Contender(model, lambda x: x, step, config={"config": _jsonable(config.to_dict()),
                     "optimizers": [type(o).__name__ for o in opts], "lr": lr})


def rechub_mind(mb: MindBatches, negatives: str, scale: Scale, lr: float, seed: int) -> Contender:
    """torch-rechub's MIND as its MatchTrainer trains it in mode 2 (list-wise): the model
    scores [positive, negatives] with the label-aware best interest and CrossEntropyLoss
    takes the positive as class 0. `negatives`: "same" gives every row our S shared negatives
    (the same loss inputs as ours); "example" draws rechub_example_negatives per row from the
    same q (its ML example's neg_ratio=3)."""
    D, L, N = 64, 50, mb.n_items
    users = [SparseFeature(f"user_{f}", n, 16) for f, n in mb.user_feature_sizes.items()]
    item = [SparseFeature("item_id", N + 1, D, padding_idx=0)]
    history = [SequenceFeature("hist_item_id", N + 1, D, pooling="concat", shared_with="item_id", padding_idx=0)]
    neg = [SequenceFeature("neg_items", N + 1, D, pooling="concat", shared_with="item_id", padding_idx=0)]
    model = RechubMIND(users, history, item, neg, max_length=L, interest_num=4, dynamic_interest=True)
    model.mode = None  # training: forward returns the (B, 1 + negatives) scores
    opt = torch.optim.Adam(model.parameters(), lr=lr)  # MatchTrainer's optimizer, without its weight decay
    ce = nn.CrossEntropyLoss()  # MatchTrainer's mode-2 criterion
    gen = torch.Generator().manual_seed(seed)

    def convert(x: tuple[Batch, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        batch, shared = x
        B = len(batch.target)
        if negatives == "same":
            negs = shared[None, :].repeat(B, 1)  # (B, S)
        else:
            negs = torch.multinomial(mb.q, B * scale.rechub_example_negatives, replacement=True,
                                     generator=gen).reshape(B, -1)
        cols = {f"user_{f}": v[:, 0] for f, v in batch.user_features.items()}
        cols["hist_item_id"] = batch.history.masked_fill(~batch.mask, 0)
        cols["item_id"], cols["neg_items"] = batch.target, negs
        return cols, torch.zeros(B, dtype=torch.long)

    def step(xy: tuple[dict[str, Tensor], Tensor]) -> float:  # MatchTrainer.train_one_epoch, mode 2
        x, y = xy
        loss = ce(model(x), y)
        model.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    n = scale.negatives if negatives == "same" else scale.rechub_example_negatives
    config = {"embed_dim": D, "max_length": L, "interest_num": 4, "dynamic_interest": True,
              "user_features": [f.name for f in users], "profile_embed_dim": 16, "item_features": ["item_id"],
              "negatives_per_row": n, "negatives": "our shared draw, repeated per row" if negatives == "same"
              else "drawn per row from the same q", "optimizer": f"Adam(lr={lr})",
              "loss": "CrossEntropyLoss over [positive, negatives] (MatchTrainer mode=2)"}
    return Contender(model, convert, step, config=config)


def bench_mind(ds: Dataset | None, split: Split | None, scale: Scale, seed: int) -> dict[str, Any]:
    lr = TrainConfig.lr
    out: dict[str, Any] = {}
    for shape in scale.mind_shapes:
        if shape.source == "ml100k":
            assert ds is not None and split is not None
            mb = mind_batches_ml100k(ds, split, shape, scale, seed)
        else:
            mb = mind_batches_synthetic(shape, scale, seed)
        contenders: dict[str, Contender] = {}
        torch.manual_seed(seed)
        contenders["ours MIND"] = ours_mind(mb, True, lr, seed)
        if mb.item_features:
            torch.manual_seed(seed)
            contenders["ours MIND (item id only)"] = ours_mind(mb, False, lr, seed)
        torch.manual_seed(seed)
        contenders["torch-rechub MIND"] = rechub_mind(mb, "same", scale, lr, seed)
        torch.manual_seed(seed)
        contenders[f"torch-rechub MIND ({scale.rechub_example_negatives} neg/row)"] = rechub_mind(
            mb, "example", scale, lr, seed)
        fns = {n: train_fn(c, [c.convert(x) for x in mb.batches], shape.batch) for n, c in contenders.items()}
        log.info("MIND %s: timing (%d rounds x %d steps)", shape.name, scale.repeats, scale.mind_steps)
        rates = interleaved(fns, scale.mind_warmup, scale.mind_steps, scale.repeats)
        draws = []
        sampler = NegativeSampler(mb.q, scale.negatives, seed)
        for _ in range(20):  # what retrieval/train.py adds per step, outside the batches timed here
            t0 = time.perf_counter()
            sampler.draw()
            draws.append(time.perf_counter() - t0)
        entry = {"batch": shape.batch, "n_items": mb.n_items, "L": 50, "D": 64, "K": 4, "negatives": scale.negatives,
                 "source": shape.source, "negative_draw_ms": 1e3 * float(np.median(draws)),
                 "models": {n: {"train_samples_per_s": summary(rates[n]),
                                "step_ms": 1e3 * shape.batch / float(np.median(rates[n])),
                                "config": contenders[n].config} for n in contenders}}
        for n, m in entry["models"].items():
            log.info("  %-32s %8.0f samples/s  %7.1f ms/step", n, m["train_samples_per_s"]["median"], m["step_ms"])
        out[shape.name] = entry
    return out


# ---------------------------------------------------------------------------- report


NOTES = {
    "din": [
        "Same rows for all: batches built once by retrieval.ranking.data.make_rank_batch and converted to "
        "each library's input before timing; conversion is never timed for anyone (nor is our own batch building).",
        "Embedding dim 16 per field; features item id + year + genre (history and candidate) + age, gender, "
        "occupation (profile); history L=50; final MLP 200-80-1; attention MLP 80-40-1; Adam lr 1e-3, no "
        "weight decay, no L2; BCE. MLP inputs are 144 wide for all three.",
        "Genres: ours mean-pools all of an item's genres; neither public DIN takes a multi-valued field per "
        "history position, so both get the item's first genre (as torch-rechub's own ML example does).",
        "Ours: Dice (batch statistics, running averages in eval) in both MLPs; the activation unit runs only "
        "on real (unpadded) positions of the 48-d concatenated item representation; weights not normalised.",
        "torch-rechub DIN: one activation unit per history field (three 16-d units instead of one 48-d one), "
        "run over all L positions including padding (padding embeddings are zero); its MLPs put BatchNorm "
        "before its own Dice (per-row normalisation, no running statistics); sigmoid + BCELoss; CTRTrainer's "
        "default weight_decay 1e-5 dropped to match ours.",
        "deepctr-torch DIN: one 48-d activation unit with Dice (BatchNorm over all L positions, padding "
        "included, masked afterwards by the sequence length); the final MLP uses PReLU because its DNN "
        "builds Dice for 3-d input only (dnn_activation='dice' fails on the 2-d MLP input); embeddings and "
        "MLP weights initialised with std 1e-4 (its default); l2_reg_embedding set to 0 (default 1e-6); loss "
        "summed over the batch as BaseModel.fit does (Adam is nearly scale-invariant).",
    ],
    "mind": [
        "Same batches: our training windows (ML-100K, shuffled as retrieval/train.py) or synthetic Zipf(1) "
        "windows, and the same shared negatives drawn from q ∝ (frequency + 1), converted before timing; "
        "neither side's batch building nor our per-step negative draw (negative_draw_ms, reported apart) is timed.",
        "Ours: retrieval.mind.MIND (K=4, D=64, L=50, 3 routing rounds, S init std 1, hard label-aware "
        "attention, profile 3x16 through two ReLU layers of 256 and 64), sampled softmax with log-Q "
        "correction and accidental hits masked, sparse embedding gradients (retrieval/train.py's optimizers: "
        "Adam + a row-sparse Adam), its own train_step, lr 3e-3. "
        "At ML-100K ours is timed as trained (item id + year + genres mean-pooled) and with the item id only.",
        "torch-rechub MIND: item id only (its item tower takes one feature), profile 3x16 concatenated with "
        "each capsule and projected by one linear map (no ReLU layers), L2-normalised user and item vectors "
        "(cosine scores; its temperature argument is not used by forward), routing softmax over the sequence "
        "(ComiRec-style) instead of over interests, dense embedding gradients with Adam over the whole table "
        "(its only option), no log-Q correction, no accidental-hit mask; MatchTrainer mode 2 "
        "(CrossEntropyLoss, positive at index 0), its default weight_decay 1e-5 dropped to match ours.",
        "torch-rechub MIND takes negatives per row (B, S): the headline row gives every row our S shared "
        "negatives (the same loss inputs as ours, so B x S item vectors are gathered and normalised); the "
        "'neg/row' row is its own ML example's setting (3 per row drawn from q), cheaper but a different "
        "(much weaker) loss, shown for context only.",
    ],
}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torch-rechub", "deepctr-torch", "numpy", "polars", "faiss-cpu", "retrieve"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["repo_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["repo_commit"] = "unknown"
    return out


def _ratios(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    din = result.get("din", {}).get("throughput", {})
    if "ours din" in din:
        for pub in ("torch-rechub DIN", "deepctr-torch DIN"):
            if pub in din:
                for k in ("train_samples_per_s", "score_candidates_per_s"):
                    out[f"DIN {k} ours / {pub}"] = din["ours din"][k]["median"] / din[pub][k]["median"]
    for shape, e in result.get("mind", {}).items():
        m = e["models"]
        out[f"MIND {shape} ours / torch-rechub"] = (m["ours MIND"]["train_samples_per_s"]["median"]
                                                    / m["torch-rechub MIND"]["train_samples_per_s"]["median"])
    synthetic = sorted((e for e in result.get("mind", {}).values() if e["source"] == "synthetic"),
                       key=lambda e: e["n_items"])
    if len(synthetic) > 1 and synthetic[0]["batch"] == synthetic[-1]["batch"]:
        small, large = synthetic[0], synthetic[-1]
        out[f"MIND ours step time N={large['n_items']:,} / N={small['n_items']:,}"] = (
            large["models"]["ours MIND"]["step_ms"] / small["models"]["ours MIND"]["step_ms"])
    return out


def run(scale: str, out_dir: Path, *, threads: int | None = None, epochs: int | None = None,
        data: Path = ML100K, seed: int = 2026, parts: tuple[str, ...] = ("din", "auc", "mind")) -> dict[str, Any]:
    """Run the comparison at `scale` ("smoke" or "full"); writes out_dir/public-<scale>.json after
    each part (atomically) and returns the report."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    sc = replace(SCALES[scale], threads=threads or SCALES[scale].threads,
                 auc_epochs=epochs or SCALES[scale].auc_epochs)
    torch.set_num_threads(sc.threads)
    out_path = Path(out_dir) / f"public-{scale}.json"
    result: dict[str, Any] = {
        "scale": scale, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": sc.threads,
        "cpu_count": os.cpu_count(), "seed": seed, "split_seed": 2026, "data": str(data),
        "versions": versions(), "settings": _jsonable(asdict(sc)), "notes": NOTES,
    }
    t_start = time.perf_counter()
    ds = split = None
    if {"din", "auc"} & set(parts) or any(s.source == "ml100k" for s in sc.mind_shapes):
        spec = DataSpec(data / "interactions.csv", data / "items.csv", data / "users.csv", user_features=USER_FIELDS)
        ds = load_dataset(spec)
        split = split_users(ds, 2026)
    if "din" in parts:
        assert ds is not None and split is not None
        result["din"] = bench_din(ds, split, sc, seed)
        atomic_write_json(out_path, _jsonable(result))
    if "auc" in parts:
        assert ds is not None and split is not None
        result["din_auc"] = din_auc(ds, split, sc, seed, sc.auc_epochs)
        atomic_write_json(out_path, _jsonable(result))
    if "mind" in parts:
        result["mind"] = bench_mind(ds, split, sc, seed)
    result["ratios"] = _ratios(result)
    result["seconds"] = time.perf_counter() - t_start
    atomic_write_json(out_path, _jsonable(result))
    return result


def _rate(s: dict[str, Any]) -> str:
    return f"{s['median']:>9,.0f} [{s['min']:,.0f}–{s['max']:,.0f}]"


def table(result: dict[str, Any]) -> str:
    """The report as plain text tables (medians with [min–max] over the rounds)."""
    v = result["versions"]
    lines = [f"scale {result['scale']}, {result['threads']} thread(s), torch {v['torch']}, torch-rechub "
             f"{v['torch-rechub']}, deepctr-torch {v['deepctr-torch']}, {result.get('seconds', 0):.0f} s"]
    if "din" in result:
        t = result["din"]["throughput"]
        lines += ["", "Rankers (ML-100K batches; B=256 train, large-batch scoring)",
                  f"{'model':<22} {'train samples/s':>28} {'score candidates/s':>30}"]
        for n, m in t.items():
            lines.append(f"{n:<22} {_rate(m['train_samples_per_s']):>28} {_rate(m['score_candidates_per_s']):>30}")
    if "din_auc" in result:
        a = result["din_auc"]
        lines += ["", f"DIN trained {a['epochs']} epoch(s) on identical rows ({a['train_rows']:,}), "
                      f"test pairs {a['test_rows']:,}",
                  f"{'model':<22} {'test AUC':>9} {'GAUC':>7} {'samples/s (whole run)':>22}"]
        for n, m in a["models"].items():
            lines.append(f"{n:<22} {m['test_auc']:>9.4f} {m['test_gauc']:>7.4f} {m['train_samples_per_s']:>22,.0f}")
    for shape, e in result.get("mind", {}).items():
        lines += ["", f"MIND {shape} (N={e['n_items']:,}, L=50, D=64, K=4, S={e['negatives']}; "
                      f"our negative draw {e['negative_draw_ms']:.2f} ms/step, not timed)",
                  f"{'model':<34} {'train samples/s':>28} {'ms/step':>9}"]
        for n, m in e["models"].items():
            lines.append(f"{n:<34} {_rate(m['train_samples_per_s']):>28} {m['step_ms']:>9.1f}")
    if result.get("ratios"):
        lines += ["", "Ratios (medians)"] + [f"  {k}: {x:.2f}x" for k, x in result["ratios"].items()]
    return "\n".join(lines)


def main(
    scale: Annotated[str, typer.Option(help="smoke (tiny, about a minute) or full (the real shapes)")] = "smoke",
    out_dir: Annotated[Path, typer.Option(help="where public-<scale>.json goes")] = REPO / "runs" / "bench",
    threads: Annotated[int, typer.Option(help="torch threads for every contender (0 = the scale's: 1)")] = 0,
    epochs: Annotated[int, typer.Option(help="epochs of the DIN AUC comparison (0 = the scale's: full 2, smoke 1)")] = 0,
    data: Annotated[Path, typer.Option(exists=True, file_okay=False, help="ML-100K directory")] = ML100K,
    seed: Annotated[int, typer.Option(help="seeds models, row order and synthetic batches")] = 2026,
    parts: Annotated[str, typer.Option(help="comma-separated: din (throughput), auc, mind")] = "din,auc,mind",
) -> None:
    """Throughput (and DIN test AUC) of ours beside torch-rechub and deepctr-torch on the same batches."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    result = run(scale, out_dir, threads=threads or None, epochs=epochs or None, data=data, seed=seed,
                 parts=tuple(p.strip() for p in parts.split(",") if p.strip()))
    print(table(result))
    print(f"\nreport: {Path(out_dir) / f'public-{scale}.json'}")


if __name__ == "__main__":
    typer.run(main)
