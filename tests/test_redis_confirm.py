"""Writes that must survive a failover wait for a replica; a Redis without one works as before.

Real redis-server processes on loopback: a primary with a replica (no Sentinel), and a lone
server. A replica in ``DEBUG SLEEP`` stands for one that lags or is cut off.
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent

from agentd.config import UsageConfig
from agentd.keys.sealing import generate_kek
from agentd.pricing import PriceTable
from agentd.redisconfirm import ReplicaConfirmer, Witness
from agentd.redisprimary import Address
from agentd.redisstore import RedisStore
from agentd.usage.layout import month_of
from agentd.usage.recorder import FLUSH_CHUNK, UsageRecorder
from agentd.usage.records import UsageEvent
from tests.harness import base_config, merge, token
from tests.samples import sample
from tests.servers import RedisServer, redis_command
from tests.waiting import eventually


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and its replica, in sync."""
    primary = RedisServer(tmp_path / "primary", ["--repl-diskless-sync-delay", "0"])
    replica = RedisServer(
        tmp_path / "replica",
        ["--enable-debug-command", "yes", "--replicaof", "127.0.0.1", str(primary.port)],
    )
    primary.start()
    replica.start()
    try:
        deadline = time.monotonic() + 15
        while "master_link_status:up" not in replica.cli("INFO", "replication"):
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.05)
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def asleep(server: RedisServer, seconds: float) -> subprocess.Popen[bytes]:
    """``DEBUG SLEEP`` the server in the background: it answers nothing meanwhile."""
    process = subprocess.Popen(
        redis_command(server.port, "DEBUG", "SLEEP", str(seconds)), stdout=subprocess.DEVNULL
    )
    time.sleep(0.05)  # until it sleeps
    return process


def caught_up(primary: RedisServer) -> bool:
    """Whether the primary's replica has acknowledged all it was sent."""
    info = primary.cli("--raw", "INFO", "replication")
    sent = re.search(r"master_repl_offset:(\d+)", info)
    acknowledged = re.search(r"slave0:.*offset=(\d+)", info)
    return bool(sent and acknowledged and sent.group(1) == acknowledged.group(1))


def event(query_id: str, now: float) -> UsageEvent:
    return UsageEvent(query_id, "alice", "p1", "echo", "m", 10, 1, 0, 0, 0.0001, now)


class Recorder:
    """A usage recorder on its own store and spool, stopped at the end."""

    def __init__(self, url: str, spool: Path) -> None:
        self.store = RedisStore(url, reactor, timeout=0.2)
        self.recorder = UsageRecorder.from_config(
            UsageConfig(spool_dir=str(spool)), self.store, reactor, PriceTable.empty()
        )
        self.recorder.start()

    async def queries(self, now: float) -> int:
        report = await self.recorder.report("user", "alice", month_of(now))
        return report.totals.queries

    async def close(self) -> None:
        await self.recorder.stop()
        await self.store.disconnect()


def connection_ids(server: RedisServer) -> set[str]:
    """The ids of the server's clients, but for the redis-cli asking."""
    listing = server.cli("--raw", "CLIENT", "LIST", "TYPE", "normal").splitlines()
    return {line.split()[0] for line in listing if "cmd=client|list" not in line}


def command_calls(server: RedisServer, command: str) -> int:
    return server.command_calls().get(command, 0)


@pytest_twisted.ensureDeferred
async def test_a_redis_without_replicas_records_usage_without_waiting_or_checking(
    tmp_path, redis_server
):
    recorder = Recorder(redis_server.url, tmp_path / "spool")
    try:
        skipped = sample("agentd_redis_replica_confirmations_total", result="no_replica")
        now = time.time()
        await gatherResults([recorder.recorder.record(event(f"q{i}", now)) for i in range(50)])
        assert recorder.recorder.spool_depth == 0
        assert await recorder.queries(now) == 50
    finally:
        await recorder.close()
    assert sample("agentd_redis_replica_confirmations_total", result="no_replica") == skipped + 50
    assert command_calls(redis_server, "wait") == 0
    # Only the usage script (a call per chunk of the 50 records recorded together) and the
    # report's reads: no confirmation round's script.
    scripts = command_calls(redis_server, "eval") + command_calls(redis_server, "evalsha")
    assert scripts == math.ceil(50 / FLUSH_CHUNK)


@pytest_twisted.ensureDeferred
async def test_usage_a_sleeping_replica_does_not_confirm_waits_in_the_spool_until_it_does(
    tmp_path, replicated
):
    primary, replica = replicated
    recorder = Recorder(primary.url, tmp_path / "spool")
    try:
        unconfirmed = sample("agentd_usage_events_total", result="unconfirmed")
        now = time.time()
        sleeper = asleep(replica, 1.5)
        await gatherResults([recorder.recorder.record(event(f"q{i}", now)) for i in range(20)])
        # Recorded on the primary, which still takes writes, but kept until a replica has it.
        assert recorder.recorder.spool_depth == 20
        assert recorder.recorder.health()["redis"] is True
        assert sample("agentd_usage_events_total", result="unconfirmed") == unconfirmed + 20
        assert primary.cli("--raw", "EXISTS", "{usage}:query:q0").strip() == "1"
        sleeper.wait(timeout=10)
        await eventually(lambda: recorder.recorder.spool_depth == 0, what="the spool released")
        assert await recorder.queries(now) == 20
        assert replica.cli("--raw", "EXISTS", "{usage}:query:q19").strip() == "1"
    finally:
        await recorder.close()


@pytest_twisted.ensureDeferred
async def test_a_stored_key_is_on_the_replica_before_the_api_answers_success(
    tmp_path, replicated, agentd, monkeypatch
):
    primary, replica = replicated
    monkeypatch.setenv("TEST_KEK", generate_kek())
    gateway = agentd(
        merge(
            base_config(tmp_path),
            redis={"url": primary.url, "timeout_ms": 500},
            keys={"encryption_keys": ["env:TEST_KEK"]},
        )
    )
    alice = {"Authorization": f"Bearer {token('alice')}"}
    url = gateway.http + "/api/keys/anthropic"

    sleeper = asleep(replica, 1.5)
    refused = await treq.put(url, json={"key": "sk-ant-0123456789abcdef"}, headers=alice)
    assert refused.code == 503
    assert (await refused.json())["error"] == "stored keys are unavailable right now; try again"
    sleeper.wait(timeout=10)
    await eventually(lambda: caught_up(primary), what="the replica caught up")

    stored = await treq.put(url, json={"key": "sk-ant-0123456789abcdef"}, headers=alice)
    assert stored.code == 204, await stored.text()
    # The answer came after the replica had the record: nothing to wait for here.
    stored_on = [
        server.cli("--raw", "HGET", "agentd:userkeys:alice", "anthropic").strip()
        for server in (primary, replica)
    ]
    assert stored_on[0] and stored_on[0] == stored_on[1]

    deleted = await treq.delete(url, headers=alice)
    assert deleted.code == 204
    assert replica.cli("--raw", "HEXISTS", "agentd:userkeys:alice", "anthropic").strip() == "0"


@pytest_twisted.ensureDeferred
async def test_a_primary_turned_replica_is_left_and_its_refused_writes_are_replayed(
    tmp_path, redis_server, logged: list[LogEvent]
):
    other = RedisServer(tmp_path / "other")
    other.start()
    recorder = Recorder(redis_server.url, tmp_path / "spool")
    try:
        now = time.time()
        await recorder.store.ping()
        clients = connection_ids(redis_server)
        # An operator (or a failover) makes it a replica: writes get READONLY from now on.
        redis_server.cli("REPLICAOF", "127.0.0.1", str(other.port))
        await gatherResults([recorder.recorder.record(event(f"q{i}", now)) for i in range(10)])
        assert recorder.recorder.spool_depth == 10
        changing = [formatEvent(e) for e in logged if "is not the primary" in formatEvent(e)]
        assert len(changing) == 1 and "READONLY" in changing[0]
        # Every connection was closed, to find the primary again.
        await eventually(lambda: not clients & connection_ids(redis_server), what="reconnected")
        redis_server.cli("REPLICAOF", "NO", "ONE")
        await eventually(lambda: recorder.recorder.spool_depth == 0, timeout=15, what="replay")
        assert await recorder.queries(now) == 10
    finally:
        await recorder.close()
        other.stop()


class FakeRoundConnection:
    """Answers a confirmation round's commands as a primary with ``replicas`` would, and
    remembers which commands were sent."""

    def __init__(self) -> None:
        self.replicas = 1
        self.held = 1
        self.acknowledged = 1
        self.sent: list[str] = []

    def execute_command(self, command: str, *args: Any) -> Deferred[Any]:
        self.sent.append(command)
        if command == "INFO":
            return succeed(f"# Replication\r\nrole:master\r\nconnected_slaves:{self.replicas}\r\n")
        if command == "EVAL":
            return succeed([self.held] * (int(args[1]) - 1))
        return succeed(self.acknowledged)


def confirmer(
    connection: FakeRoundConnection, clock: Clock, verify: bool, address: list[Address]
) -> ReplicaConfirmer:
    return ReplicaConfirmer(
        lambda: succeed((connection, address[0])),
        clock,
        timeout=0.1,
        wait=0.1,
        grace=10.0,
        verify=verify,
    )


def confirmed(replicas: ReplicaConfirmer) -> bool:
    results: list[bool] = []
    replicas.confirm(Witness.key_exists("k")).addCallback(results.append)
    [result] = results
    return result


def test_a_replica_that_left_is_waited_for_until_the_grace_ends_then_not_at_all() -> None:
    clock, connection, address = Clock(), FakeRoundConnection(), [Address("10.0.0.1", 6379)]
    replicas = confirmer(connection, clock, verify=False, address=address)
    assert confirmed(replicas) and connection.sent == ["INFO", "EVAL", "WAIT"]

    connection.replicas, connection.acknowledged = 0, 0
    clock.advance(5)
    connection.sent.clear()
    assert not confirmed(replicas)  # it may come back, and be promoted
    assert connection.sent == ["INFO", "EVAL", "WAIT"]

    clock.advance(6)  # 11 s since a replica was last seen
    connection.sent.clear()
    assert confirmed(replicas)
    assert connection.sent == ["INFO"]  # a standalone Redis: nothing to check or wait for


def test_without_replicas_sentinel_mode_still_checks_that_the_write_is_there() -> None:
    clock, connection, address = Clock(), FakeRoundConnection(), [Address("10.0.0.1", 6379)]
    connection.replicas = 0
    replicas = confirmer(connection, clock, verify=True, address=address)
    assert confirmed(replicas) and connection.sent == ["INFO", "EVAL"]
    # The write was made on a primary that has since been replaced: it is not here.
    connection.held = 0
    assert not confirmed(replicas)


def test_a_new_primary_forgets_the_replicas_of_the_old_one() -> None:
    clock, connection, address = Clock(), FakeRoundConnection(), [Address("10.0.0.1", 6379)]
    replicas = confirmer(connection, clock, verify=True, address=address)
    assert confirmed(replicas)
    address[0] = Address("10.0.0.2", 6379)  # promoted; its old primary is gone
    connection.replicas, connection.acknowledged = 0, 0
    connection.sent.clear()
    assert confirmed(replicas)
    assert connection.sent == ["INFO", "EVAL"]


def test_the_records_of_one_call_are_confirmed_in_one_round() -> None:
    clock, connection, address = Clock(), FakeRoundConnection(), [Address("10.0.0.1", 6379)]
    replicas = confirmer(connection, clock, verify=False, address=address)
    witnesses = [Witness.key_exists(f"k{i}") for i in range(3)]
    results: list[list[bool]] = []
    replicas.confirm_all(witnesses).addCallback(results.append)
    assert results == [[True, True, True]]
    assert connection.sent == ["INFO", "EVAL", "WAIT"]  # one round for the three
    # A replica that did not acknowledge: none of them is confirmed.
    connection.acknowledged = 0
    connection.sent.clear()
    replicas.confirm_all(witnesses).addCallback(results.append)
    assert results[-1] == [False, False, False]
    assert connection.sent == ["EVAL", "WAIT"]
    # A standalone Redis, seen as one long enough: nothing is sent at all.
    connection.replicas, connection.acknowledged = 0, 0
    clock.advance(5)
    replicas.confirm_all(witnesses).addCallback(results.append)
    clock.advance(6)
    connection.sent.clear()
    replicas.confirm_all(witnesses).addCallback(results.append)
    replicas.confirm_all(witnesses).addCallback(results.append)
    assert results[-2:] == [[True, True, True], [True, True, True]]
    assert connection.sent == ["INFO"]
