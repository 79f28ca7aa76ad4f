"""`retrieve`: train MIND on a behaviour log, build a FAISS item index, query it, evaluate offline.

The CLI only parses arguments, calls the library and prints. Bad input ends with one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
log = logging.getLogger("retrieve")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's RetrievalError, or an OS error on a path (an --out under a file, no
    permission, disk full), into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from retrieval.errors import RetrievalError

        try:
            return fn(*args, **kwargs)
        except RetrievalError as err:
            _fail(str(err))
        except OSError as err:
            _fail(f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err))

    return wrapper


class _Clock:
    """Seconds spent per named phase of a command, from its start (the interpreter's own start
    and the import of the CLI come before it: a fresh process's wall time less the total)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self._last
        self._last = now

    def report(self) -> dict[str, float]:
        return {**{k: round(v, 6) for k, v in self.phases.items()}, "total": round(sum(self.phases.values()), 6)}


def _columns(value: Optional[str]) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    return tuple(c.strip() for c in value.split(",") if c.strip())


Interactions = Annotated[Path, typer.Option(help="Interaction log (CSV or Parquet): user, item, timestamp.")]
Items = Annotated[Optional[Path], typer.Option(help="Item side file: id, optional title, feature columns.")]
Users = Annotated[Optional[Path], typer.Option(help="User-profile file: id and profile columns.")]


@app.command()
@clean_errors
def generate(
    out: Annotated[Path, typer.Option(help="Directory for interactions, items and users (.csv or .parquet) and planted.json.")] = Path("runs/demo/data"),
    users: Annotated[int, typer.Option(min=10, help="Number of users.")] = 2000,
    items: Annotated[int, typer.Option(min=50, help="Number of items.")] = 3000,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    topics: Annotated[int, typer.Option(min=1, help="Planted item topics.")] = 40,
    min_len: Annotated[int, typer.Option(min=1, help="Fewest behaviours per user.")] = 20,
    mean_len: Annotated[float, typer.Option(min=1, help="Mean behaviours per user (before clipping).")] = 60.0,
    max_len: Annotated[int, typer.Option(min=1, help="Most behaviours per user.")] = 150,
    format: Annotated[str, typer.Option("--format", help="File format: csv or parquet.")] = "csv",
    method: Annotated[str, typer.Option(help="per_user (exact walk, the default data) or vectorised (numpy, for millions of users).")] = "per_user",
) -> None:
    """Write the embedded synthetic behaviour log (users with planted multiple interests)."""
    from data.synthetic import SyntheticConfig, generate as gen

    if format not in ("csv", "parquet"):
        _fail(f"--format must be csv or parquet, got {format!r}")
    if method not in ("per_user", "vectorised"):
        _fail(f"--method must be per_user or vectorised, got {method!r}")
    try:
        config = SyntheticConfig(n_users=users, n_items=items, seed=seed, n_topics=topics, min_len=min_len,
                                 mean_len=mean_len, max_len=max_len, method=method)  # type: ignore[arg-type]
        paths = gen(out, config, fmt=format)  # type: ignore[arg-type]
    except ValueError as err:
        _fail(str(err))
    for name, p in paths.items():
        typer.echo(f"{name}: {p}")


@app.command()
@clean_errors
def train(
    interactions: Interactions,
    out: Annotated[Path, typer.Option(help="Model bundle directory to write.")],
    items: Items = None,
    users: Users = None,
    user_col: Annotated[str, typer.Option(help="User id column.")] = "user_id",
    item_col: Annotated[str, typer.Option(help="Item id column.")] = "item_id",
    time_col: Annotated[str, typer.Option(help="Timestamp column (numeric).")] = "timestamp",
    item_features: Annotated[Optional[str], typer.Option(help="Comma-separated item feature columns (default: all but id and title).")] = None,
    user_features: Annotated[Optional[str], typer.Option(help="Comma-separated profile columns (default: all but id).")] = None,
    interests: Annotated[int, typer.Option("--interests", "-k", min=1, help="K: most interest vectors per user.")] = 4,
    dim: Annotated[int, typer.Option(min=2, help="D: embedding size.")] = 64,
    max_len: Annotated[int, typer.Option(min=1, help="L: behaviours fed to the routing.")] = 50,
    routing_iters: Annotated[int, typer.Option(min=1, help="Dynamic-routing iterations.")] = 3,
    pow: Annotated[float, typer.Option(min=0, help="Label-aware attention power p (0 = mean).")] = 2.0,
    hard_attention: Annotated[bool, typer.Option("--hard-attention/--power-attention", help="Label-aware attention: the best-matching interest (default, best on validation) or softmax(s^p) with --pow.")] = True,
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs.")] = 30,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    lr: Annotated[float, typer.Option(min=0)] = 3e-3,
    negatives: Annotated[int, typer.Option(min=1, help="Sampled negatives per batch.")] = 512,
    neg_alpha: Annotated[float, typer.Option(help="Negatives drawn ∝ frequency^alpha (0 = uniform).")] = 1.0,
    patience: Annotated[int, typer.Option(min=1, help="Early-stopping patience in epochs.")] = 3,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    split_seed: Annotated[int, typer.Option(help="The protocol's user-split seed.")] = 2026,
    merge: Annotated[str, typer.Option(help="Merge of interests for validation: best or share.")] = "best",
    max_steps: Annotated[int, typer.Option(min=0, help="Cap on steps per epoch (smoke runs, benchmarks); 0 = whole epochs.")] = 0,
) -> None:
    """Train MIND on the log's training users; write a model bundle (best validation Recall@50)."""
    from retrieval.data import DataSpec, load_dataset, split_users
    from retrieval.train import TrainConfig, model_config_for, train as run_train

    if merge not in ("best", "share"):
        _fail(f"--merge must be best or share, got {merge!r}")
    spec = DataSpec(interactions, items, users, user_col, item_col, time_col,
                    item_features=_columns(item_features), user_features=_columns(user_features))
    ds = load_dataset(spec)
    split = split_users(ds, split_seed)
    cfg = model_config_for(ds, dim=dim, interests=interests, max_len=max_len, routing_iters=routing_iters,
                           pow=pow, attention="hard" if hard_attention else "power", seed=seed)
    tc = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, negatives=negatives, neg_alpha=neg_alpha,
                     patience=patience, seed=seed, split_seed=split_seed, merge=merge, max_steps=max_steps)
    result = run_train(ds, split, cfg, tc, out=out, data_spec=spec)
    typer.echo(f"bundle: {out}  best epoch {result.best_epoch}  val recall@50 {result.best_recall:.4f}  "
               f"{result.samples_per_s:,.0f} samples/s")


@app.command("build-index")
@clean_errors
def build_index_cmd(
    bundle: Annotated[Path, typer.Option(help="Model bundle from `retrieve train`.")],
    out: Annotated[Path, typer.Option(help="Index directory to write.")],
    factory: Annotated[str, typer.Option(help="faiss index_factory string: Flat (exact), IVF256,Flat, HNSW32 ...")] = "Flat",
    target_recall: Annotated[Optional[float], typer.Option(help="Raise nprobe (IVF) or efSearch (HNSW) until the served top-N of sampled validation users reaches this recall against exact search; the choice is recorded in the manifest and used by query. An index without such a parameter (Flat, PQ) is measured once and must reach it as it is.")] = None,
    tune_users: Annotated[int, typer.Option(min=1, help="Validation users sampled for --target-recall.")] = 1000,
    tune_n: Annotated[int, typer.Option(min=1, help="N of the recall@N that --target-recall measures.")] = 50,
) -> None:
    """Embed every item with the trained model and write a FAISS inner-product index."""
    from index.faiss_index import build_index, save_index
    from index.tuning import check_target_recall, tune_on_validation
    from retrieval.bundle import load_bundle

    if target_recall is not None:
        check_target_recall(target_recall)
    b = load_bundle(bundle)
    vectors = b.model.item_vectors().detach().numpy()
    index = build_index(vectors, factory)
    manifest = {"factory": factory, "bundle_fingerprint": b.fingerprint, "bundle": str(bundle)}
    tuning = None
    if target_recall is not None:
        tuning = tune_on_validation(index, b, vectors, target_recall, n=tune_n, max_users=tune_users)
        manifest.update(tuning.manifest())
    save_index(index, out, manifest)
    typer.echo(f"index: {out}  {factory}  {index.ntotal} items  d={index.d}")
    if tuning is not None:
        setting = f"{tuning.search_param}={tuning.search_value}" if tuning.search_param else "no search parameter"
        typer.echo(f"tuned: {setting}  recall@{tuning.n} {tuning.recall:.4f} against exact search on "
                   f"{tuning.users} validation users (target {tuning.target_recall})")


def _read_users_file(path: Path) -> list[str]:
    if not path.is_file():
        _fail(f"{path}: file not found")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        _fail(f"{path}: no user ids (one per line)")
    return ids


@app.command()
@clean_errors
def query(
    bundle: Annotated[Path, typer.Option(help="Model bundle.")],
    index: Annotated[Path, typer.Option(help="Index built from that bundle.")],
    user: Annotated[Optional[str], typer.Option(help="User id as in the log.")] = None,
    users_file: Annotated[Optional[Path], typer.Option(help="File of user ids, one per line.")] = None,
    n: Annotated[int, typer.Option("-n", min=1, help="Items to return per user.")] = 10,
    merge: Annotated[str, typer.Option(help="Merge of interests: best or share.")] = "best",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    rank: Annotated[Optional[Path], typer.Option("--rank", help="Ranker bundle: rerank the retrieved candidates.")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="M: candidates retrieved for the ranker.")] = 200,
    timings: Annotated[bool, typer.Option("--timings", help="Print where the time went (seconds) as JSON on stderr.")] = False,
) -> None:
    """Top-N items for users, from all their known behaviours (items already seen excluded).

    With --rank, M candidates are retrieved, scored by the ranker, and the top N printed
    with both the retrieval score and the ranking score."""
    clock = _Clock()
    import numpy as np

    from index.faiss_index import load_index
    from retrieval.bundle import load_bundle
    from retrieval.recommend import recommend
    from retrieval.samples import Histories

    clock.lap("imports")
    if (user is None) == (users_file is None):
        _fail("give exactly one of --user or --users-file")
    if merge not in ("best", "share"):
        _fail(f"--merge must be best or share, got {merge!r}")
    b = load_bundle(bundle)
    clock.lap("load_bundle")
    idx, _ = load_index(index, b.fingerprint)
    clock.lap("load_index")
    raw = [user] if user is not None else _read_users_file(users_file)  # type: ignore[arg-type]
    ds = b.dataset
    uidx = np.array([ds.user_index(u) for u in raw], dtype=np.int64)
    ends = ds.lengths()[uidx]
    hist = Histories.of(ds, uidx, ends)
    rec = recommend(b.model, ds, idx, hist, candidates if rank else n, merge=merge)  # type: ignore[arg-type]
    clock.lap("search")
    rank_scores = None
    if rank is not None:
        from retrieval.ranking.bundle import load_ranker
        from retrieval.ranking.scoring import rerank

        ranker = load_ranker(rank, b)
        order, logits = rerank(ranker.model, ds, hist, rec.items, rec.scores)  # each item's retrieval score and interest follow it
        order = order[:, :n]
        rec.items, rec.scores, rec.interest = (np.take_along_axis(x, order, 1) for x in (rec.items, rec.scores, rec.interest))
        rank_scores = logits[:, :n]
        clock.lap("rank")
    results = []
    for r, u in enumerate(raw):
        rows = []
        for rank_pos, (i, s, k) in enumerate(zip(rec.items[r], rec.scores[r], rec.interest[r]), 1):
            if i == 0:
                break
            row = {"rank": rank_pos, "item": str(ds.item_ids[i]), "score": round(float(s), 6), "interest": int(k)}
            if rank_scores is not None:
                row["rank_score"] = round(float(rank_scores[r, rank_pos - 1]), 6)
            if ds.titles is not None:
                row["title"] = str(ds.titles[i])
            rows.append(row)
        results.append({"user": u, "history": int(ds.lengths()[uidx[r]]), "items": rows})
    if as_json:
        typer.echo(json.dumps(results if users_file else results[0], indent=2, ensure_ascii=False))
    else:
        _print_results(results, ranked=rank is not None)
    clock.lap("print")
    if timings:
        typer.echo("timings: " + json.dumps(clock.report()), err=True)


def _print_results(results: list[dict[str, Any]], ranked: bool) -> None:
    """The query results as one table per user."""
    for res in results:
        typer.echo(f"user {res['user']}  ({res['history']} behaviours)")
        typer.echo(f"{'rank':>4}  {'item':<12} {'score':>9}  " + (f"{'rank_score':>10}  " if ranked else "")
                   + f"{'interest':>8}  title")
        for row in res["items"]:
            extra = f"{row['rank_score']:>10.4f}  " if ranked else ""
            typer.echo(f"{row['rank']:>4}  {row['item']:<12} {row['score']:>9.4f}  {extra}{row['interest']:>8}  "
                       f"{row.get('title', '')}")


@app.command()
@clean_errors
def evaluate(
    bundle: Annotated[Path, typer.Option(help="MIND model bundle.")],
    index: Annotated[Optional[Path], typer.Option(help="Index built from the bundle (default: exact search in memory).")] = None,
    k1_bundle: Annotated[Optional[Path], typer.Option(help="The same MIND trained with --interests 1, as a baseline.")] = None,
    part: Annotated[str, typer.Option(help="Held-out users: test or validation.")] = "test",
    out: Annotated[Optional[Path], typer.Option(help="JSON report to write.")] = None,
    ranker: Annotated[Optional[Path], typer.Option(help="Ranker bundle: add AUC / GAUC and two-stage metrics.")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="M: candidates the ranker reorders.")] = 200,
) -> None:
    """Recall / HitRate / NDCG @20 and @50 of MIND and its baselines on held-out users (the protocol).

    With --ranker, also the ranker's standalone AUC and GAUC and the two-stage
    (retrieve M, rerank) metrics beside the retrieval order on the same users."""
    from index.faiss_index import load_index
    from retrieval.artifacts import atomic_write_json
    from retrieval.bundle import load_bundle
    from retrieval.evaluate import evaluate_bundles, format_table

    if part not in ("test", "validation"):
        _fail(f"--part must be test or validation, got {part!r}")
    b = load_bundle(bundle)
    idx = load_index(index, b.fingerprint)[0] if index else None
    k1 = load_bundle(k1_bundle) if k1_bundle else None
    if ranker is not None:  # a bad ranker fails before the retrieval evaluation, not after it
        from retrieval.ranking.bundle import load_ranker

        rb = load_ranker(ranker, b)
    report = evaluate_bundles(b, idx, k1, part)
    if ranker is not None:
        from index.faiss_index import build_index
        from retrieval.ranking.evaluate import evaluate_ranker

        index_for_ranker = idx if idx is not None else build_index(b.model.item_vectors().detach().numpy(), "Flat")
        report["ranker"] = {"model": rb.name, "bundle": str(ranker),
                            **evaluate_ranker(rb.model, b.dataset, b.split, b.model, index_for_ranker, part, candidates)}
    if out:
        atomic_write_json(out, report)
    typer.echo(f"{report['dataset']}  split seed {report['split_seed']}  {part} users {report['users']}  "
               f"K={report['K']} L={report['L']} D={report['dim']}  merge chosen on validation: "
               f"{report['merge_chosen_on_validation']}")
    typer.echo(format_table(report))
    if "ranker" in report:
        r = report["ranker"]
        typer.echo(f"ranker {r['model']}: AUC {r['standalone']['auc']:.4f}  GAUC {r['standalone']['gauc']:.4f}  "
                   f"log loss {r['standalone']['log_loss']:.4f}  retrieval weight {r['retrieval_weight']:g}  "
                   f"({r['candidates_per_s']:,.0f} candidates/s)")
        for stage in ("retrieval_only", "two_stage", "two_stage_ranker_only"):
            typer.echo(f"  {stage:<15}" + "  ".join(f"{k} {v:.4f}" for k, v in r[stage].items()))
    if out:
        typer.echo(f"report: {out}")


@app.command("train-ranker")
@clean_errors
def train_ranker_cmd(
    bundle: Annotated[Path, typer.Option(help="Retrieval bundle: its data, split and (for hard negatives) model.")],
    out: Annotated[Path, typer.Option(help="Ranker bundle directory to write.")],
    model: Annotated[str, typer.Option(help="Ranker: din, dmin, dien, dsin or base (embedding + MLP).")] = "din",
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs; early stopping usually ends sooner.")] = 50,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    lr: Annotated[float, typer.Option(min=0)] = 1e-3,
    negatives: Annotated[int, typer.Option(min=1, help="Negatives per positive.")] = 1,
    negative_source: Annotated[str, typer.Option(help="uniform (never-touched items, mixed by --hard-share) or retrieval (every negative from the retriever's top-M).")] = "uniform",
    hard_share: Annotated[float, typer.Option(min=0, max=1, help="Share of negatives drawn from the retriever's top-M candidates the user did not take; the rest uniform.")] = 0.0,
    candidates: Annotated[int, typer.Option(min=1, help="M: retrieval candidates per user (hard negatives, two-stage validation).")] = 200,
    dim: Annotated[int, typer.Option(min=2, help="Embedding size per field.")] = 16,
    max_len: Annotated[int, typer.Option(min=1)] = 50,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without a better validation figure before stopping.")] = 3,
    monitor: Annotated[str, typer.Option(help="Validation figure early stopping follows: auc, gauc or ndcg@20 (two-stage).")] = "auc",
    fuse: Annotated[bool, typer.Option("--fuse/--no-fuse", help="Choose the weight of the retrieval score in the served order on validation users.")] = True,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a second-stage ranker on the retrieval bundle's training users, to convergence on validation users."""
    from retrieval.bundle import load_bundle
    from retrieval.ranking.bundle import save_ranker
    from retrieval.ranking.models import NAMES
    from retrieval.ranking.train import MONITORS, RankTrainConfig, retrieval_candidates, train_ranker

    if model not in NAMES:
        _fail(f"--model must be one of {', '.join(NAMES)}, got {model!r}")
    if negative_source not in ("uniform", "retrieval"):
        _fail(f"--negative-source must be uniform or retrieval, got {negative_source!r}")
    if monitor not in MONITORS:
        _fail(f"--monitor must be one of {', '.join(MONITORS)}, got {monitor!r}")
    b = load_bundle(bundle)
    cfg = RankTrainConfig(model=model, epochs=epochs, batch_size=batch_size, lr=lr, negatives=negatives,
                          negative_source=negative_source, hard_share=hard_share, retrieval_m=candidates,
                          patience=patience, monitor=monitor, fuse=fuse, seed=seed, dim=dim, max_len=max_len)
    rc = retrieval_candidates(b.model, b.dataset, b.split, candidates) if cfg.needs_retrieval else None

    def save(m, history, fusion=None):  # rewrite the best ranker so far, atomically
        save_ranker(out, m, model, cfg, b, extra={"history": history, "best_val_auc": max(h["val_auc"] for h in history),
                                                  **({"fusion": fusion} if fusion else {})})

    result = train_ranker(b.dataset, b.split, cfg, retrieval=rc, on_improve=save)
    save(result.model, result.history, result.fusion)
    typer.echo(f"ranker: {out}  {model}  best epoch {result.best_epoch} of {len(result.history)}  "
               + "  ".join(f"{k} {v:.4f}" for k, v in result.best.items())
               + (f"  retrieval weight {result.fusion['weight']:g}" if result.fusion else "")
               + f"  {result.samples_per_s:,.0f} samples/s")


@app.command()
@clean_errors
def experiment(
    interactions: Interactions,
    out: Annotated[Path, typer.Option(help="JSON report to write.")],
    items: Items = None,
    users: Users = None,
    user_col: Annotated[str, typer.Option(help="User id column.")] = "user_id",
    item_col: Annotated[str, typer.Option(help="Item id column.")] = "item_id",
    time_col: Annotated[str, typer.Option(help="Timestamp column (numeric).")] = "timestamp",
    user_features: Annotated[Optional[str], typer.Option(help="Comma-separated profile columns.")] = None,
    item_features: Annotated[Optional[str], typer.Option(help="Comma-separated item feature columns.")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated split seeds.")] = "2026,2027,2028,2029,2030",
    interests: Annotated[int, typer.Option("--interests", "-k", min=1)] = 4,
    dim: Annotated[int, typer.Option(min=2)] = 64,
    max_len: Annotated[int, typer.Option(min=1)] = 50,
    pow: Annotated[float, typer.Option(min=0)] = 2.0,
    hard_attention: Annotated[bool, typer.Option("--hard-attention/--power-attention")] = True,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    lr: Annotated[float, typer.Option(min=0)] = 3e-3,
    negatives: Annotated[int, typer.Option(min=1)] = 512,
    neg_alpha: Annotated[float, typer.Option()] = 1.0,
    patience: Annotated[int, typer.Option(min=1)] = 3,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """MIND (K), MIND (K=1), item-KNN and popularity over several split seeds: mean ± std."""
    from retrieval.artifacts import atomic_write_json
    from retrieval.data import DataSpec, load_dataset
    from retrieval.evaluate import format_table
    from retrieval.experiment import run_experiment
    from retrieval.train import TrainConfig

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        _fail(f"--seeds must be comma-separated integers, got {seeds!r}")
    spec = DataSpec(interactions, items, users, user_col, item_col, time_col,
                    item_features=_columns(item_features), user_features=_columns(user_features))
    ds = load_dataset(spec)
    settings = {"interests": interests, "dim": dim, "max_len": max_len, "pow": pow,
                "attention": "hard" if hard_attention else "power", "seed": seed}
    tc = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, negatives=negatives, neg_alpha=neg_alpha,
                     patience=patience, seed=seed)
    report = run_experiment(ds, spec, seed_list, settings, tc)
    atomic_write_json(out, report)
    typer.echo(f"{report['dataset']}  seeds {seed_list}  K={interests} L={max_len} D={dim}  "
               f"wall {report['wall_time_s']:.0f}s")
    typer.echo(format_table(report))
    typer.echo(f"report: {out}")


@app.command("experiment-rankers")
@clean_errors
def experiment_rankers(
    interactions: Interactions,
    out: Annotated[Path, typer.Option(help="JSON report to write.")],
    items: Items = None,
    users: Users = None,
    user_features: Annotated[Optional[str], typer.Option(help="Comma-separated profile columns.")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated split seeds.")] = "2026,2027,2028,2029,2030",
    rankers: Annotated[str, typer.Option(help="Comma-separated rankers or variants (name:key=value;key=value).")] = (
        "base,din,dmin,dien,dsin"),
    epochs: Annotated[int, typer.Option(min=1, help="Most ranker epochs; early stopping usually ends sooner.")] = 50,
    patience: Annotated[int, typer.Option(min=1, help="Ranker epochs without a better validation figure before stopping.")] = 3,
    monitor: Annotated[str, typer.Option(help="Validation figure the rankers' early stopping follows: auc, gauc or ndcg@20.")] = "auc",
    negatives: Annotated[int, typer.Option(min=1, help="Negatives per positive.")] = 1,
    hard_share: Annotated[float, typer.Option(min=0, max=1, help="Share of negatives from the retriever's top-M.")] = 0.0,
    candidates: Annotated[int, typer.Option(min=1, help="M: retrieval candidates reranked.")] = 200,
    seed: Annotated[int, typer.Option()] = 0,
    jobs: Annotated[int, typer.Option(min=1, help="Seeds run side by side, one torch thread each (timings then per job).")] = 1,
) -> None:
    """Every ranker (and variants) over several split seeds: AUC, GAUC, log loss, two-stage NDCG, speed (mean ± std)."""
    from retrieval.artifacts import atomic_write_json
    from retrieval.data import DataSpec, load_dataset
    from retrieval.ranking.experiment import format_ranker_table, parse_variant, run_ranker_experiment, variant_config
    from retrieval.ranking.models import ranker_config
    from retrieval.ranking.train import MONITORS, RankTrainConfig
    from retrieval.train import TrainConfig

    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        variants = [v for v in rankers.split(",") if v.strip()]
        for v in variants:
            parse_variant(v)
    except ValueError as err:
        _fail(str(err) if "ranker" in str(err) else f"--seeds must be comma-separated integers, got {seeds!r}")
    if monitor not in MONITORS:
        _fail(f"--monitor must be one of {', '.join(MONITORS)}, got {monitor!r}")
    spec = DataSpec(interactions, items, users, user_features=_columns(user_features))
    ds = load_dataset(spec)
    rank_train = RankTrainConfig(epochs=epochs, patience=patience, monitor=monitor, negatives=negatives,
                                 hard_share=hard_share, retrieval_m=candidates, seed=seed)
    for v in variants:  # a bad setting fails now, not after hours of training
        try:
            cfg = variant_config(rank_train, *parse_variant(v)[1:])
            ranker_config(cfg.model, ds, **cfg.settings)
        except (ValueError, TypeError) as err:
            _fail(f"ranker {v!r}: {err}")
    report = run_ranker_experiment(ds, spec, seed_list, variants, {"seed": seed}, TrainConfig(seed=seed),
                                   rank_train, m=candidates, jobs=jobs,
                                   on_seed=lambda partial: atomic_write_json(out, partial))
    atomic_write_json(out, report)
    typer.echo(format_ranker_table(report))
    typer.echo(f"report: {out}")


if __name__ == "__main__":
    app()
