"""`retrieve`: train MIND on a behaviour log, build a FAISS item index, query it, evaluate offline.

The CLI only parses arguments, calls the library and prints. Bad input ends with one
line on stderr and exit code 2, never a traceback. A command that writes claims its
--out first (`_claim`), before any work: see retrieval/artifacts.py for what it may
replace.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Optional

import typer

if TYPE_CHECKING:
    from retrieval.device import Runtime
    from retrieval.distributed import Group

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
log = logging.getLogger("retrieve")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


_outputs: contextvars.ContextVar[contextlib.ExitStack] = contextvars.ContextVar("_outputs")


def _claim(out: Path, kind: str, inputs: tuple[Optional[Path], ...] = (), force: bool = False) -> None:
    """Claim the command's output before any work (`retrieval.artifacts.claim_output`): a bad
    --out fails here at no cost, and the lock is held until the command ends."""
    from retrieval.artifacts import claim_output

    _outputs.get().enter_context(claim_output(out, kind, inputs, force))


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's RetrievalError, or an OS error on a path (an --out under a file, no
    permission, disk full), into one line on stderr and exit code 2; release the outputs the
    command claimed when it ends, however it ends."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from retrieval.errors import RetrievalError

        try:
            with contextlib.ExitStack() as outputs:
                token = _outputs.set(outputs)
                try:
                    return fn(*args, **kwargs)
                finally:
                    _outputs.reset(token)
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


def _non_negative(value: float) -> float:
    """A float option's check: typer's own min= lets NaN through (and names the bound instead)."""
    if not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"must be a finite number >= 0, got {value}")
    return value


def _share(value: float) -> float:
    """A share option's check: a finite number in (0, 1]."""
    if not (math.isfinite(value) and 0 < value <= 1):
        raise typer.BadParameter(f"must be a number in (0, 1], got {value}")
    return value


NEG_ALPHA_MAX = 4.0  # |alpha| beyond this puts every draw on a few items (and (count + 1)^alpha overflows)


def _neg_alpha(value: float) -> float:
    if not (math.isfinite(value) and abs(value) <= NEG_ALPHA_MAX):
        raise typer.BadParameter(f"must be a finite number in [-{NEG_ALPHA_MAX:g}, {NEG_ALPHA_MAX:g}], got {value}")
    return value


def _interests(value: str) -> str:
    """--interests: a positive K, or auto (train K = 1, 2, 4, 8 and keep the best on validation)."""
    text = value.strip().lower()
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise typer.BadParameter(f"must be a positive integer or auto, got {value!r}")
    return text


def _interest_count(value: str) -> Optional[int]:
    """K from a checked --interests value, None for auto."""
    return None if value == "auto" else int(value)


def _model_settings(extractor: str, **settings: Any) -> dict[str, Any]:
    """The settings the extractor's config takes: routing's own fields are dropped for the others."""
    if extractor != "routing":
        for name in ("routing_iters", "routing_grad"):
            settings.pop(name, None)
    return settings


def _attention(extractor: str, attention: Optional[str]) -> str:
    """--attention, or the extractor's own default when not given (MIND: max)."""
    from retrieval.retrievers import retriever_classes

    if attention is not None:
        return attention
    _, config_cls = retriever_classes(extractor)
    return next(f.default for f in dataclasses.fields(config_cls) if f.name == "attention")


def _data_spec(interactions: Path, items: Optional[Path], users: Optional[Path], user_col: str, item_col: str,
               time_col: str, item_features: Optional[str], user_features: Optional[str]) -> Any:
    from retrieval.data import DataSpec

    return DataSpec(interactions, items, users, user_col, item_col, time_col,
                    item_features=_columns(item_features), user_features=_columns(user_features))


SEED_MAX = 2**32 - 1  # seeds numpy and torch both take


def _seed_list(text: str) -> list[int]:
    """--seeds: comma-separated split seeds, at least one, each in [0, SEED_MAX], none twice."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        _fail(f"--seeds must be comma-separated integers, got {text!r}")
    if not seeds:
        _fail(f"--seeds names no split seed, got {text!r}; give at least one, e.g. 2026")
    for s in seeds:
        if not 0 <= s <= SEED_MAX:
            _fail(f"--seeds must be integers in [0, {SEED_MAX}], got {s}")
    if len(set(seeds)) < len(seeds):
        _fail(f"--seeds repeats a seed, got {text!r}")
    return seeds


# Options shared by several commands, declared once. The choices mirror the library's
# Literal types (data.synthetic.Format / Method, retrieval.ranking.models.RankerName);
# tests/test_misuse.py checks they agree. Typer validates and lists them.
Interactions = Annotated[Path, typer.Option(help="Interaction log (CSV or Parquet): user, item, timestamp.")]
Items = Annotated[Optional[Path], typer.Option(help="Item side file: id, optional title, feature columns.")]
Users = Annotated[Optional[Path], typer.Option(help="User-profile file: id and profile columns.")]
UserCol = Annotated[str, typer.Option(help="User id column.")]
ItemCol = Annotated[str, typer.Option(help="Item id column.")]
TimeCol = Annotated[str, typer.Option(help="Timestamp column (numeric).")]
ItemFeatures = Annotated[Optional[str], typer.Option(help="Comma-separated item feature columns of --items (default: all but id and title).")]
UserFeatures = Annotated[Optional[str], typer.Option(help="Comma-separated profile columns of --users (default: all but id).")]
Interests = Annotated[str, typer.Option("--interests", "-k", callback=_interests, help="K: most interest vectors per user, or auto: train K = 1, 2, 4, 8 and keep the best on validation users (every K's figures go in the bundle or report).")]
Extractor = Annotated[Literal["routing", "self-attention"], typer.Option(help="Interest extractor: routing (MIND's B2I dynamic routing) or self-attention (ComiRec-SA).")]
HardNegatives = Annotated[float, typer.Option(callback=_non_negative, help="REMI's beta: sampled negatives reweighted by exp(beta * logit), so hard ones count more (0 = off).")]
PeakPenalty = Annotated[float, typer.Option(callback=_non_negative, help="REMI's lambda: routing regularisation against interests whose behaviour weights peak on few behaviours (0 = off). With --extractor routing it needs --routing-grad.")]
RoutingGrad = Annotated[bool, typer.Option("--routing-grad/--no-routing-grad", help="Let gradients through MIND's routing logits (not in the paper; without it --peak-penalty changes nothing on routing).")]
TargetWindow = Annotated[int, typer.Option(min=1, help="W: each training window's target is drawn from the next W behaviours (1 = the next item).")]
RecentTargets = Annotated[float, typer.Option(callback=_share, help="Share of the training period whose behaviours are targets: the most recent part (1 = all), each with its whole history.")]
Dim = Annotated[int, typer.Option(min=2, help="D: embedding size.")]
MaxLen = Annotated[int, typer.Option(min=1, help="L: behaviours fed to the routing.")]
Pow = Annotated[float, typer.Option(callback=_non_negative, help="Label-aware attention power p (0 = mean).")]
Attention = Annotated[Optional[Literal["max", "hard", "power"]], typer.Option(help="How training reads the interests: max (every candidate, the target and each negative, scored by its best interest, as the best-score merge serves; routing's default), hard (the label-aware attention's best-matching interest for the target, the paper's p -> infinity; self-attention's default) or power (softmax(s^p) with --pow).")]
Epochs = Annotated[int, typer.Option(min=1, help="Most epochs.")]
BatchSize = Annotated[int, typer.Option(min=1)]
Lr = Annotated[float, typer.Option(callback=_non_negative, help="Adam learning rate.")]
Negatives = Annotated[int, typer.Option(min=0, help="Sampled negatives per batch; 0 = every item (full softmax, no log-Q).")]
NegAlpha = Annotated[float, typer.Option(callback=_neg_alpha, help="Negatives drawn ∝ (frequency + 1)^alpha, alpha in [-4, 4] (0 = uniform, 1 = by popularity).")]
Patience = Annotated[int, typer.Option(min=1, help="Early-stopping patience in epochs.")]
Seed = Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Training seed.")]
SplitSeed = Annotated[int, typer.Option(min=0, max=SEED_MAX, help="The protocol's user-split seed.")]
Seeds = Annotated[str, typer.Option(help="Comma-separated split seeds.")]
SplitKind = Annotated[Literal["user", "time"], typer.Option("--split", help="user (the protocol's split by user) or time (train on everything before the 0.8 quantile of timestamps, evaluate after it).")]
Merge = Annotated[Literal["best", "share"], typer.Option(help="Merge of the interests' results: best (each item's best score) or share (slots per interest).")]
Part = Annotated[Literal["test", "validation"], typer.Option(help="Held-out users: test or validation.")]
RankerModel = Annotated[Literal["base", "din", "dmin", "dien", "dsin"], typer.Option(help="Ranker: din, dmin, dien, dsin or base (embedding + MLP).")]
NegativeSource = Annotated[Literal["uniform", "retrieval"], typer.Option(help="uniform (never-touched items, mixed with the retriever's top-M by --hard-share) or retrieval (every negative from the retriever's top-M).")]
RankMonitor = Annotated[Literal["auc", "gauc", "ndcg@20"], typer.Option(help="Validation figure the rankers' early stopping follows: auc, gauc or ndcg@20 (two-stage).")]
DataFormat = Annotated[Literal["csv", "parquet"], typer.Option("--format", help="File format.")]
GenerateMethod = Annotated[Literal["per_user", "vectorised"], typer.Option(help="per_user (exact walk, the default data) or vectorised (numpy, for millions of users).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an artifact of another kind at --out (never a directory or file that is not an artifact, nor an input).")]
# Where a command runs (retrieval.device: DeviceName, Precision); the training commands also take precision and compile.
Device = Annotated[Literal["auto", "cpu", "cuda"], typer.Option(help="auto (cuda when PyTorch sees a GPU, else cpu), cpu or cuda.")]
Precision = Annotated[Literal["fp32", "bf16"], typer.Option(help="fp32, or bf16: the training loss under bf16 autocast (weights and optimizer stay fp32).")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the training loss (pays off on GPUs; the first steps compile).")]
Threads = Annotated[int, typer.Option(min=0, help="Torch threads per process (0 = torch's default; torchrun sets 1).")]
# Checkpoints and resumption of training (retrieval.checkpoint).
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint of an interrupted run with the same settings (a fresh start when there is none yet).")]
CheckpointEvery = Annotated[int, typer.Option(min=0, help="Also checkpoint every this many steps inside an epoch (0 = at each epoch's end only).")]
Checkpoint = Annotated[Optional[Path], typer.Option(help="Checkpoint file (default: OUT.ckpt beside the bundle; removed when the run ends).")]


@contextlib.contextmanager
def _runtime(device: str, precision: str = "fp32", compile: bool = False) -> Iterator[tuple["Runtime", "Group"]]:
    """The command's device settings, inside the process group when torchrun started several
    processes (gloo on CPU, NCCL on GPU); ranks other than 0 log warnings only."""
    from retrieval.device import runtime_for
    from retrieval.distributed import init_from_env, local_rank, shutdown

    runtime = runtime_for(device, precision, compile, local_rank())
    group = init_from_env(runtime.device)
    if not group.main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield runtime, group
    finally:
        shutdown()


def _claim_on_main(group: "Group", out: Path, kind: str, inputs: tuple[Optional[Path], ...], force: bool) -> None:
    """_claim on rank 0, which alone writes; its refusal is raised on every rank."""
    from retrieval.distributed import from_main

    from_main(lambda: _claim(out, kind, inputs, force), group)


def _checkpointing(out: Path, checkpoint: Optional[Path], every: int, resume: bool) -> Any:
    from retrieval.checkpoint import Checkpointing, default_path

    return Checkpointing(checkpoint or default_path(out), every, resume)


@app.command()
@clean_errors
def generate(
    out: Annotated[Path, typer.Option(help="Directory for interactions, items and users (.csv or .parquet) and planted.json.")] = Path("runs/demo/data"),
    users: Annotated[int, typer.Option(min=10, help="Number of users.")] = 2000,
    items: Annotated[int, typer.Option(min=50, help="Number of items.")] = 3000,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Generator seed.")] = 0,
    topics: Annotated[int, typer.Option(min=1, help="Planted item topics.")] = 40,
    min_len: Annotated[int, typer.Option(min=1, help="Fewest behaviours per user.")] = 20,
    mean_len: Annotated[float, typer.Option(min=1, help="Mean behaviours per user (before clipping).")] = 60.0,
    max_len: Annotated[int, typer.Option(min=1, help="Most behaviours per user.")] = 150,
    format: DataFormat = "csv",
    method: GenerateMethod = "per_user",
    force: Force = False,
) -> None:
    """Write the embedded synthetic behaviour log (users with planted multiple interests)."""
    from data.synthetic import KIND, SyntheticConfig, generate as gen

    try:
        config = SyntheticConfig(n_users=users, n_items=items, seed=seed, n_topics=topics, min_len=min_len,
                                 mean_len=mean_len, max_len=max_len, method=method)
    except ValueError as err:
        _fail(str(err))
    _claim(out, KIND, force=force)
    paths = gen(out, config, fmt=format)
    for name, p in paths.items():
        typer.echo(f"{name}: {p}")


@app.command()
@clean_errors
def train(
    interactions: Interactions,
    out: Annotated[Path, typer.Option(help="Model bundle directory to write.")],
    items: Items = None,
    users: Users = None,
    user_col: UserCol = "user_id",
    item_col: ItemCol = "item_id",
    time_col: TimeCol = "timestamp",
    item_features: ItemFeatures = None,
    user_features: UserFeatures = None,
    interests: Interests = "4",
    extractor: Extractor = "routing",
    dim: Dim = 64,
    max_len: MaxLen = 50,
    routing_iters: Annotated[int, typer.Option(min=1, help="Dynamic-routing iterations.")] = 3,
    pow: Pow = 2.0,
    attention: Attention = None,
    epochs: Epochs = 30,
    batch_size: BatchSize = 256,
    lr: Lr = 3e-3,
    negatives: Negatives = 512,
    neg_alpha: NegAlpha = 1.0,
    patience: Patience = 3,
    seed: Seed = 0,
    split_seed: SplitSeed = 2026,
    split: SplitKind = "user",
    merge: Merge = "best",
    max_steps: Annotated[int, typer.Option(min=0, help="Cap on steps per epoch (smoke runs, benchmarks); 0 = whole epochs.")] = 0,
    hard_negatives: HardNegatives = 0.0,
    peak_penalty: PeakPenalty = 0.0,
    routing_grad: RoutingGrad = False,
    target_window: TargetWindow = 1,
    recent_targets: RecentTargets = 1.0,
    force: Force = False,
    threads: Threads = 0,
    device: Device = "auto",
    precision: Precision = "fp32",
    compile: Compile = False,
    resume: Resume = False,
    checkpoint_every: CheckpointEvery = 0,
    checkpoint: Checkpoint = None,
) -> None:
    """Train a multi-interest retriever (MIND by default) on the log's training data; write a
    model bundle (best validation Recall@50).

    Under torchrun (`torchrun --nproc_per_node=N -m cli train ...`) the processes train one
    model data-parallel: --batch-size is the global batch, rank 0 validates and writes."""
    from retrieval.bundle import KIND
    from retrieval.data import load_dataset, make_split
    from retrieval.train import TrainConfig, model_config_for, search_interests, train as run_train

    k = _interest_count(interests)
    spec = _data_spec(interactions, items, users, user_col, item_col, time_col, item_features, user_features)
    if k is None and resume:
        _fail("--resume continues one training run; --interests auto trains several (give one K)")
    with _runtime(device, precision, compile) as (runtime, group):
        _claim_on_main(group, out, KIND, (interactions, items, users), force)
        ds = load_dataset(spec)
        split_kind, split = split, make_split(ds, split, split_seed)
        settings = _model_settings(extractor, dim=dim, interests=k or 1, max_len=max_len, pow=pow,
                                   attention=_attention(extractor, attention), seed=seed,
                                   hard_negatives=hard_negatives, peak_penalty=peak_penalty,
                                   routing_iters=routing_iters, routing_grad=routing_grad)
        cfg = model_config_for(ds, extractor, **settings)
        tc = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, negatives=negatives, neg_alpha=neg_alpha,
                         patience=patience, seed=seed, split_seed=split_seed, split=split_kind, merge=merge,
                         threads=threads, max_steps=max_steps, target_window=target_window,
                         recent_targets=recent_targets)
        if k is None:
            search = search_interests(ds, split, cfg, tc, out=out, data_spec=spec, runtime=runtime)
            if group.main:
                for kk, f in search.figures.items():
                    typer.echo(f"K={kk}  val recall@50 {f['val_recall@50']:.4f}  ndcg@50 {f['val_ndcg@50']:.4f}  "
                               f"best epoch {f['best_epoch']}" + ("  <- chosen" if kk == search.k else ""))
            result = search.best
        else:
            result = run_train(ds, split, cfg, tc, out=out, data_spec=spec, runtime=runtime,
                               checkpointing=_checkpointing(out, checkpoint, checkpoint_every, resume))
        if group.main:
            typer.echo(f"bundle: {out}  best epoch {result.best_epoch}  val recall@50 {result.best_recall:.4f}  "
                       f"{result.samples_per_s:,.0f} samples/s" + (f"  ({group.world} processes)" if group.parallel else ""))


@app.command("build-index")
@clean_errors
def build_index_cmd(
    bundle: Annotated[Path, typer.Option(help="Model bundle from `retrieve train`.")],
    out: Annotated[Path, typer.Option(help="Index directory to write.")],
    factory: Annotated[str, typer.Option(help="faiss index_factory string: Flat (exact), IVF256,Flat, HNSW32 ...")] = "Flat",
    target_recall: Annotated[Optional[float], typer.Option(help="Raise nprobe (IVF) or efSearch (HNSW) until the served top-N of sampled validation users reaches this recall against exact search; the choice is recorded in the manifest and used by query. An index without such a parameter (Flat, PQ) is measured once and must reach it as it is.")] = None,
    tune_users: Annotated[int, typer.Option(min=1, help="Validation users sampled for --target-recall.")] = 1000,
    tune_n: Annotated[int, typer.Option(min=1, help="N of the recall@N that --target-recall measures.")] = 50,
    channels: Annotated[bool, typer.Option("--channels/--no-channels", help="The merged retriever (the default): MIND's interests, item-kNN over the history and an item-popularity prior, its table size and weights chosen on validation users and stored with the index (query, evaluate and serve then use it). --no-channels: MIND alone.")] = True,
    knn_k: Annotated[str, typer.Option(help="With --channels: neighbours per item in the item-kNN table, comma-separated sizes, the best on validation users kept.")] = "50,100,200",
    force: Force = False,
) -> None:
    """Embed every item with the trained model and write a FAISS inner-product index (with the
    merged retriever's channels unless --no-channels)."""
    from index.build import build_bundle_index
    from index.faiss_index import KIND, save_index
    from index.tuning import check_target_recall
    from retrieval.bundle import load_bundle

    if target_recall is not None:
        check_target_recall(target_recall)
    knn_sizes = _knn_sizes(knn_k)
    _claim(out, KIND, (bundle,), force)
    b = load_bundle(bundle)

    def setting(done: int, total: int) -> None:
        typer.echo(f"channels: setting {done}/{total} tried on validation users", err=True)

    built = build_bundle_index(b, str(bundle), factory, channels=channels, knn_k=knn_sizes,
                               target_recall=target_recall, tune_users=tune_users, tune_n=tune_n, on_setting=setting)
    save_index(built.index, out, built.manifest, files=built.files)
    typer.echo(f"index: {out}  {factory}  {built.index.ntotal} items  d={built.index.d}")
    if built.chosen is not None:
        ch, tuned = built.chosen.channels, built.chosen.tuned
        at = [t for t in tuned.trials if (t["prior"], t["item_knn"]) == (ch.weights.prior, ch.weights.item_knn)][0]
        half = "" if ch.halflife is None else f", prior half-life {ch.halflife:.4g}"
        typer.echo(f"channels: prior weight {ch.weights.prior:.4g}, item-kNN weight {ch.weights.item_knn:.3g} "
                   f"(k={ch.neighbours.k}, decay {ch.decay:.3g}{half}), chosen on {tuned.users} validation users: "
                   f"recall@{tune_n} {at[f'recall@{tune_n}']:.4f}")
    if built.tuning is not None:
        tuning = built.tuning
        setting_ = f"{tuning.search_param}={tuning.search_value}" if tuning.search_param else "no search parameter"
        typer.echo(f"tuned: {setting_}  recall@{tuning.n} {tuning.recall:.4f} against exact search on "
                   f"{tuning.users} validation users (target {tuning.target_recall})")


def _knn_sizes(knn_k: str) -> list[int]:
    """--knn-k: comma-separated positive neighbour-table sizes."""
    try:
        sizes = [int(k) for k in knn_k.split(",") if k.strip()]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        _fail(f"--knn-k must be comma-separated positive integers, got {knn_k!r}")
    return sizes


def _read_users_file(path: Path) -> list[str]:
    if not path.is_file():
        _fail(f"{path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        _fail(f"{path}: not a text file of user ids (one per line)")
    ids = [line.strip() for line in text.splitlines() if line.strip()]
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
    history: Annotated[Optional[str], typer.Option("--history", help="Comma-separated item ids, oldest first: new behaviours appended to --user's stored ones, or alone a new user's. Ids not in the vocabulary are dropped (and listed); with none left, the most popular items are returned.")] = None,
    n: Annotated[int, typer.Option("-n", min=1, help="Items to return per user.")] = 10,
    merge: Merge = "best",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    rank: Annotated[Optional[Path], typer.Option("--rank", help="Ranker bundle: rerank the retrieved candidates.")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="M: candidates retrieved for the ranker.")] = 200,
    explain: Annotated[bool, typer.Option("--explain", help="Name the behaviours behind each item (those with the largest routing weight into the interest that retrieved it).")] = False,
    timings: Annotated[bool, typer.Option("--timings", help="Print where the time went (seconds) as JSON on stderr.")] = False,
    device: Device = "auto",
) -> None:
    """Top-N items for users, from all their known behaviours (items already seen excluded).

    With --rank, M candidates are retrieved, scored by the ranker, and the top N printed
    with both the retrieval score and the ranking score. The model reads the most recent L
    behaviours of a history (stored and new)."""
    clock = _Clock()
    from retrieval.bundle import load_bundle
    from retrieval.device import runtime_for
    from retrieval.serving import MAX_N, Recommender, Request, load_served_index

    clock.lap("imports")
    if user is not None and users_file is not None:
        _fail("give exactly one of --user or --users-file")
    if user is None and users_file is None and history is None:
        _fail("give --user, --users-file or --history")
    if users_file is not None and history is not None:
        _fail("--history goes with --user or alone, not with --users-file")
    if n > MAX_N:
        _fail(f"-n must be at most {MAX_N}, got {n}")
    if rank is not None and n > candidates:
        _fail(f"-n {n} is more than --candidates {candidates}: the ranker reorders only the candidates retrieved")
    runtime = runtime_for(device)
    b = load_bundle(bundle)
    b.model.to(runtime.device)
    clock.lap("load_bundle")
    idx, manifest, channels = load_served_index(b, index, runtime.device)  # channels None: MIND alone
    if channels is not None and merge != "best":
        _fail("--merge share applies to MIND alone; this index holds the merged retriever (built with --channels)")
    clock.lap("load_index")
    ranker = None
    if rank is not None:
        from retrieval.ranking.bundle import load_ranker

        ranker = load_ranker(rank, b)
        ranker.model.to(runtime.device)
        clock.lap("load_ranker")
    rec = Recommender(b, idx, manifest, ranker, merge=merge, index_path=index, channels=channels)  # type: ignore[arg-type]
    raw: list[Optional[str]] = [user] if users_file is None else _read_users_file(users_file)  # type: ignore[list-item]
    for u in raw:
        if u is not None and not rec.knows_user(u):
            _fail(f"unknown user {u!r}: not in the training log")
    behaviours = [h.strip() for h in history.split(",") if h.strip()] if history is not None else None
    requests = [Request(user=u, history=behaviours, n=n, rank=rank is not None, candidates=candidates, explain=explain)
                for u in raw]
    stages: dict[str, float] = {}
    answers = rec.recommend(requests, timings=stages)
    clock.lap("search")
    if "rank" in stages:  # the ranker's share of the call, as before: search, then rank
        clock.phases["search"] -= stages["rank"]
        clock.phases["rank"] = stages["rank"]
    results = [_query_result(a, ranked=rank is not None, titles=b.dataset.titles is not None, explain=explain,
                             request_history=behaviours is not None) for a in answers]
    if as_json:
        typer.echo(json.dumps(results if users_file else results[0], indent=2, ensure_ascii=False))
    else:
        _print_results(results, ranked=rank is not None)
    clock.lap("print")
    if timings:
        typer.echo("timings: " + json.dumps(clock.report()), err=True)


def _query_result(a: Any, ranked: bool, titles: bool, explain: bool, request_history: bool) -> dict[str, Any]:
    """One answer in `query`'s output format: {"user", "history", "items": [{"rank", "item", "score",
    "interest", "rank_score"?, "title"?, "because"?}]}; with --history also "dropped" and "fallback"."""
    rows = []
    for it in a.items:
        row: dict[str, Any] = {"rank": it.rank, "item": it.item,
                               "score": None if it.score is None else round(it.score, 6), "interest": it.interest}
        if ranked:
            row["rank_score"] = None if it.rank_score is None else round(it.rank_score, 6)
        if titles:
            row["title"] = it.title
        if it.channel is not None:
            row["channel"] = it.channel
        if explain:
            row["because"] = [{"item": x.item, "title": x.title, "weight": x.weight} for x in it.because or []]
        rows.append(row)
    out: dict[str, Any] = {"user": a.user, "history": a.history, "items": rows}
    if request_history:
        out.update(dropped=a.dropped, fallback=a.fallback)
    return out


def _print_results(results: list[dict[str, Any]], ranked: bool) -> None:
    """The query results as one table per user."""
    for res in results:
        who = f"user {res['user']}" if res["user"] is not None else "new user"
        typer.echo(f"{who}  ({res['history']} behaviours)")
        if res.get("dropped"):
            typer.echo(f"dropped (not in the vocabulary): {', '.join(res['dropped'])}")
        if res.get("fallback"):
            typer.echo("no known behaviour: the most popular items")
        merged = any("channel" in row for row in res["items"])
        typer.echo(f"{'rank':>4}  {'item':<12} {'score':>9}  " + (f"{'rank_score':>10}  " if ranked else "")
                   + f"{'interest':>8}  " + (f"{'channel':<10}  " if merged else "") + "title")
        for row in res["items"]:
            score = f"{row['score']:>9.4f}" if row["score"] is not None else f"{'-':>9}"
            interest = f"{row['interest']:>8}" if row["interest"] is not None else f"{'-':>8}"
            extra = ""
            if ranked:
                extra = (f"{row['rank_score']:>10.4f}  " if row.get("rank_score") is not None else f"{'-':>10}  ")
            channel = f"{row.get('channel') or '-':<10}  " if merged else ""
            typer.echo(f"{row['rank']:>4}  {row['item']:<12} {score}  {extra}{interest}  {channel}{row.get('title') or ''}")
            if row.get("because"):
                typer.echo(f"{'':>6}because: " + "; ".join(
                    f"{x['title'] or x['item']} ({x['weight']:.2f})" for x in row["because"]))


@app.command()
@clean_errors
def serve(
    bundle: Annotated[Path, typer.Option(help="Model bundle.")],
    index: Annotated[Path, typer.Option(help="Index built from that bundle.")],
    ranker: Annotated[Optional[Path], typer.Option(help="Ranker bundle trained beside it: enables rank=true.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    merge: Merge = "best",
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests coalesced into one model call.")] = 64,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Longest a request waits for others to join its batch (ms).")] = 1.0,
    threads: Annotated[int, typer.Option(min=1, help="torch and FAISS threads of the model worker.")] = 1,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Server processes on the one port (load once, then fork: "
                                         "the model's memory is shared); about one per core.")] = 1,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Larger request bodies get 413.")] = 1 << 20,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests waiting for the model beyond which new ones get 503 (load shedding).")] = 2000,
    drain_s: Annotated[float, typer.Option(min=0, help="On SIGTERM, longest wait for requests in flight (s).")] = 30.0,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request (costs throughput).")] = False,
) -> None:
    """Serve recommendations over HTTP from a resident process (FastAPI + uvicorn).

    POST /recommend {user?, history?, n, rank, candidates, explain}; /readyz answers 200 once
    loaded; POST /admin/reload or SIGHUP reloads; SIGTERM drains. The explorer page is at /.
    With --workers N, N processes share the port and the loaded model; a reload swaps all of
    them or none, /metrics labels each series with its worker."""
    from retrieval.server.app import ServeConfig, serve as run_server

    for p in (bundle, index, ranker):
        if p is not None and not p.is_dir():
            _fail(f"{p}: not a directory")
    config = ServeConfig(bundle=bundle, index=index, ranker=ranker, merge=merge, max_batch=max_batch,
                         max_wait_ms=max_wait_ms, threads=threads, max_body_bytes=max_body_bytes, max_queue=max_queue,
                         drain_s=drain_s)
    run_server(config, host=host, port=port, access_log=access_log, workers=workers)


@app.command()
@clean_errors
def evaluate(
    bundle: Annotated[Path, typer.Option(help="MIND model bundle.")],
    index: Annotated[Optional[Path], typer.Option(help="Index built from the bundle (default: exact search in memory).")] = None,
    k1_bundle: Annotated[Optional[Path], typer.Option(help="The same MIND trained with --interests 1, as a baseline.")] = None,
    part: Part = "test",
    out: Annotated[Optional[Path], typer.Option(help="JSON report to write.")] = None,
    ranker: Annotated[Optional[Path], typer.Option(help="Ranker bundle: add AUC / GAUC and two-stage metrics.")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="M: candidates the ranker reorders.")] = 200,
    split: Annotated[Optional[Literal["user", "time"]], typer.Option("--split", help="user or time: must be the split the bundle was trained on (recorded in it; the default).")] = None,
    plots: Annotated[Optional[Path], typer.Option(help="Directory for PNGs: Recall@N for N=1..200 of every model, and the training curves (needs the plot extra).")] = None,
    force: Force = False,
    device: Device = "auto",
) -> None:
    """Recall / HitRate / NDCG @20 and @50 of MIND, the merged retriever and the baselines on
    held-out users (the protocol), with the diagnostics of MIND's interests.

    With --ranker, also the ranker's standalone AUC and GAUC and the two-stage
    (retrieve M, rerank) metrics beside the retrieval order on the same users."""
    from index.faiss_index import load_index
    from index.torch_search import on_device
    from retrieval.artifacts import atomic_write_json
    from retrieval.bundle import load_bundle
    from retrieval.channels import load_channels
    from retrieval.device import runtime_for
    from retrieval.evaluate import REPORT_KIND, evaluate_bundles, exact_index, format_diagnostics, format_table

    if plots is not None:
        from retrieval.plots import require_matplotlib

        require_matplotlib()
    if out:
        _claim(out, REPORT_KIND, (bundle, index, k1_bundle, ranker), force)
    runtime = runtime_for(device)
    b = load_bundle(bundle)
    b.model.to(runtime.device)  # without --index, exact search runs on the model's device
    if split is not None and split != b.split.kind:
        _fail(f"{bundle}: the bundle was trained on the {b.split.kind} split, not the {split} split "
              f"(train it with --split {split})")
    idx, channels = None, None
    if index:
        idx, index_manifest = load_index(index, b.fingerprint)
        channels = load_channels(index, index_manifest)
        idx = on_device(idx, runtime.device)
    k1 = load_bundle(k1_bundle) if k1_bundle else None
    if k1 is not None:
        k1.model.to(runtime.device)
    if ranker is not None:  # a bad ranker fails before the retrieval evaluation, not after it
        from retrieval.ranking.bundle import load_ranker

        rb = load_ranker(ranker, b)
        rb.model.to(runtime.device)
    report = evaluate_bundles(b, idx, k1, part, channels=channels)
    report["device"] = runtime.describe()
    if ranker is not None:
        from retrieval.ranking.evaluate import evaluate_ranker

        index_for_ranker = idx if idx is not None else exact_index(b.model)
        report["ranker"] = {"model": rb.name, "bundle": str(ranker),
                            **evaluate_ranker(rb.model, b.dataset, b.split, b.model, index_for_ranker, part, candidates)}
    if plots is not None:
        from retrieval.plots import RECALL_PNG, TRAINING_PNG, plot_recall_curves, plot_training

        histories = {"mind": b.manifest.get("history", []), **({"mind_k1": k1.manifest.get("history", [])} if k1 else {})}
        report["plots"] = [str(plot_recall_curves(report["recall_curve"], plots / RECALL_PNG,
                                                  f"{Path(report['dataset']).parent.name}, {report['split']} split, "
                                                  f"seed {report['split_seed']}, {part} users")),
                           str(plot_training({k: v for k, v in histories.items() if v}, plots / TRAINING_PNG))]
    if out:
        atomic_write_json(out, report)
    typer.echo(f"{report['dataset']}  {report['split']} split, seed {report['split_seed']}  {part} users "
               f"{report['users']}  K={report['K']} L={report['L']} D={report['dim']}  merge chosen on validation: "
               f"{report['merge_chosen_on_validation']}")
    typer.echo(format_table(report))
    typer.echo(format_diagnostics(report))
    if "ranker" in report:
        r = report["ranker"]
        typer.echo(f"ranker {r['model']}: AUC {r['standalone']['auc']:.4f}  GAUC {r['standalone']['gauc']:.4f}  "
                   f"log loss {r['standalone']['log_loss']:.4f}  retrieval weight {r['retrieval_weight']:g}  "
                   f"({r['candidates_per_s']:,.0f} candidates/s)")
        for stage in ("retrieval_only", "two_stage", "two_stage_ranker_only"):
            typer.echo(f"  {stage:<15}" + "  ".join(f"{k} {v:.4f}" for k, v in r[stage].items()))
    for p in report.get("plots", []):
        typer.echo(f"plot: {p}")
    if out:
        typer.echo(f"report: {out}")


@app.command("train-ranker")
@clean_errors
def train_ranker_cmd(
    bundle: Annotated[Path, typer.Option(help="Retrieval bundle: its data, split and (for hard negatives) model.")],
    out: Annotated[Path, typer.Option(help="Ranker bundle directory to write.")],
    model: RankerModel = "din",
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs; early stopping usually ends sooner.")] = 50,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    lr: Lr = 1e-3,
    negatives: Annotated[int, typer.Option(min=1, help="Negatives per positive.")] = 1,
    negative_source: NegativeSource = "uniform",
    hard_share: Annotated[float, typer.Option(min=0, max=1, help="Share of negatives drawn from the retriever's top-M candidates the user did not take; the rest uniform.")] = 0.0,
    candidates: Annotated[int, typer.Option(min=1, help="M: retrieval candidates per user (hard negatives, two-stage validation).")] = 200,
    dim: Annotated[int, typer.Option(min=2, help="Embedding size per field.")] = 16,
    max_len: Annotated[int, typer.Option(min=1)] = 50,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without a better validation figure before stopping.")] = 3,
    monitor: RankMonitor = "auc",
    fuse: Annotated[bool, typer.Option("--fuse/--no-fuse", help="Choose the weight of the retrieval score in the served order on validation users.")] = True,
    seed: Seed = 0,
    force: Force = False,
    threads: Threads = 0,
    device: Device = "auto",
    precision: Precision = "fp32",
    compile: Compile = False,
    resume: Resume = False,
    checkpoint: Checkpoint = None,
) -> None:
    """Train a second-stage ranker on the retrieval bundle's training users, to convergence on validation users.

    Under torchrun the processes train one ranker data-parallel; rank 0 validates and writes.
    A checkpoint is written at the end of every epoch; --resume continues a killed run from it."""
    from retrieval.bundle import load_bundle
    from retrieval.ranking.bundle import KIND, save_ranker
    from retrieval.ranking.train import RankTrainConfig, retrieval_candidates, train_ranker

    with _runtime(device, precision, compile) as (runtime, group):
        _claim_on_main(group, out, KIND, (bundle,), force)
        b = load_bundle(bundle)
        cfg = RankTrainConfig(model=model, epochs=epochs, batch_size=batch_size, lr=lr, negatives=negatives,
                              negative_source=negative_source, hard_share=hard_share, retrieval_m=candidates,
                              patience=patience, monitor=monitor, fuse=fuse, seed=seed, dim=dim, max_len=max_len,
                              threads=threads)
        b.model.to(runtime.device)
        rc = retrieval_candidates(b.model, b.dataset, b.split, candidates) if cfg.needs_retrieval else None
        extra = {"trained_on": {**runtime.describe(), "processes": group.world}}

        def save(m, history, fusion=None):  # rewrite the best ranker so far, atomically
            save_ranker(out, m, model, cfg, b, extra={"history": history, "best_val_auc": max(h["val_auc"] for h in history),
                                                      **({"fusion": fusion} if fusion else {}), **extra})

        result = train_ranker(b.dataset, b.split, cfg, retrieval=rc, on_improve=save, runtime=runtime,
                              checkpointing=_checkpointing(out, checkpoint, 0, resume),
                              identity={"retrieval_bundle": b.fingerprint})
        if group.main:
            save(result.model, result.history, result.fusion)
            typer.echo(f"ranker: {out}  {model}  best epoch {result.best_epoch} of {len(result.history)}  "
                       + "  ".join(f"{k} {v:.4f}" for k, v in result.best.items())
                       + (f"  retrieval weight {result.fusion['weight']:g}" if result.fusion else "")
                       + f"  {result.samples_per_s:,.0f} samples/s")


@app.command()
@clean_errors
def experiment(
    interactions: Interactions,
    out: Annotated[Path, typer.Option(help="JSON report to write (the README tables go beside it as .md).")],
    items: Items = None,
    users: Users = None,
    user_col: UserCol = "user_id",
    item_col: ItemCol = "item_id",
    time_col: TimeCol = "timestamp",
    user_features: UserFeatures = None,
    item_features: ItemFeatures = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated split seeds (default: 2026-2030 on the user split, 2026 on the temporal split).")] = None,
    split: SplitKind = "user",
    train_seeds: Annotated[Optional[str], typer.Option(help="Comma-separated training seeds, each run on every split seed (default: --seed on the user split, 0-4 on the temporal split).")] = None,
    interests: Interests = "4",
    extractor: Extractor = "routing",
    dim: Dim = 64,
    max_len: MaxLen = 50,
    pow: Pow = 2.0,
    attention: Attention = None,
    epochs: Epochs = 30,
    batch_size: BatchSize = 256,
    lr: Lr = 3e-3,
    negatives: Negatives = 512,
    neg_alpha: NegAlpha = 1.0,
    patience: Patience = 3,
    seed: Seed = 0,
    hard_negatives: HardNegatives = 0.0,
    peak_penalty: PeakPenalty = 0.0,
    routing_grad: RoutingGrad = False,
    target_window: TargetWindow = 1,
    recent_targets: RecentTargets = 1.0,
    settings: Annotated[Optional[str], typer.Option(help="More settings of the main MIND, key=value;key=value (any model-config or training field).")] = None,
    variants: Annotated[Optional[str], typer.Option(help="Comma-separated variants of the main MIND, each name:key=value;key=value (name: mind, or a registered retriever), e.g. one per remedy switched off.")] = None,
    tune: Annotated[Optional[str], typer.Option(help="Grid tried for the main MIND and for K=1 alike (the same budget), best validation Recall@50 kept: key=v1,v2;key=v1,v2.")] = None,
    knn_k: Annotated[str, typer.Option(help="Neighbours per item in the merged retriever's item-kNN table: comma-separated sizes, the best on validation users kept.")] = "50,100,200",
    plots: Annotated[Optional[Path], typer.Option(help="Directory for PNGs: mean Recall@N for N=1..200 of every model, and every run's training curves (needs the plot extra).")] = None,
    force: Force = False,
    threads: Threads = 0,
    device: Device = "auto",
    precision: Precision = "fp32",
    compile: Compile = False,
) -> None:
    """MIND, its variants, K=1 (same tuning budget), the merged retriever, item-kNN and popularity
    over several runs: mean ± std, diagnostics, figures by history length.

    Under torchrun the processes train each model together; rank 0 evaluates and writes."""
    from retrieval.artifacts import atomic_write_bytes, atomic_write_json
    from retrieval.data import load_dataset
    from retrieval.evaluate import format_table
    from retrieval.experiment import (KIND, TIME_TRAIN_SEEDS, USER_SEEDS, check_settings, format_markdown,
                                      parse_grid, parse_settings, parse_variant, run_experiment)
    from retrieval.train import TrainConfig

    seed_list = _seed_list(seeds) if seeds is not None else list(USER_SEEDS) if split == "user" else [2026]
    try:
        train_seed_list = ([int(s) for s in train_seeds.split(",") if s.strip()] if train_seeds is not None else
                           [seed] if split == "user" else list(TIME_TRAIN_SEEDS))
    except ValueError:
        _fail(f"--train-seeds must be comma-separated integers, got {train_seeds!r}")
    if not train_seed_list or min(train_seed_list) < 0 or len(set(train_seed_list)) < len(train_seed_list):
        _fail(f"--train-seeds must be distinct non-negative integers, at least one, got {train_seeds!r}")
    knn_sizes = _knn_sizes(knn_k)
    k = _interest_count(interests)
    model_settings: dict[str, Any] = {"interests": interests if k is None else k, "dim": dim, "max_len": max_len,
                                      "pow": pow, "attention": _attention(extractor, attention), "seed": seed}
    if extractor != "routing":
        model_settings["retriever"] = extractor
    # the remedies only when asked for, so that a variant of another retriever inherits no field it lacks
    remedies = {"hard_negatives": hard_negatives, "peak_penalty": peak_penalty, "routing_grad": routing_grad}
    model_settings.update(_model_settings(extractor, **{key: v for key, v in remedies.items() if v}))
    try:
        model_settings.update(parse_settings(settings or "", "--settings entry"))
        variant_list = [v.strip() for v in (variants or "").split(",") if v.strip()]
        grid = parse_grid(tune or "")
        check_settings(model_settings, [parse_variant(v) for v in variant_list], grid)
    except ValueError as err:
        _fail(str(err))
    if plots is not None:
        from retrieval.plots import require_matplotlib

        require_matplotlib()
    spec = _data_spec(interactions, items, users, user_col, item_col, time_col, item_features, user_features)
    with _runtime(device, precision, compile) as (runtime, group):
        _claim_on_main(group, out, KIND, (interactions, items, users), force)
        ds = load_dataset(spec)
        tc = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, negatives=negatives, neg_alpha=neg_alpha,
                         patience=patience, seed=seed, split=split, threads=threads,
                         target_window=target_window, recent_targets=recent_targets)
        md = out.with_suffix(".md")

        def write(partial: dict[str, Any]) -> None:
            if group.main:
                atomic_write_json(out, partial)
                atomic_write_bytes(md, format_markdown(partial).encode())

        report = run_experiment(ds, spec, seed_list, model_settings, tc, split=split, train_seeds=train_seed_list,
                                variants=variant_list, grid=grid, knn_k=knn_sizes, on_run=write, runtime=runtime)
        if not group.main:
            return
        if plots is not None:
            from retrieval.plots import RECALL_PNG, TRAINING_PNG, plot_recall_curves, plot_training

            histories = {f"{name} ({r['split_seed']}/{r['train_seed']})": t["history"]
                         for r in report["per_run"] for name, t in r["training"].items()}
            report["plots"] = [str(plot_recall_curves(report["recall_curve"], plots / RECALL_PNG,
                                                      f"{Path(report['dataset']).parent.name}, {split} split, mean of "
                                                      f"{report['runs']} runs, test users")),
                               str(plot_training(histories, plots / TRAINING_PNG))]
        write(report)
        chosen = ""
        if k is None:
            chosen = "  K chosen per run " + ",".join(str(r["interests_search"]["chosen"]) for r in report["per_run"])
        typer.echo(f"{report['dataset']}  {split} split  seeds {seed_list}  training seeds {train_seed_list}  "
                   f"{extractor}  K={interests} L={max_len} D={dim}  wall {report['wall_time_s']:.0f}s{chosen}")
        typer.echo(format_table(report))
        for p in report.get("plots", []):
            typer.echo(f"plot: {p}")
        typer.echo(f"report: {out}  tables: {md}")


@app.command("experiment-rankers")
@clean_errors
def experiment_rankers(
    interactions: Interactions,
    out: Annotated[Path, typer.Option(help="JSON report to write (the README tables go beside it as .md).")],
    items: Items = None,
    users: Users = None,
    user_col: UserCol = "user_id",
    item_col: ItemCol = "item_id",
    time_col: TimeCol = "timestamp",
    user_features: UserFeatures = None,
    item_features: ItemFeatures = None,
    seeds: Seeds = "2026,2027,2028,2029,2030",
    rankers: Annotated[str, typer.Option(help="Comma-separated rankers or variants (name:key=value;key=value).")] = (
        "base,din,dmin,dien,dsin"),
    epochs: Annotated[int, typer.Option(min=1, help="Most ranker epochs; early stopping usually ends sooner.")] = 50,
    patience: Annotated[int, typer.Option(min=1, help="Ranker epochs without a better validation figure before stopping.")] = 3,
    monitor: RankMonitor = "auc",
    negatives: Annotated[int, typer.Option(min=1, help="Negatives per positive.")] = 1,
    hard_share: Annotated[float, typer.Option(min=0, max=1, help="Share of negatives from the retriever's top-M.")] = 0.0,
    candidates: Annotated[int, typer.Option(min=1, help="M: retrieval candidates reranked.")] = 200,
    seed: Seed = 0,
    part: Part = "test",
    jobs: Annotated[int, typer.Option(min=1, help="Seeds run side by side, one torch thread each (timings then per job).")] = 1,
    force: Force = False,
    device: Device = "auto",
    precision: Precision = "fp32",
    compile: Compile = False,
) -> None:
    """Every ranker (and variants) over several split seeds: AUC, GAUC, log loss, two-stage NDCG, speed (mean ± std)."""
    from retrieval.artifacts import atomic_write_bytes, atomic_write_json
    from retrieval.data import load_dataset
    from retrieval.ranking.experiment import (KIND, format_ranker_markdown, format_ranker_table, parse_variant,
                                              run_ranker_experiment, variant_config)
    from retrieval.ranking.models import ranker_config
    from retrieval.ranking.train import RankTrainConfig
    from retrieval.train import TrainConfig

    seed_list = _seed_list(seeds)
    variants = [v for v in rankers.split(",") if v.strip()]
    if not variants:
        _fail(f"--rankers names no ranker, got {rankers!r}")
    rank_train = RankTrainConfig(epochs=epochs, patience=patience, monitor=monitor, negatives=negatives,
                                 hard_share=hard_share, retrieval_m=candidates, seed=seed)
    configs = []
    for v in variants:  # one line, before any work
        _, name, settings = parse_variant(v)  # ConfigError
        try:
            configs.append(variant_config(rank_train, name, settings))
        except ValueError as err:  # a training setting out of range (RankTrainConfig)
            _fail(f"ranker {v!r}: {err}")
    spec = _data_spec(interactions, items, users, user_col, item_col, time_col, item_features, user_features)
    with _runtime(device, precision, compile) as (runtime, group):
        _claim_on_main(group, out, KIND, (interactions, items, users), force)
        ds = load_dataset(spec)
        for v, cfg in zip(variants, configs):  # a bad model setting fails now, not after hours of training
            try:
                ranker_config(cfg.model, ds, **cfg.settings)
            except (ValueError, TypeError) as err:
                _fail(f"ranker {v!r}: {err}")
        md = out.with_suffix(".md")

        def write(partial: dict[str, Any]) -> None:  # the JSON and its README tables beside it, atomically
            atomic_write_json(out, partial)
            atomic_write_bytes(md, format_ranker_markdown(partial).encode())

        report = run_ranker_experiment(ds, spec, seed_list, variants, {"seed": seed}, TrainConfig(seed=seed),
                                       rank_train, part=part, m=candidates, jobs=jobs,
                                       on_seed=write if group.main else None,
                                       runtime=runtime)
        if group.main:
            write(report)
            typer.echo(format_ranker_table(report))
            typer.echo(f"report: {out}  tables: {md}")


if __name__ == "__main__":
    app()
