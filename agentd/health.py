"""Health endpoints for load balancers and operators: /health, /health/live, /health/ready.

``/health`` runs every check concurrently, each bounded by its own timeout so a hung
dependency reads as "failed" instead of hanging the request, and answers

    {"status": "healthy" | "degraded" | "unhealthy", "checks": {...}, "uptime": s, "version": v}

A failed ``critical`` check makes agentd unhealthy (503); any other failed or degraded check
makes it degraded (200: agentd still serves, with a fallback such as the in-process rate
limiter or the usage spool). ``/health/live`` answers 200 whenever the reactor runs;
``/health/ready`` answers 503 while ``ready()`` is false, for example while draining.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from twisted.internet.defer import Deferred, TimeoutError, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from agentd.refusal import NOT_FOUND
from agentd.webrequest import WebRequest

_log = Logger()

CheckStatus = Literal["ok", "degraded", "failed"]
HealthStatus = Literal["healthy", "degraded", "unhealthy"]


@dataclass(frozen=True)
class CheckResult:
    status: CheckStatus
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthCheck:
    """A named probe; a failed ``critical`` one makes the whole service unhealthy."""

    name: str
    probe: Callable[[], Deferred[CheckResult]] | Callable[[], CheckResult]
    critical: bool = False
    timeout: float = 1.0


def run_check(check: HealthCheck, clock: IReactorTime) -> Deferred[CheckResult]:
    """Run ``check.probe``; never fails: errors and timeouts become a "failed" result.

    The detail names only the exception type: /health is reachable by load balancers, and
    exception text can carry addresses or credentials.
    """
    d: Deferred[CheckResult] = maybeDeferred(check.probe)
    d.addTimeout(check.timeout, clock)

    def failed(failure: Failure) -> CheckResult:
        if isinstance(failure.value, TimeoutError):
            return CheckResult("failed", {"error": f"timed out after {check.timeout:g} s"})
        _log.failure("health check {check} failed", failure, level=LogLevel.debug, check=check.name)
        return CheckResult("failed", {"error": type(failure.value).__name__})

    d.addErrback(failed)
    return d


def overall_status(results: Sequence[tuple[HealthCheck, CheckResult]]) -> HealthStatus:
    if any(check.critical and r.status == "failed" for check, r in results):
        return "unhealthy"
    if any(r.status != "ok" for _, r in results):
        return "degraded"
    return "healthy"


class HealthReporter(Protocol):
    """A part of agentd that says what /health should ask about it."""

    def health_checks(self) -> list[HealthCheck]: ...


class Pinger(Protocol):
    """Redis as /health sees it: a ``RedisStore``, or the ``RedisHealth`` that its other users
    share, which then learns what /health found."""

    def ping(self) -> Deferred[Any]: ...


def redis_check(
    redis: Pinger,
    critical: bool = False,
    detail: Callable[[], Mapping[str, Any]] | None = None,
) -> HealthCheck:
    """Ask Redis now, under the store's own, shorter, timeout; ``detail`` (which primary
    agentd uses, since when) is shown whether or not Redis answers."""

    def probe() -> Deferred[CheckResult]:
        def answered(_: object) -> CheckResult:
            return CheckResult("ok", detail() if detail else {})

        def failed(failure: Failure) -> CheckResult:
            error = {"error": type(failure.value).__name__}
            return CheckResult("failed", {**(detail() if detail else {}), **error})

        return redis.ping().addCallbacks(answered, failed)

    return HealthCheck("redis", probe, critical=critical)


def _write_json(request: WebRequest, code: int, body: Mapping[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


class LiveResource(Resource):
    """200 for as long as the reactor answers requests at all."""

    isLeaf = True

    def render_GET(self, request: WebRequest) -> bytes:
        return _write_json(request, 200, {"status": "alive"})


class ReadyResource(Resource):
    """200 while agentd accepts new connections, 503 before that and while draining."""

    isLeaf = True

    def __init__(self, ready: Callable[[], bool]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self._ready = ready

    def render_GET(self, request: WebRequest) -> bytes:
        if self._ready():
            return _write_json(request, 200, {"status": "ready"})
        return _write_json(request, 503, {"status": "not ready"})


class HealthResource(Resource):
    """/health itself, with ``live`` and ``ready`` as children."""

    def __init__(
        self,
        checks: Sequence[HealthCheck],
        clock: IReactorTime,
        version: str,
        started_at: float,
        ready: Callable[[], bool],
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self.checks = tuple(checks)
        self._clock = clock
        self._version = version
        self._started_at = started_at
        self.putChild(b"live", LiveResource())  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self.putChild(b"ready", ReadyResource(ready))

    def getChild(self, path: bytes, request: Request) -> IResource:
        return self if path == b"" else NOT_FOUND

    def report(self) -> Deferred[tuple[int, dict[str, Any]]]:
        """The HTTP status and body /health answers, once every check has finished."""
        d = gatherResults([run_check(check, self._clock) for check in self.checks])

        def build(results: list[CheckResult]) -> tuple[int, dict[str, Any]]:
            pairs = list(zip(self.checks, results, strict=True))
            status = overall_status(pairs)
            body = {
                "status": status,
                "checks": {
                    check.name: {
                        "status": r.status,
                        "critical": check.critical,
                        "detail": dict(r.detail),
                    }
                    for check, r in pairs
                },
                "uptime": round(self._clock.seconds() - self._started_at, 3),
                "version": self._version,
            }
            return (503 if status == "unhealthy" else 200), body

        return d.addCallback(build)

    def render_GET(self, request: WebRequest) -> int:
        gone = False

        def lost(_: Failure) -> None:
            nonlocal gone
            gone = True

        request.notifyFinish().addErrback(lost)

        def respond(answer: tuple[int, dict[str, Any]]) -> None:
            if not gone:
                request.write(_write_json(request, *answer))
                request.finish()

        self.report().addCallback(respond)
        return NOT_DONE_YET
