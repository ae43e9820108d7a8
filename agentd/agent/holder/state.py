"""What a session remembers besides its lines: whose it is, the prompts it accepted, usage
not yet recorded, how far the client confirmed, and whether it ended.

``session.json`` holds the identity (session, user, project, agent), written once when the
session is created. ``state.jsonl`` is an append-only log of small records, rewritten in
full when it grows past ``COMPACT_BYTES``::

    {"prompt": ID}        a prompt accepted and forwarded to the agent
    {"usage": {...}}      a finished query's usage, until agentd says it recorded it
    {"recorded": ID}      agentd recorded the usage of query ID
    {"confirmed": N}      the client confirmed every line up to seq N
    {"ended": REASON}     the holder ended but left the session for a later attach to read
                          (usage still unrecorded, or stopped by a signal); null: resumed

A holder that starts on a session whose holder was lost reads both and carries on.

A ``recorded`` record waits in memory for the next record, or for the holder's ``flush``
once no query runs: agentd sends them in batches with a prompt, and their writes would
otherwise come between that prompt and its answer. A holder that dies first offers that usage
again, which agentd records once (under the same event id).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, NamedTuple

from agentd.agent.holder import wire

if TYPE_CHECKING:
    from agentd.agent.holder.journal import Syncer

IDENTITY_FILE = "session.json"
STATE_FILE = "state.jsonl"
# Prompt ids remembered for exactly-once forwarding, as many as agentd remembers per session.
REMEMBERED_PROMPT_IDS = 10_000
# Finished queries whose usage agentd has not confirmed recording; an agentd that never
# confirms must not grow the state without bound.
MAX_UNRECORDED = 10_000
COMPACT_BYTES = 1 << 20
# ``recorded`` records waiting for a write are written at once past this size.
LATER_BYTES = 4096


class Identity(NamedTuple):
    session: str
    user: str
    project: str
    agent: str


def read_identity(directory: str) -> Identity | None:
    """The identity stored in ``directory``; None when there is none. A file that cannot be
    understood raises ValueError: such a session must be refused, never guessed at."""
    try:
        with open(os.path.join(directory, IDENTITY_FILE), "rb") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{IDENTITY_FILE}: unreadable") from e
    if not isinstance(raw, dict) or not all(
        isinstance(raw.get(k), str) for k in ("session", "user", "project", "agent")
    ):
        raise ValueError(f"{IDENTITY_FILE}: malformed")
    return Identity(raw["session"], raw["user"], raw["project"], raw["agent"])


def write_identity(directory: str, identity: Identity) -> None:
    data = json.dumps(identity._asdict()).encode() + b"\n"
    _replace(os.path.join(directory, IDENTITY_FILE), data)


def _replace(path: str, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file, fsynced, renamed over it."""
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class State:
    """The session's state log in ``directory``, loaded on construction."""

    def __init__(self, directory: str, syncer: Syncer | None = None) -> None:
        self.path = os.path.join(directory, STATE_FILE)
        self._syncer = syncer
        self.prompts: OrderedDict[str, None] = OrderedDict()
        self.unrecorded: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.confirmed = 0
        self.ended: str | None = None
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._later = bytearray()  # records applied, not yet written

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn last record: what it said was not yet promised to anyone
            if isinstance(record, dict):
                self._apply(record)

    def _apply(self, record: dict[str, Any]) -> None:
        if isinstance(prompt := record.get("prompt"), str):
            self.prompts[prompt] = None
            if len(self.prompts) > REMEMBERED_PROMPT_IDS:
                self.prompts.popitem(last=False)
        elif isinstance(usage := record.get("usage"), dict) and isinstance(usage.get("id"), str):
            self.unrecorded[usage["id"]] = usage
            if len(self.unrecorded) > MAX_UNRECORDED:
                self.unrecorded.popitem(last=False)
        elif isinstance(query := record.get("recorded"), str):
            self.unrecorded.pop(query, None)
        elif isinstance(seq := record.get("confirmed"), int):
            self.confirmed = max(self.confirmed, seq)
        elif "ended" in record:
            reason = record["ended"]
            self.ended = reason if isinstance(reason, str) else None

    def _append(self, record: dict[str, Any]) -> None:
        self._apply(record)
        self._write(wire.dumps(record) + b"\n")

    def _write(self, data: bytes) -> None:
        if self._later:
            data = bytes(self._later) + data
            self._later.clear()
        if self._size + len(data) > COMPACT_BYTES:
            self._compact()
        os.write(self._fd, data)
        self._size += len(data)
        if self._syncer is None:
            os.fsync(self._fd)
        else:
            self._syncer.dirty(self._fd)

    def _compact(self) -> None:
        records: list[dict[str, Any]] = [{"prompt": p} for p in self.prompts]
        records += [{"usage": u} for u in self.unrecorded.values()]
        records.append({"confirmed": self.confirmed})
        if self.ended is not None:
            records.append({"ended": self.ended})
        data = b"".join(
            json.dumps(r, separators=(",", ":")).encode("ascii") + b"\n" for r in records
        )
        _replace(self.path, data)
        old, self._fd = self._fd, os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = len(data)
        if self._syncer is None:
            os.close(old)
        else:
            self._syncer.retire(old)

    def accept(self, prompt_id: str) -> None:
        self._append({"prompt": prompt_id})

    def add_usage(self, record: dict[str, Any]) -> None:
        self._append({"usage": record})

    def recorded(self, query: str) -> None:
        """Forget the usage of ``query``; written later (see the module's docstring)."""
        if query in self.unrecorded:
            record = {"recorded": query}
            self._apply(record)
            self._later += wire.dumps(record) + b"\n"
            if len(self._later) >= LATER_BYTES:
                self.flush()

    def flush(self) -> None:
        """Write the records that wait."""
        if self._later:
            self._write(b"")

    def confirm(self, seq: int) -> None:
        if seq > self.confirmed:
            self._append({"confirmed": seq})

    def end(self, reason: str | None) -> None:
        """Mark the session ended (a holder that takes it over again clears the mark)."""
        self._append({"ended": reason})

    def close(self) -> None:
        self.flush()
        if self._syncer is None:
            os.close(self._fd)
        else:
            self._syncer.retire(self._fd)
