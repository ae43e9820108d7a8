"""The attach protocol: the JSON lines between ``agentd-agent attach`` and a session holder.

Two kinds of line travel from the holder to an attach. A numbered line is one the client
sees: it always begins with ``{"seq":N`` (N being its place in the session) and is kept in
the journal. A control line is for agentd only: it begins with ``{"type":`` and never carries
``seq``. docs/agent-cli.md lists every line of both directions.
"""

from __future__ import annotations

import enum
import json
from typing import Any

VERSION = 1
SEQ_PREFIX = b'{"seq":'
# The line the agent CLI writes for every delta begins so and ends so (newline included);
# such lines are numbered without being parsed (the CLI encodes them with json.dumps),
# everything else is parsed first.
DELTA_PREFIX = b'{"type":"delta","id":"'
DELTA_SUFFIX = b'"}\n'


class Refusal(enum.StrEnum):
    """The ``code`` of a control ``error`` line: why an attach or one of its lines was refused."""

    BAD_REQUEST = "bad_request"  # malformed arguments, hello or input line
    MISMATCH = "mismatch"  # the session belongs to another user, project or agent
    NO_SESSION = "no_session"  # nothing is known under this id and no start was asked for
    UNAVAILABLE = "unavailable"  # the holder could not be started or did not answer
    JOURNAL_FULL = "journal_full"  # no room for the line until the client confirms more
    ENDING = "ending"  # the session is ending and takes no more input


def encode(message: dict[str, Any]) -> bytes:
    """One line, ASCII-only JSON."""
    return (json.dumps(message, separators=(",", ":")) + "\n").encode("ascii")


def hello(session: str, user: str, project: str, agent: str, *, after: int, started: bool) -> bytes:
    """An attach's first line: whose session it is, and the last seq its client has."""
    return encode(
        {
            "type": "hello",
            "v": VERSION,
            "session": session,
            "user": user,
            "project": project,
            "agent": agent,
            "after": after,
            "started": started,
        }
    )


def refusal(code: Refusal, text: str, prompt_id: str | None = None) -> bytes:
    """A control ``error`` line; ``prompt_id`` when it refuses a prompt."""
    message = {"type": "error", "code": code.value, "error": text}
    if prompt_id is not None:
        message["id"] = prompt_id
    return encode(message)


def number(line: bytes, seq: int, obj: dict[str, Any]) -> bytes:
    """``line`` (a JSON object ``obj``, without its newline) with ``seq`` first, newline added.

    The agent's bytes are kept when that is safe, like agentd's own splice; an agent's own
    ``seq`` field is replaced.
    """
    if "seq" in obj or not obj:
        obj.pop("seq", None)
        return numbered(obj, seq)
    if line[0] == 123 and line[-1] == 125:  # "{...}", as agents write it
        return b'{"seq":%d,%s\n' % (seq, line[1:])
    body = line.strip()[1:].strip()
    return b'{"seq":%d,%s\n' % (seq, body)


def dumps(message: Any) -> bytes:
    """``message`` as compact, ASCII-only JSON: orjson's bytes when they are that, else the
    json module's (for non-ASCII text, integers past 64 bits and keys that are not strings).
    For the holder's lines, many a prompt; the attach path never calls it."""
    # Imported here: the attach path never needs it, and must start fast.
    import orjson

    try:
        data = orjson.dumps(message)
    except TypeError:
        data = b""
    if data and data.isascii():
        return data
    return json.dumps(message, separators=(",", ":")).encode("ascii")


def numbered(message: dict[str, Any], seq: int) -> bytes:
    """``message`` as a numbered line."""
    body = dumps(message)
    if body == b"{}":
        return b'{"seq":%d}\n' % seq
    return b'{"seq":%d,%s\n' % (seq, body[1:])


def seq_of(line: bytes) -> int:
    """The seq of a numbered line (raises ValueError for anything else)."""
    if not line.startswith(SEQ_PREFIX):
        raise ValueError("not a numbered line")
    end = len(SEQ_PREFIX)
    while line[end : end + 1].isdigit():
        end += 1
    return int(line[len(SEQ_PREFIX) : end])


def usage_event_id(session: str, query: str) -> str:
    """The usage event id of ``query`` (the prompt id) in ``session``.

    Derived, not drawn: every agentd that records this query's usage computes the same id,
    and the usage store records an id once, so a query is never counted twice. The result
    fits agentd's query id pattern (printable ASCII, at most 128 characters).
    """
    # Imported here: the attach path never needs it, and must start fast.
    import hashlib

    digest = hashlib.sha256(f"{session}\n{query}".encode()).hexdigest()
    return f"h-{digest}"


def agent_exited(reason: str, exit_status: int | None) -> dict[str, Any]:
    """The line that tells the client its agent process is gone (agentd's ``agent_exited``)."""
    return {
        "type": "error",
        "code": "agent_exited",
        "error": f"The agent process ended ({reason}); the next prompt starts a new one.",
        "exitStatus": exit_status,
    }


def is_agent_exited(line: bytes) -> bool:
    """Whether a numbered line is an ``agent_exited`` error."""
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("code") == "agent_exited"
