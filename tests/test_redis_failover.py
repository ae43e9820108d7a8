"""agentd on Redis Sentinel, under load: failovers that bill every query once and keep limits.

Real processes on loopback: one primary, one replica, three Sentinels (down after 1 s), and
agentd in the test's reactor with users sending prompts to echo agents the whole time.
"""

from __future__ import annotations

import datetime
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import LogEvent

from agentd.redisprimary import Address
from tests.harness import RunningAgentd, base_config, merge, token
from tests.redisgroup import SentinelGroup
from tests.samples import sample
from tests.servers import RedisServer, redis_command
from tests.waiting import eventually
from tests.wsclient import WsClient, connect

USERS = 6
LIMIT = 3


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    servers = SentinelGroup(tmp_path / "redis")
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


class Load:
    """Users each sending one prompt after another until ``stop``, recording every answer."""

    def __init__(self, gateway: RunningAgentd, users: int) -> None:
        self.gateway = gateway
        self.users = [f"load-{i}" for i in range(users)]
        self.done: dict[str, int] = dict.fromkeys(self.users, 0)
        self.errors: list[dict[str, Any]] = []
        self.sent_at: dict[str, float] = {}
        self.answered_at: dict[str, float] = {}
        self._stopping = False
        self._running: list[Any] = []

    async def start(self) -> None:
        clients = [await self._connect(user) for user in self.users]
        self._running = [
            Deferred.fromCoroutine(self._prompts(user, client))
            for user, client in zip(self.users, clients, strict=True)
        ]

    async def flowing(self) -> None:
        """Until every user's agent has answered a few prompts."""
        await eventually(lambda: min(self.done.values()) >= 5, timeout=30, what="the load")

    async def stop(self) -> None:
        self._stopping = True
        for running in self._running:
            await running

    def in_flight_at(self, moment: float) -> int:
        return sum(
            1
            for query, sent in self.sent_at.items()
            if sent <= moment < self.answered_at.get(query, float("inf"))
        )

    def answered_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.answered_at.values() if start <= t <= end)

    async def _connect(self, user: str) -> WsClient:
        client = await connect(self.gateway.ws_url(token=token(user)))
        assert (await client.recv())["type"] == "session"
        return client

    async def _prompts(self, user: str, client: WsClient) -> None:
        n = 0
        while not self._stopping:
            n += 1
            query = f"{user}-{n}"
            self.sent_at[query] = time.time()
            client.send({"type": "prompt", "id": query, "text": "hi"})
            while True:
                message = await client.recv(timeout=30)
                if message.get("type") in ("done", "error") and message.get("id") == query:
                    break
            self.answered_at[query] = time.time()
            if message["type"] == "done":
                self.done[user] += 1
            else:
                self.errors.append(message)
        client.close()


async def prompts_against_a_limit(gateway: RunningAgentd, user: str, count: int) -> list[str]:
    """Send ``count`` prompts as ``user``, one after another: each one's outcome."""
    client = await connect(gateway.ws_url(token=token(user)))
    await client.recv()
    outcomes = []
    for i in range(count):
        client.send({"type": "prompt", "id": f"{user}-{i}", "text": "hi"})
        while True:
            message = await client.recv(timeout=30)
            if message.get("type") in ("done", "error") and message.get("id") == f"{user}-{i}":
                break
        outcomes.append("done" if message["type"] == "done" else message["code"])
    client.close()
    return outcomes


def billed_queries(server: RedisServer, user: str, since: float) -> int:
    """The queries Redis counts for ``user`` on the UTC days from ``since`` to now."""
    first = datetime.datetime.fromtimestamp(since, datetime.UTC).date()
    last = datetime.datetime.now(datetime.UTC).date()
    total = 0
    for offset in range((last - first).days + 1):
        day = (first + datetime.timedelta(days=offset)).isoformat()
        value = server.cli("--raw", "HGET", f"{{usage}}:day:user:{user}:{day}", "queries")
        total += int(value.strip() or 0)
    return total


async def settled(gateway: RunningAgentd, primary: RedisServer, load: Load, since: float) -> None:
    """Until the spool is empty and every user's answered queries are billed, then a moment
    longer: a query billed twice would show then."""
    recorder = gateway.service.usage

    def billed() -> dict[str, int]:
        return {user: billed_queries(primary, user, since) for user in load.users}

    await eventually(lambda: recorder.spool_depth == 0, timeout=20, what="the spool drained")
    await eventually(lambda: billed() == load.done, timeout=10, what="every query billed")
    await deferLater(reactor, 0.5, lambda: None)
    assert recorder.spool_depth == 0
    assert billed() == load.done


def failures(events: list[LogEvent]) -> list[str]:
    return [str(e.get("log_format")) for e in events if "log_failure" in e]


def start_gateway(tmp_path: Path, group: SentinelGroup, agentd: Any, **redis: Any) -> RunningAgentd:
    config = merge(
        base_config(tmp_path),
        redis=group.redis_config(timeout_ms=250, **redis),
        ratelimit={"prompts_per_minute": 100_000},
    )
    config["log"]["level"] = "info"
    return agentd(config)


async def wait_for_redis(gateway: RunningAgentd) -> None:
    health = gateway.service.redis_health
    assert health is not None
    await eventually(lambda: health.up, timeout=20, what="agentd writing to Redis again")


async def failover_under_load(
    tmp_path: Path,
    group: SentinelGroup,
    agentd: Any,
    logged: list[LogEvent],
    lose_primary: Callable[[], Awaitable[float]],
) -> dict[str, Any]:
    """Users prompt all along while ``lose_primary`` makes the primary fail (and returns
    when); asserts that agentd follows the promoted replica within a second of the switch,
    that limits are exact on both sides of the failover, that every query is billed once and
    that nobody met an internal error. Returns the figures."""
    group.primary.cli("HSET", "rl:{limited-before}:limits", "prompts", str(LIMIT))
    group.primary.cli("HSET", "rl:{limited-after}:limits", "prompts", str(LIMIT))
    started = time.time()
    gateway = start_gateway(tmp_path, group, agentd)
    store = gateway.service.store
    assert store is not None
    await eventually(lambda: store.primary.address is not None, what="agentd on the primary")
    assert store.primary.address == Address("127.0.0.1", group.primary.port)

    before = await prompts_against_a_limit(gateway, "limited-before", LIMIT + 2)
    assert before == ["done"] * LIMIT + ["rate_limit"] * 2
    replayed = sample("agentd_usage_events_total", result="replayed")

    load = Load(gateway, USERS)
    await load.start()
    await load.flowing()
    lost = await lose_primary()
    await eventually(
        lambda: store.primary.address == Address("127.0.0.1", group.replica.port),
        timeout=20,
        what="agentd on the promoted replica",
    )
    followed = time.time()
    await wait_for_redis(gateway)
    writing = time.time()
    switched = group.switched_at()
    await deferLater(reactor, 0.5, lambda: None)

    after = await prompts_against_a_limit(gateway, "limited-after", LIMIT + 2)
    assert after == ["done"] * LIMIT + ["rate_limit"] * 2
    # Decided by the new primary, not by agentd's in-process fallback.
    assert group.replica.cli("LLEN", "rl:{limited-after}:prompts").strip() == f"(integer) {LIMIT}"
    await load.stop()
    await settled(gateway, group.replica, load, started)
    assert sum(load.done.values()) > 0
    assert load.errors == []
    assert failures(logged) == []
    assert writing - switched <= 1.0
    return {
        "failover_s": round(switched - lost, 2),
        "agentd_on_new_primary_s": round(followed - lost, 2),
        "agentd_writing_s": round(writing - lost, 2),
        "after_switch_s": round(writing - switched, 2),
        "in_flight_at_loss": load.in_flight_at(lost),
        "answered_during_failover": load.answered_between(lost, writing),
        "queries": sum(load.done.values()),
        "billed": sum(load.done.values()),
        "replayed": int(sample("agentd_usage_events_total", result="replayed") - replayed),
        "_load": load,
        "_killed": lost,
    }


def print_figures(label: str, figures: dict[str, Any]) -> None:
    shown = {k: v for k, v in figures.items() if not k.startswith("_")}
    print(f"\n{label}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


@pytest_twisted.ensureDeferred
async def test_a_killed_primary_is_followed_and_every_query_is_billed_once(
    tmp_path, group, agentd, logged
):
    async def kill() -> float:
        group.primary.kill()
        return time.time()

    figures = await failover_under_load(tmp_path, group, agentd, logged, kill)
    print_figures("SIGKILL failover", figures)


@pytest_twisted.ensureDeferred
async def test_a_hung_primary_is_left_when_sentinel_switches(tmp_path, group, agentd, logged):
    async def hang() -> float:
        # Its connections stay open while it sleeps: only Sentinel's switch says to leave.
        sleeping = subprocess.Popen(
            redis_command(group.primary.port, "DEBUG", "SLEEP", "5"), stdout=subprocess.DEVNULL
        )
        hung.append(sleeping)
        return time.time()

    hung: list[subprocess.Popen[bytes]] = []
    try:
        figures = await failover_under_load(tmp_path, group, agentd, logged, hang)
    finally:
        for process in hung:
            process.wait(timeout=10)
    print_figures("DEBUG SLEEP failover", figures)


@pytest_twisted.ensureDeferred
async def test_writes_the_replica_never_got_are_replayed_on_it_after_failover(
    tmp_path, group, agentd, logged
):
    unconfirmed = sample("agentd_usage_events_total", result="unconfirmed")
    cut: list[float] = []

    async def cut_then_kill() -> float:
        # The replica sleeps, the primary drops its link: what agentd writes now is on the
        # primary only, until the primary dies before the replica wakes.
        sleeping = subprocess.Popen(
            redis_command(group.replica.port, "DEBUG", "SLEEP", "0.8"), stdout=subprocess.DEVNULL
        )
        await deferLater(reactor, 0.05, lambda: None)
        group.primary.cli("CLIENT", "KILL", "TYPE", "replica")
        cut.append(time.time())
        await deferLater(reactor, 0.4, lambda: None)
        group.primary.kill()
        killed = time.time()
        sleeping.wait(timeout=10)
        return killed

    figures = await failover_under_load(tmp_path, group, agentd, logged, cut_then_kill)
    load: Load = figures["_load"]
    written_on_the_primary_only = load.answered_between(cut[0], figures["_killed"])
    assert written_on_the_primary_only > 0
    assert sample("agentd_usage_events_total", result="unconfirmed") - unconfirmed >= (
        written_on_the_primary_only
    )
    figures["written_while_cut"] = written_on_the_primary_only
    print_figures("replication cut, then failover", figures)
