"""The session's ledger: numbering its lines into the journal, and what each query used.

The agent's lines get the next seqs as far as the journal has room for them; the rest are
held back and the agent is paused until the client confirms what it read. The holder's
and agentd's own lines go into the reserve above the agent's share. Each line journaled is
relayed to the current attach. A ``done`` or ``error`` line ends a running query, whose
usage is kept in the state until agentd says it recorded it.

A prompt's ``ack`` waits up to ACK_WAIT_SECONDS for the agent's first line, and goes into
the journal and out to the attach with it, in one write: agentd then wakes once for both,
not twice. Any other line journaled meanwhile sends it first, so the order stays the order
of events.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from agentd.agent.holder import wire
from agentd.agent.holder.child import READ_BYTES
from agentd.agent.holder.connections import Attaches
from agentd.agent.holder.journal import Journal, JournalError, Position
from agentd.agent.holder.state import State
from agentd.agent.log import Log

if TYPE_CHECKING:
    from agentd.agent.holder.process import Settings

# A journal the disk refused is tried again after this long; the agent waits meanwhile.
RETRY_SECONDS = 1.0
# A prompt's ack waits this long at most for the agent's first line, to share its write.
ACK_WAIT_SECONDS = 0.002


def key_source() -> str | None:
    """Whose provider keys the agent was started with, as agentd said when it started the
    holder (``AGENTD_KEY_SOURCE``): the usage of its queries is billed accordingly by
    whichever agentd records it."""
    source = os.environ.get("AGENTD_KEY_SOURCE")
    return source if source in ("user", "operator") else None


class Ledger:
    """Numbers and journals the session's lines; ``running`` are the prompt ids of queries
    not yet ended, ``held`` the agent's lines read but not yet journaled (no room)."""

    def __init__(
        self,
        settings: Settings,
        journal: Journal,
        state: State,
        attaches: Attaches,
        log: Log,
        pause_agent: Callable[[], None],
        resume_agent: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.identity = settings.identity
        self.journal = journal
        self.state = state
        self.attaches = attaches
        self.log = log
        self.pause_agent = pause_agent
        self.resume_agent = resume_agent  # and see whether it ended meanwhile
        self.running: OrderedDict[str, None] = OrderedDict()
        self.held: list[bytes] = []
        self.retry_at: float | None = None
        self.last_words = False  # ending: the agent's lines are journaled whatever their size
        self.waiting_ack: dict[str, Any] | None = None  # waiting for the agent's first line
        self.ack_due: float | None = None
        journal.advance(state.confirmed)

    @property
    def _short(self) -> str:
        return self.identity.session[:8]

    def deadlines(self) -> list[float]:
        deadlines = (self.retry_at, self.age_deadline(), self.ack_due)
        return [d for d in deadlines if d is not None]

    def ack(self, message: dict[str, Any]) -> None:
        """Journal a prompt's ``ack`` with the agent's first line, or alone by ACK_WAIT_SECONDS
        (``retry``); an ack already waiting goes first."""
        self.send_ack()
        self.waiting_ack = message
        self.ack_due = time.monotonic() + ACK_WAIT_SECONDS

    def send_ack(self) -> None:
        """Journal the waiting ack now, if there is one."""
        message = self.waiting_ack
        if message is not None:
            self.waiting_ack = self.ack_due = None
            self.emit(message, force=True)

    def retry(self, now: float) -> None:
        """Send the ack that waited long enough; journal what the disk refused before, once
        RETRY_SECONDS have passed."""
        if self.ack_due is not None and now >= self.ack_due:
            self.send_ack()
        if self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            self.unhold()

    def age_deadline(self) -> float | None:
        """When the journal next has a segment too old to keep (as a monotonic time)."""
        expiry = self.journal.next_expiry(self.state.confirmed, self._keep())
        if expiry is None:
            return None
        return time.monotonic() + max(0.0, expiry - time.time())

    def take(self, lines: list[bytes]) -> None:
        """Journal the agent's lines (each with its newline), holding back (and pausing the
        agent) what has no room."""
        if self.held:
            self.send_ack()
            self.held += lines
            return
        taken = self._journal_agent_lines(lines)
        if taken < len(lines):
            self.held = lines[taken:]
            self.pause_agent()

    def unhold(self) -> None:
        if self.held:
            taken = self._journal_agent_lines(self.held)
            self.held = self.held[taken:]
        if not self.held and self.retry_at is None:
            self.resume_agent()

    def _journal_agent_lines(self, lines: list[bytes]) -> int:
        """Number, journal and relay as many of ``lines`` as fit; how many were used up."""
        journal = self.journal
        if self.last_words:
            room = 1 << 62  # the agent's last words (its final ``done``) are always kept
        else:
            limit = self.settings.agent_limit
            if journal.total + 2 * READ_BYTES > limit:
                journal.trim(self.state.confirmed, self._keep(), 2 * READ_BYTES, limit)
            room = limit - journal.total
        seq = first = journal.last_seq + 1
        out: list[bytes] = []
        if self.waiting_ack is not None:
            out.append(wire.numbered(self.waiting_ack, seq))  # in the reserve, as emit's
            seq += 1
        effects: list[dict[str, Any]] = []
        size = used = 0
        for line in lines:
            if line.startswith(wire.DELTA_PREFIX) and line.endswith(wire.DELTA_SUFFIX):
                numbered = b'{"seq":%d,%s' % (seq, line[1:])
                obj = None
            else:
                obj = self._parse_agent_line(line)
                if obj is None:
                    used += 1
                    continue
                numbered = wire.number(line[:-1], seq, obj)
            size += len(numbered)
            if size > room:
                break
            out.append(numbered)
            used += 1
            seq += 1
            if obj is not None and obj.get("type") in ("done", "error"):
                effects.append(obj)
        if out:
            if not self._append(b"".join(out), first, seq - 1, effects):
                return 0
            self.waiting_ack = self.ack_due = None
        return used

    def _parse_agent_line(self, line: bytes) -> dict[str, Any] | None:
        try:
            obj = orjson.loads(line)
        except ValueError:
            obj = None
        if type(obj) is not dict:
            if line.strip():
                size = len(line) - 1  # without its newline
                self.log.warn(
                    "agent wrote a line that is not a JSON object", session=self._short, size=size
                )
                self.attaches.forward_dropped("not_json", size)
            return None
        return obj

    def _append(
        self, data: bytes, first: int, last: int, ends: list[dict[str, Any]] | None = None
    ) -> bool:
        """Journal numbered lines and relay them; False (nothing journaled) when the disk
        refused, to be tried again later. ``ends`` are the queries' ``done`` and ``error``
        lines among them: their usage is kept in the state before anyone sees them, so an
        attach that saw a ``done`` finds its usage however soon the holder dies after."""
        caught_up = self.attaches.caught_up()
        try:
            self.journal.append(data, first, last)
        except JournalError as e:
            self.log.error("journal write failed", session=self._short, error=e.strerror)
            self.retry_at = time.monotonic() + RETRY_SECONDS
            self.pause_agent()
            return False
        for obj in ends or ():
            self._query_end(obj)
        self.attaches.relay(data, caught_up)
        return True

    def emit(self, message: dict[str, Any], force: bool = False) -> bool:
        """Journal one of the holder's or agentd's own lines with the next seq. Without
        ``force``, False when even the reserve above the agent's share is full."""
        if self.waiting_ack is not None:
            self.send_ack()  # which clears it before it comes back here
        seq = self.journal.last_seq + 1
        line = wire.numbered(message, seq)
        if not force and not self.has_room(len(line)):
            return False
        return self._append(line, seq, seq)

    def has_room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit the journal's bound (making room if they can)."""
        journal = self.journal
        if journal.total + size > self.settings.journal_max_bytes:
            journal.trim(self.state.confirmed, self._keep(), size)
        return journal.total + size <= self.settings.journal_max_bytes

    def _keep(self) -> Position | None:
        """The journal position the attached client still needs, if any."""
        attach = self.attaches.current
        return None if attach is None else attach.cursor

    def trim(self) -> None:
        if self.age_deadline() is not None:
            self.journal.trim(self.state.confirmed, self._keep())

    def _query_end(self, obj: dict[str, Any]) -> None:
        """A ``done`` or ``error`` line: the end of a query (as agentd judges it), whose usage
        is kept until agentd says it recorded it."""
        kind = obj.get("type")
        line_id = obj.get("id")
        if isinstance(line_id, str) and line_id in self.running:
            query = line_id
        elif self.running:
            query = next(iter(self.running))  # agents that do not echo ids answer in order
        else:
            return
        if kind == "error" and "usage" not in obj and line_id != query:
            return  # an error about something else, not this query's end
        del self.running[query]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            outcome = "aborted" if obj.get("aborted") else ("done" if kind == "done" else "error")
            record: dict[str, Any] = {
                "id": query,
                "event": wire.usage_event_id(self.identity.session, query),
                "outcome": outcome,
                "usage": usage,
                "timestamp": round(time.time(), 3),
            }
            source = key_source()
            if source is not None:
                # Kept with the record: an agentd that records it from a lost holder's
                # journal has no holder to ask whose keys paid.
                record["keySource"] = source
            self.state.add_usage(record)

    def confirm(self, seq: int) -> None:
        seq = min(seq, self.journal.last_seq)
        if seq > self.state.confirmed:
            self.state.confirm(seq)
            self.unhold()
