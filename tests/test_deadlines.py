"""Deadlines time Deferreds out as Deferred.addTimeout does, with one timed call for all."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from agentd.deadlines import Deadlines


def outcome(d: Deferred[object]) -> list[object]:
    """What ``d`` fires with, once it fires: its result, or its failure's exception."""
    seen: list[object] = []
    d.addBoth(lambda r: seen.append(r.value if isinstance(r, Failure) else r))
    return seen


def test_a_deferred_that_answers_in_time_is_untouched() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    d: Deferred[object] = Deferred()
    deadlines.add(d, 0.1)
    seen = outcome(d)
    clock.advance(0.05)
    d.callback("reply")
    clock.advance(1)
    assert seen == ["reply"]
    assert clock.getDelayedCalls() == []


def test_one_that_does_not_answer_fails_with_timeout_error_at_its_deadline() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    cancelled: list[Deferred[object]] = []
    d: Deferred[object] = Deferred(cancelled.append)
    deadlines.add(d, 0.1)
    seen = outcome(d)
    clock.advance(0.099)
    assert seen == [] and cancelled == []
    clock.advance(0.001)
    assert cancelled == [d]  # the command's own canceller ran, as with addTimeout
    assert len(seen) == 1 and isinstance(seen[0], TimeoutError)
    assert str(seen[0]) == str(TimeoutError(0.1, "Deferred"))
    assert clock.getDelayedCalls() == []


def test_the_same_failure_as_add_timeout() -> None:
    """Side by side with Twisted's own: the same exception, the same message."""
    clock = Clock()
    ours: Deferred[object] = Deferred()
    Deadlines(clock).add(ours, 2)
    theirs: Deferred[object] = Deferred()
    theirs.addTimeout(2, clock)
    got, expected = outcome(ours), outcome(theirs)
    clock.advance(2)
    assert type(got[0]) is type(expected[0]) and str(got[0]) == str(expected[0])


def test_a_cancellation_by_anyone_else_stays_a_cancellation() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    d: Deferred[object] = Deferred()
    deadlines.add(d, 0.1)
    seen = outcome(d)
    d.cancel()
    assert len(seen) == 1 and isinstance(seen[0], CancelledError)
    clock.advance(1)
    assert len(seen) == 1


def test_a_failure_passes_through_unchanged() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    d: Deferred[object] = Deferred()
    deadlines.add(d, 0.1)
    seen = outcome(d)
    d.errback(ValueError("NOSCRIPT"))
    assert len(seen) == 1 and isinstance(seen[0], ValueError)


def test_many_deferreds_share_one_timed_call_and_each_times_out_on_time() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    waiting: list[tuple[Deferred[object], list[object]]] = []
    for _ in range(5):
        d: Deferred[object] = Deferred()
        deadlines.add(d, 10)
        waiting.append((d, outcome(d)))
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(1)
    waiting[1][0].callback("answered")
    # The first's deadline is 10; the others follow a second apart.
    clock.advance(5)
    assert [len(seen) for _, seen in waiting] == [1, 1, 0, 0, 0]
    clock.advance(1)  # the answered one's deadline, 11
    for i in range(2, 5):
        clock.advance(0.999)
        assert waiting[i][1] == []
        clock.advance(0.001)
        assert len(waiting[i][1]) == 1 and isinstance(waiting[i][1][0], TimeoutError)
    assert isinstance(waiting[0][1][0], TimeoutError)
    assert waiting[1][1] == ["answered"]
    assert clock.getDelayedCalls() == []


def test_a_shorter_timeout_after_a_longer_one_is_not_late() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    long: Deferred[object] = Deferred()
    short: Deferred[object] = Deferred()
    deadlines.add(long, 5)
    deadlines.add(short, 0.1)
    seen_long, seen_short = outcome(long), outcome(short)
    clock.advance(0.1)
    assert len(seen_short) == 1 and isinstance(seen_short[0], TimeoutError)
    assert seen_long == []
    clock.advance(4.9)
    assert len(seen_long) == 1 and isinstance(seen_long[0], TimeoutError)


def test_answered_deferreds_do_not_pile_up() -> None:
    """A steady stream of calls that answer: the heap holds about what is in flight, and the
    reactor sees one timed call per timeout period, not one per call."""
    clock = Clock()
    deadlines = Deadlines(clock)
    armed: list[object] = []
    for _ in range(10_000):
        d: Deferred[object] = Deferred()
        deadlines.add(d, 0.1)
        armed.extend(clock.getDelayedCalls())
        clock.advance(0.0005)
        d.callback(None)
        assert deadlines.pending <= 2
    assert len(set(map(id, armed))) <= 10_000 * 0.0005 / 0.1 + 2


def test_a_timeout_whose_callback_adds_another_arms_for_the_earliest() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    later: Deferred[object] = Deferred()
    first: Deferred[object] = Deferred()
    retried: list[Deferred[object]] = []

    def retry(_: object) -> None:
        again: Deferred[object] = Deferred()
        deadlines.add(again, 10)
        retried.append(again)

    first.addErrback(retry)
    deadlines.add(first, 1)
    deadlines.add(later, 2)
    seen_later = outcome(later)
    clock.advance(1)
    assert len(retried) == 1
    clock.advance(1)  # "later" times out at 2, not when the retry's call would
    assert len(seen_later) == 1 and isinstance(seen_later[0], TimeoutError)
    seen_again = outcome(retried[0])
    clock.advance(8.5)  # the retry came at 1, with 10 s
    assert seen_again == []
    clock.advance(0.5)
    assert len(seen_again) == 1 and isinstance(seen_again[0], TimeoutError)
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("timeout", [0.0, 1e-9])
def test_a_zero_timeout_fires_on_the_next_turn(timeout: float) -> None:
    clock = Clock()
    d: Deferred[object] = Deferred()
    Deadlines(clock).add(d, timeout)
    seen = outcome(d)
    clock.advance(0)
    clock.advance(timeout)
    assert len(seen) == 1 and isinstance(seen[0], TimeoutError)


def test_a_canceller_that_raises_does_not_stop_the_others_timing_out() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)

    def broken(_: Deferred[object]) -> None:
        raise ValueError("not in the queue")

    first: Deferred[object] = Deferred(broken)
    second: Deferred[object] = Deferred()
    third: Deferred[object] = Deferred()
    deadlines.add(first, 1)
    deadlines.add(second, 1)
    deadlines.add(third, 2)
    seen_second, seen_third = outcome(second), outcome(third)
    clock.advance(1)
    assert len(seen_second) == 1 and isinstance(seen_second[0], TimeoutError)
    clock.advance(1)
    assert len(seen_third) == 1 and isinstance(seen_third[0], TimeoutError)
    assert clock.getDelayedCalls() == []
