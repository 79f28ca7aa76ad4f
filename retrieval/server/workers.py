"""Several server processes on one port (`retrieve serve --workers N`): load once, then fork.

The supervisor (the process `retrieve serve` started) binds the listening socket, loads,
verifies and warms the artifacts once, then forks N workers. Each worker runs its own
uvicorn, event loop and micro-batcher (its own model thread) on the inherited socket: the
kernel hands each new connection to one worker. The model's tensors and the FAISS index
are memory the workers share copy-on-write until a reload replaces them, so N workers cost
little more resident memory than one (PSS, not RSS, shows it). One process per core lets a
second core run model batches: one Python process runs one at a time (the GIL).

The supervisor keeps one pipe to each worker and answers, on behalf of all of them:

- reload (POST /admin/reload on whichever worker got it, or SIGHUP to the supervisor or to a
  worker): every worker loads and verifies the new paths beside the old model (prepare);
  only once every worker holds them are they all told to swap (commit). If any worker fails,
  all drop what they loaded (abort) and keep serving the old artifacts: no worker is ever
  left on other artifacts than its siblings. The caller gets the outcome of the whole set.
- metrics: GET /metrics on any worker gathers every worker's registry through the
  supervisor; each series carries a `worker` label ("0".."N-1"), so sum() over it in a
  query gives the service's totals.
- SIGTERM or SIGINT: forwarded once to every worker; each drains its requests in flight
  (uvicorn's graceful shutdown, up to --drain-s) and exits; the supervisor exits 0 once all
  have exited 0.
- a worker that dies otherwise: the supervisor stops the others and exits 1, for the process
  manager to restart the service (a half-sized service does not limp on unnoticed).

Workers put themselves in a process group of their own (a terminal's Ctrl-C reaches the
supervisor alone, which forwards one SIGTERM) and ask the kernel for SIGTERM should the
supervisor die. The port opens before the load, but connections wait in its backlog until
the workers start: /healthz answers once the workers run, not during the load.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from retrieval.errors import RetrievalError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies
KILL_AFTER_S = 10.0  # beyond --drain-s, how long the supervisor waits for draining workers before SIGKILL


# ----------------------------------------------------------------------------- worker side


class WorkerLink:
    """A worker's end of its pipe to the supervisor: asks (reload, metrics) from the event
    loop, and a reader thread that runs the supervisor's commands (prepare, commit, abort,
    collect) and hands the answers to asks back to the loop."""

    def __init__(self, conn: Connection, worker: int, workers: int):
        self.conn, self.worker, self.workers = conn, worker, workers
        self._send_lock = threading.Lock()
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None  # app.Server

    def start(self, server: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._server, self._loop = server, loop
        threading.Thread(target=self._read, name="supervisor-link", daemon=True).start()

    def send(self, kind: str, token: int, payload: Any = None) -> None:
        with self._send_lock:
            self.conn.send((kind, token, payload))

    async def ask(self, kind: str, payload: Any = None) -> Any:
        """The supervisor's answer to `kind` (on the event loop)."""
        future = asyncio.get_running_loop().create_future()
        token = next(self._ids)
        self._pending[token] = future
        try:
            self.send(kind, token, payload)
        except OSError as err:
            self._pending.pop(token, None)
            raise RetrievalError(f"the supervisor is gone: {err}") from None
        return await future

    def _read(self) -> None:
        assert self._loop is not None and self._server is not None
        while True:
            try:
                kind, token, payload = self.conn.recv()
            except (EOFError, OSError):
                return  # the supervisor is gone: PR_SET_PDEATHSIG ends this process
            if kind == "reply":
                future = self._pending.pop(token, None)
                if future is not None:
                    self._loop.call_soon_threadsafe(_resolve, future, payload)
            elif kind == "prepare":  # loading takes seconds: off this thread, so collects still answer
                threading.Thread(target=self._prepare, args=(token, payload), daemon=True).start()
            elif kind == "commit":
                self._loop.call_soon_threadsafe(self._commit, token)
            elif kind == "abort":
                self._server.abort_staged(token, payload)
            elif kind == "collect":
                self.send("collected", token, list(self._server.metrics.registry.collect()))

    def _prepare(self, token: int, paths: dict[str, str | None]) -> None:
        try:
            self._server.stage(token, paths)
            self.send("prepared", token, (True, None))
        except Exception as err:  # noqa: BLE001 - any failure is the reload's outcome, never the worker's end
            reason = str(err) if isinstance(err, RetrievalError) else f"{type(err).__name__}: {err}"
            self.send("prepared", token, (False, reason))

    def _commit(self, token: int) -> None:
        self.send("committed", token, self._server.commit_staged(token))


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


# ----------------------------------------------------------------------------- supervisor side


@dataclass
class _Child:
    worker: int
    pid: int
    conn: Connection
    open: bool = True  # the pipe still answers


@dataclass
class _Round:
    """One reload or metrics collection across the workers."""

    kind: str  # "reload" or "metrics"
    requester: tuple[int, int] | None  # (worker, its ask's token); None for SIGHUP
    waiting: set[int]  # workers still to answer this phase
    paths: dict[str, str | None] = field(default_factory=dict)
    phase: str = "prepare"  # reload: prepare, then commit
    failures: list[str] = field(default_factory=list)
    answers: dict[int, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


class Supervisor:
    """Forks the workers and coordinates them (the module docstring)."""

    def __init__(self, paths: dict[str, str | None], drain_s: float):
        self.paths = paths  # what the workers serve: bundle, index, ranker
        self.drain_s = drain_s
        self.children: dict[int, _Child] = {}  # by pid
        self.rounds: dict[int, _Round] = {}
        self.reloading: int | None = None  # token of the reload round under way
        self.tokens = itertools.count()
        self.signals: list[int] = []
        self.stopping = False
        self.failed = False
        self.kill_at: float | None = None  # once stopping: when workers still draining get SIGKILL

    # --- lifecycle

    def fork(self, workers: int, run_worker: Any) -> None:
        """Fork `workers` processes, each running run_worker(index, conn) -> exit code."""
        for i in range(workers):
            mine, theirs = Pipe(duplex=True)
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    mine.close()
                    for c in self.children.values():
                        c.conn.close()
                    _worker_process_setup()
                    code = run_worker(i, theirs)
                except SystemExit as done:
                    code = done.code if isinstance(done.code, int) else 1
                except BaseException:  # noqa: BLE001 - a worker must never return into the supervisor's code
                    log.exception("worker %d failed", i)
                finally:
                    logging.shutdown()
                    os._exit(code)
            theirs.close()
            self.children[pid] = _Child(i, pid, mine)

    def run(self) -> int:
        """Coordinate until every worker has exited; the exit code of the service."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        log.info("supervisor %d: %d workers (%s)", os.getpid(), len(self.children),
                 ", ".join(str(c.pid) for c in self.children.values()))
        while self.children:
            conns = [c.conn for c in self.children.values() if c.open]
            if not conns:
                time.sleep(0.05)
            for conn in wait(conns, timeout=0.05) if conns else []:
                child = next(c for c in self.children.values() if c.conn is conn)
                try:
                    kind, token, payload = conn.recv()
                except (EOFError, OSError):
                    child.open = False
                    continue
                self._message(child, kind, token, payload)
            while self.signals:
                sig = self.signals.pop(0)
                if sig == signal.SIGHUP:
                    self._start_reload(None, dict(self.paths))
                else:
                    self.stop(f"signal {signal.Signals(sig).name}")
            self._reap()
            if self.kill_at is not None and time.monotonic() > self.kill_at:
                log.error("workers still running %.0fs after SIGTERM: killing them", self.drain_s + KILL_AFTER_S)
                self.failed, self.kill_at = True, None
                for c in self.children.values():
                    with _quiet():
                        os.kill(c.pid, signal.SIGKILL)
        return 1 if self.failed else 0

    def stop(self, why: str) -> None:
        """SIGTERM to every worker, once: each drains and exits."""
        if self.stopping:
            return
        self.stopping = True
        self.kill_at = time.monotonic() + self.drain_s + KILL_AFTER_S
        log.info("stopping the workers (%s)", why)
        for c in self.children.values():
            with _quiet():
                os.kill(c.pid, signal.SIGTERM)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            child.conn.close()
            if code != 0 or not self.stopping:
                self.failed = True
                log.error("worker %d (pid %d) exited with %d%s", child.worker, pid, code,
                          "" if self.stopping else ": stopping the service")
                self.stop(f"worker {child.worker} exited")
            for token, r in list(self.rounds.items()):  # rounds no longer wait for it
                if child.worker in r.waiting and r.kind == "reload":
                    r.failures.append(f"worker {child.worker} exited")
                r.waiting.discard(child.worker)
                self._advance(token)

    # --- messages

    def _send(self, child: _Child, kind: str, token: int, payload: Any = None) -> None:
        try:
            child.conn.send((kind, token, payload))
        except OSError:
            child.open = False

    def _child(self, worker: int) -> _Child | None:
        return next((c for c in self.children.values() if c.worker == worker), None)

    def _reply(self, requester: tuple[int, int] | None, payload: Any) -> None:
        if requester is not None and (child := self._child(requester[0])) is not None:
            self._send(child, "reply", requester[1], payload)

    def _message(self, child: _Child, kind: str, token: int, payload: Any) -> None:
        if kind == "reload":
            if self.reloading is not None or self.stopping:
                self._send(child, "reply", token, {"ok": False, "busy": True})
            else:
                self._start_reload((child.worker, token), payload)
        elif kind == "metrics":
            t = next(self.tokens)
            self.rounds[t] = _Round("metrics", (child.worker, token), {c.worker for c in self.children.values()})
            for c in self.children.values():
                self._send(c, "collect", t)
            self._advance(t)
        elif kind in ("prepared", "committed", "collected") and token in self.rounds:
            r = self.rounds[token]
            r.waiting.discard(child.worker)
            if kind == "prepared" and not payload[0]:
                r.failures.append(f"worker {child.worker}: {payload[1]}")
            else:
                r.answers[child.worker] = payload
            self._advance(token)

    def _start_reload(self, requester: tuple[int, int] | None, paths: dict[str, str | None]) -> None:
        if self.reloading is not None or self.stopping:
            log.warning("reload ignored: %s", "one is already running" if self.reloading is not None else "stopping")
            return
        t = self.reloading = next(self.tokens)
        self.rounds[t] = _Round("reload", requester, {c.worker for c in self.children.values()}, paths=paths)
        for c in self.children.values():
            self._send(c, "prepare", t, paths)
        self._advance(t)

    def _advance(self, token: int) -> None:
        """Move a round on once no worker is left to answer its phase."""
        r = self.rounds.get(token)
        if r is None or r.waiting:
            return
        if r.kind == "metrics":
            del self.rounds[token]
            self._reply(r.requester, r.answers)
            return
        if r.phase == "prepare":
            if r.failures:  # all or nothing: every worker drops what it loaded
                for c in self.children.values():
                    self._send(c, "abort", token, r.failures[0])
                self._finish(token, {"ok": False, "error": r.failures[0]})
                return
            r.phase, r.answers = "commit", {}
            r.waiting = {c.worker for c in self.children.values()}
            for c in self.children.values():
                self._send(c, "commit", token)
            self._advance(token)
            return
        self.paths = r.paths
        first = r.answers[min(r.answers)] if r.answers else {}
        self._finish(token, {"ok": True, **first, "workers": len(r.answers), "seconds": time.perf_counter() - r.started})

    def _finish(self, token: int, outcome: dict[str, Any]) -> None:
        r = self.rounds.pop(token)
        self.reloading = None
        log.info("reload %s across the workers in %.1fs%s", "done" if outcome["ok"] else "failed",
                 time.perf_counter() - r.started, "" if outcome["ok"] else f": {outcome['error']}")
        self._reply(r.requester, outcome)


class _quiet:
    """Ignore a process already gone."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, ProcessLookupError)


def _worker_process_setup() -> None:
    """In a fresh worker: default signal dispositions (uvicorn and the app install their own),
    a process group of its own, and SIGTERM when the supervisor dies."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the worker outlives a killed supervisor
        pass
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(1)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on (inherited through fork)."""
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=2048)
    except OSError as err:
        raise RetrievalError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def run_supervised(load: Any, make_worker: Any, workers: int, paths: dict[str, str | None], drain_s: float,
                   sock: socket.socket) -> int:
    """Load once (load() -> the Recommender, raising RetrievalError: then nothing is forked),
    fork `workers` processes running make_worker(recommender, index, conn, workers) -> exit
    code, coordinate them; the service's exit code."""
    loaded = [load()]
    gc.collect()
    gc.freeze()  # the loaded objects leave the collector's generations: fewer copied pages in the workers
    sup = Supervisor(paths, drain_s)
    sup.fork(workers, lambda i, conn: make_worker(loaded[0], i, conn, workers))
    loaded.clear()  # the workers hold the model; the supervisor's pages return to them alone
    sock.close()
    gc.collect()
    return sup.run()


def path_dict(bundle: Path, index: Path, ranker: Path | None) -> dict[str, str | None]:
    return {"bundle": str(bundle), "index": str(index), "ranker": str(ranker) if ranker is not None else None}
