"""JSON log lines on stderr (stdout carries protocol lines only), with secrets redacted.

The lines have the fields, level names and time format of agentd's own log
(``agentd.logformat``), which they end up in.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

from agentd.logformat import LEVEL, LEVELS, MESSAGE, TIME, timestamp

_RANK = {name: rank for rank, name in enumerate(LEVELS)}

# Secrets shorter than this are not redacted: replacing every "a" would only garble the log.
_MIN_SECRET_CHARS = 8


class Log:
    """Writes one JSON object per line to a file descriptor: time, level, message, agent."""

    def __init__(
        self, agent: str, fd: int = 2, level: str = "info", secrets: Iterable[str] = ()
    ) -> None:
        self.agent = agent
        self.fd = fd
        self.threshold = _RANK.get(level, _RANK["info"])
        self.secrets = sorted(
            {s for s in secrets if len(s) >= _MIN_SECRET_CHARS}, key=len, reverse=True
        )

    def emit(self, level: str, message: str, query: str | None = None, **fields: Any) -> None:
        if _RANK[level] < self.threshold:
            return
        record: dict[str, Any] = {
            TIME: timestamp(time.time()),
            LEVEL: level,
            MESSAGE: message,
            "agent": self.agent,
        }
        if query is not None:
            record["query"] = query
        record.update(fields)
        line = json.dumps(record, default=str)
        for secret in self.secrets:
            line = line.replace(secret, "[redacted]")
        try:
            os.write(self.fd, (line + "\n").encode("utf-8", "replace"))
        except OSError:
            # Nowhere left to report a broken stderr; the protocol on stdout goes on.
            pass

    def debug(self, message: str, query: str | None = None, **fields: Any) -> None:
        self.emit("debug", message, query, **fields)

    def info(self, message: str, query: str | None = None, **fields: Any) -> None:
        self.emit("info", message, query, **fields)

    def warn(self, message: str, query: str | None = None, **fields: Any) -> None:
        self.emit("warn", message, query, **fields)

    def error(self, message: str, query: str | None = None, **fields: Any) -> None:
        self.emit("error", message, query, **fields)
