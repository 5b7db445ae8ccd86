"""Waiting on engine batches from Python: synchronously and from any asyncio loop.

The engine's worker threads never call into Python. A synchronous wait sleeps in C with the
GIL released and checks for Ctrl-C between short slices; an asyncio wait registers the
batch's eventfd with ``loop.add_reader``, so the loop thread itself resolves the future when
the engine signals, and a cancelled task cancels the batch's transfers.

Large jobs go through a bounded window: at most two windows of requests are in the engine at
once, so memory grows with the window, not with the number of items.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import weakref
from collections import deque
from typing import Callable, Iterator, Optional, Tuple

from . import _engine

logger = logging.getLogger("semex")

# Engines alive in this process, closed at interpreter exit so worker threads are joined
# before finalization.
_live_engines: "weakref.WeakSet[_engine.Engine]" = weakref.WeakSet()
_lock = threading.Lock()


def new_engine(**options) -> _engine.Engine:
    engine = _engine.Engine(**options)
    with _lock:
        _live_engines.add(engine)
    return engine


@atexit.register
def _close_all() -> None:
    with _lock:
        engines = list(_live_engines)
    for engine in engines:
        if not engine.forked:
            engine.close()


def _after_fork_in_child() -> None:
    # The parent's worker threads do not exist here. Engines notice by pid and refuse to be
    # used; owners (LM) build a new one lazily. Forget the old ones without touching them.
    global _lock
    _lock = threading.Lock()
    _live_engines.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class EngineHolder:
    """Builds an engine on first use and rebuilds it in a fork() child."""

    def __init__(self, **options):
        self._options = options
        self._engine: Optional[_engine.Engine] = None
        self._pid = -1
        self._guard = threading.Lock()

    def get(self) -> _engine.Engine:
        engine = self._engine
        if engine is not None and self._pid == os.getpid() and not engine.closed:
            return engine
        with self._guard:
            if self._engine is None or self._pid != os.getpid() or self._engine.closed:
                self._engine = new_engine(**self._options)
                self._pid = os.getpid()
            return self._engine

    def close(self) -> None:
        engine = self._engine
        if engine is not None and self._pid == os.getpid():
            engine.close()
        self._engine = None

    def stats(self) -> dict:
        engine = self._engine
        if engine is None or self._pid != os.getpid() or engine.closed:
            return {}
        return engine.stats()


Tick = Optional[Callable[[], None]]


def wait_sync(batch: _engine.Batch, tick: Tick = None, interval: float = 0.1) -> None:
    """Block until the batch is done; Ctrl-C cancels it (in C) and raises. `tick` runs every
    `interval` seconds meanwhile, and once at the end."""
    if tick is None:
        batch.wait()
        return
    while not batch.wait(interval):
        tick()
    tick()


async def wait_async(batch: _engine.Batch, tick: Tick = None,
                     interval: Optional[float] = None) -> None:
    """Await the batch on the running loop; cancelling the awaiting task cancels the batch.
    `tick` runs on each wake-up of the batch's eventfd and, with `interval`, every
    `interval` seconds meanwhile (a loop timer: nothing blocks)."""
    if batch.done:
        if tick is not None:
            tick()
        return
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    fd = batch.fileno()
    timer: Optional[asyncio.TimerHandle] = None

    def ticked() -> bool:
        """Run tick; an exception from it ends the wait in the awaiting task."""
        if tick is None:
            return True
        try:
            tick()
            return True
        except Exception as exc:  # noqa: BLE001 - raised in the awaiting task
            if not future.done():
                future.set_exception(exc)
            return False

    def on_ready() -> None:
        batch.clear_notify()
        if ticked() and batch.done and not future.done():
            future.set_result(None)

    def on_timer() -> None:
        nonlocal timer
        if not future.done() and ticked():
            timer = loop.call_later(interval, on_timer)

    loop.add_reader(fd, on_ready)
    if tick is not None and interval:
        timer = loop.call_later(interval, on_timer)
    try:
        await future
    except BaseException:
        batch.cancel()
        raise
    finally:
        loop.remove_reader(fd)
        if timer is not None:
            timer.cancel()


class Windows:
    """Runs [0, n) through the engine as consecutive windows of `size` requests, keeping
    `depth` windows submitted ahead so the engine never idles between them. Iterate to get
    (start, batch) in order; wait on each batch before asking for the next. close() cancels
    whatever is still pending (a failed or interrupted caller loses no finished work: the
    windows it already consumed are its own).

    The first window is only `first` requests: the engine starts sending after building
    those few bodies instead of a whole window's, and the next window is built while they
    are in flight.

    Results are read in window order, so one slow request (a retry waiting out its backoff,
    a straggler) holds its window back. top_up(), called while the caller waits, submits
    another window whenever the engine has less than one window of unfinished work, up to
    `max_depth` windows: the engine keeps sending while the oldest window waits for its last
    answers (measured with 1% of requests failing: without it, each window's slowest retry
    left the engine idle and 20,000 requests took 4 s instead of ~1.2 s)."""

    def __init__(self, submit: Callable[[int, int], _engine.Batch], n: int, size: int,
                 depth: int = 2, first: int = 256, max_depth: int = 8):
        self._submit = submit
        self.n = n
        self.size = max(1, size)
        self.first = max(1, min(first, self.size))
        self.depth = max(1, depth)
        self.max_depth = max(self.depth, max_depth)
        self.pending: "deque[Tuple[int, _engine.Batch]]" = deque()
        self._start = 0
        self.finished = 0  # requests in windows already consumed

    def __iter__(self) -> Iterator[Tuple[int, _engine.Batch]]:
        while self._start < self.n or self.pending:
            while len(self.pending) < self.depth and self._start < self.n:
                self._submit_next()
            start, batch = self.pending[0]
            yield start, batch
            self.pending.popleft()
            self.finished += len(batch)

    def _submit_next(self) -> None:
        size = self.size if self._start else self.first
        end = min(self.n, self._start + size)
        self.pending.append((self._start, self._submit(self._start, end)))
        self._start = end

    def top_up(self) -> None:
        """Submit another window if the engine is running out of work (see the class doc)."""
        if self._start >= self.n or len(self.pending) >= self.max_depth:
            return
        unfinished = 0
        for _, batch in self.pending:
            unfinished += len(batch) - batch.completed
        if unfinished < self.size:
            self._submit_next()

    def completed(self) -> int:
        """Requests finished so far, for progress reporting."""
        return self.finished + sum(batch.completed for _, batch in self.pending)

    def close(self) -> None:
        while self.pending:
            _, batch = self.pending.popleft()
            batch.cancel()
