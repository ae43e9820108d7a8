"""The HTTP API that reads monthly usage: a user's own, and any user's or project's for admins.

Mounted at ``/api/usage`` and authenticated with the same JWTs as the WebSocket::

    GET /api/usage?month=YYYY-MM[&format=csv]                 the caller's own month
    GET /api/usage/users/{id}?month=YYYY-MM[&format=csv]      admins (or the user themself)
    GET /api/usage/projects/{id}?month=YYYY-MM[&format=csv]   admins only

``month`` defaults to the current month (UTC). JSON answers carry the totals, the days with
usage and the breakdown by project (for a user) or by user (for a project); ``format=csv``
answers the same report as CSV (see docs/usage.md). Failures answer ``{"error": "..."}``:
401 without a valid token, 403 for someone else's usage, 400 for a bad month, id or format,
503 when the usage store cannot be read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from agentd.auth import Authenticator, AuthError, Principal
from agentd.config import PROJECT_RE, USER_RE
from agentd.usage import UsageRecorder, parse_month

_log = Logger()


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _error(status: int, error: str, *headers: tuple[bytes, bytes]) -> _Reply:
    return _Reply(status, json.dumps({"error": error}).encode("utf-8"), headers=headers)


class _Refused(Exception):
    def __init__(self, status: int, error: str, *headers: tuple[bytes, bytes]) -> None:
        super().__init__(error)
        self.reply = _error(status, error, *headers)


class UsageResource(Resource):
    """``/api/usage``, ``/api/usage/users/{id}`` and ``/api/usage/projects/{id}``."""

    isLeaf = True

    def __init__(self, recorder: UsageRecorder, authenticator: Authenticator) -> None:
        super().__init__()
        self._recorder = recorder
        self._authenticator = authenticator

    def render(self, request: IRequest) -> int:
        gone: list[Failure] = []
        # Every request a Site dispatches is a server.Request; IRequest lacks notifyFinish.
        cast(Request, request).notifyFinish().addErrback(gone.append)
        d = Deferred.fromCoroutine(self._answer(request))
        d.addErrback(self._crashed)
        d.addCallback(self._send, request, gone)
        return NOT_DONE_YET

    async def _answer(self, request: IRequest) -> _Reply:
        try:
            scope, subject, month, fmt = self._parse(request)
        except _Refused as e:
            return e.reply
        try:
            report = await self._recorder.report(scope, subject, month)
        except Exception as e:
            _log.error("usage API: the usage store cannot be read: {error!r}", error=e)
            return _error(503, "usage is unavailable right now; try again")
        if fmt == "csv":
            filename = f"usage-{scope}-{subject}-{month}.csv"
            return _Reply(
                200,
                report.as_csv().encode("utf-8"),
                b"text/csv; charset=utf-8",
                ((b"content-disposition", f'attachment; filename="{filename}"'.encode()),),
            )
        return _Reply(200, json.dumps(report.as_json()).encode("utf-8"))

    def _parse(self, request: IRequest) -> tuple[str, str, str, str]:
        if request.method not in (b"GET", b"HEAD"):
            raise _Refused(405, "use GET", (b"allow", b"GET, HEAD"))
        try:
            principal = self._authenticator.authenticate(request)
        except AuthError as e:
            challenge = ((b"www-authenticate", b"Bearer"),) if e.status == 401 else ()
            raise _Refused(e.status, e.reason, *challenge) from None
        scope, subject = _target(principal, list(request.postpath or []))
        month_arg = _argument(request, b"month")
        try:
            month = parse_month(month_arg) if month_arg else self._recorder.current_month()
        except ValueError:
            raise _Refused(400, "month must be YYYY-MM") from None
        fmt = _argument(request, b"format") or "json"
        if fmt not in ("json", "csv"):
            raise _Refused(400, "format must be json or csv")
        return scope, subject, month, fmt

    def _crashed(self, failure: Failure) -> _Reply:
        _log.failure("usage API request failed", failure)
        return _error(500, "internal error")

    def _send(self, reply: _Reply, request: IRequest, gone: list[Failure]) -> None:
        if gone:
            return
        request.setResponseCode(reply.status)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-type", reply.content_type)
        for name, value in reply.headers:
            request.setHeader(name, value)
        request.write(reply.body)
        request.finish()


def _target(principal: Principal, path: list[bytes]) -> tuple[str, str]:
    """Whose usage the path names, once the caller may read it."""
    if path and path[-1] == b"":
        path.pop()
    if not path:
        return "user", principal.user
    if len(path) != 2 or path[0] not in (b"users", b"projects"):
        raise _Refused(404, "not found")
    scope = "user" if path[0] == b"users" else "project"
    subject = path[1].decode("utf-8", "replace")
    if not principal.admin and scope == "project":
        raise _Refused(403, "only admins may read a project's usage")
    if not principal.admin and subject != principal.user:
        raise _Refused(403, "only admins may read another user's usage")
    if not (USER_RE if scope == "user" else PROJECT_RE).fullmatch(subject):
        raise _Refused(400, f"invalid {scope} id")
    return scope, subject


def _argument(request: IRequest, name: bytes) -> str | None:
    values = request.args.get(name) if request.args else None
    return values[0].decode("utf-8", "replace") if values else None
