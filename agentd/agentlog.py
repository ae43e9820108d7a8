"""What an agent puts into agentd's log: its stderr lines cut to size, at a bounded rate.

An agent runs next to code its user controls, so what it writes is not trusted to be small
or rare. Each JSON line it writes on stderr becomes one event of agentd's log with at most
``MAX_FIELDS`` fields, every string cut to ``MAX_CHARS`` characters like the message, and
nested values flattened to cut JSON text. The lines one session's agent causes (its stderr,
and agentd's warnings about its stdout) pass a token bucket; those held back are counted and
reported in one summary line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from agentd.logformat import LEVEL, MESSAGE

MAX_CHARS = 2000
MAX_FIELDS = 16
MAX_KEY_CHARS = 64
# Far above what a working agent writes (a few lines a query), far below a flood.
LINES_PER_SECOND = 10.0
BURST_LINES = 100
SUMMARY_SECONDS = 10.0

_WARNING_LEVELS = frozenset({"warn", "warning", "error"})


def clip(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` cut to about ``limit`` characters, keeping both ends: the last line of a
    traceback says what went wrong."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}…[{len(text) - 2 * half} characters cut]…{text[-half:]}"


def _bounded(value: Any) -> Any:
    if isinstance(value, str):
        return clip(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return clip(orjson.dumps(value).decode())


class AgentLogLine(NamedTuple):
    warning: bool
    message: str
    fields: dict[str, Any]


def parse_agent_log(line: bytes) -> AgentLogLine:
    """One stderr line as a log event: a JSON object's ``level``, ``message`` and other fields
    (as ``agent_<name>``), or a line of plain text as the message."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        obj = None
    if type(obj) is not dict:
        return AgentLogLine(False, clip(line.decode("utf-8", "replace")), {})
    fields: dict[str, Any] = {}
    dropped = 0
    for key, value in obj.items():
        if key == MESSAGE or key == LEVEL:
            continue
        if len(fields) < MAX_FIELDS:
            fields["agent_" + key[:MAX_KEY_CHARS]] = _bounded(value)
        else:
            dropped += 1
    if dropped:
        fields["agent_fields_dropped"] = dropped
    message = obj.get(MESSAGE, "")
    return AgentLogLine(
        obj.get(LEVEL) in _WARNING_LEVELS,
        clip(message if isinstance(message, str) else orjson.dumps(message).decode()),
        fields,
    )


class LogBudget:
    """A token bucket of log lines for one session.

    ``allow()`` says whether the next line may be written: ``burst`` at once, then ``rate``
    a second. Lines refused are counted; ``report`` gets the count at most once every
    ``SUMMARY_SECONDS`` while lines are refused, and at once on ``flush()``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        report: Callable[[int], None],
        rate: float = LINES_PER_SECOND,
        burst: int = BURST_LINES,
    ) -> None:
        self._clock = clock
        self._report = report
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._updated = clock.seconds()
        self._held = 0
        self._summary: IDelayedCall | None = None

    def allow(self) -> bool:
        now = self._clock.seconds()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self._held += 1
        if self._summary is None:
            self._summary = self._clock.callLater(SUMMARY_SECONDS, self.flush)
        return False

    def flush(self) -> None:
        """Report the lines held back so far, now."""
        summary, self._summary = self._summary, None
        if summary is not None and summary.active():
            summary.cancel()
        held, self._held = self._held, 0
        if held:
            self._report(held)
