"""An agent's stderr lines as agentd logs them: cut to size, and the per-session line budget."""

from __future__ import annotations

import orjson
from twisted.internet.task import Clock

from agentd import agentlog
from agentd.agentlog import MAX_CHARS, MAX_FIELDS, clip, parse_agent_log


def test_agent_log_lines_pass_at_the_sustained_rate():
    clock = Clock()
    reported: list[int] = []
    budget = agentlog.LogBudget(clock, reported.append, rate=10.0, burst=20)
    assert sum(budget.allow() for _ in range(25)) == 20
    clock.advance(0.5)
    assert sum(budget.allow() for _ in range(25)) == 5
    clock.advance(agentlog.SUMMARY_SECONDS)
    assert reported == [5 + 20]


def test_every_field_is_cut_like_the_message_and_nesting_becomes_cut_text() -> None:
    big = "x" * 900_000
    line = orjson.dumps(
        {
            "level": "error",
            "message": big,
            "detail": big,
            "nested": {"deeper": [[big]]},
            "count": 3,
            "ok": None,
            "k" * 1000: 1,
        }
    )
    entry = parse_agent_log(line)
    assert entry.warning
    assert len(entry.message) < MAX_CHARS + 40
    assert len(entry.fields["agent_detail"]) < MAX_CHARS + 40
    assert entry.fields["agent_nested"].startswith('{"deeper":[["xxx')
    assert len(entry.fields["agent_nested"]) < MAX_CHARS + 40
    assert (entry.fields["agent_count"], entry.fields["agent_ok"]) == (3, None)
    assert max(map(len, entry.fields)) <= len("agent_") + agentlog.MAX_KEY_CHARS


def test_an_agent_log_line_keeps_a_bounded_number_of_fields() -> None:
    line = orjson.dumps({"message": "m", **{f"k{i}": i for i in range(1000)}})
    entry = parse_agent_log(line)
    assert len(entry.fields) == MAX_FIELDS + 1
    assert entry.fields["agent_fields_dropped"] == 1000 - MAX_FIELDS
    assert not entry.warning


def test_a_cut_traceback_keeps_its_last_line() -> None:
    traceback = "Traceback (most recent call last):\n" + "  frame\n" * 1000 + "KeyError: 'q'"
    cut = clip(traceback)
    assert cut.startswith("Traceback") and cut.endswith("KeyError: 'q'")
    assert "characters cut" in cut and len(cut) < MAX_CHARS + 40
    assert clip("short") == "short"


def test_plain_text_on_stderr_is_the_message() -> None:
    entry = parse_agent_log(b"\xff plain " + b"y" * 10_000)
    assert entry.fields == {} and not entry.warning
    assert entry.message.startswith("\ufffd plain") and len(entry.message) < MAX_CHARS + 40
