"""The closed set of error codes a client can see, and the one way to build an error message.

Every code is documented in docs/protocol.md. Nothing else reaches a client: no tracebacks,
no exception text, no secrets.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    VM_UNAVAILABLE = "vm_unavailable"
    AGENT_EXITED = "agent_exited"
    INTERNAL = "internal"
    RATE_LIMIT = "rate_limit"
    QUOTA_EXCEEDED = "quota_exceeded"
    TIMEOUT = "timeout"
    BACKLOG_FULL = "backlog_full"


def error_message(code: ErrorCode, text: str, **extra: Any) -> dict[str, Any]:
    """An agentd error in the wire envelope: ``{"type": "error", "code": ..., "error": ...}``."""
    message: dict[str, Any] = {"type": "error", "code": code.value, "error": text}
    message.update(extra)
    return message
