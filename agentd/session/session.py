"""One live agent conversation: seq numbers, the replay log, attach/detach, grace, prompts.

A session belongs to one (project, user, agent) and owns at most one agent process, started
on the first prompt. Every message to the client gets the next ``seq`` and a place in a
bounded replay log, so a client that comes back with ``last_seq`` gets exactly what it
missed. When its WebSocket goes away the agent keeps running for the grace period.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from agentd import metrics
from agentd.agentlog import LINES_PER_SECOND, LogBudget, parse_agent_log
from agentd.errors import ErrorCode, error_message
from agentd.session.replay import ReplayLog, encode_frame, splice_seq
from agentd.session.services import Client, SessionServices
from agentd.transport import AgentProcess, AgentTarget, TransportError

if TYPE_CHECKING:
    from agentd.session.registry import SessionRegistry

# Log lines carry the room's name, which operators filter on, not this module's.
_log = Logger(namespace="agentd.session")

# Bound once: labels() is a locked dictionary lookup, too dear for every relayed message.
_MESSAGES_TO_CLIENT = metrics.MESSAGES.labels("to_client")
_BYTES_TO_CLIENT = metrics.BYTES.labels("to_client")

SUPERSEDED = 4001
# Prompt ids remembered per session for exactly-once acks; far more than a session's
# prompts in any realistic grace period.
REMEMBERED_PROMPT_IDS = 10_000


class SessionKey(NamedTuple):
    project: str
    user: str
    agent: str


@dataclass
class Query:
    prompt_id: str
    query_id: str
    started: float
    outputs: int = 0


class Session:
    def __init__(
        self, registry: SessionRegistry, key: SessionKey, services: SessionServices
    ) -> None:
        self.id = secrets.token_urlsafe(24)  # 192 random bits
        self.key = key
        self._registry = registry
        self._services = services
        self._clock = services.clock
        self.seq = 0
        self.replay = ReplayLog(services.replay_messages, services.replay_bytes)
        self.client: Client | None = None
        self.process: AgentProcess | None = None
        self._key_source = "operator"
        self._prompt_chain: Deferred[None] = defer.succeed(None)
        self._accepted: OrderedDict[str, None] = OrderedDict()
        self._pending: set[str] = set()
        self._settled_waiters: list[Deferred[None]] = []
        self.queries: OrderedDict[str, Query] = OrderedDict()
        self._grace_call: IDelayedCall | None = None
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

    def attach(self, client: Client, last_seq: int, resumed: bool) -> None:
        previous = self.client
        self.client = client
        if previous is not None and previous is not client:
            metrics.SESSION_EVENTS.labels("superseded").inc()
            previous.close(SUPERSEDED, "superseded by a newer connection")
        if self._paused:  # by the connection before; this one has nothing queued yet
            self.resume_output()
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self._grace_call = None
        frames, complete = self.replay.since(last_seq if resumed else self.seq, self.seq)
        if not complete:
            metrics.REPLAY_OVERFLOWS.inc()
        hello = {
            "type": "session",
            "session": self.id,
            "resumed": resumed,
            "complete": complete,
            "lastSeq": self.seq,
            "project": self.key.project,
            "agent": self.key.agent,
        }
        client.send_frame(orjson.dumps(hello))
        for frame in frames:
            client.send_frame(frame)
        self._registry.update_gauges()

    def detach(self, client: Client) -> None:
        if self.client is not client:
            return
        self.client = None
        metrics.SESSION_EVENTS.labels("detached").inc()
        # Nobody is reading now: let the agent run on into the replay log.
        self.resume_output()
        if self._registry.draining:
            return  # shutting down: running queries finish, then end_all ends the agents
        grace = self._services.grace_seconds
        if grace <= 0:
            self.end("detached")
        else:
            self._grace_call = self._clock.callLater(grace, self._expire)
        self._registry.update_gauges()

    def _expire(self) -> None:
        self._grace_call = None
        if self.client is None:
            metrics.SESSION_EVENTS.labels("expired").inc()
            _log.info("session expired after the grace period", **self._log_context)
            self.end("expired")

    def end(self, why: str) -> None:
        """Forget the session and end its agent (it still reports usage as it exits)."""
        if self.ended:
            return
        self.ended = True
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        client, self.client = self.client, None
        if client is not None:
            client.close(SUPERSEDED if why == "replaced" else 1001, f"session {why}")
        if self.process is not None:
            self.process.terminate()
        self._registry.forget(self)
        metrics.SESSION_EVENTS.labels("ended").inc()

    def pause_output(self) -> None:
        self._paused = True
        if self.process is not None:
            metrics.FLOW_PAUSES.inc()
            self.process.pause()

    def resume_output(self) -> None:
        self._paused = False
        if self.process is not None:
            self.process.resume()

    def emit(self, message: dict[str, Any]) -> None:
        """Send one of agentd's own messages in the session's seq envelope."""
        self.seq += 1
        message["seq"] = self.seq
        self._send(encode_frame(message))

    def error(self, code: ErrorCode, text: str, **extra: Any) -> None:
        metrics.ERRORS.labels(self.key.agent, code.value).inc()
        self.emit(error_message(code, text, **extra))

    def _send(self, frame: bytes) -> None:
        self.replay.append(self.seq, frame)
        _MESSAGES_TO_CLIENT.inc()
        _BYTES_TO_CLIENT.inc(len(frame))
        if self.client is not None:
            self.client.send_frame(frame)

    # -- prompts --------------------------------------------------------------------------

    def prompt(self, prompt_id: str, text: str, options: dict[str, Any] | None = None) -> None:
        """Forward a prompt to the agent, once per id; ``options`` is passed on as it is."""
        if prompt_id in self._accepted:
            self.emit({"type": "ack", "id": prompt_id, "duplicate": True})
            return
        if prompt_id in self._pending:
            return  # its ack (or refusal) is on the way
        self._pending.add(prompt_id)
        self._prompt_chain.addCallback(
            lambda _: defer.ensureDeferred(self._accept(prompt_id, text, options))
        )
        self._prompt_chain.addErrback(self._prompt_failed, prompt_id)

    @property
    def prompts_waiting(self) -> int:
        """Prompts accepted from the client that are not yet acknowledged or refused."""
        return len(self._pending)

    def prompts_settled(self) -> Deferred[None]:
        """Fires once no prompt waits for its ack or refusal (at once if none does)."""
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

    async def _accept(self, prompt_id: str, text: str, options: dict[str, Any] | None) -> None:
        try:
            if self.ended:
                return
            gate = self._services.gate
            if gate is not None:
                refusal = await gate.admit(self.key.user, self.key.project)
                if refusal is not None:
                    refusal.metric.inc()
                    self.error(refusal.code, refusal.text, id=prompt_id, **refusal.fields)
                    return
            process = await self._ensure_process()
            if process is None or self.ended:
                self.error(ErrorCode.VM_UNAVAILABLE, "The project VM is unavailable.", id=prompt_id)
                return
            query = Query(prompt_id, "q_" + secrets.token_hex(12), time.monotonic())
            self.queries[prompt_id] = query
            metrics.QUERIES_IN_FLIGHT.labels(self.key.agent).inc()
            message: dict[str, Any] = {"type": "prompt", "id": prompt_id, "text": text}
            if options is not None:
                message["options"] = options
            line = orjson.dumps(message)
            process.write_line(line)
            metrics.MESSAGES.labels("to_agent").inc()
            metrics.BYTES.labels("to_agent").inc(len(line) + 1)
            self._accepted[prompt_id] = None
            if len(self._accepted) > REMEMBERED_PROMPT_IDS:
                self._accepted.popitem(last=False)
            self.emit({"type": "ack", "id": prompt_id})
        finally:
            self._settle(prompt_id)

    def abort(self) -> None:
        if self.process is not None:
            self.process.write_line(b'{"type":"abort"}')
            metrics.MESSAGES.labels("to_agent").inc()

    async def _ensure_process(self) -> AgentProcess | None:
        """The running agent, or a new one (prompts are handled one at a time, so at most
        one spawn is ever in progress)."""
        if self.process is not None:
            return self.process
        services = self._services
        env: dict[str, str] = {}
        try:
            if services.keys is not None:
                keys = await services.keys.keys_for(self.key.user)
                env = dict(keys.env)
                # No key at all (the echo agent) has nobody to charge but the operator.
                self._key_source = "user" if keys.source == "user" else "operator"
            target = AgentTarget(
                project=self.key.project,
                agent=self.key.agent,
                user=self.key.user,
                session=self.id,
                env=env,
            )
            process: AgentProcess = await defer.maybeDeferred(
                services.transport.spawn, target, _Sink(self)
            )
        except TransportError as e:
            metrics.AGENT_PROCESSES.labels(self.key.agent, "failed").inc()
            _log.warn(
                "cannot start agent: {reason} ({detail})",
                reason=e.reason,
                detail=e.detail,
                **self._log_context,
            )
            return None
        except Exception:
            metrics.AGENT_PROCESSES.labels(self.key.agent, "failed").inc()
            _log.failure("cannot start agent", **self._log_context)
            return None
        metrics.AGENT_PROCESSES.labels(self.key.agent, "started").inc()
        if self.ended:
            process.terminate()
            return None
        self.process = process
        if self._paused:
            process.pause()
        return process

    # -- agent side -----------------------------------------------------------------------

    def agent_line(self, line: bytes) -> None:
        self.agent_lines([line])

    def agent_lines(self, lines: list[bytes]) -> None:
        """Validate each line, give it the next seq, log it for replay and send it.

        This is the hot path of a streaming answer: the metrics are counted once per call.
        """
        replay = self.replay
        sent = size = 0
        for line in lines:
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None
            if type(obj) is not dict:
                self._bad_line(line)
                continue
            kind = obj.get("type")
            if kind == "delta" or kind == "start":
                if self.queries:
                    self._count_output(obj)
            self.seq += 1
            frame = splice_seq(line, self.seq, obj)
            replay.append(self.seq, frame)
            sent += 1
            size += len(frame)
            client = self.client
            if client is not None:
                client.send_frame(frame)
            if kind == "done" or kind == "error":
                # After forwarding: recording usage never delays the answer.
                self._finish_query(obj, kind)
        if sent:
            _MESSAGES_TO_CLIENT.inc(sent)
            _BYTES_TO_CLIENT.inc(size)

    def _bad_line(self, line: bytes) -> None:
        if line.strip():
            metrics.AGENT_BAD_LINES.labels(self.key.agent).inc()
            if not self._log_budget.allow():
                return
            _log.warn(
                "agent wrote a line that is not a JSON object ({size} bytes)",
                size=len(line),
                **self._log_context,
            )

    def _count_output(self, obj: dict[str, Any]) -> None:
        query = self._query_for(obj)
        if query is not None:
            if query.outputs == 0:
                metrics.FIRST_DELTA.labels(self.key.agent).observe(time.monotonic() - query.started)
            query.outputs += 1

    def _query_for(self, obj: dict[str, Any]) -> Query | None:
        prompt_id = obj.get("id")
        if isinstance(prompt_id, str) and prompt_id in self.queries:
            return self.queries[prompt_id]
        # Agents that do not echo ids answer in order.
        return next(iter(self.queries.values()), None)

    def _finish_query(self, obj: dict[str, Any], kind: str) -> None:
        agent = self.key.agent
        if kind == "error":
            code = obj.get("code")
            metrics.ERRORS.labels(agent, code if isinstance(code, str) else "agent").inc()
        query = self._query_for(obj)
        if query is None:
            return
        if kind == "error" and "usage" not in obj and obj.get("id") != query.prompt_id:
            return  # an error about something else (a malformed line), not this query's end
        del self.queries[query.prompt_id]
        metrics.QUERIES_IN_FLIGHT.labels(agent).dec()
        metrics.QUERY_DURATION.labels(agent).observe(time.monotonic() - query.started)
        outcome = "aborted" if obj.get("aborted") else ("done" if kind == "done" else "error")
        metrics.QUERIES.labels(agent, outcome).inc()
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._record_usage(query, usage, outcome)

    def _record_usage(self, query: Query, usage: dict[str, Any], outcome: str) -> None:
        services = self._services
        if services.usage is None or services.usage_event is None:
            return
        event = services.usage_event(
            usage,
            query_id=query.query_id,
            user=self.key.user,
            project=self.key.project,
            agent=self.key.agent,
            timestamp=time.time(),
            key_source=self._key_source,
            outcome=outcome,
        )
        if event is None:
            _log.warn("agent reported malformed usage", **self._log_context)
            return
        services.usage.record(event)

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
            "dropped an agent {stream} line of {size} bytes (over the limit)",
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

    def agent_ended(self, exit_status: int | None, reason: str) -> None:
        self.process = None
        self._log_budget.flush()
        metrics.AGENT_PROCESSES.labels(self.key.agent, "ended").inc()
        if self.queries:
            metrics.QUERIES_IN_FLIGHT.labels(self.key.agent).dec(len(self.queries))
            metrics.QUERIES.labels(self.key.agent, "exited").inc(len(self.queries))
            self.queries.clear()
        _log.info("agent process ended: {reason}", reason=reason, **self._log_context)
        if not self.ended:
            self.error(
                ErrorCode.AGENT_EXITED,
                f"The agent process ended ({reason}); the next prompt starts a new one.",
                exitStatus=exit_status,
            )
        self._registry.process_ended(self)


class _Sink:
    """Adapts transport callbacks to the session without exposing the session itself."""

    __slots__ = ("agent_ended", "agent_line", "agent_lines", "agent_log", "agent_overlong")

    def __init__(self, session: Session) -> None:
        self.agent_lines = session.agent_lines
        self.agent_line = session.agent_line
        self.agent_log = session.agent_log
        self.agent_overlong = session.agent_overlong
        self.agent_ended = session.agent_ended
