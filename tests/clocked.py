"""A server or a worker whose schedules fire by a clock the test walks.

``python -m tests.clocked serve PORT CLOCK_FILE`` or ``... worker CLOCK_FILE``,
configured by the usual ``PIPELINE_*`` variables. The clock is the instant
written in CLOCK_FILE (ISO 8601, replaced atomically by the test), so several
processes see the same "now" and a test walks them through an hour of
minute-ticks in seconds. Everything else is what ``pipeline serve`` and
``pipeline worker`` run.
"""

from __future__ import annotations

import datetime as dt
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from pipeline import serving
from pipeline.api import create_app
from pipeline.config import get_settings
from pipeline.logs import configure_logging
from pipeline.service import Service


class FileClock:
    """``now`` as written in a file (what a test controls from outside the process)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.path.read_text().strip())


def set_clock(path: Path, now: dt.datetime) -> None:
    """Move every process reading ``path`` to ``now`` at once."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(now.isoformat())
    tmp.replace(path)


def main(argv: list[str]) -> int:
    settings = get_settings()
    configure_logging(settings.log_format)
    if argv[0] == "serve":
        port, clock = int(argv[1]), FileClock(Path(argv[2]))
        app = create_app(settings, clock=clock)
        started = serving.serve(
            app, settings, host="127.0.0.1", port=port, on_stop=app.state.service.stop_claiming
        )
        return 0 if started else 1
    service = Service(settings, execute=True, clock=FileClock(Path(argv[1])))
    stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    service.start()
    print("worker ready", flush=True)
    stop.wait()
    service.stop(wait=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
