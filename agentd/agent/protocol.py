"""The agent's side of the JSON-lines protocol: error codes, input parsing, usage, output lines.

Only the standard library is imported here: the ``echo`` path must start fast.
"""

from __future__ import annotations

import enum
import json
from typing import Any

# An input line longer than this is refused (agentd caps browser messages far below it).
MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_ID_CHARS = 256


class ErrorCode(enum.StrEnum):
    """Every ``code`` the agent CLI can write in an ``error`` line."""

    BAD_REQUEST = "bad_request"
    BUSY = "busy"
    UNKNOWN_AGENT = "unknown_agent"
    BAD_CONFIG = "bad_config"
    INTERNAL = "internal"
    TIMEOUT = "timeout"
    PROVIDER_AUTH = "provider_auth"
    PROVIDER_RATE_LIMIT = "provider_rate_limit"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PROVIDER_ERROR = "provider_error"


class BadRequest(ValueError):
    """An input line the agent cannot act on; ``query_id`` is set when the line named one."""

    def __init__(self, problem: str, query_id: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.query_id = query_id


class Prompt:
    """A validated ``prompt`` message. Its test options (``agentd-agent --test-options`` only)
    are honoured by the echo provider, and ``exit_status`` by every agent."""

    __slots__ = (
        "delay_ms",
        "delta_bytes",
        "exit_status",
        "id",
        "repeat",
        "report_keys",
        "text",
        "turn",
    )

    def __init__(
        self,
        id: str,
        text: str,
        repeat: int = 1,
        delay_ms: float = 0.0,
        delta_bytes: int | None = None,
        report_keys: bool = False,
        exit_status: int | None = None,
        turn: bool = False,
    ) -> None:
        self.id = id
        self.text = text
        self.repeat = repeat
        self.delay_ms = delay_ms
        self.delta_bytes = delta_bytes
        self.report_keys = report_keys
        self.exit_status = exit_status
        self.turn = turn


class Abort:
    """A validated ``abort`` message; without an id it aborts whatever query runs."""

    __slots__ = ("id",)

    def __init__(self, id: str | None) -> None:
        self.id = id


# The fields of a prompt's ``options`` object that drive the test behaviour.
TEST_OPTIONS = ("repeat", "delay_ms", "delta_bytes", "report_keys", "exit", "turn")


def _integer(options: dict[str, Any], key: str, low: int, high: int, query_id: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"options.{key} must be an integer from {low} to {high}", query_id)
    return value


def parse_line(line: bytes, test_options: bool = False) -> Prompt | Abort:
    """Parse one input line; raises BadRequest naming what is wrong.

    A prompt's test options are read from its ``options`` object, and refused unless
    ``test_options`` is set: agentd passes ``options`` on from any browser.
    """
    try:
        message = json.loads(line)
    except ValueError:
        raise BadRequest("line is not valid JSON") from None
    if not isinstance(message, dict):
        raise BadRequest("line is not a JSON object")
    raw_id = message.get("id")
    query_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_CHARS else None
    kind = message.get("type")
    if kind == "abort":
        if raw_id is not None and query_id is None:
            raise BadRequest(f"id must be a string of 1 to {MAX_ID_CHARS} characters")
        return Abort(query_id)
    if kind != "prompt":
        raise BadRequest("type must be prompt or abort", query_id)
    if query_id is None:
        raise BadRequest(f"id must be a string of 1 to {MAX_ID_CHARS} characters")
    text = message.get("text")
    if not isinstance(text, str) or not text:
        raise BadRequest("text must be a non-empty string", query_id)
    options = message.get("options", {})
    if not isinstance(options, dict):
        raise BadRequest("options must be an object", query_id)
    asked = [name for name in TEST_OPTIONS if name in options]
    if not asked:
        return Prompt(id=query_id, text=text)
    if not test_options:
        raise BadRequest(
            f"test options ({', '.join(asked)}) need agentd-agent --test-options", query_id
        )
    delay_ms = options.get("delay_ms", 0)
    if (
        isinstance(delay_ms, bool)
        or not isinstance(delay_ms, int | float)
        or not 0 <= delay_ms <= 1000
    ):
        raise BadRequest("options.delay_ms must be a number from 0 to 1000", query_id)
    report_keys, turn = options.get("report_keys", False), options.get("turn", False)
    for name, flag in (("report_keys", report_keys), ("turn", turn)):
        if not isinstance(flag, bool):
            raise BadRequest(f"options.{name} must be true or false", query_id)
    return Prompt(
        id=query_id,
        text=text,
        repeat=_integer(options, "repeat", 1, 1_000_000, query_id) or 1,
        delay_ms=float(delay_ms),
        delta_bytes=_integer(options, "delta_bytes", 1, 1_048_576, query_id),
        report_keys=report_keys,
        exit_status=_integer(options, "exit", 0, 255, query_id),
        turn=turn,
    )


class Usage:
    """Tokens a query consumed, updated as the provider reports them, and what they cost.

    ``estimated`` is set when the stream ended before the provider reported its own counts
    (an abort, a timeout, a cut stream) and some counts had to be estimated from the text.
    """

    __slots__ = (
        "cache_read_tokens",
        "cache_write_tokens",
        "cost",
        "estimated",
        "input_tokens",
        "model",
        "output_tokens",
    )

    def __init__(self, model: str) -> None:
        self.model = model
        self.input_tokens = 0
        self.output_tokens = 0
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0
        self.cost: float | None = None
        self.estimated = False

    def to_json(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "cacheReadTokens": self.cache_read_tokens,
            "cacheWriteTokens": self.cache_write_tokens,
            "cost": self.cost,
            "model": self.model,
        }
        if self.estimated:
            usage["estimated"] = True
        return usage


def encode(message: dict[str, Any]) -> bytes:
    """One output line. ASCII-only JSON, so any text the provider sends is valid on the wire."""
    return (json.dumps(message, separators=(",", ":")) + "\n").encode("ascii")


def error_line(code: ErrorCode, text: str, **extra: Any) -> bytes:
    message: dict[str, Any] = {"type": "error", "code": code.value, "error": text}
    message.update(extra)
    return encode(message)


def delta_encoder(query_id: str) -> tuple[bytes, bytes]:
    """The bytes before and after a JSON string that make a delta line for ``query_id``."""
    prefix = b'{"type":"delta","id":' + json.dumps(query_id).encode("ascii") + b',"text":'
    return prefix, b"}\n"


def json_string(text: str) -> bytes:
    return json.dumps(text).encode("ascii")


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token) for when a provider has not reported one."""
    return (len(text) + 3) // 4
