"""The HTTP server: uvicorn, bounded against one client holding it all, stopped gracefully.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but
a connection that never sends a complete request head (or nothing at all) is
kept for ever, and ``limit_concurrency`` refuses *requests* beyond the limit,
not connections. One client without a token could therefore hold every file
descriptor of the process: ``accept()`` then fails with EMFILE, asyncio logs
that with a traceback each time it retries (measured: 300 idle connections
against a limit of 256 descriptors wrote 150,000 log lines in 8 s) and
``/healthz`` times out. So:

* a connection must complete its request head within
  ``PIPELINE_HTTP_HEADER_TIMEOUT_SECONDS`` of connecting or of its previous
  response, or it is closed (:class:`BoundedH11Protocol`);
* beyond ``PIPELINE_HTTP_MAX_CONNECTIONS`` open connections a new one is
  closed at once, and uvicorn answers requests beyond it with 503;
* a log message that repeats is written once per ``REPEAT_INTERVAL_SECONDS``,
  with the count of those left out (:class:`RepeatFilter`).

Behind a reverse proxy, the proxy bounds the rest: header and body read
timeouts, body size and connections per client (see the README).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.config import Settings

# After a stop signal, open requests get this long to finish; event streams
# end by themselves (they watch the service's stop flag).
GRACEFUL_HTTP_SECONDS = 10
REPEAT_INTERVAL_SECONDS = 10.0


def bounded_protocol(*, header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for request heads and a connection cap."""

    limits = {"header_timeout": header_timeout, "max_connections": max_connections}
    return type("Bounded", (BoundedH11Protocol,), limits)


class BoundedH11Protocol(H11Protocol):
    """Closes a connection that holds no request in flight past its deadline."""

    header_timeout: float = 10.0
    max_connections: int = 1000
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.close()  # the descriptor is back at once; nothing was read
            return
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request head is due within the timeout too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        in_flight = self.cycle is not None and not self.cycle.response_complete
        if not in_flight and not self.transport.is_closing():
            self.transport.close()


class RepeatFilter(logging.Filter):
    """Lets a message through once per interval; the next one says how many were left out."""

    def __init__(self, interval: float = REPEAT_INTERVAL_SECONDS) -> None:
        super().__init__()
        self.interval = interval
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last, skipped = self._seen.get(key, (float("-inf"), 0))
            if now - last < self.interval:
                self._seen[key] = (last, skipped + 1)
                return False
            self._seen[key] = (now, 0)
        if skipped:
            record.msg = f"{record.msg} (and {skipped} more like it in {self.interval:g}s)"
        return True


def limit_repeats(*logger_names: str) -> RepeatFilter:
    """Install one :class:`RepeatFilter` on these loggers (asyncio's and uvicorn's)."""
    repeat = RepeatFilter()
    for name in logger_names:
        logging.getLogger(name).addFilter(repeat)
    return repeat


def serve(
    app: Any, settings: Settings, *, host: str, port: int, on_stop: Callable[[], None]
) -> bool:
    """Run the app until stopped; True if it started."""
    # In JSON mode uvicorn's records go through our root handler, like every other.
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_config=log_config,
        http=bounded_protocol(
            header_timeout=settings.http_header_timeout_seconds,
            max_connections=settings.http_max_connections,
        ),
        limit_concurrency=settings.http_max_connections,
        timeout_keep_alive=settings.http_keep_alive_seconds,
        timeout_graceful_shutdown=GRACEFUL_HTTP_SECONDS,
    )
    limit_repeats("asyncio", "uvicorn.error")
    server = GracefulServer(config, on_stop=on_stop)
    server.run()
    return server.started


class GracefulServer(uvicorn.Server):
    """uvicorn, but a graceful stop exits 0 and a second signal exits at once.

    uvicorn re-raises a captured SIGTERM after its shutdown, so the process
    would die with -15 even after a clean stop. Here the first SIGTERM or
    SIGINT stops accepting requests and lets running runs finish (the
    lifespan waits for them); a second one exits at once with 128+signal,
    and the runs it leaves are swept as interrupted on the next start.
    """

    def __init__(self, config: uvicorn.Config, *, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        serve_log = logging.getLogger("pipeline.serve")
        if self.should_exit:
            serve_log.warning("second signal: exiting now; unfinished runs will be swept later")
            os._exit(128 + sig)
        serve_log.info("stopping: no new requests; waiting for running runs to finish")
        self._on_stop()  # before the HTTP drain: no queued run may start during it
        self.handle_exit(sig, frame)
