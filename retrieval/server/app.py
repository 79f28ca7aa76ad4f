"""The HTTP server (`retrieve serve`): FastAPI on uvicorn in front of one `Recommender`.

    POST /recommend          one request  {user?, history?, times?, n, rank, candidates, explain}
    POST /recommend/batch    {"requests": [...]}, answered in order
    GET  /healthz            alive (200 as soon as the process listens)
    GET  /readyz             200 once the artifacts are loaded, 503 before
    GET  /metrics            Prometheus text: requests by path and status, latency, batch sizes,
                             stage times, reloads, the fingerprints being served
    POST /admin/reload       {bundle?, index?, ranker?}: load, verify and swap (SIGHUP: same paths)
    GET  /                   the explorer page;  GET /info, /users, /items feed it
    GET  /docs, /openapi.json  FastAPI's API page and schema

Requests are validated on the event loop, then coalesced by the micro-batcher into one
`Recommender.recommend` call in one worker thread (one interest forward, one FAISS search
per distinct depth). The artifacts load in the background after the port opens, so
/healthz answers at once and /readyz says when serving starts. A reload loads and verifies
the new artifacts in another thread while the old ones keep serving, then swaps one
reference: a batch already running finishes on the old model, the next one uses the new;
a reload that fails keeps the old model and answers why. SIGTERM stops accepting
connections, lets every request in flight finish (up to `drain_s`), then exits.

Every error is one line of JSON, {"error": "..."}: 400 malformed JSON or a bad header,
413 a body over `max_body_bytes`, 422 a value out of range or of the wrong type, 503 not
loaded yet or overloaded (more than `max_queue` requests already wait for the model: shed
at once rather than queued without bound); never a traceback.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Query
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.metrics_core import Metric
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, WithJsonSchema
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from retrieval.errors import RetrievalError
from retrieval.serving import (
    MAX_CANDIDATES,
    MAX_HISTORY,
    MAX_N,
    Recommender,
    Request,
    RequestError,
)
from retrieval.serving import Response as Answer
from retrieval.serving import set_threads
from retrieval.server.batcher import BatcherClosed, MicroBatcher, Overloaded
from retrieval.server.workers import WorkerLink, path_dict

log = logging.getLogger(__name__)

MAX_BATCH_REQUESTS = 256  # most requests in one POST /recommend/batch
PATHS = ("/recommend", "/recommend/batch", "/healthz", "/readyz", "/metrics", "/admin/reload", "/",
         "/info", "/users", "/items", "/docs", "/openapi.json")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(frozen=True)
class ServeConfig:
    """What `retrieve serve` serves and how."""

    bundle: Path  # MIND bundle
    index: Path  # index built from it
    ranker: Path | None = None  # optional ranker trained beside it
    merge: str = "best"  # merge of the interests' result lists: best or share
    max_batch: int = 64  # most requests coalesced into one model call
    max_wait_ms: float = 1.0  # longest a request waits for others to join its batch
    threads: int = 1  # torch and FAISS threads of the worker (one core for it, one for HTTP)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_queue: int = 2000  # requests waiting for the model beyond which new ones get 503 (load shedding)
    drain_s: float = 30.0  # on SIGTERM, longest wait for requests in flight
    fast_path: bool = True  # serve /recommend, /recommend/batch and /healthz beside the framework (same answers)


# ----------------------------------------------------------------------------- request bodies

def _raw_id(value: Any) -> str:
    """A user or item id as the log spells it: JSON strings and integers alike."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PydanticCustomError("id_type", "Input should be a string or an integer id")
    return str(value)


Id = Annotated[str, BeforeValidator(_raw_id), WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]})]


class RecommendBody(BaseModel):
    """One recommendation request."""

    model_config = ConfigDict(extra="forbid")

    user: Id | None = Field(None, description="A user id of the training log; an unknown id is a new user.")
    history: list[Id] | None = Field(
        None, max_length=MAX_HISTORY,
        description=f"New behaviours, raw item ids, oldest first, appended to the user's stored ones (at most "
                    f"{MAX_HISTORY}). Ids not in the vocabulary are dropped and listed in `dropped`. The model reads "
                    "the most recent L behaviours; all of them are excluded from the results.")
    times: list[StrictInt] | None = Field(
        None, max_length=MAX_HISTORY, description="Event time of each history behaviour (seconds); default: now.")
    n: StrictInt = Field(10, ge=1, le=MAX_N, description=f"Items to return (1..{MAX_N}).")
    rank: StrictBool = Field(False, description="Rerank `candidates` retrieved items with the loaded ranker.")
    candidates: StrictInt = Field(200, ge=1, le=MAX_CANDIDATES,
                                  description=f"M, candidates retrieved for the ranker (n..{MAX_CANDIDATES}).")
    explain: StrictBool = Field(False, description="Name the behaviours behind each item and the user's interests.")

    def request(self) -> Request:
        return Request(
            user=self.user, history=self.history, times=self.times, n=self.n, rank=self.rank, candidates=self.candidates, explain=self.explain,
        )


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[RecommendBody] = Field(..., min_length=1, max_length=MAX_BATCH_REQUESTS)


class ReloadBody(BaseModel):
    """Paths to load instead of the current ones; omitted = the current path; "ranker": null drops the ranker."""

    model_config = ConfigDict(extra="forbid")

    bundle: StrictStr | None = None
    index: StrictStr | None = None
    ranker: StrictStr | None = None


class ErrorBody(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in ((400, "malformed JSON"), (413, "body too large"), (422, "a bad value"),
                       (503, "not loaded yet, or shutting down"))
}


# ----------------------------------------------------------------------------- errors


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


class NotReady(Exception):
    pass


class ReloadBusy(Exception):
    pass


def error(status: int, message: str) -> JSONResponse:
    """The one error shape: {"error": "..."} on one line."""
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def error_status(err: BaseException) -> tuple[int, str]:
    """(HTTP status, message) of an exception, the one mapping both request paths use; 500 for
    anything unexpected (its traceback goes to the log, never to the client)."""
    if isinstance(err, ValidationError):
        return _validation_message(err.errors())
    if isinstance(err, RequestValidationError):
        return _validation_message(err.errors())
    if isinstance(err, HTTPException):
        return err.status_code, str(err.detail)
    if isinstance(err, RequestError):
        return 422, str(err)
    if isinstance(err, NotReady):
        return 503, "not ready: the model is still loading"
    if isinstance(err, (BatcherClosed, Overloaded)):
        return 503, str(err)
    if isinstance(err, ReloadBusy):
        return 409, "a reload is already running"
    log.error("internal error", exc_info=err)
    return 500, "internal error (see the server log)"


def _validation_message(errors: Sequence[Any]) -> tuple[int, str]:
    """(status, message) of pydantic's first error: 400 for malformed JSON, else 422 naming the field."""
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return 400, f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query"))
    return 422, f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))


def _body_schema(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses `model` from the raw body itself."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    if defs:  # nested models (a batch's requests) inline: the page needs no shared components
        schema = json.loads(json.dumps(schema).replace('{"$ref": "#/components/schemas/RecommendBody"}',
                                                       json.dumps(defs.get("RecommendBody", {}))))
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("retrieve_http_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.latency = Histogram("retrieve_http_request_seconds", "HTTP request latency, first byte in to last byte out",
                                 ["path"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("retrieve_http_requests_in_flight", "Requests received and not yet answered", ["path"],
                               registry=r)
        self.batch = Histogram("retrieve_batch_requests", "Requests per model call (micro-batch size)",
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256), registry=r)
        self.queued = Histogram("retrieve_batch_wait_seconds", "Time the oldest request of a batch waited for it",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("retrieve_stage_seconds", "Seconds per batch in each stage of the model call", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.fallback = Counter("retrieve_fallback_responses", "Responses served by popularity (no known behaviour)", registry=r)
        self.dropped = Counter("retrieve_dropped_items", "Request behaviours dropped as unknown item ids", registry=r)
        self.reloads = Counter("retrieve_reloads", "Reloads by outcome", ["outcome"], registry=r)
        self.model = Info("retrieve_model", "The artifacts being served", registry=r)
        self.ready = Gauge("retrieve_ready", "1 once the artifacts are loaded", registry=r)
        self.waiting = Gauge("retrieve_batch_queue_requests", "Requests waiting for the model", registry=r)
        self.loaded_at = Gauge("retrieve_model_loaded_timestamp_seconds", "When the served artifacts were swapped in", registry=r)

    def serving(self, rec: Recommender, paths: ServeConfig) -> None:
        fp = rec.fingerprints()
        self.model.info({"bundle_fingerprint": fp["bundle"] or "", "index_sha256": fp["index"] or "",
                         "ranker_fingerprint": fp["ranker"] or "", "bundle": str(paths.bundle), "index": str(paths.index),
                         "ranker": str(paths.ranker or "")})
        self.ready.set(1)
        self.loaded_at.set(rec.loaded_at)


# ----------------------------------------------------------------------------- the server's state


class Server:
    """The loaded Recommender, the batcher feeding it, reloads and metrics. In a worker of
    `serve --workers N` (retrieval.server.workers), `link` is its pipe to the supervisor:
    reloads and /metrics then go through it, across every worker."""

    def __init__(self, config: ServeConfig, preloaded: Recommender | None = None, link: WorkerLink | None = None):
        self.config = config  # the paths being served and the settings
        self.metrics = Metrics()
        self.recommender: Recommender | None = None
        self.preloaded = preloaded  # loaded before the process forked: served at once
        self.link = link
        self._staged: tuple[int, Recommender, ServeConfig] | None = None  # a worker's prepared reload
        self._aborted: set[int] = set()  # reloads aborted (another worker failed) while this one still loaded
        self.batcher: MicroBatcher | None = None
        self.fatal: BaseException | None = None  # the initial load failed: the process exits with it
        self.on_fatal: Any = None  # set by serve(): stops uvicorn
        self.last_reload: dict[str, Any] | None = None
        self._reloading = False
        self._tasks: set[asyncio.Task] = set()

    # --- lifecycle

    async def start(self) -> None:
        self.batcher = MicroBatcher(self._handle, max_batch=self.config.max_batch,
                                    max_wait_s=self.config.max_wait_ms / 1000, max_queue=self.config.max_queue,
                                    on_start=lambda: set_threads(self.config.threads), on_batch=self._on_batch)
        if self.link is not None:
            self.link.start(self, asyncio.get_running_loop())
        if self.preloaded is not None:
            self.recommender, self.preloaded = self.preloaded, None
            self.metrics.serving(self.recommender, self.config)
        else:
            self._spawn(self._initial_load())

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close(timeout=self.config.drain_s)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _initial_load(self) -> None:
        t0 = time.perf_counter()
        try:
            rec = await asyncio.get_running_loop().run_in_executor(None, self._load, self.config)
        except Exception as err:  # noqa: BLE001 - whatever it was, the process cannot serve
            log.error("could not load the artifacts: %s", err)
            self.fatal = err if isinstance(err, RetrievalError) else RetrievalError(f"loading failed: {err}")
            if self.on_fatal is not None:
                self.on_fatal()
            return
        self.recommender = rec
        self.metrics.serving(rec, self.config)
        log.info("ready in %.1fs: bundle %s, index %s, ranker %s", time.perf_counter() - t0, self.config.bundle,
                 self.config.index, self.config.ranker)

    def _load(self, paths: ServeConfig) -> Recommender:
        """Load, verify and warm a Recommender (in a thread, off the event loop)."""
        return load_recommender(paths)

    def ready(self) -> Recommender:
        if self.recommender is None:
            raise NotReady()
        return self.recommender

    # --- answering (both request paths)

    async def answer(self, bodies: list[RecommendBody]) -> list[bytes]:
        """Check the requests on the model in use, then queue them for one batch; JSON answers."""
        rec = self.ready()
        requests = [b.request() for b in bodies]
        for i, r in enumerate(requests):
            try:
                rec.check(r)
            except RequestError as err:
                raise RequestError(f"requests.{i}: {err}" if len(bodies) > 1 else str(err)) from None
        assert self.batcher is not None
        return await self.batcher.submit(requests)

    async def recommend_json(self, raw: bytes, batch: bool) -> bytes:
        """The body of POST /recommend (or /recommend/batch) for its raw request body. Parsed by
        pydantic straight from the bytes whatever the Content-Type says: one JSON parse, strict types."""
        if batch:
            data = await self.answer(BatchBody.model_validate_json(raw).requests)
            return b'{"responses":[' + b",".join(data) + b"]}"
        [data] = await self.answer([RecommendBody.model_validate_json(raw)])
        return data

    # --- reload

    async def reload(self, body: ReloadBody | None) -> dict[str, Any]:
        """Load the given (or current) paths, verify, warm, swap; RetrievalError keeps the old model."""
        if self._reloading:
            raise ReloadBusy()
        self._reloading = True
        t0 = time.perf_counter()
        try:
            paths = self.config
            if body is not None:
                given = body.model_fields_set
                paths = replace(
                    paths,
                    bundle=Path(body.bundle) if body.bundle else paths.bundle,
                    index=Path(body.index) if body.index else paths.index,
                    ranker=(Path(body.ranker) if body.ranker else None) if "ranker" in given else paths.ranker,
                )
            if self.link is not None:
                return await self._reload_workers(paths)
            try:
                rec = await asyncio.get_running_loop().run_in_executor(None, self._load, paths)
            except Exception as err:  # noqa: BLE001 - any failure keeps the old model
                reason = str(err) if isinstance(err, RetrievalError) else f"{type(err).__name__}: {err}"
                self.metrics.reloads.labels("failed").inc()
                self.last_reload = {"ok": False, "error": reason, "at": time.time(), "seconds": time.perf_counter() - t0}
                log.error("reload failed, still serving the old model: %s", reason)
                raise RequestError(f"reload failed, still serving {self.config.bundle}: {reason}") from None
            self.recommender, self.config = rec, paths  # the swap: the next batch runs on the new model
            self.metrics.serving(rec, paths)
            self.metrics.reloads.labels("ok").inc()
            self.last_reload = {"ok": True, "at": time.time(), "seconds": time.perf_counter() - t0,
                                "fingerprints": rec.fingerprints()}
            log.info("reloaded in %.1fs: bundle %s, index %s, ranker %s", time.perf_counter() - t0, paths.bundle,
                     paths.index, paths.ranker)
            return {"status": "reloaded", **self.last_reload, "info": rec.info()}
        finally:
            self._reloading = False

    async def _reload_workers(self, paths: ServeConfig) -> dict[str, Any]:
        """A reload of every worker through the supervisor: all swap, or none does."""
        assert self.link is not None
        outcome = await self.link.ask("reload", path_dict(paths.bundle, paths.index, paths.ranker))
        if outcome.get("busy"):
            raise ReloadBusy()
        if not outcome["ok"]:
            raise RequestError(f"reload failed, still serving {self.config.bundle}: {outcome['error']}")
        return {"status": "reloaded", **{k: v for k, v in outcome.items() if k != "status"}}

    def stage(self, token: int, paths: dict[str, str | None]) -> None:
        """A worker's prepare: load and verify `paths` beside the model in use (a thread of its own)."""
        config = replace(self.config, bundle=Path(paths["bundle"] or ""), index=Path(paths["index"] or ""),
                         ranker=Path(paths["ranker"]) if paths["ranker"] else None)
        self._staged = None
        rec = self._load(config)
        if token in self._aborted:  # the others gave up meanwhile: drop it rather than hold a second model
            return
        self._staged = (token, rec, config)

    def commit_staged(self, token: int) -> dict[str, Any]:
        """A worker's commit (on the event loop): swap the staged model in; the reload's outcome."""
        staged, self._staged = self._staged, None
        assert staged is not None and staged[0] == token, "commit without a prepared reload"
        _, rec, config = staged
        self.recommender, self.config = rec, config
        self.metrics.serving(rec, config)
        self.metrics.reloads.labels("ok").inc()
        self.last_reload = {"ok": True, "at": time.time(), "fingerprints": rec.fingerprints()}
        return {**self.last_reload, "info": rec.info()}

    def abort_staged(self, token: int, reason: str) -> None:
        """A worker's abort: drop what it loaded (or is still loading); the old model keeps serving."""
        self._aborted.add(token)
        self._staged = None
        self.metrics.reloads.labels("failed").inc()
        self.last_reload = {"ok": False, "error": reason, "at": time.time()}

    async def metrics_text(self) -> bytes:
        """Prometheus text: this process's registry, or in a worker every worker's, labelled worker="i"."""
        if self.link is None:
            return generate_latest(self.metrics.registry)
        gathered = await self.link.ask("metrics")
        return generate_latest(_Gathered(gathered))

    def reload_on_signal(self) -> None:
        """SIGHUP: reload the same paths in the background; the outcome goes to the log and /metrics."""
        async def run() -> None:
            try:
                await self.reload(None)
            except ReloadBusy:
                log.warning("SIGHUP ignored: a reload is already running")
            except RequestError:
                pass  # logged by reload()
        self._spawn(run())

    # --- the worker thread's batch

    def _on_batch(self, size: int, waited_s: float) -> None:
        self.metrics.waiting.set(self.batcher.waiting if self.batcher is not None else 0)
        self.metrics.batch.observe(size)
        self.metrics.queued.observe(waited_s)

    def _handle(self, requests: list[Request]) -> list[bytes | BaseException]:
        """One batch on the model in use when it starts; each answer encoded as JSON here, off the loop."""
        rec = self.recommender
        assert rec is not None, "requests are only queued once loaded"
        timings: dict[str, float] = {}
        answers: list[Answer | BaseException]
        try:
            answers = list(rec.recommend(requests, timings=timings))
        except RequestError:  # a request this model cannot serve (e.g. swapped to one without a ranker): alone
            answers = []
            for r in requests:
                try:
                    answers.extend(rec.recommend([r]))
                except RequestError as err:
                    answers.append(err)
        t0 = time.perf_counter()
        out: list[bytes | BaseException] = []
        for a in answers:
            if isinstance(a, BaseException):
                out.append(a)
                continue
            if a.fallback:
                self.metrics.fallback.inc()
            if a.dropped:
                self.metrics.dropped.inc(len(a.dropped))
            out.append(a.to_json())
        timings["encode"] = time.perf_counter() - t0
        for stage, seconds in timings.items():
            self.metrics.stage.labels(stage).observe(seconds)
        return out


# ----------------------------------------------------------------------------- the ASGI guard


class Guard:
    """Pure ASGI middleware: the body-size limit (413), and every request's status and latency
    in the metrics (unknown paths counted as "other", so the label set stays bounded)."""

    def __init__(self, app: Any, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"] if scope["path"] in PATHS else "other"
        status = 500
        limit = self.server.config.max_body_bytes

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m = self.server.metrics
        m.in_flight.labels(path).inc()
        try:
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if length is not None and (not length.isdigit() or int(length) > limit):
                bad = error(413, f"request body over {limit} bytes") if length.isdigit() else error(400, "bad Content-Length")
                await bad(scope, receive, send_status)
                return
            received = 0

            async def receive_limited() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:  # a chunked body that outgrew the limit
                        raise BodyTooLarge(limit)
                return message

            fast = FAST_PATHS.get((scope["method"], scope["path"])) if self.server.config.fast_path else None
            if fast is not None:
                await self._fast(fast, receive_limited, send_status)
            else:
                await self.app(scope, receive_limited, send_status)
        finally:
            m.in_flight.labels(path).dec()
            m.requests.labels(path, str(status)).inc()
            m.latency.labels(path).observe(time.perf_counter() - t0)


    async def _fast(self, route: str, receive: Any, send: Any) -> None:
        """The hot endpoints without the framework's routing, dependency and response machinery
        (measured at about a hundred times the cost of this path per request): the same
        Server.recommend_json and the same error mapping as the FastAPI routes below, which
        describe them in the OpenAPI schema and serve them when `fast_path` is off."""
        status, headers = 200, [(b"content-type", b"application/json")]
        try:
            if route == "healthz":
                payload = b'{"status":"ok"}'
            else:
                chunks = []
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body"):
                        break
                payload = await self.server.recommend_json(b"".join(chunks), batch=route == "batch")
        except Exception as err:  # noqa: BLE001 - every failure is an answer, never a traceback
            status, message = error_status(err)
            payload = orjson.dumps({"error": " ".join(message.split())})
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


FAST_PATHS = {("POST", "/recommend"): "recommend", ("POST", "/recommend/batch"): "batch", ("GET", "/healthz"): "healthz"}


# ----------------------------------------------------------------------------- the app


def explorer_html() -> str:
    """The explorer page, shipped as package data beside this module."""
    return resources.files("retrieval.server").joinpath("explorer.html").read_text(encoding="utf-8")


def create_app(config: ServeConfig, preloaded: Recommender | None = None, link: WorkerLink | None = None) -> FastAPI:
    """The FastAPI app serving `config` (`preloaded` and `link` in a worker of `serve --workers`);
    its state is app.state.server (a Server)."""
    server = Server(config, preloaded, link)
    page = explorer_html()

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        await server.start()
        hup = False
        try:
            loop.add_signal_handler(signal.SIGHUP, server.reload_on_signal)
            hup = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (in-process tests)
            pass
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            server.close()

    app = FastAPI(title="retrieve", version="0.1.0", lifespan=lifespan,
                  description="MIND multi-interest retrieval with a FAISS index and an optional ranker, "
                              "serving request-time behaviours.")
    app.state.server = server

    async def failed(request: Any, err: Exception) -> JSONResponse:
        return error(*error_status(err))

    for kind in (RequestValidationError, ValidationError, HTTPException, RequestError, NotReady, BatcherClosed,
                 Overloaded, ReloadBusy, Exception):
        app.add_exception_handler(kind, failed)

    @app.post("/recommend", response_model=Answer, responses=ERRORS, openapi_extra=_body_schema(RecommendBody))
    async def recommend(request: HTTPRequest) -> Response:
        """Top-n items for a user, new behaviours, or both; ranked and explained on request."""
        return Response(await server.recommend_json(await request.body(), batch=False), media_type="application/json")

    @app.post("/recommend/batch", responses=ERRORS, openapi_extra=_body_schema(BatchBody))
    async def recommend_batch(request: HTTPRequest) -> Response:
        """Many requests at once: {"responses": [...]} in request order."""
        return Response(await server.recommend_json(await request.body(), batch=True), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorBody}})
    async def readyz() -> JSONResponse:
        """Ready once the artifacts are loaded."""
        rec = server.ready()
        ready: dict[str, Any] = {"status": "ready", "fingerprints": rec.fingerprints()}
        if server.link is not None:
            ready.update(worker=server.link.worker, workers=server.link.workers)
        return JSONResponse(ready)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(await server.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", responses={**ERRORS, 409: {"model": ErrorBody, "description": "a reload is running"}},
              openapi_extra=_body_schema(ReloadBody, required=False))
    async def admin_reload(request: HTTPRequest) -> JSONResponse:
        """Load new (or the same) artifacts in the background, verify and swap; a failure keeps the old ones (422)."""
        raw = await request.body()
        body = ReloadBody.model_validate_json(raw) if raw.strip() else None
        return JSONResponse(await server.reload(body))

    @app.get("/admin/reload")
    async def reload_status() -> dict[str, Any]:
        """The outcome of the last reload (SIGHUP's too), and the paths being served."""
        c = server.config
        return {"last": server.last_reload, "reloading": server._reloading,
                "paths": {"bundle": str(c.bundle), "index": str(c.index), "ranker": str(c.ranker) if c.ranker else None}}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def explorer() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """Sizes, paths, fingerprints and limits of what is served."""
        return server.ready().info()

    @app.get("/users")
    def users(limit: int = Query(20, ge=1, le=1000), seed: int | None = Query(None)) -> dict[str, Any]:
        """Some user ids with their history length: the first ones, or a random draw with `seed`."""
        return {"users": server.ready().sample_users(limit, seed)}

    @app.get("/items")
    def items(q: str = Query(..., min_length=1, max_length=200), limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
        """Items whose id is q or whose title contains q (case-insensitive)."""
        return {"items": server.ready().search_items(q, limit)}

    app.add_middleware(Guard, server=server)
    return app


def load_recommender(paths: ServeConfig) -> Recommender:
    """Load, verify and warm the Recommender of `paths` (the initial load, a reload, a worker's prepare)."""
    set_threads(paths.threads)
    rec = Recommender.load(paths.bundle, paths.index, paths.ranker, merge=paths.merge)  # type: ignore[arg-type]
    rec.warm()
    gc.freeze()  # the loaded objects leave the collector's generations: its full passes stay short
    return rec


class _Gathered:
    """A collector over every worker's metric families ({worker: [Metric]}), each sample
    labelled with its worker; families of the same name merge into one."""

    def __init__(self, gathered: dict[int, list[Any]]):
        self.gathered = gathered

    def collect(self) -> list[Any]:
        merged: dict[str, Any] = {}
        for worker in sorted(self.gathered):
            for family in self.gathered[worker]:
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                into.samples.extend(s._replace(labels={**s.labels, "worker": str(worker)}) for s in family.samples)
        return list(merged.values())


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, access_log: bool = False,
          log_level: str = "info", workers: int = 1) -> None:
    """Run the server until SIGTERM or SIGINT (graceful: requests in flight finish); raises the
    RetrievalError of an initial load that failed. With `workers` > 1: load once, fork that many
    processes on one port (retrieval.server.workers); the service's exit code is raised as SystemExit."""
    set_threads(config.threads)
    # the event loop and the model worker share the GIL: a 1 ms switch interval (Python's default
    # is 5 ms) keeps a batch's pure-Python stretches from holding up the parsing of new requests
    sys.setswitchinterval(0.001)
    if workers > 1:
        _serve_workers(config, host, port, access_log, log_level, workers)
        return
    app = create_app(config)
    _run_uvicorn(app, config, access_log, log_level, host=host, port=port)


def _serve_workers(config: ServeConfig, host: str, port: int, access_log: bool, log_level: str, workers: int) -> None:
    from retrieval.server.workers import listen, run_supervised

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s:     [%(process)d] %(message)s")
    sock = listen(host, port)

    def worker(rec: Recommender, index: int, conn: Any, count: int) -> int:
        from retrieval.server.workers import WorkerLink

        app = create_app(config, preloaded=rec, link=WorkerLink(conn, index, count))
        _run_uvicorn(app, config, access_log, log_level, sockets=[sock])
        return 0

    code = run_supervised(lambda: load_recommender(config), worker, workers,
                          path_dict(config.bundle, config.index, config.ranker), config.drain_s, sock)
    if code:
        raise SystemExit(code)


def _run_uvicorn(app: FastAPI, config: ServeConfig, access_log: bool, log_level: str, host: str = "127.0.0.1",
                 port: int = 8000, sockets: list[Any] | None = None) -> None:
    import uvicorn

    server: Server = app.state.server
    uv = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level,
                                       timeout_graceful_shutdown=int(config.drain_s), lifespan="on"))

    def stop() -> None:
        uv.should_exit = True

    def drained(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    server.on_fatal = stop
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found: a
    # drained shutdown then exits 0 instead of dying by the signal
    previous = signal.signal(signal.SIGTERM, drained)
    try:
        uv.run(sockets=sockets)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if server.fatal is not None:
        raise server.fatal
