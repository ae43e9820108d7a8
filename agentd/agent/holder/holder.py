"""The session holder: one session's loop, its clients' requests, and how the session ends.

``agentd-agent attach`` starts it (see attach.py and process.py) in the session directory,
in a session and process group of its own, with no pipe back to sshd or agentd. It runs the
agent CLI as its child (child.py), exactly as agentd would, numbers every line the agent
writes (that number is the client's ``seq``), appends it to the journal (ledger.py) and
relays it to the attach that is connected, if any (connections.py). Attaches come and go;
the agent does not notice.

One thread runs everything through a selector; a second only fsyncs (journal.Syncer).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import orjson

from agentd.agent.holder import sessions, wire
from agentd.agent.holder.child import AgentChild
from agentd.agent.holder.connections import Attach, Attaches
from agentd.agent.holder.journal import Journal, Syncer
from agentd.agent.holder.ledger import Ledger, key_source
from agentd.agent.holder.state import State
from agentd.agent.log import Log
from agentd.agent.protocol import MAX_ID_CHARS

if TYPE_CHECKING:
    from agentd.agent.holder.process import Settings

# Ending, the agent's stdin is closed, which the CLI takes as the end (the running query is
# aborted with its usage). An agent still there this long after gets SIGTERM (not at once: the
# CLI, already on its way out, no longer handles it and would die of it), then SIGKILL.
TERM_SECONDS = 2.0
KILL_SECONDS = 10.0


class Holder:
    """Owns the agent, the attaches and the ledger, runs the loop over them, answers what
    the current attach asks, and ends the session (idle, by request, on a signal)."""

    def __init__(
        self,
        settings: Settings,
        journal: Journal,
        state: State,
        listener: socket.socket,
        syncer: Syncer,
        log: Log,
    ) -> None:
        self.settings = settings
        self.identity = settings.identity
        self.journal = journal
        self.state = state
        self.syncer = syncer
        self.log = log
        self.sel = selectors.DefaultSelector()
        self.attaches = Attaches(self.sel, listener, journal, self.identity, log, self)
        self.agent: AgentChild | None = None
        self.exited_seq: int | None = None  # the seq of agent_exited while no agent runs
        self.ending: str | None = None
        self.keep_directory = False
        self.finishing = False
        self.finished = False
        self.idle_since: float | None = time.monotonic()
        self.term_at: float | None = None
        self.kill_at: float | None = None
        self.stop_signal: int | None = None
        self.ledger = Ledger(
            settings, journal, state, self.attaches, log, self._pause_agent, self._resume_agent
        )
        self._signals()

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        registered = self.sel.get_map()
        while not self.finished and not self.attaches.over:
            for key, mask in self.sel.select(self._timeout()):
                # A callback earlier in this batch may have closed or replaced this one.
                if registered.get(key.fd) is key:
                    key.data(mask)
            self._tick()

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = self.attaches.deadlines()
        if self.idle_since is not None and self.ending is None:
            deadlines.append(self.idle_since + self.settings.idle_seconds)
        deadlines += self.ledger.deadlines()
        deadlines += [d for d in (self.term_at, self.kill_at) if d is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _tick(self) -> None:
        now = time.monotonic()
        if self.stop_signal is not None and self.ending is None:
            self.log.info("stopping", session=self._short, signal=self.stop_signal)
            self.keep_directory = True
            self._begin_end("session holder stopped")
        self.attaches.tick(now)
        self.ledger.retry(now)
        if self.term_at is not None and now >= self.term_at and self.agent is not None:
            self.term_at = None
            self.log.warn("agent did not exit at end of input; terminating it", session=self._short)
            self.agent.signal(signal.SIGTERM)
        if self.kill_at is not None and now >= self.kill_at and self.agent is not None:
            self.kill_at = None
            self.log.warn("agent did not exit; killing it", session=self._short)
            self.agent.signal(signal.SIGKILL)
        self.attaches.linger_over(now)
        self.ledger.trim()
        if not self.ledger.running:
            # Between queries: a prompt that came with ``recorded`` lines has its answer.
            self.state.flush()
        self._check_idle(now)

    def _check_idle(self, now: float) -> None:
        if self.ending is not None:
            return
        if (
            self.attaches.current is None
            and self.agent is None
            and self.exited_seq is not None
            and self.state.confirmed >= self.exited_seq
        ):
            self._begin_end("agent exited")
            return
        # A query blocked on a full journal cannot reach its end without a client, so it
        # does not keep a session alive that nobody comes back to.
        attaches = self.attaches
        idle = attaches.current is None and not attaches.waiting
        idle = idle and (not self.ledger.running or bool(self.ledger.held))
        if not idle:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since >= self.settings.idle_seconds:
            self.log.info("idle: ending", session=self._short)
            self._begin_end("idle")

    def _signals(self) -> None:
        receive, wake = socket.socketpair()
        receive.setblocking(False)
        wake.setblocking(False)
        self._wake = wake  # kept: the wakeup fd must stay open
        signal.set_wakeup_fd(wake.fileno())
        self.sel.register(receive, selectors.EVENT_READ, lambda mask: self._drain(receive))

        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stop_signal = signum

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        try:
            while sock.recv(4096):
                pass
        except BlockingIOError:
            pass

    @property
    def _short(self) -> str:
        return self.identity.session[:8]

    # -- the agent ------------------------------------------------------------------------

    def take_over(self) -> None:
        """Start where a holder that is gone stopped: its client learns that its agent
        ended, unless the journal already says so."""
        last = self.journal.last_line()
        if last is None or not wire.is_agent_exited(last):
            self.ledger.emit(wire.agent_exited("session holder lost", None), force=True)
        self.log.warn("took over a session whose holder was gone", session=self._short)

    def start_agent(self) -> AgentChild:
        """Start the agent process; raises OSError when it cannot be started."""
        settings = self.settings
        agent = AgentChild.start(
            settings.agent_argv,
            settings.cwd,
            self.sel,
            settings.max_line,
            self.log,
            self._short,
            self,
        )
        self.agent = agent
        self.exited_seq = None
        self.log.info("agent started", session=self._short, pid=agent.proc.pid)
        return agent

    def agent_lines(self, lines: list[bytes]) -> None:
        self.ledger.take(lines)

    def agent_stderr(self, lines: list[bytes]) -> None:
        self.attaches.forward_log(lines)

    def agent_dropped(self, reason: str, size: int) -> None:
        self.attaches.forward_dropped(reason, size)

    def agent_changed(self) -> None:
        """Once the agent has exited and all it wrote is journaled, say so to the client."""
        agent = self.agent
        if agent is None or not agent.ended or self.ledger.held:
            return
        reason, exit_status = agent.release()
        self.agent = None
        self.term_at = self.kill_at = None
        self.ledger.running.clear()
        self.log.info("agent ended", session=self._short, reason=reason)
        self.ledger.emit(wire.agent_exited(reason, exit_status), force=True)
        self.exited_seq = self.journal.last_seq
        if self.ending is not None:
            self._finish()

    def _pause_agent(self) -> None:
        """The journal has no room for the agent's lines: stop reading them."""
        if self.agent is not None:
            self.agent.pause()

    def _resume_agent(self) -> None:
        """The journal took all the agent's lines: read on, and see if it ended meanwhile."""
        if self.agent is not None:
            self.agent.resume()
        self.agent_changed()

    # -- attaches -------------------------------------------------------------------------

    def welcome(self, attach: Attach, hello: dict[str, Any]) -> None:
        after = hello["after"]
        journal = self.journal
        if after > journal.last_seq:
            # The client saw lines this journal no longer has (the VM lost what was not yet
            # synced): number on from where the client is, so it never sees a seq twice.
            self.log.warn("client is ahead of the journal", session=self._short, after=after)
            journal.advance(after)
        attach.cursor, complete = journal.locate(after)
        agent = self.agent
        attach.out += wire.encode(
            {
                "type": "attached",
                "v": wire.VERSION,
                "session": self.identity.session,
                "lastSeq": journal.last_seq,
                "complete": complete,
                "started": hello.get("started") is True,
                "live": True,
                "agentPid": None if agent is None else agent.proc.pid,
                "holderPid": os.getpid(),
                "keySource": key_source(),
            }
        )
        for record in self.state.unrecorded.values():
            attach.out += wire.encode({"type": "unrecorded", **record})
        self.ledger.confirm(after)
        self.attaches.flush(attach)

    def received(self, attach: Attach, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = orjson.loads(line)
        except ValueError:
            message = None
        kind = message.get("type") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(kind, str):
            self.attaches.send(attach, wire.refusal(wire.Refusal.BAD_REQUEST, "not a typed object"))
            return
        if kind == "prompt":
            self._prompt(attach, line, message)
        elif kind == "abort":
            if self.agent is not None:
                self.agent.send(line)
        elif kind == "confirm":
            seq = message.get("seq")
            if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
                self.ledger.confirm(seq)
            else:
                self.attaches.send(
                    attach, wire.refusal(wire.Refusal.BAD_REQUEST, "seq: an integer")
                )
        elif kind == "recorded":
            query = message.get("id")
            if isinstance(query, str):
                self.state.recorded(query)
            else:
                self.attaches.send(attach, wire.refusal(wire.Refusal.BAD_REQUEST, "id: a string"))
        elif kind == "emit":
            self._emit_for(attach, message.get("message"))
        elif kind == "end":
            self.log.info("end requested", session=self._short)
            self._begin_end("ended by request")
        else:
            self.attaches.send(
                attach, wire.refusal(wire.Refusal.BAD_REQUEST, f"unknown type {kind}")
            )

    def _prompt(self, attach: Attach, line: bytes, message: dict[str, Any]) -> None:
        prompt_id = message.get("id")
        if not isinstance(prompt_id, str) or not 0 < len(prompt_id) <= MAX_ID_CHARS:
            problem = f"id: a string of 1 to {MAX_ID_CHARS} characters"
            self.attaches.send(attach, wire.refusal(wire.Refusal.BAD_REQUEST, problem))
            return
        if self.ending is not None:
            refused = wire.refusal(wire.Refusal.ENDING, "the session is ending", prompt_id)
            self.attaches.send(attach, refused)
            return
        if prompt_id in self.state.prompts:
            ack = {"type": "ack", "id": prompt_id, "duplicate": True}
            if not self.ledger.emit(ack):
                self._journal_full(attach, prompt_id)
            return
        ack = {"type": "ack", "id": prompt_id}
        if not self.ledger.has_room(len(wire.numbered(ack, self.journal.last_seq + 1))):
            self._journal_full(attach, prompt_id)
            return
        agent = self.agent
        if agent is None:
            try:
                agent = self.start_agent()
            except OSError as e:
                self.log.error("cannot start the agent", session=self._short, error=e.strerror)
                message = {
                    "type": "error",
                    "code": "vm_unavailable",
                    "error": "The project VM is unavailable.",
                    "id": prompt_id,
                }
                self.ledger.emit(message, force=True)
                return
        self.state.accept(prompt_id)
        agent.send(line)
        self.ledger.running[prompt_id] = None
        self.ledger.ack(ack)

    def _journal_full(self, attach: Attach, prompt_id: str) -> None:
        text = f"no room for prompt {prompt_id} until the client confirms what it read"
        self.attaches.send(attach, wire.refusal(wire.Refusal.JOURNAL_FULL, text, prompt_id))

    def _emit_for(self, attach: Attach, message: object) -> None:
        if self.finishing:
            self.attaches.send(attach, wire.refusal(wire.Refusal.ENDING, "the session has ended"))
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.attaches.send(
                attach, wire.refusal(wire.Refusal.BAD_REQUEST, "message: an object with a type")
            )
            return
        message.pop("seq", None)
        if not self.ledger.emit(message):
            self.attaches.send(
                attach, wire.refusal(wire.Refusal.JOURNAL_FULL, "no room until the client confirms")
            )

    # -- ending ---------------------------------------------------------------------------

    def _begin_end(self, reason: str) -> None:
        """Stop taking attaches, stop the agent (its running query ends as aborted, with its
        usage), then finish."""
        if self.ending is not None:
            return
        self.ending = reason
        self.ledger.last_words = True
        self.attaches.stop()
        agent = self.agent
        if agent is None:
            self._finish()
            return
        agent.end_input()
        now = time.monotonic()
        self.term_at = now + TERM_SECONDS
        self.kill_at = now + KILL_SECONDS
        self.ledger.unhold()

    def _finish(self) -> None:
        if self.finishing:
            return
        self.finishing = True
        self.ledger.send_ack()
        assert self.ending is not None
        if not self.attaches.finish(self.ending):
            self.finished = True

    def close(self) -> None:
        """After the loop: everything on disk, then the directory removed unless it is still
        needed (usage nobody recorded, or a stop that a later attach should learn of)."""
        reason = self.ending or "ended"
        self.attaches.close_all()
        keep = self.keep_directory or bool(self.state.unrecorded)
        if keep:
            self.state.end(reason)
        self.journal.close()
        self.state.close()
        self.syncer.stop()
        if not keep:
            sessions.remove_current()
        self.log.info("ended", session=self._short, reason=reason, kept=keep)
