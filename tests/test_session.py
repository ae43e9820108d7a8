"""Sessions with a fake clock and a fake holder: replay, grace, takeover, re-attach, usage.

The fake holder speaks the attach protocol of docs/agent-cli.md the way the real one does
(numbered lines, ``attached``, acks, superseded); tests/test_holder.py runs the real one, and
tests/test_durable.py runs both together with real processes.
"""

from __future__ import annotations

import base64
import tracemalloc
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from agentd import agentlog
from agentd.agent.holder.wire import usage_event_id
from agentd.errors import ErrorCode
from agentd.keys.source import AgentKeys
from agentd.session.registry import SessionRegistry
from agentd.session.replay import ReplayLog, splice_seq
from agentd.session.services import Refusal, SessionServices
from agentd.session.session import RECORDED_DELAY, Session, SessionKey
from agentd.transport import AgentSink, AgentTarget, TransportError
from agentd.usage.records import UsageEvent
from tests.samples import sample


class FakeHolder:
    """One session on the fake VM: its journal, accepted prompts and current attach."""

    def __init__(self, target: AgentTarget) -> None:
        self.identity = (target.user, target.project, target.agent)
        self.key_source = target.env.get("AGENTD_KEY_SOURCE")
        self.journal: list[bytes] = []
        self.prompts: set[str] = set()
        self.attach: FakeAttach | None = None
        self.confirmed = 0
        self.recorded: list[str] = []
        self.unrecorded: list[dict[str, Any]] = []
        self.ended: str | None = None

    @property
    def last_seq(self) -> int:
        return len(self.journal)

    def say(self, **message: Any) -> None:
        """The agent (or the holder) writes a numbered line."""
        line = orjson.dumps({"seq": self.last_seq + 1, **message})
        self.journal.append(line)
        if self.attach is not None:
            self.attach.sink.agent_line(line)

    def received(self, attach: FakeAttach, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "prompt":
            if message["id"] in self.prompts:
                self.say(type="ack", id=message["id"], duplicate=True)
            else:
                self.prompts.add(message["id"])
                attach.forwarded.append(message)
                self.say(type="ack", id=message["id"])
        elif kind == "confirm":
            self.confirmed = max(self.confirmed, message["seq"])
        elif kind == "recorded":
            self.recorded.append(message["id"])
        elif kind == "abort":
            attach.forwarded.append(message)
        elif kind == "end":
            self.end("ended by request")

    def end(self, reason: str) -> None:
        self.ended = reason
        if self.attach is not None:
            attach, self.attach = self.attach, None
            attach.control(type="ended", reason=reason)
            attach.exit()


class FakeAttach:
    """``agentd-agent attach`` as the session sees it: an AgentProcess on a sink."""

    def __init__(self, sink: AgentSink, target: AgentTarget, holder: FakeHolder | None) -> None:
        self.sink = sink
        self.target = target
        self.holder = holder
        self.written: list[dict[str, Any]] = []
        self.writes = 0
        self.forwarded: list[dict[str, Any]] = []
        self.paused = False
        self.terminated = False
        self.exited = False

    def control(self, **message: Any) -> None:
        self.sink.agent_line(orjson.dumps(message))

    def exit(self, reason: str = "exited with 0") -> None:
        if not self.exited:
            self.exited = True
            self.sink.agent_ended(0, reason)

    # AgentProcess
    def write_line(self, line: bytes) -> None:
        """One write: a line, or several joined (the holder splits them)."""
        self.writes += 1
        for part in line.split(b"\n"):
            message = orjson.loads(part)
            self.written.append(message)
            if self.holder is not None and self.holder.attach is self:
                self.holder.received(self, message)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def terminate(self) -> None:
        self.terminated = True
        if self.holder is not None and self.holder.attach is self:
            self.holder.attach = None
        self.exit()

    # what the tests look at
    @property
    def prompts(self) -> list[dict[str, Any]]:
        return [m for m in self.forwarded if m["type"] == "prompt"]


class FakeTransport:
    """Holders by session id, attached to as the real attach does."""

    def __init__(self) -> None:
        self.attaches: list[FakeAttach] = []
        self.holders: dict[str, FakeHolder] = {}
        self.fail_with: Exception | None = None
        # Attaches answer when the test says so (the real one answers after a round trip).
        self.hold_answers = False
        self.unanswered: list[FakeAttach] = []
        # The journal an attach replays comes when the test says so, after ``attached``.
        self.hold_replay = False
        self.replays: list[tuple[FakeAttach, list[bytes]]] = []

    def spawn(self, target: AgentTarget, sink: AgentSink) -> Deferred[Any]:
        if self.fail_with is not None:
            raise self.fail_with
        holder = self.holders.get(target.session)
        attach = FakeAttach(sink, target, holder)
        self.attaches.append(attach)
        if self.hold_answers:
            self.unanswered.append(attach)
        else:
            self.answer(attach)
        return succeed(attach)

    def answer(self, attach: FakeAttach) -> None:
        target = attach.target
        holder = self.holders.get(target.session)
        if holder is None or holder.ended is not None:
            if not target.start:
                attach.control(type="error", code="no_session", error="no such session")
                attach.exit("exited with 1")
                return
            holder = self.holders[target.session] = FakeHolder(target)
            holder.journal = [b""] * target.after  # a new holder numbers on after --after
        if holder.identity != (target.user, target.project, target.agent):
            attach.control(type="error", code="mismatch", error="not your session")
            attach.exit("exited with 1")
            return
        attach.holder = holder
        previous, holder.attach = holder.attach, attach
        if previous is not None:
            previous.control(type="superseded")
            previous.exit()
        holder.confirmed = max(holder.confirmed, target.after)
        attach.control(
            type="attached",
            v=1,
            session=target.session,
            lastSeq=holder.last_seq,
            complete=True,
            started=target.start,
            live=True,
            keySource=holder.key_source,
        )
        for record in holder.unrecorded:
            attach.control(type="unrecorded", **record)
        replay = holder.journal[target.after :]
        if self.hold_replay:
            self.replays.append((attach, replay))
            return
        for line in replay:
            attach.sink.agent_line(line)

    def replay(self) -> None:
        replays, self.replays = self.replays, []
        for attach, lines in replays:
            attach.sink.agent_lines(lines)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def health_checks(self) -> list[Any]:
        return []

    @property
    def current(self) -> FakeAttach:
        return self.attaches[-1]


class FakeClient:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(orjson.loads(frame))

    def send_frames(self, frames: list[bytes]) -> None:
        self.frames.extend(map(orjson.loads, frames))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.frames if "seq" in f]


class FakeUsage:
    def __init__(self) -> None:
        self.events: list[UsageEvent] = []
        self.pending: list[Deferred[None]] = []

    def record(self, event: UsageEvent) -> Deferred[None]:
        self.events.append(event)
        done: Deferred[None] = Deferred()
        self.pending.append(done)
        return done

    def waiting_for_agent(self) -> None:
        pass

    def settle(self) -> None:
        pending, self.pending = self.pending, []
        for done in pending:
            done.callback(None)


class CountingGate:
    def __init__(self) -> None:
        self.admitted = 0

    def admit(self, user: str, project: str) -> Deferred[None]:
        self.admitted += 1
        return succeed(None)


class LateGate:
    """Answers each prompt's admission when told to, refusing the ids in ``refuse``."""

    def __init__(self, refuse: set[int]) -> None:
        self.refuse = refuse
        self.asked: list[Deferred[Refusal | None]] = []

    def admit(self, user: str, project: str) -> Deferred[Refusal | None]:
        self.asked.append(Deferred())
        return self.asked[-1]

    def answer(self) -> None:
        number = len([d for d in self.asked if d.called])
        refusal = Refusal(ErrorCode.RATE_LIMIT, "Rate limited.", {}, _NoMetric())
        self.asked[number].callback(refusal if number in self.refuse else None)


class _NoMetric:
    def inc(self, amount: float = 1) -> None:
        pass


KEY = SessionKey("demo", "alice", "echo")
SAMPLED_IDS = 400
USAGE = {"inputTokens": 3, "outputTokens": 5, "cost": 0.25}


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


def opened(registry: SessionRegistry, key: SessionKey, client: FakeClient, *resume: Any) -> Any:
    """The session ``registry.open`` gave the client (every fake answers at once)."""
    session_id, last_seq = resume or (None, 0)
    result: list[Session | None] = []
    registry.open(key, client, session_id, last_seq).addCallback(result.append)
    assert result, "the session was not opened at once"
    return result[0]


def test_first_message_is_session_and_seq_comes_from_the_holder():
    _, transport, registry = make()
    client = FakeClient()
    session = opened(registry, KEY, client)
    assert client.frames[0] == {
        "type": "session",
        "session": session.id,
        "resumed": False,
        "complete": True,
        "lastSeq": 0,
        "project": "demo",
        "agent": "echo",
    }
    assert transport.attaches == []  # no holder (and no agent) before the first prompt
    session.prompt("a", "hi")
    attach = transport.current
    assert attach.target.start and attach.target.after == 0
    assert attach.target.session == session.id and attach.target.user == "alice"
    assert attach.prompts == [{"type": "prompt", "id": "a", "text": "hi"}]
    holder = transport.holders[session.id]
    holder.say(type="delta", id="a", text="hi")
    holder.say(type="done", id="a", agent="echo", usage=USAGE)
    assert [f["type"] for f in client.frames[1:]] == ["ack", "delta", "done"]
    assert client.seqs() == [1, 2, 3]


def test_session_ids_are_192_random_bits():
    # The same key in fresh registries: an id derived from the key, or from a counter that
    # starts with the registry, repeats.
    ids = [opened(make()[2], KEY, FakeClient()).id for _ in range(SAMPLED_IDS)]
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


def test_resume_from_memory_replays_exactly_what_was_missed_and_confirms_it():
    _, transport, registry = make()
    first = FakeClient()
    session = opened(registry, KEY, first)
    session.prompt("a", "x")
    holder = transport.holders[session.id]
    for i in range(5):
        holder.say(type="delta", id="a", text=str(i))
    session.detach(first)
    for i in range(5, 8):
        holder.say(type="delta", id="a", text=str(i))
    second = FakeClient()
    again = opened(registry, KEY, second, session.id, 4)
    assert again is session
    assert len(transport.attaches) == 1  # served from memory, on the same attach
    assert second.frames[0]["resumed"] is True and second.frames[0]["complete"] is True
    assert second.frames[0]["lastSeq"] == 9
    assert second.seqs() == [5, 6, 7, 8, 9]
    assert holder.confirmed == 4
    holder.say(type="delta", id="a", text="live")
    assert second.seqs()[-1] == 10


def test_a_resume_memory_does_not_reach_is_replayed_by_the_holder_without_duplicates():
    _, transport, registry = make(messages=3)
    first = FakeClient()
    session = opened(registry, KEY, first)
    session.prompt("a", "x")
    holder = transport.holders[session.id]
    session.detach(first)
    for i in range(10):
        holder.say(type="delta", id="a", text=str(i))
    second = FakeClient()
    opened(registry, KEY, second, session.id, 1)
    reattach = transport.current
    assert reattach is not transport.attaches[0] and not reattach.target.start
    assert reattach.target.after == 1
    assert transport.attaches[0].terminated  # the older attach let go
    assert second.frames[0]["resumed"] is True and second.frames[0]["complete"] is True
    assert second.seqs() == list(range(2, 12))
    holder.say(type="delta", id="a", text="live")
    assert second.seqs()[-1] == 12


def test_replay_log_is_bounded_by_bytes():
    log = ReplayLog(max_messages=1000, max_bytes=100)
    for seq in range(1, 51):
        log.append(seq, b"x" * 10)
    assert log.size <= 100
    frames, complete = log.since(0, 50)
    assert not complete and len(frames) == 10


def test_after_the_grace_period_agentd_lets_go_and_the_agent_runs_on():
    clock, transport, registry = make(grace=120)
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    holder = transport.holders[session.id]
    holder.say(type="done", id="a", agent="echo", usage=USAGE)
    session.detach(client)
    clock.advance(119)
    assert not transport.current.terminated and session.id in registry.by_id
    clock.advance(2)
    assert transport.current.terminated and session.id not in registry.by_id
    assert holder.ended is None  # let go of, not ended: no "end" was sent
    assert {"type": "end"} not in transport.attaches[0].written
    holder.say(type="delta", id="b", text="meanwhile")
    late = FakeClient()
    resumed = opened(registry, KEY, late, session.id, 2)
    assert resumed.id == session.id and late.frames[0]["resumed"] is True
    assert not transport.current.target.start  # a resume never starts an agent
    assert late.seqs() == [3]


def test_letting_go_waits_for_the_running_query_so_its_usage_is_recorded_now():
    clock, transport, registry = make(grace=10, usage=FakeUsage())
    usage = registry.services.usage
    registry.services.usage_event = UsageEvent.from_agent_usage
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    holder = transport.holders[session.id]
    holder.say(type="start", id="a")
    session.detach(client)
    clock.advance(60)
    assert session.id in registry.by_id and not transport.current.terminated
    holder.say(type="done", id="a", agent="echo", usage=USAGE)
    usage.settle()
    clock.advance(0)
    assert [e.query_id for e in usage.events] == [usage_event_id(session.id, "a")]
    assert holder.recorded == ["a"]
    assert transport.current.terminated and session.id not in registry.by_id


def test_reattaching_within_grace_cancels_letting_go():
    clock, transport, registry = make(grace=10)
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    session.detach(client)
    clock.advance(5)
    opened(registry, KEY, FakeClient(), session.id, 1)
    clock.advance(60)
    assert not transport.attaches[0].terminated


def test_takeover_closes_the_older_connection_with_4001():
    _, _, registry = make()
    older, newer = FakeClient(), FakeClient()
    session = opened(registry, KEY, older)
    opened(registry, KEY, newer, session.id, 0)
    assert older.closed is not None and older.closed[0] == 4001
    assert session.client is newer
    session.notify({"type": "pong"})
    assert older.frames[-1]["type"] == "session"  # nothing more went to the old one
    assert newer.frames[-1] == {"type": "pong"}  # agentd's own answers carry no seq


def test_a_resent_prompt_is_forwarded_by_the_holder_once_and_skips_the_rate_limit():
    gate = CountingGate()
    _, transport, registry = make(gate=gate)
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    session.prompt("a", "x")
    assert len(transport.current.prompts) == 1
    acks = [f for f in client.frames if f.get("type") == "ack"]
    assert [a["id"] for a in acks] == ["a", "a"] and acks[1]["duplicate"] is True
    assert gate.admitted == 1


def test_a_prompt_resent_on_another_instance_is_not_counted_again_when_its_ack_is_replayed():
    _, transport, here = make(gate=CountingGate())
    session = opened(here, KEY, FakeClient())
    session.prompt("a", "x")  # forwarded and acknowledged; the client never saw the ack
    gate = CountingGate()
    _, other_transport, elsewhere = make(gate=gate)
    other_transport.holders = transport.holders  # the same VM
    other_transport.hold_replay = True
    client = FakeClient()
    resumed = opened(elsewhere, KEY, client, session.id, 0)
    assert resumed.id == session.id and client.frames[0]["resumed"] is True
    # The client resends what it has not seen acknowledged, and a new prompt, before the
    # holder's replay is in: neither is decided yet.
    resumed.prompt("a", "x")
    resumed.prompt("b", "y")
    assert gate.admitted == 0 and resumed.prompts_waiting == 2
    other_transport.replay()
    # "a" was acknowledged before: forwarded (the holder acknowledges it again, and does not
    # run it twice) without the gate; "b" is new, and the gate counts it.
    assert gate.admitted == 1
    holder = transport.holders[session.id]
    assert [p["id"] for a in transport.attaches + other_transport.attaches for p in a.prompts] == [
        "a",
        "b",
    ]
    acks = [(f["id"], f.get("duplicate", False)) for f in client.frames if f.get("type") == "ack"]
    assert acks == [("a", False), ("a", True), ("b", False)]
    assert resumed.prompts_waiting == 0 and holder.prompts == {"a", "b"}


def test_prompts_waiting_for_a_replay_are_decided_when_the_attach_is_lost_instead():
    _, transport, here = make(gate=CountingGate())
    session = opened(here, KEY, FakeClient())
    session.prompt("a", "x")
    gate = CountingGate()
    _, other_transport, elsewhere = make(gate=gate)
    other_transport.holders = transport.holders
    other_transport.hold_replay = True
    resumed = opened(elsewhere, KEY, FakeClient(), session.id, 0)
    resumed.prompt("b", "y")
    assert gate.admitted == 0
    other_transport.current.exit("exited with 255")  # the way to the VM broke
    assert gate.admitted == 1 and resumed.prompts_waiting == 0


def test_prompts_wait_for_the_gate_one_after_another_and_reach_the_holder_in_order():
    gate = LateGate(refuse={1})
    _, transport, registry = make(gate=gate)
    client = FakeClient()
    session = opened(registry, KEY, client)
    for prompt_id in ("a", "b", "c"):
        session.prompt(prompt_id, "x")
    # The next prompt is asked about only once the one before it is forwarded or refused.
    assert len(gate.asked) == 1 and session.prompts_waiting == 3
    gate.answer()
    assert [p["id"] for p in transport.current.prompts] == ["a"]
    assert len(gate.asked) == 2
    gate.answer()  # b: refused, with its id, and never forwarded
    refused = [f for f in client.frames if f.get("type") == "error"]
    assert [(f["code"], f["id"]) for f in refused] == [("rate_limit", "b")]
    gate.answer()
    assert [p["id"] for p in transport.current.prompts] == ["a", "c"]
    assert session.prompts_waiting == 0


class BrokenGate:
    """Raises for the first prompt, fails the second's Deferred, admits the rest."""

    def __init__(self) -> None:
        self.asked = 0

    def admit(self, user: str, project: str) -> Deferred[Refusal | None]:
        self.asked += 1
        if self.asked == 1:
            raise RuntimeError("a bug in the gate")
        if self.asked == 2:
            return fail(RuntimeError("a bug in its callback"))
        return succeed(None)


def test_a_gate_that_raises_or_fails_costs_that_prompt_an_internal_error_and_no_more():
    _, transport, registry = make(gate=BrokenGate())
    client = FakeClient()
    session = opened(registry, KEY, client)
    for prompt_id in ("a", "b", "c"):
        session.prompt(prompt_id, "x")
    errors = [(f["code"], f.get("id")) for f in client.frames if f.get("type") == "error"]
    assert errors == [("internal", "a"), ("internal", "b")]
    assert [p["id"] for p in transport.current.prompts] == ["c"]
    assert session.prompts_waiting == 0
    session.prompt("d", "x")
    assert [p["id"] for p in transport.current.prompts] == ["c", "d"]


def test_resume_by_another_user_starts_a_fresh_session_and_reveals_nothing():
    _, transport, registry = make()
    alice = FakeClient()
    session = opened(registry, KEY, alice)
    session.prompt("secret", "alice's prompt")
    transport.holders[session.id].say(type="delta", id="secret", text="alice's answer")
    mallory = FakeClient()
    other = opened(registry, SessionKey("demo", "mallory", "echo"), mallory, session.id, 0)
    assert other is not session
    assert mallory.frames == [mallory.frames[0]]
    assert mallory.frames[0]["resumed"] is False and mallory.frames[0]["session"] != session.id
    assert session.client is alice and alice.closed is None


def test_another_instance_resuming_someone_elses_session_is_refused_by_the_holder():
    # The id is unknown to this registry (another agentd started it): the holder checks.
    _, transport, started_by = make()
    alice = FakeClient()
    session = opened(started_by, KEY, alice)
    session.prompt("secret", "alice's prompt")
    _, other_transport, elsewhere = make()
    other_transport.holders = transport.holders  # the same VM
    mallory = FakeClient()
    other = opened(elsewhere, SessionKey("demo", "mallory", "echo"), mallory, session.id, 0)
    assert other.id != session.id and mallory.frames[0]["resumed"] is False
    assert [f["type"] for f in mallory.frames] == ["session"]
    assert other_transport.attaches[0].target.user == "mallory"
    assert transport.holders[session.id].attach is transport.current  # alice's, untouched
    assert list(elsewhere.by_id) == [other.id]


def test_a_fresh_connection_replaces_the_earlier_session_of_the_same_key():
    _, transport, registry = make()
    first = FakeClient()
    old = opened(registry, KEY, first)
    old.prompt("a", "x")
    new = opened(registry, KEY, FakeClient())
    assert new is not old and first.closed[0] == 4001
    assert {"type": "end"} in transport.attaches[0].written
    assert transport.holders[old.id].ended == "ended by request"
    assert registry.sessions_of("alice") == 1


def test_the_agent_exiting_is_relayed_and_the_next_prompt_goes_to_the_same_holder():
    _, transport, registry = make()
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    holder = transport.holders[session.id]
    holder.say(type="error", code="agent_exited", error="The agent process ended", exitStatus=3)
    assert client.frames[-1]["code"] == "agent_exited" and client.frames[-1]["seq"] == 2
    session.prompt("b", "y")
    assert len(transport.attaches) == 1
    assert [p["id"] for p in transport.current.prompts] == ["a", "b"]


def test_after_the_holder_ended_a_prompt_starts_a_new_one_numbering_on():
    _, transport, registry = make()
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    holder = transport.holders[session.id]
    holder.say(type="done", id="a", agent="echo", usage=USAGE)
    holder.end("idle")
    session.prompt("b", "y")
    restart = transport.current
    assert restart.target.start and restart.target.after == 2
    assert client.seqs() == [1, 2, 3]  # the new holder's ack numbers on
    assert client.frames[-1] == {"seq": 3, "type": "ack", "id": "b"}


def test_a_lost_attach_is_replaced_with_backoff_and_the_client_sees_no_gap_or_repeat():
    clock, transport, registry = make()
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    holder = transport.holders[session.id]
    holder.say(type="delta", id="a", text="0")
    session.confirm(2)
    transport.hold_answers = True
    transport.current.exit("connection to the VM lost")  # the SSH connection broke
    holder.attach = None
    holder.say(type="delta", id="a", text="1")  # journaled while nobody is attached
    clock.advance(0.1)
    [reattach] = transport.unanswered
    assert not reattach.target.start and reattach.target.after == 2
    transport.answer(reattach)
    holder.say(type="delta", id="a", text="2")
    assert client.seqs() == [1, 2, 3, 4]
    assert [f.get("text") for f in client.frames[2:]] == ["0", "1", "2"]
    assert client.closed is None


def test_unreachable_vm_gives_vm_unavailable_for_that_prompt():
    _, transport, registry = make()
    transport.fail_with = TransportError("refused", "connection refused", transient=True)
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    assert client.frames[-1] == {
        "type": "error",
        "code": "vm_unavailable",
        "error": "The project VM is unavailable.",
        "id": "a",
    }


def test_a_resume_elsewhere_with_the_vm_unreachable_asks_the_client_to_try_again():
    _, transport, registry = make()
    transport.fail_with = TransportError("refused", "connection refused", transient=True)
    client = FakeClient()
    assert opened(registry, KEY, client, "s" * 32, 7) is None
    assert client.closed is not None and client.closed[0] == 1013
    assert client.frames == [] and registry.by_id == {}


def test_a_full_journal_refuses_the_prompt_with_its_id_until_the_client_confirms():
    _, transport, registry = make()
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    transport.current.control(type="error", code="journal_full", error="no room", id="b")
    assert client.frames[-1]["code"] == "backlog_full" and client.frames[-1]["id"] == "b"
    assert "seq" not in client.frames[-1]


def test_usage_is_recorded_under_the_derived_id_then_the_holder_is_told():
    usage = FakeUsage()
    clock, transport, registry = make(usage=usage, usage_event=UsageEvent.from_agent_usage)
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    holder = transport.holders[session.id]
    holder.say(type="done", id="a", agent="echo", usage=USAGE)
    assert [e.query_id for e in usage.events] == [usage_event_id(session.id, "a")]
    assert holder.recorded == []  # not before the store has it
    usage.settle()
    # The holder hears of it after the next line it is sent, in the same write...
    writes = transport.current.writes
    session.prompt("b", "y")
    assert holder.recorded == ["a"] and transport.current.writes == writes + 1
    assert [m["type"] for m in transport.current.written[-2:]] == ["prompt", "recorded"]
    # ...or on its own, when nothing else goes to the holder for RECORDED_DELAY.
    holder.say(type="done", id="b", agent="echo", usage=USAGE)
    usage.settle()
    clock.advance(RECORDED_DELAY - 0.01)
    assert holder.recorded == ["a"]
    clock.advance(0.01)
    assert holder.recorded == ["a", "b"]


def test_the_usage_sink_hears_of_each_prompt_once_it_is_written_to_the_holder():
    usage = FakeUsage()
    _, transport, registry = make(usage=usage, usage_event=UsageEvent.from_agent_usage)
    session = opened(registry, KEY, FakeClient())
    seen: list[list[str]] = []
    usage.waiting_for_agent = lambda: seen.append(  # type: ignore[method-assign]
        [m.get("id") for m in transport.current.written if m["type"] == "prompt"]
    )
    session.prompt("a", "x")
    holder = transport.holders[session.id]
    holder.say(type="done", id="a", agent="echo", usage=USAGE)
    session.prompt("b", "y")
    assert seen == [["a"], ["a", "b"]]


def test_usage_a_departed_agentd_did_not_record_is_recorded_by_the_next_attach():
    usage = FakeUsage()
    _, transport, registry = make(usage=usage, usage_event=UsageEvent.from_agent_usage)
    session = opened(registry, KEY, FakeClient())
    session.prompt("a", "x")
    holder = transport.holders[session.id]
    event = usage_event_id(session.id, "a")
    holder.unrecorded = [
        {"id": "a", "event": event, "outcome": "done", "usage": USAGE, "timestamp": 1.7e9}
    ]
    clock, elsewhere_transport, elsewhere = make(
        usage=usage, usage_event=UsageEvent.from_agent_usage
    )
    elsewhere_transport.holders = transport.holders
    opened(elsewhere, KEY, FakeClient(), session.id, 1)
    assert [e.query_id for e in usage.events] == [event]
    assert usage.events[0].timestamp == 1.7e9
    usage.settle()
    clock.advance(RECORDED_DELAY)
    assert holder.recorded == ["a"]


class UserKeys:
    async def keys_for(self, user: str) -> AgentKeys:
        return AgentKeys({"ANTHROPIC_API_KEY": "sk-ant-users-own"}, "user")


def test_an_instance_that_did_not_start_the_agent_bills_with_the_keys_it_was_started_with():
    usage = FakeUsage()
    _, transport, registry = make(
        usage=usage, usage_event=UsageEvent.from_agent_usage, keys=UserKeys()
    )
    session = opened(registry, KEY, FakeClient())
    session.prompt("a", "x")
    assert transport.current.target.env["AGENTD_KEY_SOURCE"] == "user"
    holder = transport.holders[session.id]
    holder.unrecorded = [
        {"id": "a", "event": "h-1", "outcome": "done", "usage": USAGE, "timestamp": 1.7e9}
    ]
    _, elsewhere_transport, elsewhere = make(usage=usage, usage_event=UsageEvent.from_agent_usage)
    elsewhere_transport.holders = transport.holders
    opened(elsewhere, KEY, FakeClient(), session.id, 1)
    assert [e.key_source for e in usage.events] == ["user"]


def test_a_lost_holders_usage_is_billed_to_whose_keys_each_record_names():
    """A lost holder's journal comes with no one to say whose keys the agent ran with (its
    ``attached`` has no keySource): each unrecorded record names them itself. A record from
    a holder that did not write the field is billed as the session is."""
    usage = FakeUsage()
    _, transport, registry = make(usage=usage, usage_event=UsageEvent.from_agent_usage)
    session = opened(registry, KEY, FakeClient())
    session.prompt("a", "x")
    holder = transport.holders[session.id]
    holder.key_source = None  # the journal of a holder that is gone
    holder.unrecorded = [
        {
            "id": "a",
            "event": "h-1",
            "outcome": "done",
            "usage": USAGE,
            "timestamp": 1.7e9,
            "keySource": "user",
        },
        {"id": "b", "event": "h-2", "outcome": "done", "usage": USAGE, "timestamp": 1.7e9},
        {
            "id": "c",
            "event": "h-3",
            "outcome": "done",
            "usage": USAGE,
            "timestamp": 1.7e9,
            "keySource": "somebody",
        },
    ]
    _, elsewhere_transport, elsewhere = make(usage=usage, usage_event=UsageEvent.from_agent_usage)
    elsewhere_transport.holders = transport.holders
    opened(elsewhere, KEY, FakeClient(), session.id, 1)
    billed = {e.query_id: e.key_source for e in usage.events}
    assert billed == {"h-1": "user", "h-2": "operator", "h-3": "operator"}


def test_a_client_resuming_on_another_instance_closes_this_ones_with_4001():
    _, transport, registry = make()
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    transport.current.control(type="superseded")
    assert client.closed is not None and client.closed[0] == 4001
    assert session.id not in registry.by_id
    assert transport.holders[session.id].ended is None


def test_leave_all_lets_go_of_every_attach_without_ending_a_session():
    _, transport, registry = make()
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    registry.close_all(1012, "server restarting")
    assert client.closed == (1012, "server restarting")
    gone: list[object] = []
    registry.leave_all().addCallback(gone.append)
    assert gone and transport.current.terminated and registry.by_id == {}
    assert {"type": "end"} not in transport.current.written


def test_backpressure_pauses_the_attach_and_detach_lets_it_run_on():
    _, transport, registry = make()
    client = FakeClient()
    session = opened(registry, KEY, client)
    session.prompt("a", "x")
    session.pause_output()
    assert transport.current.paused
    session.detach(client)
    assert not transport.current.paused


def test_a_new_connection_resumes_an_attach_the_one_before_paused():
    _, transport, registry = make()
    first = FakeClient()
    session = opened(registry, KEY, first)
    session.prompt("a", "x")
    session.pause_output()  # the first connection's queue was full
    opened(registry, KEY, FakeClient(), session.id, 0)
    assert first.closed is not None and first.closed[0] == 4001
    assert not transport.current.paused


def test_agentd_answers_cost_nothing_in_the_replay_log():
    _, _, registry = make(messages=1000)
    client = FakeClient()
    session = opened(registry, KEY, client)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):
            session.error(ErrorCode.BAD_REQUEST, "message must be a JSON object")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert session.replay.size == 0 and session.seq == 0
    assert grown < 1000 * 1024, f"{grown // 1000} bytes kept for each message of under 100"


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
    session = opened(registry, KEY, FakeClient())
    session.prompt("a", "x")
    attach = transport.current
    bad_lines = sample("agentd_agent_bad_lines_total", agent="echo")
    for _ in range(1000):
        attach.control(type="log", line='{"level":"warn","message":"disk full"}')
    for _ in range(1000):
        attach.sink.agent_line(b'{"seq":not json')
        attach.sink.agent_overlong("stdout", 2_000_000)
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
        attach.control(type="log", line='{"level":"warn","message":"disk full"}')
    assert len(agent_log_events) == 5


def test_lines_held_back_are_reported_when_the_holder_ends(agent_log_events):
    clock, transport, registry = make()
    session = opened(registry, KEY, FakeClient())
    session.prompt("a", "x")
    for _ in range(agentlog.BURST_LINES + 7):
        transport.current.control(type="log", line="plain text on stderr")
    transport.holders[session.id].end("agent exited")
    [summary] = [e for e in agent_log_events if "held back" in e["log_format"]]
    assert summary["count"] == 7
    assert clock.getDelayedCalls() == []
