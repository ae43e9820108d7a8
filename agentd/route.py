"""The WebSocket route: admission before the upgrade.

``/projects/{project}/agent/{agent}`` refuses, before any upgrade and with a plain HTTP
status and ``{"error": ...}``, whatever it can: 404 (route), 401 (token), 403 (project or
Origin), 400 (``last_seq``), 429 (connection limits), 503 (draining); a request that passes
every check but is not an upgrade learns so with 426. An admitted request is handed to the
WebSocket protocol (agentd/gateway.py) with its ``ConnectionContext``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from agentd import metrics
from agentd.api import argument
from agentd.auth import Authenticator, AuthError, Principal, request_origin_allowed
from agentd.config import PROJECT_RE
from agentd.edge import authenticated
from agentd.ratelimit import HandshakeLimiter
from agentd.refusal import Refused
from agentd.session.registry import SessionRegistry
from agentd.session.session import SessionKey
from agentd.webrequest import WebRequest

_log = Logger()

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
LAST_SEQ_RE = re.compile(r"[0-9]{1,16}")
MAX_SEQ = 2**53


@dataclass(frozen=True)
class ConnectionContext:
    principal: Principal
    project: str
    agent: str
    session_id: str | None
    last_seq: int
    peer: str


@dataclass(frozen=True)
class Admission:
    """Everything the route needs to admit a connection."""

    authenticator: Authenticator
    agents: frozenset[str]
    allowed_origins: tuple[str, ...]
    registry: SessionRegistry
    max_sessions_per_user: int
    limiter: HandshakeLimiter | None
    draining: Callable[[], bool]


class Upgrader(Protocol):
    """Where an admitted request goes: the WebSocket protocol's factory."""

    def upgrade(self, request: Request, ctx: ConnectionContext) -> None: ...


def parse_route(postpath: list[bytes]) -> tuple[str, str] | None:
    """``[project, b"agent", agent]`` below /projects, or None."""
    if len(postpath) != 3 or postpath[1] != b"agent":
        return None
    try:
        project, agent = postpath[0].decode("ascii"), postpath[2].decode("ascii")
    except UnicodeDecodeError:
        return None
    if not PROJECT_RE.fullmatch(project):
        return None
    return project, agent


class AgentRoute(Resource):
    """``/projects/{project}/agent/{agent}``: admission control, then the WebSocket upgrade."""

    isLeaf = True

    def __init__(self, admission: Admission, upgrader: Upgrader) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self._admission = admission
        self._upgrader = upgrader

    def render(self, request: Request) -> bytes | int:
        try:
            ctx = self._admit(request)
            if not _is_upgrade(request):
                # Before the limiter: a plain GET carrying the cookie spends none of the
                # user's handshake budget, so it cannot lock the user out.
                raise Refused(426, "WebSocket upgrade required", (b"upgrade", b"websocket"))
        except Refused as refused:
            return _refuse(request, refused)
        limiter = self._admission.limiter
        if limiter is None:
            self._upgrade(request, ctx)
            return NOT_DONE_YET
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        d = defer.maybeDeferred(limiter.check_handshake, ctx.principal.user)

        def decided(decision: Any) -> None:
            metrics.RATELIMIT_DECISIONS.labels(
                "connections", "allowed" if decision.allowed else "rejected"
            ).inc()
            if finished:
                return
            if not decision.allowed:
                seconds = max(1, -(-decision.retry_after_ms // 1000))
                _finish(request, Refused(429, "too many connections", retry_after=seconds))
                return
            self._upgrade(request, ctx)

        def failed(failure: Failure) -> None:
            _log.failure("handshake admission failed", failure)
            if not finished:
                _finish(request, Refused(500, "internal error"))

        d.addCallbacks(decided, failed)
        return NOT_DONE_YET

    def _admit(self, request: Request) -> ConnectionContext:
        a = self._admission
        route = parse_route(request.postpath or [])
        if route is None or route[1] not in a.agents:
            raise Refused(404, "no such route")
        project, agent = route
        if a.draining():
            raise Refused(503, "shutting down", retry_after=1)
        try:
            principal = a.authenticator.authenticate(request)
        except AuthError as e:
            raise Refused(e.status, e.reason) from None
        if not principal.may_access(project):
            raise Refused(403, "token does not cover this project")
        if not request_origin_allowed(request, a.allowed_origins):
            raise Refused(403, "origin not allowed")
        session_id = argument(request, b"session")
        if session_id is not None and not SESSION_ID_RE.fullmatch(session_id):
            session_id = None
        last_seq_text = argument(request, b"last_seq") or "0"
        # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
        if not LAST_SEQ_RE.fullmatch(last_seq_text) or int(last_seq_text) > MAX_SEQ:
            raise Refused(400, "last_seq must be a non-negative integer")
        key = SessionKey(project, principal.user, agent)
        if (
            a.registry.sessions_of(principal.user) >= a.max_sessions_per_user
            and key not in a.registry.by_key
        ):
            metrics.RATELIMIT_DECISIONS.labels("sessions", "rejected").inc()
            raise Refused(429, "too many concurrent sessions", retry_after=10)
        view: WebRequest = request
        peer = view.getClientAddress()
        return ConnectionContext(
            principal=principal,
            project=project,
            agent=agent,
            session_id=session_id,
            last_seq=int(last_seq_text),
            peer=str(getattr(peer, "host", "")),
        )

    def _upgrade(self, request: Request, ctx: ConnectionContext) -> None:
        metrics.HANDSHAKES.labels("101").inc()
        authenticated(request)
        self._upgrader.upgrade(request, ctx)


def _refuse(request: WebRequest, refused: Refused) -> bytes:
    metrics.HANDSHAKES.labels(str(refused.status)).inc()
    return refused.answer(request)


def _finish(request: WebRequest, refused: Refused) -> None:
    request.write(_refuse(request, refused))
    request.finish()


def _is_upgrade(request: Request) -> bool:
    upgrade = request.getHeader(b"upgrade") or b""
    return request.method == b"GET" and upgrade.strip().lower() == b"websocket"
