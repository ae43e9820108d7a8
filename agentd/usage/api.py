"""The HTTP API that reads monthly usage: a user's own, and any user's or project's for admins.

Mounted at ``/api/usage`` and authenticated with the same JWTs as the WebSocket::

    GET /api/usage?month=YYYY-MM[&format=csv]                 the caller's own month
    GET /api/usage/users/{id}?month=YYYY-MM[&format=csv]      admins (or the user themself)
    GET /api/usage/projects/{id}?month=YYYY-MM[&format=csv]   admins only

``month`` defaults to the current month (UTC). JSON answers carry the totals, the days with
usage, the breakdown by project (for a user) or by user (for a project) and, for the current
month, the budget in force; ``format=csv`` answers the report without the budget as CSV (see
docs/usage.md). Failures answer ``{"error": "..."}``:
401 without a valid token, 403 for someone else's usage, 400 for a bad month, id or format,
503 when the usage store cannot be read.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from agentd.api import APIResource, Reply, argument, error_reply, path_segments
from agentd.auth import Authenticator, Principal
from agentd.config import PROJECT_RE, USER_RE
from agentd.refusal import Refused
from agentd.usage.layout import parse_month
from agentd.usage.recorder import UsageRecorder

_log = Logger()


class UsageResource(APIResource):
    """``/api/usage``, ``/api/usage/users/{id}`` and ``/api/usage/projects/{id}``."""

    name = "usage API"

    def __init__(
        self,
        recorder: UsageRecorder,
        authenticator: Authenticator,
        allowed_origins: tuple[str, ...] = (),
    ) -> None:
        super().__init__(authenticator, allowed_origins)
        self._recorder = recorder

    async def answer(self, request: IRequest) -> Reply:
        scope, subject, month, fmt = self._parse(request)
        try:
            report = await self._recorder.report(scope, subject, month)
        except Exception as e:
            _log.error("usage API: the usage store cannot be read: {error!r}", error=e)
            return error_reply(503, "usage is unavailable right now; try again")
        if fmt == "csv":
            filename = f"usage-{scope}-{subject}-{month}.csv"
            return Reply(
                200,
                report.as_csv().encode("utf-8"),
                b"text/csv; charset=utf-8",
                ((b"content-disposition", f'attachment; filename="{filename}"'.encode()),),
            )
        return Reply.json(200, report.as_json())

    def _parse(self, request: IRequest) -> tuple[str, str, str, str]:
        if request.method not in (b"GET", b"HEAD"):
            raise Refused(405, "use GET", (b"allow", b"GET, HEAD"))
        principal = self.principal(request)
        scope, subject = _target(principal, path_segments(request))
        month_arg = argument(request, b"month")
        try:
            month = parse_month(month_arg) if month_arg else self._recorder.current_month()
        except ValueError:
            raise Refused(400, "month must be YYYY-MM") from None
        fmt = argument(request, b"format") or "json"
        if fmt not in ("json", "csv"):
            raise Refused(400, "format must be json or csv")
        return scope, subject, month, fmt


def _target(principal: Principal, path: list[bytes]) -> tuple[str, str]:
    """Whose usage the path names, once the caller may read it."""
    if not path:
        return "user", principal.user
    if len(path) != 2 or path[0] not in (b"users", b"projects"):
        raise Refused(404, "not found")
    scope = "user" if path[0] == b"users" else "project"
    subject = path[1].decode("utf-8", "replace")
    if not principal.admin and scope == "project":
        raise Refused(403, "only admins may read a project's usage")
    if not principal.admin and subject != principal.user:
        raise Refused(403, "only admins may read another user's usage")
    if not (USER_RE if scope == "user" else PROJECT_RE).fullmatch(subject):
        raise Refused(400, f"invalid {scope} id")
    return scope, subject
