"""Open-loop HTTP load at a fixed request rate, from its own process (loopback only).

    python -m bench.loadgen --url http://127.0.0.1:8000/recommend --bodies bodies.jsonl \
        --rate 1000 --count 5000 --max-seconds 10 --out result.json

Request i is due at start + i / rate whatever happened to the others (open loop: a slow
server faces the same arrivals, so queueing shows up in the latency instead of slowing
the load, no coordinated omission). Latency runs from the due time to the last byte of
the response. Connections are HTTP/1.1 keep-alive, taken from a pool and opened as
needed, so concurrency follows the server's latency. Bodies (one JSON document per line)
are sent in turn; without --bodies, GET requests.

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
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np


class Pool:
    """Keep-alive connections to one host, opened on demand."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()
        self.opened = 0

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.idle:
            return self.idle.pop()
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port)

    def put(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.idle.append(conn)

    def close(self) -> None:
        while self.idle:
            self.idle.pop()[1].close()


def request_bytes(method: str, host: str, path: str, body: bytes | None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


async def exchange(pool: Pool, payload: bytes) -> int:
    """Send one request on a pooled connection; the response's status (the body is read and dropped)."""
    reader, writer = await pool.get()
    try:
        writer.write(payload)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if length:
            await reader.readexactly(length)
    except BaseException:
        writer.close()
        raise
    if close:
        writer.close()
    else:
        pool.put((reader, writer))
    return status


async def run_load(url: str, bodies: list[bytes] | None, rate: float, count: int, max_seconds: float,
                   timeout: float) -> dict[str, Any]:
    """Send the load; the raw per-request figures and the summary."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"error: loopback only, got host {host!r}")
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    payloads = ([request_bytes("POST", host, path, b) for b in bodies] if bodies
                else [request_bytes("GET", host, path, None)])
    n = min(count, int(rate * max_seconds))
    due = np.arange(n) / rate  # seconds after start
    lateness = np.full(n, np.nan)
    latency = np.full(n, np.nan)
    errors: Counter[str] = Counter()
    pool = Pool(host, port)
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    clock = time.perf_counter  # uvloop's loop.time() ticks in whole milliseconds

    async def one(i: int, at: float) -> None:
        lateness[i] = clock() - at
        try:
            status = await asyncio.wait_for(exchange(pool, payloads[i % len(payloads)]), timeout)
        except asyncio.TimeoutError:
            errors["timeout"] += 1
            return
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as err:
            errors[type(err).__name__] += 1
            return
        latency[i] = clock() - at
        if status != 200:
            errors[f"http {status}"] += 1

    start = clock() + 0.05
    i = 0
    while i < n:
        now = clock()
        while i < n and start + due[i] <= now:  # everything due by now goes out now
            tasks.append(loop.create_task(one(i, start + due[i])))
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, start + due[i] - clock()))
    await asyncio.gather(*tasks)
    end = clock()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    pool.close()

    ok = np.isfinite(latency)
    done_at = start + due[ok] + latency[ok]
    span = (done_at.max() - start) if ok.any() else float("nan")
    lat_ms = latency[ok] * 1e3
    pct = (lambda q: float(np.percentile(lat_ms, q))) if ok.any() else (lambda q: float("nan"))
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "url": url, "offered_rate": rate, "sent": n, "completed": int(ok.sum()),
        "errors": int(sum(errors.values())), "errors_by_kind": dict(errors),
        "achieved_rate": float(ok.sum() / span) if ok.any() else 0.0,
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": float(lat_ms.max()) if ok.any() else float("nan"),
        "send_lag_p50_ms": float(np.nanpercentile(lateness, 50) * 1e3),
        "send_lag_p99_ms": float(np.nanpercentile(lateness, 99) * 1e3),
        "connections_opened": pool.opened, "seconds": end - start,
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
