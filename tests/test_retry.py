"""SSH connection retries on a fake clock: the schedule, and which failures are retried."""

from __future__ import annotations

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock

from agentd.retry import backoff_delay, retry
from agentd.transport import TransportError
from agentd.transport.ssh.pool import _classify


def test_full_jitter_stays_within_the_exponential_envelope():
    assert backoff_delay(0, 0.5, 10, lambda: 1.0) == 0.5
    assert backoff_delay(3, 0.5, 10, lambda: 1.0) == 4.0
    assert backoff_delay(10, 0.5, 10, lambda: 1.0) == 10.0  # capped
    assert backoff_delay(3, 0.5, 10, lambda: 0.0) == 0.0
    assert backoff_delay(2, 0.5, 10, lambda: 0.25) == 0.5


def _flaky(failures: list[Exception], calls: list[float], clock: Clock):
    def attempt() -> defer.Deferred[str]:
        calls.append(clock.seconds())
        if failures:
            return defer.fail(failures.pop(0))
        return defer.succeed("connected")

    return attempt


def test_transient_failures_are_retried_on_the_clock_without_sleeping():
    clock = Clock()
    calls: list[float] = []
    refused = TransportError("refused", "connection refused", transient=True)
    d = retry(
        _flaky([refused, refused], calls, clock),
        attempts=3,
        base=1.0,
        cap=30.0,
        clock=clock,
        is_transient=lambda e: getattr(e, "transient", False),
        rand=lambda: 1.0,
    )
    assert calls == [0] and not d.called
    clock.advance(1.0)
    assert calls == [0, 1.0] and not d.called
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    assert calls == [0, 1.0, 3.0]
    assert d.result == "connected"


def test_the_last_attempt_failure_is_reported():
    clock = Clock()
    calls: list[float] = []
    timeout = TransportError("timeout", "timed out", transient=True)
    d = retry(
        _flaky([timeout] * 5, calls, clock),
        attempts=3,
        base=0.5,
        cap=10.0,
        clock=clock,
        is_transient=lambda e: getattr(e, "transient", False),
        rand=lambda: 0.5,
    )
    clock.pump([1.0] * 5)
    assert len(calls) == 3
    failure = []
    d.addErrback(failure.append)
    assert failure[0].value is timeout


@pytest.mark.parametrize("reason", ["auth", "host_key"])
def test_authentication_and_host_key_failures_are_not_retried(reason):
    clock = Clock()
    calls: list[float] = []
    d = retry(
        _flaky([TransportError(reason, "no")], calls, clock),
        attempts=5,
        base=0.5,
        cap=10.0,
        clock=clock,
        is_transient=lambda e: getattr(e, "transient", False),
    )
    clock.pump([1.0] * 10)
    assert calls == [0]
    d.addErrback(lambda f: None)


@pytest.mark.parametrize(
    ("exception", "reason", "transient"),
    [
        (error.ConnectionRefusedError(), "refused", True),
        (error.TimeoutError(), "timeout", True),
        (defer.TimeoutError(), "timeout", True),
        (error.ConnectingCancelledError(None), "timeout", True),
        (error.DNSLookupError(), "unreachable", True),
        (error.NoRouteError(), "unreachable", True),
        (error.ConnectionLost(), "lost", True),
        (TransportError("auth", "refused"), "auth", False),
        (TransportError("host_key", "changed"), "host_key", False),
        (ValueError("bug"), "other", False),
    ],
)
def test_failures_are_classified(exception, reason, transient):
    classified = _classify(exception)
    assert (classified.reason, classified.transient) == (reason, transient)
