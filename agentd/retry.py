"""Retries with exponential backoff and full jitter, on the reactor's clock, never sleeping."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

T = TypeVar("T")


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] for attempt 0, 1, 2, ..."""
    return rand() * min(cap, base * 2.0**attempt)


def retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    base: float,
    cap: float,
    clock: IReactorTime,
    is_transient: Callable[[BaseException], bool],
    rand: Callable[[], float] = random.random,
    on_retry: Callable[[int, float, BaseException], None] | None = None,
) -> Deferred[T]:
    """Call ``attempt`` until it succeeds, a failure is not transient, or attempts run out.

    Returns a Deferred firing with the first success or the last failure.
    """
    return Deferred.fromCoroutine(
        _retry(attempt, attempts, base, cap, clock, is_transient, rand, on_retry)
    )


async def _retry(
    attempt: Callable[[], Awaitable[T]],
    attempts: int,
    base: float,
    cap: float,
    clock: IReactorTime,
    is_transient: Callable[[BaseException], bool],
    rand: Callable[[], float],
    on_retry: Callable[[int, float, BaseException], None] | None,
) -> T:
    for n in range(attempts):
        try:
            return await attempt()
        except Exception as e:
            if n + 1 >= attempts or not is_transient(e):
                raise
            delay = backoff_delay(n, base, cap, rand)
            if on_retry is not None:
                on_retry(n + 1, delay, e)
            await deferLater(clock, delay, lambda: None)
    raise AssertionError("unreachable")  # pragma: no cover
