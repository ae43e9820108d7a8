"""The /health, /health/live and /health/ready resources, driven through treq's StubTreq."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from agentd.health import CheckResult, HealthCheck, HealthResource, redis_check
from agentd.redisstore import RedisStore
from tests.servers import RedisServer

STARTED_AT = 1_000.0


def fired(d: Deferred[Any]) -> bool:
    seen: list[bool] = []

    def note(result: Any) -> Any:
        seen.append(True)
        return result

    d.addBoth(note)
    return bool(seen)


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class Site:
    """A root resource with /health mounted, a client for it and the clock it runs on."""

    def __init__(self, checks: list[HealthCheck], ready: Callable[[], bool] = lambda: True):
        self.clock = Clock()
        self.clock.advance(STARTED_AT)
        root = Resource()
        root.putChild(b"health", HealthResource(checks, self.clock, "1.2.3", STARTED_AT, ready))
        self.client = StubTreq(root)

    def request(self, path: str) -> Deferred[Any]:
        return self.client.get(f"http://agentd.test{path}")

    def answer(self, d: Deferred[Any]) -> tuple[int, dict[str, Any]]:
        self.client.flush()
        response = result_of(d)
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        assert response.headers.getRawHeaders(b"cache-control") == [b"no-store"]
        body = result_of(self.client.content(response))
        return response.code, json.loads(body)

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        return self.answer(self.request(path))


def ok() -> CheckResult:
    return CheckResult("ok", {"latency_ms": 1})


def degraded() -> CheckResult:
    return CheckResult("degraded", {"fallback": "in-process"})


def failed() -> CheckResult:
    return CheckResult("failed")


def raises() -> CheckResult:
    raise ConnectionRefusedError("redis://:hunter2@10.0.0.5:6379 refused")


def hangs() -> Deferred[CheckResult]:
    return Deferred()


def test_all_checks_ok_is_healthy_with_uptime_and_version() -> None:
    site = Site([HealthCheck("redis", ok, critical=True), HealthCheck("spool", ok)])
    site.clock.advance(42.5)
    code, body = site.get("/health")
    assert code == 200
    assert body == {
        "status": "healthy",
        "checks": {
            "redis": {"status": "ok", "critical": True, "detail": {"latency_ms": 1}},
            "spool": {"status": "ok", "critical": False, "detail": {"latency_ms": 1}},
        },
        "uptime": 42.5,
        "version": "1.2.3",
    }


def test_trailing_slash_is_the_same_report() -> None:
    code, body = Site([HealthCheck("redis", ok)]).get("/health/")
    assert (code, body["status"]) == (200, "healthy")


@pytest.mark.parametrize(
    ("checks", "code", "status"),
    [
        ([HealthCheck("a", ok), HealthCheck("b", degraded)], 200, "degraded"),
        ([HealthCheck("a", ok), HealthCheck("b", failed)], 200, "degraded"),
        ([HealthCheck("a", degraded, critical=True)], 200, "degraded"),
        ([HealthCheck("a", failed, critical=True), HealthCheck("b", ok)], 503, "unhealthy"),
        ([HealthCheck("a", degraded), HealthCheck("b", failed, critical=True)], 503, "unhealthy"),
        ([], 200, "healthy"),
    ],
)
def test_overall_status_follows_the_critical_flag(
    checks: list[HealthCheck], code: int, status: str
) -> None:
    answered, body = Site(checks).get("/health")
    assert (answered, body["status"]) == (code, status)


def test_a_check_that_raises_fails_naming_only_the_exception_type() -> None:
    code, body = Site([HealthCheck("redis", raises, critical=True)]).get("/health")
    assert code == 503
    assert body["checks"]["redis"] == {
        "status": "failed",
        "critical": True,
        "detail": {"error": "ConnectionRefusedError"},
    }
    assert "hunter2" not in json.dumps(body)


def test_a_hung_check_fails_after_its_timeout_instead_of_hanging_the_request() -> None:
    site = Site([HealthCheck("redis", hangs, critical=True, timeout=1.0), HealthCheck("spool", ok)])
    d = site.request("/health")
    site.client.flush()
    assert not fired(d)
    site.clock.advance(0.9)
    site.client.flush()
    assert not fired(d)
    site.clock.advance(0.1)
    code, body = site.answer(d)
    assert code == 503
    assert body["status"] == "unhealthy"
    assert body["checks"]["redis"]["detail"] == {"error": "timed out after 1 s"}
    assert body["checks"]["spool"]["status"] == "ok"


def test_a_check_may_answer_later_through_a_deferred() -> None:
    pending: Deferred[CheckResult] = Deferred()
    site = Site([HealthCheck("redis", lambda: pending)])
    d = site.request("/health")
    site.client.flush()
    assert not fired(d)
    pending.callback(degraded())
    code, body = site.answer(d)
    assert (code, body["status"]) == (200, "degraded")
    assert body["checks"]["redis"]["detail"] == {"fallback": "in-process"}


def test_checks_run_on_every_request() -> None:
    calls: list[int] = []

    def counted() -> Deferred[CheckResult]:
        calls.append(1)
        return succeed(ok())

    site = Site([HealthCheck("redis", counted)])
    site.get("/health")
    site.get("/health")
    assert len(calls) == 2


def test_live_answers_200_even_when_checks_fail() -> None:
    site = Site([HealthCheck("redis", failed, critical=True)], ready=lambda: False)
    assert site.get("/health/live") == (200, {"status": "alive"})


def test_ready_follows_the_ready_callable() -> None:
    state = {"ready": True}
    site = Site([HealthCheck("redis", failed, critical=True)], ready=lambda: state["ready"])
    assert site.get("/health/ready") == (200, {"status": "ready"})
    state["ready"] = False
    assert site.get("/health/ready") == (503, {"status": "not ready"})


def test_unknown_child_is_404() -> None:
    site = Site([])
    d = site.request("/health/nope")
    site.client.flush()
    assert result_of(d).code == 404


@pytest_twisted.ensureDeferred
async def test_redis_check_is_ok_with_redis_and_failed_without(
    redis_server: RedisServer,
) -> None:
    from twisted.internet import reactor

    store = RedisStore(redis_server.url, reactor, timeout=0.5)
    try:
        check = redis_check(store)
        assert not check.critical
        assert (await HealthResource([check], reactor, "v", 0.0, lambda: True).report())[1][
            "checks"
        ]["redis"]["status"] == "ok"
        redis_server.stop()
        code, body = await HealthResource([check], reactor, "v", 0.0, lambda: True).report()
        assert (code, body["status"]) == (200, "degraded")
        assert body["checks"]["redis"]["status"] == "failed"
    finally:
        await store.disconnect()
