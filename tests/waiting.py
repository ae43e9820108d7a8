"""Waiting in tests until something has happened, with a deadline instead of a fixed sleep.

``eventually`` is for tests on the Twisted reactor, ``wait_until`` for tests that drive
subprocesses and threads. Both check once more at the deadline, so a condition that comes
true just then still counts, and fail the test with ``what`` when it never does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def eventually(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "the condition",
) -> None:
    """Let the reactor run until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            assert predicate(), f"{what} did not happen within {timeout:g} seconds"
            return
        await deferLater(reactor, interval, lambda: None)


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "the condition",
) -> None:
    """Block until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            assert predicate(), f"{what} did not happen within {timeout:g} seconds"
            return
        time.sleep(interval)
