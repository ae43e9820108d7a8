"""Operator logs as JSON lines: one redacted object per event, installed under ``twistd``.

Each line carries ``time`` (ISO 8601, UTC), ``level``, ``message`` (the formatted event),
``namespace``, the context fields an event names (session, project, user, agent, vm, query),
any other plain-JSON keys the caller passed, and for failures a short ``error`` plus the
``traceback``; names and formats are ``agentd.logformat``'s, which the agent CLI's lines
share. Every string is passed through ``redact`` before it is written, so a token,
bearer credential or provider key that slips into a message never reaches the log.

How ``twistd -n agentd`` ends up writing these lines
----------------------------------------------------
twistd chooses its observer in ``AppLogger.start(application)``, after the plugin's
``makeService`` has returned and twistd has called ``setServiceParent(application)`` on the
service it returned. It takes, in order: the ``--logger`` option, an ``ILogObserver``
component of the application, or a text observer built from ``--logfile``/``--syslog``.
A plugin never sees the application, but its root service does: ``install_json_logging``
returns that root, and when twistd parents it, it registers the JSON observer as the
application's ``ILogObserver``. twistd then starts the global log beginner with it alone,
so the very first line ("twistd ... starting up"), everything logged while ``makeService``
ran (the beginner buffers it), ``print`` output and warnings all come out as JSON, and no
text observer is installed. An explicit ``--logger`` still takes precedence; ``--logfile``
and ``--syslog`` are ignored because ``[log] file`` names the destination.

``"-"`` writes to file descriptor 1 through a stream of our own: once logging begins twistd
replaces ``sys.stdout`` with a file that logs, so writing there would loop. Logging to
stdout needs ``--nodaemon`` (a daemon's stdout is ``/dev/null``).
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import IO, Any

from twisted.application.service import IServiceCollection, MultiService
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from zope.interface import implementer

from agentd.config import LogConfig
from agentd.logformat import CONTEXT_FIELDS, LEVEL, MESSAGE, TIME, timestamp

REDACTED = "[redacted]"

_RECORD_FIELDS = frozenset(
    {TIME, LEVEL, MESSAGE, "namespace", "error", "traceback", *CONTEXT_FIELDS}
)

# Keys twisted.python.log adds to legacy events; what they hold is already in the message.
_LEGACY_KEYS = frozenset(
    {"message", "time", "isError", "system", "format", "failure", "why", "logLevel"}
)

_CREDENTIAL_NAME = r"[A-Za-z0-9_-]*(?:token|secret|password|passwd|api_?key)"

# (pattern, replacement) pairs applied in order; each leaves its own output unchanged.
_CREDENTIAL_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # JSON Web Tokens: three base64url segments; the header always starts with '{"'.
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # Provider API keys: Anthropic sk-ant-..., OpenAI sk-... and sk-proj-....
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), REDACTED),
    # Authorization header values, whatever the scheme.
    (
        re.compile(
            r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token|digest)\s+)?)"
            r"[^\s\"',;]+"
        ),
        rf"\1{REDACTED}",
    ),
    # Bearer credentials outside a header.
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/-]{16,}=*"), rf"\1{REDACTED}"),
    # Query and form parameters: token=, access_token=, api_key=, password=, ...
    (re.compile(rf"(?i)\b({_CREDENTIAL_NAME}=)[^&\s\"'#;,]+"), rf"\1{REDACTED}"),
    # The same names as JSON members inside a string: "token": "...".
    (re.compile(rf'(?i)("{_CREDENTIAL_NAME}"\s*:\s*")[^"]*"'), rf'\1{REDACTED}"'),
    # Passwords in URLs: scheme://user:password@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@"), rf"\1{REDACTED}@"),
)

# Event keys whose values are credentials whatever they look like.
_CREDENTIAL_KEY = re.compile(
    r"(?i)(?:^|_)(?:token|secret|password|passwd|api_?key|authorization|jwt|cookie)$"
)

_MAX_DEPTH = 8


def redact(text: str) -> str:
    """``text`` with every token, bearer credential, API key and URL password replaced."""
    for pattern, replacement in _CREDENTIAL_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    if isinstance(value, dict):
        return {
            k: REDACTED if _CREDENTIAL_KEY.search(k) else _redact_value(v) for k, v in value.items()
        }
    return value


def _is_plain(value: Any, depth: int = 0) -> bool:
    """True for values JSON represents faithfully: str, finite numbers, lists, str-keyed maps."""
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, list | tuple):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _failure_of(event: LogEvent) -> Failure | None:
    failure = event.get("log_failure")
    if failure is None and event.get("isError"):
        # twisted.python.log.err(): the failure travels under the legacy key.
        failure = event.get("failure")
    return failure if isinstance(failure, Failure) else None


def _message(event: LogEvent, failure: Failure | None) -> str:
    if failure is not None and "log_failure" not in event:
        # A legacy error's formatted text is "why" followed by the whole traceback, which
        # this format keeps in its own field.
        return str(event.get("why") or "Unhandled Error")
    return formatEvent(event)


def event_record(event: LogEvent) -> dict[str, Any]:
    """The redacted JSON object written for one event."""
    level = event.get("log_level", LogLevel.info)
    failure = _failure_of(event)
    record: dict[str, Any] = {
        TIME: timestamp(event.get("log_time") or time.time()),
        LEVEL: level.name,
        MESSAGE: _message(event, failure),
        "namespace": event.get("log_namespace", "log_legacy"),
    }
    for name in CONTEXT_FIELDS:
        value = event.get(name)
        if value is not None:
            record[name] = value if _is_plain(value) else str(value)
    for key, value in event.items():
        if (
            not key.startswith("log_")
            and key not in _RECORD_FIELDS
            and key not in _LEGACY_KEYS
            and _is_plain(value)
        ):
            record[key] = value
    if failure is not None:
        record["error"] = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    redacted: dict[str, Any] = _redact_value(record)
    return redacted


def json_line(event: LogEvent) -> bytes:
    """One event as a single UTF-8 JSON line."""
    text = json.dumps(event_record(event), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "backslashreplace") + b"\n"


@implementer(ILogObserver)
class JSONLogObserver:
    """Writes each event it sees to ``stream`` as one JSON line, flushed at once."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        self._stream.write(json_line(event))
        self._stream.flush()


def _open_destination(file: str) -> IO[bytes]:
    """The byte stream behind ``[log] file``: ``"-"`` is file descriptor 1, else append."""
    # Both stay open for the life of the process: the observer writes until twistd exits.
    if file == "-":
        return open(1, "wb", closefd=False)
    return open(file, "ab")


def json_log_observer(config: LogConfig) -> FilteringLogObserver:
    """A JSON observer writing to ``[log] file`` that drops events below ``[log] level``."""
    return FilteringLogObserver(
        JSONLogObserver(_open_destination(config.file)),
        [LogLevelFilterPredicate(LogLevel.levelWithName(config.level))],
    )


class JSONLoggingService(MultiService):
    """A root service that makes the twistd application it joins log through ``observer``."""

    def __init__(self, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: IServiceCollection) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def install_json_logging(config: LogConfig) -> JSONLoggingService:
    """Open ``[log] file`` and return the root service for ``makeService`` to return.

    Add every other service under it. When twistd parents it to its application, the JSON
    observer becomes that application's log observer (see the module docstring). Opening the
    file here makes a bad path fail at startup, with twistd's error, not at the first line.
    """
    return JSONLoggingService(json_log_observer(config))
