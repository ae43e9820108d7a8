"""Durable sessions end to end: agents and conversations outlive agentd, SSH and clients.

Every part is real: agentd as ``twistd`` processes or in the test's reactor, OpenSSH sshd,
redis-server, HAProxy, and the session holders with their echo agents.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, threads
from twisted.internet.error import ConnectError
from twisted.internet.task import LoopingCall, deferLater

from agentd.agent.holder.wire import usage_event_id
from agentd.agent.providers.echo import words
from bench.procs import Agentd, children, descendants, token
from tests.harness import RunningAgentd, base_config, merge, ssh_config
from tests.harness import token as harness_token
from tests.samples import sample
from tests.servers import (
    HaProxy,
    agent_command,
    attach_command,
    free_port,
    holder_pids,
    sessions_dir,
)
from tests.waiting import eventually
from tests.wsclient import WsClient, connect


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class Reader:
    """A client as agent-client.js is one: it keeps its session and the last seq it has,
    resumes with them after any close (at once after 1012, within ``jitter``), resends the
    prompts it has not seen acknowledged, and confirms every ``confirm_every`` messages.

    Unlike agent-client.js it tolerates nothing: a numbered message that is not the next
    seq, a repeat or a gap, fails the test at once.
    """

    def __init__(
        self,
        url: Callable[[dict[str, Any]], str],
        confirm_every: int = 0,
        jitter: float = 0.0,
        patience: float = 20.0,
    ) -> None:
        self.url = url
        self.confirm_every = confirm_every
        self.jitter = jitter
        self.patience = patience
        self.session: str | None = None
        self.last_seq = 0
        self.confirmed = 0
        self.messages: list[dict[str, Any]] = []  # the numbered ones, in seq order
        self.unnumbered: list[dict[str, Any]] = []
        self.hellos: list[dict[str, Any]] = []
        self.closes: list[int | None] = []
        self.refusals: list[str] = []  # why connecting failed, each time it did
        self.unacked: dict[str, dict[str, Any]] = {}
        self.client: WsClient | None = None

    @property
    def connected(self) -> bool:
        return self.client is not None and not self.client.closed.called

    @property
    def resumes(self) -> list[dict[str, Any]]:
        return self.hellos[1:]

    async def connect(self) -> None:
        """Connect, or resume; tries again (bounded by the reader's patience) while the
        gateway refuses or is unreachable, as agent-client.js does."""
        deadline = time.monotonic() + self.patience
        while True:
            params: dict[str, Any] = {}
            if self.session is not None:
                params = {"session": self.session, "last_seq": self.last_seq}
            try:
                client = await connect(self.url(params))
            except (ConnectionError, ConnectError, defer.TimeoutError, defer.CancelledError) as e:
                self.refusals.append(repr(e))
                client = None
            if client is not None:
                client.closed.addBoth(_wake_reader, client)
                hello = await client.recv(20)
                if hello is not None:
                    break
                self.refusals.append(f"closed with {client.close_code}")
            assert time.monotonic() < deadline, f"no connection: {self.refusals[-3:]}"
            await sleep(0.05 + random.random() * 0.1)
        assert hello["type"] == "session", hello
        self.client = client
        self.hellos.append(hello)
        if self.session is not None and hello["resumed"]:
            assert hello["session"] == self.session
        self.session = hello["session"]
        for prompt in self.unacked.values():
            client.send(prompt)

    def prompt(self, prompt_id: str, text: str, **options: Any) -> None:
        message: dict[str, Any] = {"type": "prompt", "id": prompt_id, "text": text}
        if options:
            message["options"] = options
        self.unacked[prompt_id] = message
        assert self.client is not None
        self.client.send(message)

    def send(self, message: dict[str, Any]) -> None:
        assert self.client is not None
        self.client.send(message)

    async def read_until(
        self, ends: Callable[[dict[str, Any]], bool], resume: bool = True, timeout: float = 20.0
    ) -> bool:
        """Read until a numbered message for which ``ends`` is true (True), or until the
        connection closes when not ``resume`` (False); resumes after a close otherwise."""
        while True:
            assert self.client is not None
            message = await self.client.recv(timeout)
            if message is None:
                code = self.client.close_code
                self.closes.append(code)
                if not resume:
                    return False
                if code == 1012 and self.jitter:
                    await sleep(random.random() * self.jitter)
                await self.connect()
                continue
            if self._take(message) and ends(message):
                return True

    def _take(self, message: dict[str, Any]) -> bool:
        seq = message.get("seq")
        if seq is None:
            self.unnumbered.append(message)
            return False
        assert seq == self.last_seq + 1, f"seq {seq} after {self.last_seq}: {message}"
        self.last_seq = seq
        self.messages.append(message)
        if message["type"] == "ack":
            self.unacked.pop(message["id"], None)
        if self.confirm_every and seq - self.confirmed >= self.confirm_every:
            self.confirmed = seq
            self.send({"type": "confirm", "seq": seq})
        return True

    async def leave(self) -> None:
        """Close the connection as a browser tab does, and wait until it is closed."""
        assert self.client is not None
        self.client.close()
        await self.client.closed

    def of(self, prompt_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            m
            for m in self.messages
            if m.get("id") == prompt_id and (kind is None or m["type"] == kind)
        ]

    def text(self, prompt_id: str) -> str:
        return "".join(m["text"] for m in self.of(prompt_id, "delta"))


def _wake_reader(result: object, client: WsClient) -> object:
    """A closed connection puts None in the queue, so a reader waiting on it wakes up."""
    client.queue.put(None)  # type: ignore[arg-type]
    return result


def is_done(prompt_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("id") == prompt_id and m["type"] in ("done", "error")


def deltas_of(prompt_id: str, count: int) -> Callable[[dict[str, Any]], bool]:
    seen = [0]

    def enough(message: dict[str, Any]) -> bool:
        if message.get("id") == prompt_id and message["type"] == "delta":
            seen[0] += 1
        return seen[0] >= count

    return enough


def is_attach(pid: int) -> bool:
    """Whether ``pid`` runs ``agentd-agent attach``."""
    try:
        return b"\0attach\0" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def agent_pid(holder: int) -> int:
    """The agent a holder runs: its only child."""
    (agent,) = children(holder)
    return agent


def journaled(sessions: Path, fragment: bytes) -> bool:
    """Whether a line containing ``fragment`` is in a journal under ``sessions``."""
    return any(fragment in p.read_bytes() for p in sessions.glob("**/journal/*") if p.is_file())


def journal_bytes(sessions: Path) -> int:
    return sum(p.stat().st_size for p in sessions.glob("**/journal/*") if p.is_file())


def twistd_sections(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The configuration of agentd instances run by twistd, sharing one sessions dir."""
    config: dict[str, dict[str, Any]] = {
        "server": {"drain_seconds": 5.0},
        "agents": {
            "names": ["echo"],
            "command": agent_command(),
            "attach_command": attach_command(),
            "sessions_dir": str(sessions_dir(tmp_path)),
        },
        "sessions": {"grace_seconds": 30.0},
        "log": {"level": "info"},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


@pytest.fixture
def twistd_agentd() -> Iterator[Callable[[Path, dict[str, dict[str, Any]]], Agentd]]:
    """agentd as ``twistd -n agentd`` processes, each in its own directory; killed at the end."""
    made: list[Agentd] = []

    def make(work: Path, sections: dict[str, dict[str, Any]]) -> Agentd:
        instance = Agentd(work, sections)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        if instance.proc is not None and instance.proc.poll() is None:
            instance.proc.kill()
            instance.proc.wait()


def ws_url(instance: Agentd | HaProxy, user: str = "alice") -> Callable[[dict[str, Any]], str]:
    def url(params: dict[str, Any]) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"token": token(user, ("demo",)), **params}.items())
        return f"ws://127.0.0.1:{instance.port}/projects/demo/agent/echo?{query}"

    return url


def in_process_url(gateway: RunningAgentd, user: str = "alice") -> Callable[[dict[str, Any]], str]:
    return lambda params: gateway.ws_url(token=harness_token(user), **params)


def two_instances(
    tmp_path: Path, agentd: Callable[[dict[str, Any]], RunningAgentd]
) -> tuple[RunningAgentd, RunningAgentd]:
    """Two in-process agentd on the same (local) VM, each with its own port and spool."""
    config = merge(base_config(tmp_path), sessions={"grace_seconds": 30.0})
    second = merge(
        config,
        server={"listen": [f"tcp:{free_port()}:interface=127.0.0.1"]},
        usage={"spool_dir": str(tmp_path / "spool-second")},
    )
    return agentd(config), agentd(second)


async def usage_totals(instance: Agentd, user: str) -> dict[str, Any]:
    response = await treq.get(
        f"http://127.0.0.1:{instance.port}/api/usage",
        headers={"Authorization": f"Bearer {token(user, ('demo',))}"},
    )
    assert response.code == 200, await response.text()
    return (await response.json())["totals"]


@pytest_twisted.ensureDeferred
async def test_agentd_killed_mid_answer_another_instance_resumes_and_usage_counts_once(
    tmp_path, sshd, redis_server, twistd_agentd
):
    sections = twistd_sections(
        tmp_path,
        vms=sshd.vms_section(connect_attempts=2, connect_backoff_base_seconds=0.05),
        redis={"url": redis_server.url},
    )
    first = twistd_agentd(tmp_path / "first", sections).start()
    reader = Reader(ws_url(first))
    await reader.connect()
    text = " ".join(f"w{i}" for i in range(100))
    repeat = 30
    # 3,000 deltas, paced so that agentd dies a tenth of the way through.
    reader.prompt("long", text, repeat=repeat, delay_ms=0.5)
    assert await reader.read_until(deltas_of("long", 300), resume=False)
    holders = holder_pids(tmp_path / "sessions")
    agents = {agent_pid(h) for h in holders}
    # Frozen, then killed: the answer ends in between, so the agentd that relayed the query
    # never records its usage, and the holder keeps it for the next attach.
    first.proc.send_signal(signal.SIGSTOP)
    await eventually(lambda: journaled(tmp_path / "sessions", b'"type":"done"'), what="done")
    first.proc.kill()
    first.proc.wait()
    assert not await reader.read_until(lambda m: False, resume=False)

    second = twistd_agentd(tmp_path / "second", sections).start()
    assert second.port != first.port
    reader.url = ws_url(second)
    await reader.connect()
    assert reader.resumes[-1]["resumed"] is True and reader.resumes[-1]["complete"] is True
    assert await reader.read_until(is_done("long"))
    assert reader.text("long") == text * repeat
    (done,) = reader.of("long", "done")
    assert done["usage"]["outputTokens"] == 100 * repeat
    assert [m["seq"] for m in reader.messages] == list(range(1, reader.last_seq + 1))

    reader.prompt("next", "and then", turn=True)
    assert await reader.read_until(is_done("next"))
    (after,) = reader.of("next", "done")
    # The same agent process, which remembers the conversation: its second prompt.
    assert after["turn"] == 2
    assert holder_pids(tmp_path / "sessions") == holders
    assert {agent_pid(h) for h in holders} == agents
    assert reader.unnumbered == []

    day = f"{{usage}}:day:user:alice:{time.strftime('%Y-%m-%d', time.gmtime())}"

    def recorded() -> int:
        value = redis_server.cli("HGET", day, "queries").strip()
        return 0 if value == "(nil)" else int(value.strip('"'))

    await eventually(lambda: recorded() >= 2, what="both queries recorded")
    assert recorded() == 2
    for prompt_id in ("long", "next"):
        marker = f"{{usage}}:query:{usage_event_id(reader.session, prompt_id)}"
        assert redis_server.cli("EXISTS", marker) == "(integer) 1\n"
    totals = await usage_totals(second, "alice")
    assert totals["queries"] == 2 and totals["output_tokens"] == 100 * repeat + 2, totals


@pytest_twisted.ensureDeferred
async def test_output_far_beyond_every_buffer_waits_for_a_client_away_five_seconds(
    tmp_path, sshd, agentd
):
    sessions = sessions_dir(tmp_path)
    journal_max = 262_144
    config = merge(
        ssh_config(tmp_path, sshd),
        # The journal's bound is at least 8 lines of the largest size.
        server={"max_message_bytes": journal_max // 8},
        agents={
            "attach_command": f"{attach_command()} --journal-max-bytes {journal_max}",
            "sessions_dir": str(sessions),
        },
        # agentd's own memory holds far less than the answer too.
        sessions={"grace_seconds": 30.0, "replay_messages": 1000},
    )
    gateway = agentd(config)
    reader = Reader(in_process_url(gateway), confirm_every=500)
    largest = [0]

    def measure() -> None:
        largest[0] = max(largest[0], journal_bytes(sessions))

    sampler = LoopingCall(measure)
    sampler.start(0.02)
    try:
        await reader.connect()
        text = " ".join(f"l{i}" for i in range(10))
        repeat = 5000
        reader.prompt("flood", text, repeat=repeat)
        assert await reader.read_until(deltas_of("flood", 1000), resume=False)
        await reader.leave()
        session = gateway.registry.by_id[reader.session]
        (holder,) = holder_pids(sessions)
        agent = agent_pid(holder)
        away = time.monotonic()
        seen: list[int] = []
        while time.monotonic() - away < 5.0:
            seen.append(session.seq)
            await sleep(0.25)
        # The agent was stopped, not its lines dropped: it is alive, its answer unfinished,
        # and nothing more came for the last seconds.
        assert seen[-1] < repeat * 10, "the whole answer fit somewhere"
        assert seen[-8] == seen[-1], f"still streaming: {seen}"
        assert agent_pid(holder) == agent
        await reader.connect()
        hello = reader.resumes[-1]
        assert hello["resumed"] is True and hello["complete"] is True, hello
        assert await reader.read_until(is_done("flood"))
    finally:
        sampler.stop()
    assert reader.text("flood") == text * repeat
    assert len(reader.of("flood", "delta")) == repeat * 10
    assert reader.unnumbered == []
    assert 0 < largest[0] <= journal_max, largest[0]


@pytest_twisted.ensureDeferred
async def test_a_cut_ssh_connection_is_attached_again_and_the_client_sees_no_gap(
    tmp_path, sshd, agentd
):
    gateway = agentd(merge(ssh_config(tmp_path, sshd), sessions={"grace_seconds": 30.0}))
    reader = Reader(in_process_url(gateway))
    by_socket = sample("agentd_attaches_total", via="socket")
    by_command = sample("agentd_attaches_total", via="command")
    await reader.connect()
    text = " ".join(f"w{i}" for i in range(100))
    repeat = 20
    reader.prompt("long", text, repeat=repeat, delay_ms=1)
    assert await reader.read_until(deltas_of("long", 200), resume=False)
    # The holder was started by the attach command, which then let agentd connect to its
    # socket through sshd: the stream crosses no process but sshd on the VM.
    assert sample("agentd_attaches_total", via="socket") == by_socket + 1
    (holder,) = holder_pids(tmp_path / "sessions")
    agent = agent_pid(holder)
    assert not [pid for pid in descendants(sshd.process.pid) if is_attach(pid)], "one is running"
    reattached = sample("agentd_session_events_total", event="reattached")
    # The sshd processes serving agentd's connection: the listener's children.
    serving = children(sshd.process.pid)
    assert serving
    for pid in serving:
        os.kill(pid, signal.SIGKILL)
    # The client stays connected throughout: resume=False fails on a close.
    assert await reader.read_until(is_done("long"), resume=False)
    assert sample("agentd_session_events_total", event="reattached") > reattached
    assert sample("agentd_attaches_total", via="socket") >= by_socket + 2
    assert sample("agentd_attaches_total", via="command") == by_command, "re-attached at the socket"
    assert not set(children(sshd.process.pid)) & set(serving), "the connection was not cut"
    assert reader.text("long") == text * repeat
    assert [m["seq"] for m in reader.messages] == list(range(1, reader.last_seq + 1))
    assert holder_pids(tmp_path / "sessions") == {holder}
    assert agent_pid(holder) == agent
    assert reader.hellos[1:] == [] and reader.unnumbered == []


@pytest_twisted.ensureDeferred
async def test_a_killed_holder_is_reported_on_resume_and_its_journal_still_served(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))  # grace 0: agentd lets go once the client does
    reader = Reader(in_process_url(gateway))
    await reader.connect()
    text = " ".join(f"w{i}" for i in range(100))
    reader.prompt("long", text, repeat=10, delay_ms=2)
    assert await reader.read_until(deltas_of("long", 20), resume=False)
    await reader.leave()
    session = gateway.registry.by_id[reader.session]
    # While the query runs agentd stays attached, journaling on; then the holder is lost.
    await eventually(lambda: session.seq > reader.last_seq + 50, what="output while away")
    (holder,) = holder_pids(tmp_path / "sessions")
    os.killpg(holder, signal.SIGKILL)
    await eventually(lambda: not gateway.registry.by_id, what="agentd letting go")

    away = reader.last_seq
    by_command = sample("agentd_attaches_total", via="command")
    await reader.connect()
    assert sample("agentd_attaches_total", via="command") == by_command + 1, "the journal"
    hello = reader.resumes[-1]
    assert hello["resumed"] is True and hello["complete"] is False, hello
    assert hello["session"] == reader.session
    assert await reader.read_until(lambda m: m["type"] == "error")
    exited = reader.messages[-1]
    assert exited["code"] == "agent_exited" and "session holder lost" in exited["error"]
    # What the holder journaled before it was killed, in order, each line once.
    served = reader.messages[away:-1]
    assert len(served) > 50
    assert all(m["type"] == "delta" for m in served)
    pieces = words(text) * 10
    assert reader.text("long") == "".join(pieces[: len(reader.of("long", "delta"))])
    # The next prompt starts a new agent in the same session, numbering on.
    reader.prompt("again", "fresh start", turn=True)
    assert await reader.read_until(is_done("again"))
    assert reader.of("again", "done")[0]["turn"] == 1
    assert holder_pids(tmp_path / "sessions") - {holder}
    assert reader.unnumbered == []


@pytest_twisted.ensureDeferred
async def test_a_fresh_session_on_another_instance_replaces_the_users_earlier_one(tmp_path, agentd):
    first, second = two_instances(tmp_path, agentd)
    old = Reader(in_process_url(first, "alice"))
    await old.connect()
    old.prompt("one", "the old session", turn=True)
    assert await old.read_until(is_done("one"))
    (old_holder,) = holder_pids(tmp_path / "sessions")
    bob = Reader(in_process_url(first, "bob"))
    await bob.connect()
    bob.prompt("b1", "bob's own", turn=True)
    assert await bob.read_until(is_done("b1"))

    # Alice opens a fresh session (no session id) through the other instance.
    new = Reader(in_process_url(second, "alice"))
    await new.connect()
    assert new.session != old.session
    new.prompt("two", "the new session", turn=True)
    assert await new.read_until(is_done("two"))
    assert new.of("two", "done")[0]["turn"] == 1
    # Her old session's client, on the first instance, is closed as replaced, and its
    # agent ends.
    assert not await old.read_until(lambda m: False, resume=False)
    assert old.closes[-1] == 4001
    await eventually(
        lambda: old_holder not in holder_pids(tmp_path / "sessions"), what="the old holder"
    )
    # Bob's session, on the same VM and instance, goes on.
    bob.prompt("b2", "still bob's", turn=True)
    assert await bob.read_until(is_done("b2"), resume=False)
    assert bob.of("b2", "done")[0]["turn"] == 2


@pytest_twisted.ensureDeferred
async def test_another_users_token_with_a_session_id_gets_a_fresh_session_elsewhere(
    tmp_path, agentd
):
    first, second = two_instances(tmp_path, agentd)
    alice = Reader(in_process_url(first, "alice"))
    await alice.connect()
    alice.prompt("secret", "alice private words", turn=True)
    assert await alice.read_until(is_done("secret"))
    holders = holder_pids(tmp_path / "sessions")
    refused = sample("agentd_session_events_total", event="refused")

    mallory = Reader(in_process_url(second, "mallory"))
    mallory.session = alice.session
    mallory.last_seq = 0
    await mallory.connect()
    (hello,) = mallory.hellos
    assert hello["resumed"] is False and hello["session"] != alice.session
    assert hello["lastSeq"] == 0
    # The holder itself refused the attach naming another user.
    assert sample("agentd_session_events_total", event="refused") == refused + 1
    mallory.prompt("mine", "mallory words", turn=True)
    assert await mallory.read_until(is_done("mine"))
    assert mallory.messages[0]["seq"] == 1 and mallory.text("mine") == "mallory words"
    assert mallory.of("mine", "done")[0]["turn"] == 1
    assert not any(b"alice" in raw for raw in mallory.client.raw)

    # Alice's session went on untouched: still connected, the same agent.
    alice.prompt("more", "still mine", turn=True)
    assert await alice.read_until(is_done("more"), resume=False)
    assert alice.of("more", "done")[0]["turn"] == 2
    assert holders < holder_pids(tmp_path / "sessions")


@pytest_twisted.ensureDeferred
async def test_a_rolling_restart_behind_haproxy_loses_nothing_and_restarts_no_agent(
    tmp_path, twistd_agentd
):
    if not shutil.which("haproxy", path=f"{os.environ.get('PATH', '')}:/usr/sbin"):
        pytest.skip("HAProxy is not installed (Debian: apt-get install haproxy)")
    sessions = tmp_path / "sessions"
    sections = twistd_sections(tmp_path)
    instances = [twistd_agentd(tmp_path / name, sections) for name in ("a", "b")]
    for instance in instances:
        instance.start()
    proxy = HaProxy(tmp_path / "haproxy", [instance.port for instance in instances])
    proxy.start()
    try:
        await rolling_restart(proxy, instances, sessions)
    finally:
        proxy.stop()


async def rolling_restart(proxy: HaProxy, instances: list[Agentd], sessions: Path) -> None:
    clients = 50
    # One user each: a fresh connection of the same user would replace the session.
    readers = [Reader(ws_url(proxy, f"u{n}"), jitter=0.3, patience=30) for n in range(clients)]
    await defer.gatherResults([defer.ensureDeferred(r.connect()) for r in readers])
    texts = [" ".join(f"c{n}w{i}" for i in range(20)) for n in range(clients)]
    for reader, text in zip(readers, texts):
        # Paced to run for longer than the restarts take; aborted once they are over.
        reader.prompt("long", text, repeat=100, delay_ms=200)
    answered = [
        defer.ensureDeferred(reader.read_until(is_done("long"), timeout=30)) for reader in readers
    ]

    async def until(condition: Callable[[], bool], what: str) -> None:
        """Wait for ``condition``; a reader that failed meanwhile fails the test at once."""
        await eventually(lambda: condition() or any(d.called for d in answered), 60, what=what)
        for reading in answered:
            if reading.called:
                assert await reading is False, "an answer ended before it was aborted"

    await until(lambda: all(r.of("long", "delta") or r.unnumbered for r in readers), "streaming")
    assert not [r.unnumbered for r in readers if r.unnumbered]
    holders = holder_pids(sessions)
    assert len(holders) == clients
    agents = {h: agent_pid(h) for h in holders}

    for instance in instances:
        streamed = [len(r.messages) for r in readers]
        instance.proc.send_signal(signal.SIGTERM)
        await eventually(lambda: instance.proc.poll() is not None, what="agentd exiting")
        assert instance.proc.returncode == 0
        await threads.deferToThread(instance.start)
        await until(lambda: all(r.connected for r in readers), "every client resumed")
        await until(
            lambda: all(len(r.messages) > n + 2 for r, n in zip(readers, streamed)),
            "every answer streaming again",
        )
    for reader in readers:
        reader.send({"type": "abort"})
    await defer.gatherResults(answered)

    assert holder_pids(sessions) == holders
    assert {h: agent_pid(h) for h in holders} == agents
    for reader, text in zip(readers, texts):
        (done,) = reader.of("long", "done")
        assert done.get("aborted") is True
        sent = done["usage"]["outputTokens"]
        assert reader.text("long") == "".join((words(text) * 100)[:sent])
        assert len(reader.of("long", "ack")) == 1 and len(reader.of("long", "start")) == 1
        assert 1012 in reader.closes
        assert all(h["resumed"] and h["complete"] for h in reader.resumes), reader.resumes
        assert reader.unnumbered == []


@pytest_twisted.ensureDeferred
async def test_a_prompt_lost_with_the_ssh_connection_is_sent_again_on_the_new_attach(
    tmp_path, sshd, agentd
):
    gateway = agentd(merge(ssh_config(tmp_path, sshd), sessions={"grace_seconds": 30.0}))
    reader = Reader(in_process_url(gateway))
    await reader.connect()
    reader.prompt("first", "one", turn=True)
    assert await reader.read_until(is_done("first"), resume=False)
    session = gateway.registry.by_id[reader.session]
    # The sshd serving agentd stops reading: the next prompt stays in its socket, and is
    # lost with the connection.
    serving = children(sshd.process.pid)
    for pid in serving:
        os.kill(pid, signal.SIGSTOP)
    reader.prompt("second", "two", turn=True)
    await eventually(lambda: "second" in session.queries, what="the prompt forwarded")
    for pid in serving:
        os.kill(pid, signal.SIGKILL)
    assert await reader.read_until(is_done("second"), resume=False)
    assert reader.of("second", "done")[0]["turn"] == 2
    assert len(reader.of("second", "ack")) == 1
