"""Sessions with a fake clock and a fake agent: replay, grace, takeover, exactly-once prompts."""

from __future__ import annotations

import base64
import tracemalloc
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from agentd import agentlog
from agentd.errors import ErrorCode
from agentd.session.registry import SessionRegistry
from agentd.session.replay import ReplayLog, splice_seq
from agentd.session.services import SessionServices
from agentd.session.session import SessionKey
from agentd.transport import AgentSink, AgentTarget, TransportError
from tests.samples import sample


class FakeProcess:
    def __init__(self, sink: AgentSink) -> None:
        self.sink = sink
        self.lines: list[dict[str, Any]] = []
        self.paused = False
        self.terminated = False

    def write_line(self, line: bytes) -> None:
        self.lines.append(orjson.loads(line))

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def terminate(self) -> None:
        self.terminated = True

    def say(self, **message: Any) -> None:
        self.sink.agent_line(orjson.dumps(message))


class FakeTransport:
    def __init__(self) -> None:
        self.processes: list[FakeProcess] = []
        self.targets: list[AgentTarget] = []
        self.fail_with: Exception | None = None

    def spawn(self, target: AgentTarget, sink: AgentSink) -> Deferred[Any]:
        if self.fail_with is not None:
            raise self.fail_with
        self.targets.append(target)
        process = FakeProcess(sink)
        self.processes.append(process)
        return succeed(process)

    def stop(self) -> Deferred[None]:
        return succeed(None)


class FakeClient:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(orjson.loads(frame))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.frames if "seq" in f]


KEY = SessionKey("demo", "alice", "echo")
SAMPLED_IDS = 400


def make(grace: float = 120.0, messages: int = 100, size: int = 1 << 20, **extra: Any):
    clock = Clock()
    transport = FakeTransport()
    services = SessionServices(
        transport=transport,
        clock=clock,
        grace_seconds=grace,
        replay_messages=messages,
        replay_bytes=size,
        **extra,
    )
    return clock, transport, SessionRegistry(services)


def test_first_message_is_session_and_seq_counts_from_one():
    _, transport, registry = make()
    client = FakeClient()
    session = registry.open(KEY, client, None, 0)
    assert client.frames[0] == {
        "type": "session",
        "session": session.id,
        "resumed": False,
        "complete": True,
        "lastSeq": 0,
        "project": "demo",
        "agent": "echo",
    }
    session.prompt("a", "hi")
    agent = transport.processes[0]
    assert agent.lines == [{"type": "prompt", "id": "a", "text": "hi"}]
    agent.say(type="delta", id="a", text="hi")
    agent.say(
        type="done", id="a", agent="echo", usage={"inputTokens": 1, "outputTokens": 1, "cost": 0}
    )
    assert [f["type"] for f in client.frames[1:]] == ["ack", "delta", "done"]
    assert client.seqs() == [1, 2, 3]


def test_session_ids_are_192_random_bits():
    # The same key in fresh registries: an id derived from the key, or from a counter that
    # starts with the registry, repeats.
    ids = [make()[2].open(KEY, FakeClient(), None, 0).id for _ in range(SAMPLED_IDS)]
    assert len(set(ids)) == SAMPLED_IDS
    raw = [base64.urlsafe_b64decode(i + "=" * (-len(i) % 4)) for i in ids]
    assert {len(r) for r in raw} == {24}
    # Each of the 192 bits is set in about half the ids; a counter, a timestamp or any
    # structured id leaves most of its bits fixed. 8 standard deviations each side: a
    # random id fails this once in about 10^12 runs.
    values = [int.from_bytes(r, "big") for r in raw]
    for bit in range(192):
        ones = sum(v >> bit & 1 for v in values)
        assert abs(ones - SAMPLED_IDS / 2) <= 8 * (SAMPLED_IDS / 4) ** 0.5, f"bit {bit}: {ones}"


def test_resume_replays_exactly_what_was_missed():
    _, transport, registry = make()
    first = FakeClient()
    session = registry.open(KEY, first, None, 0)
    session.prompt("a", "x")
    agent = transport.processes[0]
    for i in range(5):
        agent.say(type="delta", id="a", text=str(i))
    session.detach(first)
    for i in range(5, 8):
        agent.say(type="delta", id="a", text=str(i))
    second = FakeClient()
    again = registry.open(KEY, second, session.id, 4)
    assert again is session
    assert second.frames[0]["resumed"] is True and second.frames[0]["complete"] is True
    assert second.frames[0]["lastSeq"] == 9
    assert second.seqs() == [5, 6, 7, 8, 9]
    agent.say(type="delta", id="a", text="live")
    assert second.seqs()[-1] == 10


def test_replay_overflow_says_incomplete_and_replays_what_is_left():
    _, transport, registry = make(messages=3)
    first = FakeClient()
    session = registry.open(KEY, first, None, 0)
    session.prompt("a", "x")
    agent = transport.processes[0]
    session.detach(first)
    for i in range(10):
        agent.say(type="delta", id="a", text=str(i))
    second = FakeClient()
    registry.open(KEY, second, session.id, 1)
    assert second.frames[0]["complete"] is False
    assert second.seqs() == [9, 10, 11]


def test_replay_log_is_bounded_by_bytes():
    log = ReplayLog(max_messages=1000, max_bytes=100)
    for seq in range(1, 51):
        log.append(seq, b"x" * 10)
    assert log.size <= 100
    frames, complete = log.since(0, 50)
    assert not complete and len(frames) == 10


def test_grace_expiry_ends_the_agent_and_forgets_the_session():
    clock, transport, registry = make(grace=120)
    client = FakeClient()
    session = registry.open(KEY, client, None, 0)
    session.prompt("a", "x")
    session.detach(client)
    clock.advance(119)
    assert not transport.processes[0].terminated and session.id in registry.by_id
    clock.advance(2)
    assert transport.processes[0].terminated
    assert session.id not in registry.by_id
    late = FakeClient()
    fresh = registry.open(KEY, late, session.id, 3)
    assert fresh is not session and late.frames[0]["resumed"] is False


def test_reattaching_within_grace_cancels_expiry():
    clock, transport, registry = make(grace=10)
    client = FakeClient()
    session = registry.open(KEY, client, None, 0)
    session.prompt("a", "x")
    session.detach(client)
    clock.advance(5)
    registry.open(KEY, FakeClient(), session.id, 1)
    clock.advance(60)
    assert not transport.processes[0].terminated


def test_takeover_closes_the_older_connection_with_4001():
    _, _, registry = make()
    older, newer = FakeClient(), FakeClient()
    session = registry.open(KEY, older, None, 0)
    registry.open(KEY, newer, session.id, 0)
    assert older.closed is not None and older.closed[0] == 4001
    assert session.client is newer
    session.emit({"type": "pong"})
    assert older.frames[-1]["type"] == "session"  # nothing more went to the old one


def test_duplicate_prompt_ids_are_acked_but_forwarded_once():
    _, transport, registry = make()
    client = FakeClient()
    session = registry.open(KEY, client, None, 0)
    session.prompt("a", "x")
    session.prompt("a", "x")
    assert len(transport.processes[0].lines) == 1
    acks = [f for f in client.frames if f.get("type") == "ack"]
    assert [a["id"] for a in acks] == ["a", "a"] and acks[1]["duplicate"] is True


def test_resume_by_another_user_starts_a_fresh_session_and_reveals_nothing():
    _, transport, registry = make()
    alice = FakeClient()
    session = registry.open(KEY, alice, None, 0)
    session.prompt("secret", "alice's prompt")
    transport.processes[0].say(type="delta", id="secret", text="alice's answer")
    mallory = FakeClient()
    other = registry.open(SessionKey("demo", "mallory", "echo"), mallory, session.id, 0)
    assert other is not session
    assert mallory.frames == [mallory.frames[0]]
    assert mallory.frames[0]["resumed"] is False and mallory.frames[0]["session"] != session.id
    assert session.client is alice and alice.closed is None


def test_a_fresh_connection_replaces_the_earlier_session_of_the_same_key():
    _, transport, registry = make()
    first = FakeClient()
    old = registry.open(KEY, first, None, 0)
    old.prompt("a", "x")
    new = registry.open(KEY, FakeClient(), None, 0)
    assert new is not old and first.closed[0] == 4001
    assert transport.processes[0].terminated
    assert registry.sessions_of("alice") == 1


def test_agent_exit_reports_agent_exited_and_the_next_prompt_respawns():
    _, transport, registry = make()
    client = FakeClient()
    session = registry.open(KEY, client, None, 0)
    session.prompt("a", "x")
    transport.processes[0].sink.agent_ended(3, "exited with 3")
    error = client.frames[-1]
    assert error["code"] == "agent_exited" and error["exitStatus"] == 3
    session.prompt("b", "y")
    assert len(transport.processes) == 2


def test_unreachable_vm_gives_vm_unavailable_for_that_prompt():
    _, transport, registry = make()
    transport.fail_with = TransportError("refused", "connection refused", transient=True)
    client = FakeClient()
    session = registry.open(KEY, client, None, 0)
    session.prompt("a", "x")
    assert client.frames[-1]["code"] == "vm_unavailable" and client.frames[-1]["id"] == "a"


def test_backpressure_pauses_the_agent_and_detach_lets_it_run_on():
    _, transport, registry = make()
    client = FakeClient()
    session = registry.open(KEY, client, None, 0)
    session.prompt("a", "x")
    session.pause_output()
    assert transport.processes[0].paused
    session.detach(client)
    assert not transport.processes[0].paused


def test_a_new_connection_resumes_an_agent_the_one_before_paused():
    _, transport, registry = make()
    first = FakeClient()
    session = registry.open(KEY, first, None, 0)
    session.prompt("a", "x")
    session.pause_output()  # the first connection's queue was full
    registry.open(KEY, FakeClient(), session.id, 0)
    assert first.closed is not None and first.closed[0] == 4001
    assert not transport.processes[0].paused


def test_agentd_messages_in_the_replay_log_cost_about_their_size():
    _, _, registry = make(messages=1000)
    client = FakeClient()
    session = registry.open(KEY, client, None, 0)
    session.detach(client)  # within the grace period: the messages go to the replay log only
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):
            session.error(ErrorCode.BAD_REQUEST, "message must be a JSON object")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert session.replay.size < 1000 * 100
    assert grown < 1000 * 1024, f"{grown // 1000} bytes for each message of under 100"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"type":"delta","text":"a"}', {"seq": 7, "type": "delta", "text": "a"}),
        (b'  {"type":"x"}  ', {"seq": 7, "type": "x"}),
        (b"{}", {"seq": 7}),
        (b'{"seq":99,"type":"x"}', {"seq": 7, "type": "x"}),
    ],
)
def test_seq_is_added_without_changing_the_agent_message(line, expected):
    assert orjson.loads(splice_seq(line, 7, orjson.loads(line))) == expected


@pytest.fixture
def agent_log_events() -> Iterator[list[LogEvent]]:
    """The log events a session's agent caused, as agentd's log observers receive them."""
    seen: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "agentd.session":
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_a_flood_of_agent_warnings_is_held_back_and_summarised_once(agent_log_events):
    clock, transport, registry = make()
    session = registry.open(KEY, FakeClient(), None, 0)
    session.prompt("a", "x")
    sink = transport.processes[0].sink
    bad_lines = sample("agentd_agent_bad_lines_total", agent="echo")
    for _ in range(1000):
        sink.agent_log(b'{"level":"warn","message":"disk full"}')
    for _ in range(1000):
        sink.agent_line(b"not json")
        sink.agent_overlong("stdout", 2_000_000)
    written = [e for e in agent_log_events if "held back" not in e["log_format"]]
    assert len(written) == agentlog.BURST_LINES
    assert not any("held back" in e["log_format"] for e in agent_log_events)

    clock.advance(agentlog.SUMMARY_SECONDS)
    [summary] = [e for e in agent_log_events if "held back" in e["log_format"]]
    assert summary["count"] == 3000 - agentlog.BURST_LINES
    assert summary["session"] == session.id[:8]
    assert sample("agentd_agent_bad_lines_total", agent="echo") == bad_lines + 2000

    # The bucket refilled meanwhile: a few lines a second get through again.
    agent_log_events.clear()
    for _ in range(5):
        sink.agent_log(b'{"level":"warn","message":"disk full"}')
    assert len(agent_log_events) == 5


def test_lines_held_back_are_reported_when_the_agent_ends(agent_log_events):
    clock, transport, registry = make()
    session = registry.open(KEY, FakeClient(), None, 0)
    session.prompt("a", "x")
    sink = transport.processes[0].sink
    for _ in range(agentlog.BURST_LINES + 7):
        sink.agent_log(b"plain text on stderr")
    sink.agent_ended(0, "exited with 0")
    [summary] = [e for e in agent_log_events if "held back" in e["log_format"]]
    assert summary["count"] == 7
    assert clock.getDelayedCalls() == []
