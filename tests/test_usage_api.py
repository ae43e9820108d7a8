"""/api/usage: who may read whose usage, month and format checks, JSON and CSV answers."""

from __future__ import annotations

import calendar
import csv
import datetime
import io
import json
from collections.abc import Sequence
from typing import Any

import pytest
import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site

from agentd.auth import Authenticator
from agentd.config import UsageConfig
from agentd.pricing import PriceTable
from agentd.usage.api import UsageResource
from agentd.usage.memory_store import MemoryUsageStore
from agentd.usage.recorder import UsageRecorder
from agentd.usage.records import UsageEvent

SECRET = "test-secret-for-usage-api-0123456789"
# How long a usage record waits for others to share its call to the store.
WINDOW = UsageConfig().batch_ms / 1000
NOW = calendar.timegm(datetime.datetime(2026, 11, 20, 12, 0, 0).timetuple())
AUTH = Authenticator(secret=SECRET)


def token(user: str, admin: bool = False) -> str:
    return AUTH.mint(user, ["*"], role="admin" if admin else None)


def recorder_with_usage(*extra: UsageEvent, **config: Any) -> UsageRecorder:
    clock = Clock()
    recorder = UsageRecorder.from_config(
        UsageConfig(**config), None, clock, PriceTable.empty(), now=lambda: NOW
    )
    for i, (user, project, cost) in enumerate(
        [("alice", "p1", 1.0), ("alice", "p2", 0.5), ("bob", "p1", 2.0)]
    ):
        recorder.record(
            UsageEvent(f"q{i}", user, project, "echo", "m", 100, 10, 5, 1, cost, NOW - 86400)
        )
    for more in extra:
        recorder.record(more)
    clock.advance(WINDOW)
    return recorder


def site_root(recorder: UsageRecorder) -> Resource:
    root, api = Resource(), Resource()
    root.putChild(b"api", api)
    api.putChild(b"usage", UsageResource(recorder, AUTH))
    return root


class Client:
    def __init__(self, recorder: UsageRecorder | None = None) -> None:
        self.stub = StubTreq(site_root(recorder or recorder_with_usage()))

    async def get(
        self, path: str, user: str | None = "alice", admin: bool = False, method: str = "GET"
    ) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {token(user, admin)}"} if user else {}
        response = await self.stub.request(method, f"http://agentd{path}", headers=headers)
        body = await response.content()
        if response.headers.getRawHeaders("content-type") == ["application/json"]:
            return response.code, json.loads(body), response.headers
        return response.code, body.decode(), response.headers


@pytest_twisted.ensureDeferred
async def test_a_user_reads_their_own_month_as_json() -> None:
    code, body, headers = await Client().get("/api/usage?month=2026-11")
    assert code == 200
    assert headers.getRawHeaders("cache-control") == ["no-store"]
    assert (body["scope"], body["user"], body["month"]) == ("user", "alice", "2026-11")
    assert body["totals"]["cost_usd"] == 1.5
    assert body["totals"]["queries"] == 2
    assert [d["date"] for d in body["days"]] == ["2026-11-19"]
    assert [(p["project"], p["cost_usd"]) for p in body["projects"]] == [("p1", 1.0), ("p2", 0.5)]


@pytest_twisted.ensureDeferred
async def test_month_defaults_to_the_current_one() -> None:
    code, body, _ = await Client().get("/api/usage")
    assert (code, body["month"], body["totals"]["queries"]) == (200, "2026-11", 2)
    code, body, _ = await Client().get("/api/usage?month=2026-10")
    assert (code, body["totals"]["queries"], body["days"]) == (200, 0, [])


@pytest_twisted.ensureDeferred
async def test_the_current_month_carries_the_budget_in_force_and_what_counts_against_it() -> None:
    # Paid with alice's own provider key: shown in the totals, not counted against a budget.
    own = UsageEvent("own", "alice", "p1", "echo", "m", 1, 1, 0, 0, 5.0, NOW, key_source="user")
    recorder = recorder_with_usage(own, monthly_budget_usd=1.8)
    client = Client(recorder)

    code, body, _ = await client.get("/api/usage")
    assert (code, body["totals"]["cost_usd"]) == (200, 6.5)
    assert body["budget"] == {
        "monthly_usd": 1.8,
        "spent_usd": 1.5,
        "soft_ratio": 0.8,
        "soft_warning": True,
        "reached": False,
    }
    await recorder.set_budget("user", "alice", 1.5)
    budget = (await client.get("/api/usage"))[1]["budget"]
    assert (budget["monthly_usd"], budget["soft_warning"], budget["reached"]) == (1.5, True, True)
    await recorder.set_budget("user", "alice", 10)
    budget = (await client.get("/api/usage"))[1]["budget"]
    assert (budget["monthly_usd"], budget["soft_warning"], budget["reached"]) == (10, False, False)
    await recorder.set_budget("user", "alice", 0)
    assert (await client.get("/api/usage"))[1]["budget"] is None

    assert (await client.get("/api/usage/projects/p1", admin=True))[1]["budget"] is None
    await recorder.set_budget("project", "p1", 4)
    budget = (await client.get("/api/usage/projects/p1", admin=True))[1]["budget"]
    assert (budget["monthly_usd"], budget["spent_usd"], budget["reached"]) == (4, 3.0, False)
    # Budgets keep no history: another month's report has none.
    code, body, _ = await client.get("/api/usage/projects/p1?month=2026-10", admin=True)
    assert (code, body["budget"]) == (200, None)


@pytest_twisted.ensureDeferred
async def test_csv_carries_the_same_report() -> None:
    code, body, headers = await Client().get("/api/usage/?month=2026-11&format=csv")
    assert code == 200
    assert headers.getRawHeaders("content-type") == ["text/csv; charset=utf-8"]
    assert headers.getRawHeaders("content-disposition") == [
        'attachment; filename="usage-user-alice-2026-11.csv"'
    ]
    rows = list(csv.DictReader(io.StringIO(body)))
    assert [(r["row"], r["date"], r["project"], r["cost_usd"]) for r in rows] == [
        ("total", "2026-11", "", "1.500000"),
        ("day", "2026-11-19", "", "1.500000"),
        ("project", "", "p1", "1.000000"),
        ("project", "", "p2", "0.500000"),
    ]
    assert rows[0]["cache_read_tokens"] == "10" and rows[0]["queries"] == "2"


@pytest_twisted.ensureDeferred
async def test_nobody_reads_another_users_usage_without_the_admin_role() -> None:
    client = Client()
    code, body, _ = await client.get("/api/usage/users/bob?month=2026-11")
    assert (code, body) == (403, {"error": "only admins may read another user's usage"})
    code, _, _ = await client.get("/api/usage/projects/p1?month=2026-11")
    assert code == 403
    code, body, _ = await client.get("/api/usage/users/alice?month=2026-11")
    assert (code, body["totals"]["queries"]) == (200, 2)


@pytest_twisted.ensureDeferred
async def test_admins_read_any_user_and_any_project() -> None:
    client = Client()
    code, body, _ = await client.get("/api/usage/users/bob?month=2026-11", admin=True)
    assert (code, body["user"], body["totals"]["cost_usd"]) == (200, "bob", 2.0)
    code, body, _ = await client.get("/api/usage/projects/p1?month=2026-11", admin=True)
    assert (code, body["project"], body["totals"]["cost_usd"]) == (200, "p1", 3.0)
    assert [(u["user"], u["queries"]) for u in body["users"]] == [("alice", 1), ("bob", 1)]
    code, body, _ = await client.get("/api/usage/projects/p1?month=2026-11&format=csv", admin=True)
    assert body.splitlines()[0].startswith("row,date,user,cost_usd")


# The last is 2026-11 in Arabic-Indic digits, which a str pattern's \d matches.
@pytest.mark.parametrize(
    "month", ["2026-13", "2026-1", "nov", "1969-12", "2026-11-01", "%D9%A2%D9%A0%D9%A2%D9%A6-11"]
)
@pytest_twisted.ensureDeferred
async def test_bad_months_are_refused(month: str) -> None:
    code, body, _ = await Client().get(f"/api/usage?month={month}")
    assert (code, body) == (400, {"error": "month must be YYYY-MM"})


@pytest_twisted.ensureDeferred
async def test_refusals() -> None:
    client = Client()
    code, body, headers = await client.get("/api/usage", user=None)
    assert (code, body["error"]) == (401, "missing token")
    assert headers.getRawHeaders("www-authenticate") == ["Bearer"]
    assert (await client.get("/api/usage?format=xml"))[0] == 400
    assert (await client.get("/api/usage/users/a:b", admin=True))[0] == 400
    assert (await client.get("/api/usage/teams/x", admin=True))[0] == 404
    assert (await client.get("/api/usage/users", admin=True))[0] == 404
    code, _, headers = await client.get("/api/usage", method="POST")
    assert (code, headers.getRawHeaders("allow")) == (405, ["GET, HEAD"])


class UnreadableStore(MemoryUsageStore):
    def read(
        self, hash_keys: Sequence[str], set_keys: Sequence[str]
    ) -> Deferred[tuple[list[dict[str, str]], list[set[str]]]]:
        return fail(TimeoutError())


@pytest_twisted.ensureDeferred
async def test_an_unreadable_store_answers_503() -> None:
    recorder = UsageRecorder(UnreadableStore(lambda: NOW), Clock(), PriceTable.empty())
    code, body, _ = await Client(recorder).get("/api/usage")
    assert (code, body) == (503, {"error": "usage is unavailable right now; try again"})


@pytest_twisted.ensureDeferred
async def test_over_a_real_listening_port() -> None:
    port = reactor.listenTCP(0, Site(site_root(recorder_with_usage())), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/api/usage/users/bob?month=2026-11"
        mine = await treq.get(url, headers={"Authorization": f"Bearer {token('alice')}"})
        assert mine.code == 403
        await mine.content()
        admin = await treq.get(url, headers={"Authorization": f"Bearer {token('x', True)}"})
        assert admin.code == 200
        assert (await admin.json())["totals"]["queries"] == 1
    finally:
        await port.stopListening()
