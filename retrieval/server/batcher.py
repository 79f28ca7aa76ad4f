"""Micro-batching: concurrent requests coalesced into one call, run off the event loop in one worker thread.

A handler awaits `submit(items)`; the worker thread takes the oldest waiting job, then
every job already queued, then waits for more until the batch holds `max_batch` items or
`max_wait_s` has passed since the oldest job arrived, and runs the whole batch with one
call of `handle` (one interest forward and one FAISS search). Under load the queue fills
while a batch runs, so batches grow without waiting; at a trickle a request waits at
most `max_wait_s` for company. With `max_queue`, a submission that would leave more items
waiting raises Overloaded at once (the server answers 503) instead of queueing without bound. Results go back to each job's event loop thread-safely.

`handle(items) -> results` returns one result per item, in order: a value, or an
exception instance, which `submit` raises for the job holding that item (other jobs of
the batch are unaffected).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Job(Generic[T]):
    items: Sequence[T]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued: float = field(default_factory=time.perf_counter)


_STOP = object()


class BatcherClosed(RuntimeError):
    """The batcher has stopped and takes no more work."""


class Overloaded(RuntimeError):
    """More items wait than the batcher accepts: the caller should shed the request."""


class MicroBatcher(Generic[T, R]):
    """One worker thread that runs `handle` on coalesced batches of submitted items."""

    def __init__(self, handle: Callable[[list[T]], list[R | BaseException]], max_batch: int = 64,
                 max_wait_s: float = 0.001, max_queue: int | None = None, on_start: Callable[[], None] | None = None,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.handle, self.max_batch, self.max_wait_s, self.max_queue = handle, max_batch, max_wait_s, max_queue
        self.waiting = 0  # items submitted and not yet taken into a batch
        self._count = threading.Lock()  # the loop thread adds to `waiting`, the worker takes from it
        self.on_start, self.on_batch = on_start, on_batch  # on_batch(items, seconds the oldest job queued)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Results for `items`, in order, once the batch holding them has run; raises the
        exception the handler returned for any of them."""
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        with self._count:
            if self.max_queue is not None and self.waiting + len(items) > self.max_queue:
                raise Overloaded(f"overloaded: {self.waiting} requests already wait for the model")
            self.waiting += len(items)
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(items, loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    def close(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        if self.on_start is not None:
            self.on_start()
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            jobs, size = [first], len(first.items)
            deadline = first.queued + self.max_wait_s
            while size < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    try:
                        job = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                if job is _STOP:
                    stopping = True
                    break
                jobs.append(job)
                size += len(job.items)
            self._run_batch(jobs)

    def _run_batch(self, jobs: list[_Job[T]]) -> None:
        items = [x for job in jobs for x in job.items]
        with self._count:
            self.waiting -= len(items)
        if self.on_batch is not None:
            self.on_batch(len(items), time.perf_counter() - jobs[0].queued)
        try:
            results: list[Any] = list(self.handle(items))
            if len(results) != len(items):
                raise RuntimeError(f"batch handler returned {len(results)} results for {len(items)} items")
        except Exception as err:  # a bug in the handler: every job of the batch fails, the worker lives on
            log.exception("batch of %d items failed", len(items))
            results = [err] * len(items)
        at = 0
        for job in jobs:
            mine = results[at : at + len(job.items)]
            at += len(job.items)
            job.loop.call_soon_threadsafe(_deliver, job.future, mine)


def _deliver(future: asyncio.Future, results: list[Any]) -> None:
    if future.done():  # the client went away and the handler was cancelled
        return
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        future.set_exception(failed)
    else:
        future.set_result(results)
