"""One watcher of every run per process, for ``GET /events``: 1 viewer or 1,000 cost the same.

While anyone listens, one task looks at the runs that can change (queued or
running, created since, or just ended: :func:`pipeline.runs.watched_runs`)
every ``interval`` seconds, a handful of indexed statements whatever the
number of subscribers, and hands each change, as its event data, to every
subscriber's queue. On PostgreSQL it also looks as soon as it is told that
runs changed (:meth:`Watcher.wake`, from ``pipeline.notify``), whichever
process changed them, but never more often than every ``MIN_SPACING``
seconds: many changes, one look. A subscriber that cannot keep up (its queue full) is
dropped, and its stream ends: the client reconnects and reads the list again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio.to_thread

from pipeline import db
from pipeline.runs import Run

log = logging.getLogger("pipeline.watch")

Look = Callable[[int | None, Sequence[int]], tuple[list[Run], int]]
Encode = Callable[[Run], str]

# What one subscriber may have waiting before it counts as gone.
QUEUE_SIZE = 1000
# The shortest time between two looks, however often the database says runs changed.
MIN_SPACING = 0.1
# How long a shutdown waits for the look in flight.
STOP_TIMEOUT = 10.0


@dataclass(eq=False, slots=True)
class Subscription:
    """One open stream: the changes it has not sent yet, and its pipeline filter."""

    pipeline: str | None
    queue: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: bool = False

    def offer(self, run: Run, data: str) -> None:
        if self.dropped or (self.pipeline is not None and run.pipeline != self.pipeline):
            return
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped = True


class Watcher:
    """Looks at the runs while it has subscribers; stops when the last one leaves."""

    def __init__(self, look: Look, encode: Encode, *, interval: float) -> None:
        self._look = look
        self._encode = encode
        self._interval = interval
        self._subscribers: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._sent: dict[int, str] = {}  # what was last said of each run that can change
        self._current: dict[int, Run] = {}
        self._newest: int | None = None
        self._starting = asyncio.Lock()
        self._woken = asyncio.Event()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self.looks = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def subscribe(self, pipeline: str | None) -> Subscription:
        """A new subscription, which first receives the runs that can change now."""
        async with self._starting:
            if self._stopped:
                raise db.DatabaseBusy("the server is stopping; retry later")
            if self._task is None or self._task.done():
                await self._look_once()  # the current state, before the first change
                self._task = asyncio.get_running_loop().create_task(self._loop())
        sub = Subscription(pipeline)
        for run_id, data in self._sent.items():
            sub.offer(self._current[run_id], data)
        self._subscribers.add(sub)
        return sub

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop looking, once the look in flight has ended; before the engine closes.

        A look runs in a worker thread with a connection checked out, and
        ``Engine.dispose`` closes only the connections checked in: one given
        back later goes to an orphaned pool, which the garbage collector
        closes some time after (psycopg warns of it). So the loop is woken
        and left to end by itself, not cancelled: cancelling a task does not
        wait for the thread it awaits. A look that hangs (a database that
        does not answer) holds the shutdown for ``timeout`` seconds at most;
        so ``_starting`` is not taken (a first look may hold it), and a loop
        that a subscription starts after this ends at once.
        """
        self._stopped = True
        task = self._task
        if task is not None and not task.done():
            self._woken.set()
            _, pending = await asyncio.wait({task}, timeout=timeout)
            if pending:
                log.warning("the watcher's look did not end in %.1f s; stopping anyway", timeout)

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def wake(self) -> None:
        """Runs changed: look now rather than at the next poll. Safe from any thread."""
        event_loop = self._event_loop
        if event_loop is not None and not event_loop.is_closed():
            event_loop.call_soon_threadsafe(self._woken.set)

    async def _loop(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        last = self._event_loop.time()
        while self._subscribers and not self._stopped:
            with contextlib.suppress(TimeoutError):  # the poll: look anyway
                await asyncio.wait_for(self._woken.wait(), self._interval)
            if self._stopped:
                break
            early = MIN_SPACING - (self._event_loop.time() - last)
            if early > 0:
                await asyncio.sleep(early)
            self._woken.clear()
            last = self._event_loop.time()
            try:
                await self._look_once()
            except db.DatabaseBusy as exc:  # busy or gone: say nothing new, look again
                log.debug("the watcher waits: %s", exc)
            except Exception:
                log.exception("the watcher failed to look; it looks again")
        self._task = None
        self._sent.clear()
        self._current.clear()
        self._newest = None

    async def _look_once(self) -> None:
        found, newest = await anyio.to_thread.run_sync(self._look, self._newest, list(self._sent))
        self.looks += 1
        self._newest = newest
        for run in found:
            data = self._encode(run)
            if self._sent.get(run.id) != data:
                for sub in list(self._subscribers):
                    sub.offer(run, data)
            if run.status.terminal:  # said; it changes again only by coming back to live
                self._sent.pop(run.id, None)
                self._current.pop(run.id, None)
            else:
                self._sent[run.id] = data
                self._current[run.id] = run
