"""The JSON log line agentd and the agent CLI both write: field names, level names, time format.

An agent's stderr lines end up in agentd's log, so both kinds of line carry the same fields
under the same names and one query or log shipper reads either. The agent CLI imports this
module and must start without Twisted, so it imports only the standard library.
"""

from __future__ import annotations

import time

TIME = "time"
LEVEL = "level"
MESSAGE = "message"

# Who and what a line is about, under these names wherever they are known.
CONTEXT_FIELDS = ("session", "project", "user", "agent", "vm", "query")

# From least to most severe: the names of twisted.logger's LogLevel, which agentd writes.
LEVELS = ("debug", "info", "warn", "error", "critical")


def timestamp(seconds: float) -> str:
    """``seconds`` since the epoch in UTC, ISO 8601 with milliseconds: 2025-06-01T12:00:00.123Z"""
    whole = int(seconds)
    # Rounded to the microsecond first, as datetime does: .123 is stored as .12299999...
    carry, micros = divmod(round((seconds - whole) * 1_000_000), 1_000_000)
    whole += carry
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros // 1000:03d}Z"
