"""The ledger on its own, over a real journal and state: when a prompt's ack is written.

A prompt's ack waits for the agent's first line, at most ``ACK_WAIT_SECONDS``, and shares its
journal write and its send. The holder end to end is tests/test_holder.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentd.agent.holder import ledger as ledger_module
from agentd.agent.holder import wire
from agentd.agent.holder.journal import Journal, JournalError
from agentd.agent.holder.ledger import ACK_WAIT_SECONDS, Ledger
from agentd.agent.holder.process import Settings
from agentd.agent.holder.state import Identity, State
from agentd.agent.log import Log


class Relayed:
    """The attaches as the ledger sees them: every relay is one send to the client."""

    current = None

    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def caught_up(self) -> None:
        return None

    def relay(self, data: bytes, caught_up: object) -> None:
        self.sends.append(data)

    def forward_dropped(self, reason: str, size: int) -> None:
        pass


def nothing() -> None:
    """The agent's pause and resume: these tests run no agent."""


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Ledger, Relayed, Journal]]:
    settings = Settings(
        identity=Identity("s3ss10n-0123456789", "ada", "demo", "echo"),
        agent_argv=("true",),
        cwd=str(tmp_path),
        sessions=str(tmp_path),
        idle_seconds=60.0,
        journal_max_bytes=1 << 20,
        journal_max_age=3600.0,
        max_line=1 << 16,
    )
    journal = Journal(str(tmp_path / "journal"), 8192, 3600)
    state = State(str(tmp_path))
    relayed = Relayed()
    with (tmp_path / "holder.log").open("ab") as log_file:
        log = Log("echo", fd=log_file.fileno())
        ledger = Ledger(settings, journal, state, relayed, log, nothing, nothing)  # type: ignore[arg-type]
        yield ledger, relayed, journal
    journal.close()
    state.close()


def lines_of(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


def journaled(journal: Journal) -> list[dict[str, Any]]:
    data, _ = journal.read(journal.locate(0)[0], 1 << 20)
    return lines_of(data)


START = b'{"type":"start","id":"p1"}\n'
DELTA = b'{"type":"delta","id":"p1","text":"hi"}\n'
DONE = b'{"type":"done","id":"p1"}\n'


def test_an_ack_goes_out_with_the_agents_first_lines_in_one_send(parts):
    ledger, relayed, journal = parts
    ledger.ack({"type": "ack", "id": "p1"})
    assert relayed.sends == [] and ledger.deadlines()
    ledger.take([START, DELTA, DONE])
    assert len(relayed.sends) == 1
    sent = lines_of(relayed.sends[0])
    assert [(m["seq"], m["type"]) for m in sent] == [
        (1, "ack"),
        (2, "start"),
        (3, "delta"),
        (4, "done"),
    ]
    assert journaled(journal) == sent
    assert ledger.waiting_ack is None and not ledger.deadlines()


def test_an_ack_goes_alone_once_it_waited_long_enough(parts):
    ledger, relayed, journal = parts
    ledger.ack({"type": "ack", "id": "p1"})
    [due] = ledger.deadlines()
    assert 0 < due - time.monotonic() <= ACK_WAIT_SECONDS
    ledger.retry(due - ACK_WAIT_SECONDS / 2)
    assert relayed.sends == []
    ledger.retry(due)
    assert [lines_of(s) for s in relayed.sends] == [[{"seq": 1, "type": "ack", "id": "p1"}]]
    ledger.take([START])
    assert [m["seq"] for m in lines_of(relayed.sends[1])] == [2]
    assert [m["type"] for m in journaled(journal)] == ["ack", "start"]


def test_any_other_line_sends_a_waiting_ack_first(parts):
    ledger, relayed, journal = parts
    ledger.ack({"type": "ack", "id": "p1"})
    ledger.ack({"type": "ack", "id": "p2"})  # a second prompt before the agent answered
    ledger.emit({"type": "error", "code": "agent_exited", "error": "The agent exited."})
    sent = [m for s in relayed.sends for m in lines_of(s)]
    assert [(m["seq"], m["type"], m.get("id")) for m in sent] == [
        (1, "ack", "p1"),
        (2, "ack", "p2"),
        (3, "error", None),
    ]
    assert journaled(journal) == sent and ledger.waiting_ack is None


def test_an_ack_the_disk_refused_waits_and_goes_with_the_retry(parts, monkeypatch):
    ledger, relayed, journal = parts
    append = journal.append

    def full(data: bytes, first: int, last: int) -> None:
        raise JournalError(28, "No space left on device")

    ledger.ack({"type": "ack", "id": "p1"})
    monkeypatch.setattr(journal, "append", full)
    ledger.take([START])
    assert relayed.sends == [] and ledger.waiting_ack is not None and ledger.held == [START]
    monkeypatch.setattr(journal, "append", append)
    ledger.retry(time.monotonic() + ledger_module.RETRY_SECONDS)
    sent = [m for s in relayed.sends for m in lines_of(s)]
    assert [(m["seq"], m["type"]) for m in sent] == [(1, "ack"), (2, "start")]
    assert journaled(journal) == sent


@pytest.mark.parametrize(
    "message",
    [
        {"type": "ack", "id": "p1"},
        {"type": "error", "code": "x", "error": 'tab\there "quoted" \\ and \x01'},
        {"usage": {"input_tokens": 3, "cost": 0.25, "model": "m"}, "timestamp": 1764547200.5},
        {"text": "caf\u00e9 \u2603 \U0001f600"},  # non-ASCII: escaped, as the json module does
        {"input_tokens": 2**70},  # past 64 bits: orjson refuses, the json module writes it
        {1: "a key that is not a string"},
    ],
)
def test_the_holders_json_is_byte_for_byte_what_the_json_module_writes(message):
    assert wire.dumps(message) == json.dumps(message, separators=(",", ":")).encode("ascii")
    line = wire.numbered({"type": "emitted", "body": message.get("text", "x")}, 7)
    assert line.startswith(b'{"seq":7,"type":"emitted",') and line.isascii()


def state_records(state: State) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(state.path).read_bytes().splitlines()]


def test_a_recorded_record_is_written_with_the_next_record_or_by_flush(tmp_path: Path):
    state = State(str(tmp_path))
    state.add_usage({"id": "q1"})
    state.add_usage({"id": "q2"})
    state.recorded("q1")
    state.recorded("unknown")  # never had usage here: nothing to write
    assert "q1" not in state.unrecorded
    assert state_records(state) == [{"usage": {"id": "q1"}}, {"usage": {"id": "q2"}}]
    state.accept("p3")  # written after it, in the order they were made
    assert state_records(state)[2:] == [{"recorded": "q1"}, {"prompt": "p3"}]
    state.recorded("q2")
    state.flush()
    state.flush()
    assert state_records(state)[4:] == [{"recorded": "q2"}]
    assert not State(str(tmp_path)).unrecorded
    state.close()


def test_waiting_recorded_records_are_written_past_their_bound_and_at_close(tmp_path: Path):
    state = State(str(tmp_path))
    ids = [f"q{n:06d}" for n in range(400)]
    for query in ids:
        state.add_usage({"id": query})
    for query in ids:
        state.recorded(query)
    written = [r["recorded"] for r in state_records(state) if "recorded" in r]
    assert 0 < len(written) < len(ids) and written == ids[: len(written)]
    state.close()
    assert [r["recorded"] for r in state_records(state) if "recorded" in r] == ids
    assert not State(str(tmp_path)).unrecorded
