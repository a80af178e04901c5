"""SQLite's write gate: requests' writes go before runners', and runners are never starved."""

from __future__ import annotations

import functools
import threading
import time

from pipeline.db import _WriteGate

from .conftest import wait_for


def _queued(gate: _WriteGate) -> int:
    with gate._lock:
        return len(gate._waiters) + len(gate._background)


def _has_queued(gate: _WriteGate, count: int) -> bool:
    return _queued(gate) == count


def _take_in_turn(gate: _WriteGate, names: list[tuple[str, bool]]) -> list[str]:
    """The gate is held; each name queues (in this order) and records when it gets its turn."""
    order: list[str] = []
    threads = []
    for name, background in names:

        def take(name: str = name, background: bool = background) -> None:
            assert gate.acquire(10, background=background)
            order.append(name)
            gate.release()

        thread = threading.Thread(target=take)
        thread.start()
        threads.append(thread)
        wait_for(functools.partial(_has_queued, gate, len(threads)))  # queued in this order
    gate.release()
    for thread in threads:
        thread.join(10)
    return order


def test_a_request_goes_before_runners_that_queued_earlier():
    gate = _WriteGate()
    assert gate.acquire(1)
    order = _take_in_turn(gate, [("runner-1", True), ("runner-2", True), ("request", False)])
    assert order == ["request", "runner-1", "runner-2"]


def test_runners_get_a_turn_after_a_run_of_requests():
    """Under a flood of requests a runner waits for FOREGROUND_RUN of them, no more."""
    gate = _WriteGate()
    assert gate.acquire(1)
    requests = [(f"request-{i}", False) for i in range(_WriteGate.FOREGROUND_RUN + 2)]
    order = _take_in_turn(gate, [("runner", True), *requests])
    assert order.index("runner") == _WriteGate.FOREGROUND_RUN


def test_requests_among_themselves_and_runners_among_themselves_keep_arrival_order():
    gate = _WriteGate()
    assert gate.acquire(1)
    order = _take_in_turn(
        gate, [("runner-1", True), ("request-1", False), ("runner-2", True), ("request-2", False)]
    )
    assert order == ["request-1", "request-2", "runner-1", "runner-2"]


def test_a_waiter_that_gives_up_leaves_its_queue():
    gate = _WriteGate()
    assert gate.acquire(1)
    assert not gate.acquire(0.05, background=True)
    assert not gate.acquire(0.05)
    assert _queued(gate) == 0
    gate.release()
    assert gate.acquire(0.05, background=True)  # free again: taken at once
    gate.release()


def test_a_runner_may_take_the_gate_again_but_a_waiting_runner_gets_it_soon():
    """Between runners the gate is not handed over at every commit (a thread switch
    each time), but a waiting runner gets it once the other kept it for BACKGROUND_SLICE."""
    gate = _WriteGate()
    gate.POLL_SECONDS = 30  # the waiter looks only when woken: only the slice hands it over
    gate.BACKGROUND_SLICE = 0.2
    assert gate.acquire(1, background=True)
    got = threading.Event()

    def waiter() -> None:
        assert gate.acquire(10, background=True)
        got.set()
        gate.release()

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(functools.partial(_has_queued, gate, 1))
    started = time.monotonic()
    retaken = 0
    while time.monotonic() - started < 10:
        gate.release()
        if got.is_set() or not gate.acquire(0.001, background=True):
            break
        if got.is_set():  # it had its turn in between
            gate.release()
            break
        retaken += 1
    kept = time.monotonic() - started
    thread.join(10)
    assert got.is_set()
    assert retaken > 1
    assert kept >= gate.BACKGROUND_SLICE


def test_a_gate_left_free_is_taken_by_the_next_runner_in_line():
    gate = _WriteGate()
    assert gate.acquire(1, background=True)
    order: list[str] = []

    def take(name: str) -> None:
        assert gate.acquire(10, background=True)
        order.append(name)
        gate.release()

    threads = []
    for name in ("runner-1", "runner-2", "runner-3"):
        threads.append(threading.Thread(target=take, args=(name,)))
        threads[-1].start()
        wait_for(functools.partial(_has_queued, gate, len(threads)))
    gate.release()  # left free (the releaser could take it again); nobody comes back
    for thread in threads:
        thread.join(10)
    assert order == ["runner-1", "runner-2", "runner-3"]
