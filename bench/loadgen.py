"""Open-loop HTTP load at a fixed request rate, from its own process (loopback only).

    python -m bench.loadgen --url http://127.0.0.1:8000/recommend --bodies bodies.jsonl \
        --rate 1000 --count 5000 --max-seconds 10 --out result.json

Request i is due at start + i / rate whatever happened to the others (open loop: a slow
server faces the same arrivals, so queueing shows up in the latency instead of slowing
the load, no coordinated omission). Latency runs from the due time to the last byte of
the response. Connections are HTTP/1.1 keep-alive, one request at a time each, reused
when idle and opened as needed (up to 1,024), so concurrency follows the server's
latency. Each connection is an asyncio Protocol that parses its responses as bytes
arrive (no task, no stream per request): the generator's own cost per request stays
small. Bodies (one JSON document per line) are sent in turn; without --bodies, GET requests.

Bounded: at most --count requests and none due after --max-seconds; requests still
unanswered --timeout seconds after their due time count as errors. Reports latency
percentiles, errors by kind, the achieved throughput, how late requests went out (the
generator's own lag) and its CPU time per request, so it can be shown not to be the
bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np


class Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its response parsed as it arrives."""

    def __init__(self, load: Load):
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need: int | None = None  # bytes of the whole response, once its head is in
        self.status = 0
        self.current = -1  # the request in flight, -1 when idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.load.ready(self)

    def send(self, i: int) -> None:
        self.current = i
        self.transport.write(self.load.payload(i))  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]) if at >= 0 else 0
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            del self.buf[: self.need]
            self.need = None
            i, self.current = self.current, -1
            self.load.done(self, i, self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self, exc)


class Load:
    """The open-loop schedule, the connection pool and the figures of one run."""

    def __init__(self, host: str, port: int, payloads: list[bytes], n: int, max_connections: int):
        self.host, self.port, self.payloads, self.n = host, port, payloads, n
        self.max_connections = max_connections
        self.idle: list[Connection] = []
        self.waiting: deque[int] = deque()  # due requests without a free connection
        self.connections = 0  # open or opening
        self.opened = 0
        self.due_at = np.zeros(n)  # perf_counter seconds
        self.lateness = np.full(n, np.nan)  # how late each request went out
        self.latency = np.full(n, np.nan)
        self.errors: Counter[str] = Counter()
        self.finished = 0
        self.all_done: asyncio.Future | None = None

    def payload(self, i: int) -> bytes:
        return self.payloads[i % len(self.payloads)]

    def due(self, i: int) -> None:
        if self.idle:
            self.start(self.idle.pop(), i)
            return
        self.waiting.append(i)
        if self.connections < self.max_connections:
            self.connections += 1
            self.opened += 1
            asyncio.get_running_loop().create_task(self.open())

    async def open(self) -> None:
        try:
            await asyncio.get_running_loop().create_connection(lambda: Connection(self), self.host, self.port)
        except OSError as err:
            self.connections -= 1
            if self.waiting:
                self.fail(self.waiting.popleft(), type(err).__name__)

    def start(self, conn: Connection, i: int) -> None:
        self.lateness[i] = time.perf_counter() - self.due_at[i]
        conn.send(i)

    def ready(self, conn: Connection) -> None:
        if self.waiting:
            self.start(conn, self.waiting.popleft())
        else:
            self.idle.append(conn)

    def done(self, conn: Connection, i: int, status: int) -> None:
        self.latency[i] = time.perf_counter() - self.due_at[i]
        if status != 200:
            self.errors[f"http {status}"] += 1
        self.count()
        self.ready(conn)

    def lost(self, conn: Connection, exc: Exception | None) -> None:
        self.connections -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.current >= 0:
            self.fail(conn.current, type(exc).__name__ if exc else "connection closed")

    def fail(self, i: int, kind: str) -> None:
        self.errors[kind] += 1
        self.count()

    def count(self) -> None:
        self.finished += 1
        if self.finished == self.n and self.all_done is not None and not self.all_done.done():
            self.all_done.set_result(None)

    def close(self) -> None:
        for conn in self.idle:
            conn.transport.close()  # type: ignore[union-attr]


def request_bytes(method: str, host: str, path: str, body: bytes | None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


async def run_load(url: str, bodies: list[bytes] | None, rate: float, count: int, max_seconds: float,
                   timeout: float, max_connections: int = 1024) -> dict[str, Any]:
    """Send the load and summarise it."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"error: loopback only, got host {host!r}")
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    payloads = ([request_bytes("POST", host, path, b) for b in bodies] if bodies
                else [request_bytes("GET", host, path, None)])
    n = min(count, int(rate * max_seconds))
    load = Load(host, port, payloads, n, max_connections)
    loop = asyncio.get_running_loop()
    load.all_done = loop.create_future()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter() + 0.05  # perf_counter: uvloop's loop.time() ticks in whole milliseconds
    load.due_at = start + np.arange(n) / rate
    i = 0
    while i < n:
        now = time.perf_counter()
        while i < n and load.due_at[i] <= now:  # everything due by now goes out now
            load.due(i)
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, load.due_at[i] - time.perf_counter()))
    if n:
        try:
            await asyncio.wait_for(load.all_done, timeout)
        except asyncio.TimeoutError:
            pass
    end = time.perf_counter()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    load.close()
    unanswered = n - load.finished
    if unanswered:
        load.errors["timeout"] += unanswered

    latency, lateness, errors = load.latency, load.lateness, load.errors
    ok = np.isfinite(latency)
    span = float((load.due_at[ok] + latency[ok]).max() - start) if ok.any() else float("nan")
    lat_ms = latency[ok] * 1e3
    pct = (lambda q: float(np.percentile(lat_ms, q))) if ok.any() else (lambda q: float("nan"))
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    completed = int(ok.sum()) - sum(v for k, v in errors.items() if k.startswith("http "))
    return {
        "url": url, "offered_rate": rate, "sent": n, "completed": completed,
        "errors": int(sum(errors.values())), "errors_by_kind": dict(errors),
        "achieved_rate": float(completed / span) if ok.any() else 0.0,
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": float(lat_ms.max()) if ok.any() else float("nan"),
        "send_lag_p50_ms": float(np.nanpercentile(lateness, 50) * 1e3) if n else float("nan"),
        "send_lag_p99_ms": float(np.nanpercentile(lateness, 99) * 1e3) if n else float("nan"),
        "connections_opened": load.opened, "seconds": end - start,
        "client_cpu_s": cpu, "client_cpu_us_per_request": cpu / max(n, 1) * 1e6,
    }


def read_bodies(path: Path) -> list[bytes]:
    return [line.strip().encode() for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT/PATH (loopback only)")
    parser.add_argument("--bodies", type=Path, default=None, help="JSON bodies, one per line, POSTed in turn (else GET)")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--count", type=int, default=10_000, help="most requests")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="no request is due after this")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds after its due time a request fails")
    parser.add_argument("--out", type=Path, default=None, help="JSON result (default: stdout)")
    args = parser.parse_args(argv)
    try:
        import uvloop  # the faster event loop, where installed

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    bodies = read_bodies(args.bodies) if args.bodies else None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(run_load(args.url, bodies, args.rate, args.count, args.max_seconds, args.timeout))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
