"""One conversation as this agentd relays it: the attach to its holder, replay, prompts, usage.

The session itself lives on the VM, in its holder (docs/agent-cli.md): the holder runs the
agent, numbers every line (the client's ``seq``) and journals it. Here a session is the
relay between one client and one attach to that holder. It keeps the most recent lines in
memory, so a client that comes back to the same instance is served at once, and when memory
does not reach back far enough it attaches again with the client's ``last_seq`` and the
holder replays from its journal. Any instance can do that, which is what makes a session
outlive the agentd that started it.
"""

from __future__ import annotations

import functools
import random
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

import orjson
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from agentd import metrics
from agentd.agent.holder.wire import SEQ_PREFIX, usage_event_id
from agentd.agentlog import LINES_PER_SECOND, LogBudget, parse_agent_log
from agentd.errors import ErrorCode, error_message
from agentd.retry import backoff_delay
from agentd.session.replay import ReplayLog, encode_frame
from agentd.session.services import Client, Refusal, SessionServices
from agentd.transport import AgentProcess, AgentTarget, TransportError

if TYPE_CHECKING:
    from agentd.session.registry import SessionRegistry

# Log lines carry the room's name, which operators filter on, not this module's.
_log = Logger(namespace="agentd.session")

# Bound once: labels() is a locked dictionary lookup, too dear for every relayed message.
_MESSAGES_TO_CLIENT = metrics.MESSAGES.labels("to_client")
_BYTES_TO_CLIENT = metrics.BYTES.labels("to_client")
_MESSAGES_TO_AGENT = metrics.MESSAGES.labels("to_agent")
_BYTES_TO_AGENT = metrics.BYTES.labels("to_agent")
# And the per-agent children every prompt counts, each bound when first used (agents and
# outcomes are few, and a series appears only once it has something to say).
_QUERIES_IN_FLIGHT = functools.cache(metrics.QUERIES_IN_FLIGHT.labels)
_QUERY_DURATION = functools.cache(metrics.QUERY_DURATION.labels)
_FIRST_DELTA = functools.cache(metrics.FIRST_DELTA.labels)
_QUERIES = functools.cache(metrics.QUERIES.labels)

SUPERSEDED = 4001
# A resume this instance cannot attach (the VM unreachable): the client is told to try again,
# keeping its session, rather than being handed a fresh one.
TRY_AGAIN_LATER = 1013
# Prompt ids this instance saw acknowledged, so a resent one skips the rate limit; the holder
# is what makes prompts exactly-once.
REMEMBERED_PROMPT_IDS = 10_000
# Re-attaching after a lost attach (an SSH connection cut, an attach killed): the first try
# within 0.1 s, then backing off to this cap, for as long as the session is held here.
REATTACH_BACKOFF_BASE = 0.1
REATTACH_BACKOFF_CAP = 5.0
# How long a ``recorded`` may wait for the next line to the holder to go with: a client that
# prompts again at once costs the holder one wakeup, not two. Until then the holder keeps the
# usage, and an attach meanwhile would record it again under the same event id (once).
RECORDED_DELAY = 0.5


class SessionKey(NamedTuple):
    project: str
    user: str
    agent: str


@dataclass
class Query:
    prompt_id: str
    started: float
    outputs: int = 0
    # The prompt as forwarded, until the holder acknowledges it: an attach lost before then
    # (a cut SSH connection) may have lost it too, and the next attach sends it again.
    line: bytes | None = None


class _Link:
    """One attach to the session's holder, as the transport's sink.

    A link that is no longer the session's current one (replaced by a newer attach, or let
    go) is ignored, whatever it still reports.
    """

    __slots__ = ("attached", "ended", "hello", "holder_ended", "on_end", "process", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.process: AgentProcess | None = None
        # Fires with the holder's ``attached`` line, or with its refusal (an ``error`` line),
        # or None when the attach ended before either.
        self.attached: Deferred[dict[str, Any] | None] = Deferred()
        self.hello: dict[str, Any] | None = None  # the ``attached`` line, once it came
        self.holder_ended: str | None = None  # the reason in the holder's ``ended`` line
        self.ended = False
        self.on_end: list[Deferred[None]] = []

    def agent_lines(self, lines: list[bytes]) -> None:
        if self.session.link is self:
            self.session.holder_lines(lines)

    def agent_line(self, line: bytes) -> None:
        self.agent_lines([line])

    def agent_log(self, line: bytes) -> None:
        # The attach's own stderr: its usage errors; the agent's log comes as ``log`` lines.
        if self.session.link is self:
            self.session.agent_log(line)

    def agent_overlong(self, stream: str, size: int) -> None:
        if self.session.link is self:
            self.session.agent_overlong(stream, size)

    def agent_ended(self, exit_status: int | None, reason: str) -> None:
        self.ended = True
        if not self.attached.called:
            self.attached.callback(None)
        self.session.link_ended(self, reason)
        waiting, self.on_end = self.on_end, []
        for gone in waiting:
            gone.callback(None)


def _live(link: _Link | None) -> TypeGuard[_Link]:
    """Whether ``link`` is attached to a running holder, which takes prompts."""
    return link is not None and link.hello is not None and link.hello.get("live") is True


def _replaying(link: _Link | None, seq: int) -> bool:
    """Whether ``link``'s holder has yet to relay lines it had journaled when it attached."""
    last = None if link is None or link.hello is None else link.hello.get("lastSeq")
    return type(last) is int and seq < last


class Session:
    def __init__(
        self,
        registry: SessionRegistry,
        key: SessionKey,
        services: SessionServices,
        session_id: str | None = None,
        after: int = 0,
    ) -> None:
        self.id = session_id or secrets.token_urlsafe(24)  # 192 random bits
        self.key = key
        self._registry = registry
        self._services = services
        self._clock = services.clock
        # The highest seq this instance has had from the holder; a session resumed here from
        # another instance starts at the client's last_seq.
        self.seq = after
        # The highest seq sent to the current client, and the highest it confirmed.
        self._sent = after
        # False while a resumed client waits for its hello: nothing may reach it before, so
        # what comes for it meanwhile waits in ``_early``.
        self._greeted = True
        self._early: list[bytes] = []
        self.confirmed = after
        self.replay = ReplayLog(services.replay_messages, services.replay_bytes)
        self.client: Client | None = None
        self.link: _Link | None = None
        self._link_waiters: list[Deferred[_Link | None]] = []
        # The holder said the session ended: a new holder starts from an empty journal, and
        # must number on after every seq the client may have.
        self._holder_ended = False
        self._last_refusal: str | None = None
        self._key_source = "operator"
        self._prompt_chain: Deferred[None] = defer.succeed(None)
        self._acked: OrderedDict[str, None] = OrderedDict()
        self._pending: set[str] = set()
        self._settled_waiters: list[Deferred[None]] = []
        # Prompts that wait for the holder's replay to come in (see ``_accept``).
        self._catching_up: list[Deferred[None]] = []
        self.queries: OrderedDict[str, Query] = OrderedDict()
        self._grace_call: IDelayedCall | None = None
        self._reattach_call: IDelayedCall | None = None
        # ``recorded`` lines for the current link, sent with the next line or RECORDED_DELAY.
        self._recorded_lines: list[bytes] = []
        self._recorded_call: IDelayedCall | None = None
        self._reattach_attempts = 0
        self._leaving = False
        self._paused = False
        self.ended = False
        self._log_context: dict[str, Any] = {
            "session": self.id[:8],
            "project": key.project,
            "user": key.user,
            "agent": key.agent,
        }
        # Every log line the agent causes passes this budget, so no agent floods the log.
        self._log_budget = LogBudget(self._clock, self._report_held_log_lines)

    # -- client side ----------------------------------------------------------------------

    def attach(self, client: Client, last_seq: int, resumed: bool) -> Deferred[bool]:
        """Serve ``client`` from this instance: at once from memory when it reaches back to
        ``last_seq``, else after attaching to the holder again from there. Fires True once
        the client has its hello, False when it was closed instead (the VM unreachable)."""
        self._take(client)
        if not resumed:
            self._hello(client, resumed=False, complete=True, last_seq=self.seq)
            self._sent = self.seq
            self._greeted = True
            return defer.succeed(True)
        if self.replay.since(last_seq, self.seq)[1] or (self.link is None and self._holder_ended):
            self._serve_from_memory(client, last_seq)
            if self.link is None and not self._holder_ended:
                self._open_link(start=False)
            return defer.succeed(True)
        self._sent = last_seq
        self.confirmed = max(self.confirmed, last_seq)
        self._greeted = False

        def relinked(outcome: str) -> bool:
            if outcome == "unknown" and self.client is client:
                # The holder has forgotten the session: what memory has is all there is.
                self._serve_from_memory(client, last_seq)
                return True
            if outcome == "unreachable" and self.client is client:
                client.close(TRY_AGAIN_LATER, "the project VM is unavailable; try again")
            return outcome == "resumed"

        return self._relink(client).addCallback(relinked)

    def _serve_from_memory(self, client: Client, last_seq: int) -> None:
        self._greeted = True
        frames, complete = self.replay.since(last_seq, self.seq)
        self._hello(client, resumed=True, complete=complete, last_seq=self.seq)
        client.send_frames(frames)
        self._sent = self.seq
        self.confirm(last_seq)

    def resume_remote(self, client: Client) -> Deferred[str]:
        """Resume a session this instance does not relay: attach to its holder without
        starting one. Fires with ``resumed`` once the client has its hello, ``unknown`` when
        the holder does not know the session as this client's, or ``unreachable``."""
        self._take(client)
        self._greeted = False
        return self._relink(client)

    def abandon(self) -> None:
        """Forget a session that was never the client's (a resume that found nothing)."""
        self.client = None
        self.leave("abandoned")

    def left(self) -> Deferred[None]:
        """Fires once this session's attach has exited (at once when there is none)."""
        link = self.link
        if link is None or link.process is None or link.ended:
            return defer.succeed(None)
        gone: Deferred[None] = Deferred()
        link.on_end.append(gone)
        return gone

    def _take(self, client: Client) -> None:
        self._early = []
        previous = self.client
        self.client = client
        if previous is not None and previous is not client:
            metrics.SESSION_EVENTS.labels("superseded").inc()
            previous.close(SUPERSEDED, "superseded by a newer connection")
        if self._paused:  # by the connection before; this one has nothing queued yet
            self.resume_output()
        self._leaving = False
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self._grace_call = None
        self._registry.update_gauges()

    def _relink(self, client: Client) -> Deferred[str]:
        """Attach again from the client's confirmed seq; the hello follows ``attached``."""
        self._drop_link()

        def linked(link: _Link | None) -> str:
            if self.client is not client:
                return "gone"
            if link is None:
                refused = self._last_refusal in ("no_session", "mismatch")
                return "unknown" if refused else "unreachable"
            hello = link.hello or {}
            complete = hello.get("complete") is True and hello.get("live") is True
            last = hello.get("lastSeq")
            self._hello(
                client,
                resumed=True,
                complete=complete,
                last_seq=last if isinstance(last, int) else self.seq,
            )
            # What came before the hello could be sent.
            self._greeted = True
            early, self._early = self._early, []
            client.send_frames(early)
            return "resumed"

        return self._open_link(start=False).addCallback(linked)

    def _hello(self, client: Client, *, resumed: bool, complete: bool, last_seq: int) -> None:
        if resumed and not complete:
            metrics.REPLAY_OVERFLOWS.inc()
        hello = {
            "type": "session",
            "session": self.id,
            "resumed": resumed,
            "complete": complete,
            "lastSeq": last_seq,
            "project": self.key.project,
            "agent": self.key.agent,
        }
        client.send_frame(orjson.dumps(hello))

    def detach(self, client: Client) -> None:
        if self.client is not client:
            return
        self.client = None
        metrics.SESSION_EVENTS.labels("detached").inc()
        # Nobody is reading now: take the holder's lines into memory, and record usage.
        self.resume_output()
        if self._registry.draining:
            return  # shutting down: leave_all lets go of every session
        grace = self._services.grace_seconds
        if grace <= 0:
            self._expire()
        else:
            self._grace_call = self._clock.callLater(grace, self._expire)
        self._registry.update_gauges()

    def _expire(self) -> None:
        self._grace_call = None
        if self.client is not None:
            return
        if self.queries and self.link is not None:
            # Stay until the running query's done is relayed, so its usage is recorded now.
            self._leaving = True
            return
        metrics.SESSION_EVENTS.labels("expired").inc()
        _log.info("let go of the session after the grace period", **self._log_context)
        self.leave("expired")

    def leave(self, why: str) -> None:
        """Let go of the session here; its holder and agent live on, for any instance."""
        if self.ended:
            return
        self.ended = True
        self._cancel_calls()
        client, self.client = self.client, None
        if client is not None:
            code = SUPERSEDED if why in ("superseded", "replaced") else 1001
            client.close(code, f"session {why}")
        self._drop_link()
        self._registry.forget(self)

    def end(self, why: str) -> None:
        """End the session itself: its holder ends the agent (its running query is aborted
        and reports usage) and removes the session."""
        link = self.link
        if link is not None and link.process is not None and not self.ended:
            self._to_holder(link, b'{"type":"end"}')
        self.leave(why)
        metrics.SESSION_EVENTS.labels("ended").inc()

    def _cancel_calls(self) -> None:
        for call in (self._grace_call, self._reattach_call):
            if call is not None and call.active():
                call.cancel()
        self._grace_call = self._reattach_call = None

    def _to_holder(self, link: _Link, line: bytes) -> None:
        """Write ``line`` to the holder, and the ``recorded`` lines waiting for a ride after
        it: the holder hands a prompt to the agent before it writes them to its state."""
        assert link.process is not None
        if self._recorded_lines:
            line = b"\n".join([line, *self._recorded_lines])
            self._recorded_lines.clear()
        link.process.write_line(line)

    def _send_recorded(self) -> None:
        """Send the waiting ``recorded`` lines on their own."""
        call, self._recorded_call = self._recorded_call, None
        if call is not None and call.active():
            call.cancel()
        link = self.link
        if self._recorded_lines and link is not None and link.process is not None:
            lines, self._recorded_lines = self._recorded_lines, []
            link.process.write_line(b"\n".join(lines))

    def pause_output(self) -> None:
        self._paused = True
        link = self.link
        if link is not None and link.process is not None:
            metrics.FLOW_PAUSES.inc()
            link.process.pause()

    def resume_output(self) -> None:
        self._paused = False
        link = self.link
        if link is not None and link.process is not None:
            link.process.resume()

    def notify(self, message: dict[str, Any]) -> None:
        """Send one of agentd's own answers to the current client, outside the numbered
        stream: it is about this connection, and is neither journaled nor replayed."""
        client = self.client
        if client is not None:
            frame = encode_frame(message)
            _MESSAGES_TO_CLIENT.inc()
            _BYTES_TO_CLIENT.inc(len(frame))
            client.send_frame(frame)

    def error(self, code: ErrorCode, text: str, **extra: Any) -> None:
        metrics.ERRORS.labels(self.key.agent, code.value).inc()
        self.notify(error_message(code, text, **extra))

    def confirm(self, seq: int) -> None:
        """The client has every line up to ``seq``: the holder may let them go."""
        if seq <= self.confirmed:
            return
        self.confirmed = seq
        link = self.link
        if link is not None and link.process is not None and link.hello is not None:
            self._to_holder(link, b'{"type":"confirm","seq":%d}' % seq)

    @property
    def sent(self) -> int:
        """The highest seq sent to the current client."""
        return self._sent

    # -- the attach -----------------------------------------------------------------------

    def _open_link(self, start: bool) -> Deferred[_Link | None]:
        """Attach to the holder, one attempt at a time (a caller during one gets its
        outcome): fires with the link once the holder said ``attached``, else None."""
        waiter: Deferred[_Link | None] = Deferred()
        self._link_waiters.append(waiter)
        if len(self._link_waiters) == 1:
            Deferred.fromCoroutine(self._link(start)).addBoth(self._linked)
        return waiter

    def _linked(self, result: _Link | Failure | None) -> None:
        if isinstance(result, Failure):
            _log.failure("cannot attach to the session", result, **self._log_context)
            result = None
        waiters, self._link_waiters = self._link_waiters, []
        for waiter in waiters:
            waiter.callback(result)

    async def _link(self, start: bool) -> _Link | None:
        services = self._services
        env: dict[str, str] = {}
        if start:
            if services.keys is not None:
                keys = await services.keys.keys_for(self.key.user)
                env = dict(keys.env)
                # No key at all (the echo agent) has nobody to charge but the operator.
                self._key_source = "user" if keys.source == "user" else "operator"
            # The holder keeps it, so an agentd that resumes the session bills alike.
            env["AGENTD_KEY_SOURCE"] = self._key_source
        after = max(self.confirmed, self.seq) if self._holder_ended else self.confirmed
        target = AgentTarget(
            project=self.key.project,
            agent=self.key.agent,
            user=self.key.user,
            session=self.id,
            env=env,
            after=after,
            start=start,
        )
        link = _Link(self)
        # What waits for the link before this one is not sent: this attach reports it as
        # ``unrecorded``, and it is recorded again under the same event id, once.
        self._recorded_lines.clear()
        self.link = link
        self._last_refusal = None
        try:
            process: AgentProcess = await defer.maybeDeferred(
                services.transport.spawn, target, link
            )
        except TransportError as e:
            metrics.AGENT_PROCESSES.labels(self.key.agent, "failed").inc()
            _log.warn(
                "cannot attach to the session: {reason} ({detail})",
                reason=e.reason,
                detail=e.detail,
                **self._log_context,
            )
            if self.link is link:
                self.link = None
            return None
        link.process = process
        if self.ended:
            process.terminate()
            return None
        if self._paused:
            process.pause()
        hello = await link.attached
        if hello is None or hello.get("type") != "attached":
            self._refused(link, hello)
            return None
        if self.link is not link:
            return None
        self._holder_ended = False
        self._reattach_attempts = 0
        if hello.get("started") is True:
            metrics.AGENT_PROCESSES.labels(self.key.agent, "started").inc()
        if self.confirmed > after:
            process.write_line(b'{"type":"confirm","seq":%d}' % self.confirmed)
        for query in self.queries.values():
            if query.line is not None:
                # The holder forwards each prompt id once, so a prompt that did arrive is
                # only acknowledged again.
                process.write_line(query.line)
        return link

    def _refused(self, link: _Link, hello: dict[str, Any] | None) -> None:
        """The attach did not get the session: say why in the log, and let it go."""
        code = hello.get("code") if hello is not None else None
        self._last_refusal = code if isinstance(code, str) else None
        if code == "no_session":
            self._holder_ended = True
        elif code == "mismatch":
            metrics.SESSION_EVENTS.labels("refused").inc()
        else:
            metrics.AGENT_PROCESSES.labels(self.key.agent, "failed").inc()
            _log.warn(
                "the session holder refused the attach: {code}",
                code=str(code) if code is not None else "the attach ended",
                **self._log_context,
            )
        if self.link is link:
            self._drop_link()

    def _drop_link(self) -> None:
        self._send_recorded()
        link, self.link = self.link, None
        if link is not None and link.process is not None and not link.ended:
            link.process.terminate()
        self._caught_up()

    def link_ended(self, link: _Link, reason: str) -> None:
        """The attach is gone: the holder ended the session, or the way to it broke."""
        if self.link is not link:
            return
        self.link = None
        self._caught_up()
        if link.hello is None:
            return  # never attached: whoever opened it hears of it
        if link.holder_ended is not None:
            self._holder_gone(link.holder_ended)
            return
        if self.ended:
            return
        _log.info("attach to the session lost: {reason}", reason=reason, **self._log_context)
        self._schedule_reattach()

    def _schedule_reattach(self) -> None:
        if self.ended or self._reattach_call is not None:
            return
        if self.client is None and not self.queries:
            return  # nobody waits for the lines; a resume attaches again
        delay = backoff_delay(
            self._reattach_attempts, REATTACH_BACKOFF_BASE, REATTACH_BACKOFF_CAP, random.random
        )
        self._reattach_attempts += 1
        self._reattach_call = self._clock.callLater(delay, self._reattach)

    def _reattach(self) -> None:
        self._reattach_call = None
        if self.ended or self.link is not None:
            return
        metrics.SESSION_EVENTS.labels("reattached").inc()

        def done(link: _Link | None) -> None:
            if link is None and not self._holder_ended:
                self._schedule_reattach()

        self._open_link(start=False).addCallback(done)

    def _holder_gone(self, reason: str) -> None:
        self._holder_ended = True
        self._log_budget.flush()
        if self.queries:
            _QUERIES_IN_FLIGHT(self.key.agent).dec(len(self.queries))
            _QUERIES(self.key.agent, "exited").inc(len(self.queries))
            self.queries.clear()
        metrics.AGENT_PROCESSES.labels(self.key.agent, "ended").inc()
        _log.info("session holder ended: {reason}", reason=reason, **self._log_context)
        if self.client is None and not self.ended:
            self.leave("ended")

    # -- prompts --------------------------------------------------------------------------

    def prompt(self, prompt_id: str, text: str, options: dict[str, Any] | None = None) -> None:
        """Forward a prompt to the holder, which forwards each id to the agent once."""
        if prompt_id in self._pending:
            return  # its ack (or refusal) is on the way
        idle = not self._pending
        self._pending.add(prompt_id)
        if idle:
            # Nothing waits before it (the common case): no need to queue behind the chain.
            try:
                waiting = self._accept(None, prompt_id, text, options)
            except Exception:
                self._prompt_failed(Failure(), prompt_id)
                return
            if waiting is not None:
                self._prompt_chain = waiting.addErrback(self._prompt_failed, prompt_id)
            return
        self._prompt_chain.addCallback(self._accept, prompt_id, text, options)
        self._prompt_chain.addErrback(self._prompt_failed, prompt_id)

    @property
    def prompts_waiting(self) -> int:
        """Prompts taken from the client that are not yet forwarded or refused."""
        return len(self._pending)

    def prompts_settled(self) -> Deferred[None]:
        """Fires once no prompt waits for its decision (at once if none does)."""
        if not self._pending:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._settled_waiters.append(waiter)
        return waiter

    def _settle(self, prompt_id: str) -> None:
        self._pending.discard(prompt_id)
        if not self._pending and self._settled_waiters:
            waiters, self._settled_waiters = self._settled_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _prompt_failed(self, failure: Failure, prompt_id: str) -> None:
        self._settle(prompt_id)
        _log.failure("prompt handling failed", failure=failure, **self._log_context)
        self.error(ErrorCode.INTERNAL, "internal error", id=prompt_id)

    def _accept(
        self, _: object, prompt_id: str, text: str, options: dict[str, Any] | None
    ) -> Deferred[None] | None:
        """Ask the gate, unless this prompt was acknowledged before, then forward it."""
        gate = self._services.gate
        if self.ended or gate is None or prompt_id in self._acked:
            return self._admitted(None, prompt_id, text, options)
        if _replaying(self.link, self.seq):
            # A client resending on a resume, while the holder still relays what it had
            # journaled: that may hold this prompt's ack (another instance forwarded it), and
            # then the prompt is not the gate's to count again. Decide once it is all in.
            caught_up: Deferred[None] = Deferred()
            self._catching_up.append(caught_up)
            return caught_up.addCallback(self._accept, prompt_id, text, options)
        admitted = gate.admit(self.key.user, self.key.project)
        return admitted.addCallback(self._admitted, prompt_id, text, options)

    def _admitted(
        self, refusal: Refusal | None, prompt_id: str, text: str, options: dict[str, Any] | None
    ) -> Deferred[None] | None:
        """Answer a refused prompt, or forward an admitted one: at once to a live holder (a
        prompt's common case, without a coroutine), else once one is attached."""
        link = self.link
        if refusal is None and not self._takes_prompts(link):
            return Deferred.fromCoroutine(self._attach_and_forward(prompt_id, text, options))
        try:
            if refusal is not None:
                refusal.metric.inc()
                self.error(refusal.code, refusal.text, id=prompt_id, **refusal.fields)
            elif link is not None:
                self._forward(link, prompt_id, text, options)
        finally:
            self._settle(prompt_id)
        return None

    async def _attach_and_forward(
        self, prompt_id: str, text: str, options: dict[str, Any] | None
    ) -> None:
        try:
            if self.ended:
                return
            link = self.link
            if not _live(link):
                # No holder to take it: none attached yet, or this is a lost holder's journal
                # being served, whose attach reads nothing. A new holder takes the session on.
                link = await self._open_link(start=True)
                if not _live(link) and (link is not None or self._holder_ended):
                    # What was in flight was another attach (a resume, a re-attach) that
                    # found the holder lost or the session ended.
                    link = await self._open_link(start=True)
            if not self._takes_prompts(link):
                self.error(ErrorCode.VM_UNAVAILABLE, "The project VM is unavailable.", id=prompt_id)
                return
            self._forward(link, prompt_id, text, options)
        finally:
            self._settle(prompt_id)

    def _takes_prompts(self, link: _Link | None) -> TypeGuard[_Link]:
        """Whether a prompt can go to ``link`` now: its holder is live and attached, and this
        session has not ended."""
        return _live(link) and link.process is not None and not self.ended

    def _forward(
        self, link: _Link, prompt_id: str, text: str, options: dict[str, Any] | None
    ) -> None:
        if prompt_id not in self.queries and prompt_id not in self._acked:
            self.queries[prompt_id] = Query(prompt_id, time.monotonic())
            _QUERIES_IN_FLIGHT(self.key.agent).inc()
        message: dict[str, Any] = {"type": "prompt", "id": prompt_id, "text": text}
        if options is not None:
            message["options"] = options
        line = orjson.dumps(message)
        query = self.queries.get(prompt_id)
        if query is not None:
            query.line = line
        self._to_holder(link, line)
        _MESSAGES_TO_AGENT.inc()
        _BYTES_TO_AGENT.inc(len(line) + 1)
        usage = self._services.usage
        if usage is not None:
            usage.waiting_for_agent()

    def abort(self) -> None:
        link = self.link
        if link is not None and link.process is not None:
            self._to_holder(link, b'{"type":"abort"}')
            _MESSAGES_TO_AGENT.inc()

    # -- the holder's lines ---------------------------------------------------------------

    def holder_lines(self, lines: list[bytes]) -> None:
        """Relay the numbered lines in order, each once; act on the control lines.

        This is the hot path of a streaming answer: the holder numbered the lines, so each is
        parsed once and sent as it came; the metrics are counted once per call.
        """
        replay = self.replay
        out: list[bytes] = []  # frames for the client, written together
        size = 0
        for line in lines:
            if not line.startswith(SEQ_PREFIX):
                self._flush(out)
                self._control(line)
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None
            if type(obj) is not dict or type(seq := obj.get("seq")) is not int:
                self._bad_line(line)
                continue
            kind = obj.get("type")
            new = seq > self.seq
            if new:
                self.seq = seq
                replay.append(seq, line)
                if kind == "delta" or kind == "start":
                    self._count_output(obj, kind)
                elif kind == "ack":
                    self._remember_ack(obj)
            client = self.client
            if client is not None and seq > self._sent:
                self._sent = seq
                if self._greeted:
                    out.append(line)
                    size += len(line)
                else:
                    self._early.append(line)
            if new and (kind == "done" or kind == "error"):
                # After forwarding: recording usage never delays the answer.
                self._flush(out)
                self._finish_query(obj, kind)
        self._flush(out)
        if size:
            _BYTES_TO_CLIENT.inc(size)
        if self._catching_up and not _replaying(self.link, self.seq):
            self._caught_up()

    def _caught_up(self) -> None:
        """Let the prompts waiting for the replay go on: it is in, or its link is gone."""
        waiting, self._catching_up = self._catching_up, []
        for caught_up in waiting:
            caught_up.callback(None)

    def _flush(self, out: list[bytes]) -> None:
        """Send the frames ``holder_lines`` gathered (before anything else may reach the
        client), and empty the list."""
        if out:
            if self.client is not None:
                self.client.send_frames(out)
            _MESSAGES_TO_CLIENT.inc(len(out))
            out.clear()

    def _control(self, line: bytes) -> None:
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            message = None
        if type(message) is not dict:
            self._bad_line(line)
            return
        kind = message.get("type")
        link = self.link
        if link is None:
            return
        if kind == "log":
            text = message.get("line")
            if isinstance(text, str):
                self.agent_log(text.encode())
        elif kind == "attached" or (kind == "error" and not link.attached.called):
            if not link.attached.called:
                if kind == "attached":
                    link.hello = message
                    source = message.get("keySource")
                    if source in ("user", "operator"):
                        self._key_source = source
                link.attached.callback(message)
        elif kind == "unrecorded":
            self._record_unrecorded(message)
        elif kind == "dropped":
            size = message.get("size")
            if message.get("reason") == "overlong":
                self.agent_overlong("stdout", size if isinstance(size, int) else 0)
            else:
                self._bad_line(b"", size if isinstance(size, int) else 0)
        elif kind == "ended":
            reason = message.get("reason")
            link.holder_ended = reason if isinstance(reason, str) else "ended"
        elif kind == "superseded":
            # Another attach took the session: a client resumed it elsewhere.
            metrics.SESSION_EVENTS.labels("superseded").inc()
            self.leave("superseded")
        elif kind == "error":
            self._holder_refused(message)

    def _holder_refused(self, message: dict[str, Any]) -> None:
        code, prompt_id = message.get("code"), message.get("id")
        extra = {"id": prompt_id} if isinstance(prompt_id, str) else {}
        if isinstance(prompt_id, str):
            self._forget_query(prompt_id)
        if code == "journal_full":
            self.error(
                ErrorCode.BACKLOG_FULL,
                "The session holds too much output the client has not confirmed.",
                **extra,
            )
        elif code == "ending":
            self.error(
                ErrorCode.VM_UNAVAILABLE, "The session is restarting; send it again.", **extra
            )
        else:
            _log.warn(
                "the session holder refused a line: {code}", code=str(code), **self._log_context
            )

    def _remember_ack(self, obj: dict[str, Any]) -> None:
        prompt_id = obj.get("id")
        if isinstance(prompt_id, str):
            acked_before = prompt_id in self._acked
            self._acked[prompt_id] = None
            if len(self._acked) > REMEMBERED_PROMPT_IDS:
                self._acked.popitem(last=False)
            query = self.queries.get(prompt_id)
            if query is not None:
                query.line = None
            # A repeat of a prompt acknowledged here before is that query, which runs on;
            # one never acknowledged here may have ended long ago, and is not waited for.
            if obj.get("duplicate") and not acked_before:
                self._forget_query(prompt_id)

    def _forget_query(self, prompt_id: str) -> None:
        if self.queries.pop(prompt_id, None) is not None:
            _QUERIES_IN_FLIGHT(self.key.agent).dec()

    def _bad_line(self, line: bytes, size: int | None = None) -> None:
        """A line that is not a JSON object: from the holder (a bug or a hostile VM), or one
        of the agent's that the holder dropped (``size`` given)."""
        if size is None and not line.strip():
            return
        metrics.AGENT_BAD_LINES.labels(self.key.agent).inc()
        if not self._log_budget.allow():
            return
        _log.warn(
            "{source} wrote a line that is not a JSON object ({size} bytes)",
            source="the agent" if size is not None else "the session holder",
            size=len(line) if size is None else size,
            **self._log_context,
        )

    def _count_output(self, obj: dict[str, Any], kind: str) -> None:
        prompt_id = obj.get("id")
        query = self.queries.get(prompt_id) if isinstance(prompt_id, str) else None
        if query is None:
            if kind != "start" or not isinstance(prompt_id, str):
                return
            # A query another instance forwarded: followed here so its end is waited for.
            query = self.queries[prompt_id] = Query(prompt_id, time.monotonic())
            _QUERIES_IN_FLIGHT(self.key.agent).inc()
        if kind == "delta":
            if query.outputs == 0:
                _FIRST_DELTA(self.key.agent).observe(time.monotonic() - query.started)
            query.outputs += 1

    def _finish_query(self, obj: dict[str, Any], kind: str) -> None:
        agent = self.key.agent
        prompt_id = obj.get("id")
        if kind == "error":
            code = obj.get("code")
            metrics.ERRORS.labels(agent, code if isinstance(code, str) else "agent").inc()
            if code == "agent_exited":
                self._agent_exited()
                return
        if not isinstance(prompt_id, str):
            return
        query = self.queries.pop(prompt_id, None)
        outcome = "aborted" if obj.get("aborted") else ("done" if kind == "done" else "error")
        if query is not None:
            _QUERIES_IN_FLIGHT(agent).dec()
            _QUERY_DURATION(agent).observe(time.monotonic() - query.started)
            _QUERIES(agent, outcome).inc()
        usage = obj.get("usage")
        if isinstance(usage, dict):
            event_id = usage_event_id(self.id, prompt_id)
            self._record_usage(prompt_id, event_id, usage, outcome, time.time(), self._key_source)
        if self._leaving and not self.queries:
            self._clock.callLater(0, self._expire)

    def _agent_exited(self) -> None:
        if self.queries:
            _QUERIES_IN_FLIGHT(self.key.agent).dec(len(self.queries))
            _QUERIES(self.key.agent, "exited").inc(len(self.queries))
            self.queries.clear()
        metrics.AGENT_PROCESSES.labels(self.key.agent, "ended").inc()
        if self._leaving:
            self._clock.callLater(0, self._expire)

    def _record_unrecorded(self, message: dict[str, Any]) -> None:
        """Usage of a query whose done no agentd recorded (it went away first)."""
        prompt_id, event_id = message.get("id"), message.get("event")
        usage, outcome = message.get("usage"), message.get("outcome")
        timestamp = message.get("timestamp")
        if (
            isinstance(prompt_id, str)
            and isinstance(event_id, str)
            and isinstance(usage, dict)
            and outcome in ("done", "aborted", "error")
            and isinstance(timestamp, int | float)
        ):
            # The record says whose keys paid when it knows (the session's own attach does
            # not, when this is a lost holder's journal); an older holder's record does not.
            source = message.get("keySource")
            key_source = source if source in ("user", "operator") else self._key_source
            self._record_usage(
                prompt_id, event_id, usage, str(outcome), float(timestamp), key_source
            )
        else:
            _log.warn("the session holder sent malformed unrecorded usage", **self._log_context)

    def _record_usage(
        self,
        prompt_id: str,
        event_id: str,
        usage: dict[str, Any],
        outcome: str,
        timestamp: float,
        key_source: str,
    ) -> None:
        """Record a query's usage under its derived event id (so any instance records it
        once), then tell the holder it may forget it."""
        services = self._services
        link = self.link
        if services.usage is None or services.usage_event is None:
            self._recorded(None, link, prompt_id)
            return
        event = services.usage_event(
            usage,
            query_id=event_id,
            user=self.key.user,
            project=self.key.project,
            agent=self.key.agent,
            timestamp=timestamp,
            key_source=key_source,
            outcome=outcome,
        )
        if event is None:
            _log.warn("agent reported malformed usage", **self._log_context)
            self._recorded(None, link, prompt_id)  # it never will be recordable
            return
        services.usage.record(event).addCallback(self._recorded, link, prompt_id)

    def _recorded(self, _: object, link: _Link | None, prompt_id: str) -> None:
        # Only on the attach the usage came from: another would not know the query yet,
        # and the next attach is told of it again, and records it again, once.
        if link is not None and link is self.link and link.process is not None:
            self._recorded_lines.append(orjson.dumps({"type": "recorded", "id": prompt_id}))
            if self._recorded_call is None:
                self._recorded_call = self._clock.callLater(RECORDED_DELAY, self._send_recorded)

    # -- the agent's logs -----------------------------------------------------------------

    def agent_log(self, line: bytes) -> None:
        if not self._log_budget.allow():
            return
        entry = parse_agent_log(line)
        emit = _log.warn if entry.warning else _log.info
        emit(
            "agent: {agent_message}",
            agent_message=entry.message,
            **entry.fields,
            **self._log_context,
        )

    def agent_overlong(self, stream: str, size: int) -> None:
        metrics.AGENT_BAD_LINES.labels(self.key.agent).inc()
        if not self._log_budget.allow():
            return
        _log.warn(
            "dropped an attach {stream} line of {size} bytes (over the limit)",
            stream=stream,
            size=size,
            **self._log_context,
        )

    def _report_held_log_lines(self, count: int) -> None:
        _log.warn(
            "held back {count} log lines caused by the agent (more than {rate:g} a second)",
            count=count,
            rate=LINES_PER_SECOND,
            **self._log_context,
        )
