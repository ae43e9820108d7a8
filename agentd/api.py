"""What agentd's JSON HTTP APIs share: one reply shape, refusals, token checks, and the
asynchronous render that answers nobody once the client has gone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from agentd.auth import Authenticator, AuthError, Principal

_log = Logger()

Header = tuple[bytes, bytes]


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: bytes | None = None
    headers: tuple[Header, ...] = ()

    @classmethod
    def json(cls, status: int, data: Any, *headers: Header) -> Reply:
        return cls(status, json.dumps(data).encode("utf-8"), b"application/json", headers)


def error_reply(status: int, error: str, *headers: Header) -> Reply:
    return Reply.json(status, {"error": error}, *headers)


class Refused(Exception):
    """Answer the request with ``{"error": ...}`` and this status."""

    def __init__(self, status: int, error: str, *headers: Header) -> None:
        super().__init__(error)
        self.reply = error_reply(status, error, *headers)


class APIResource(Resource):
    """A leaf resource whose ``answer`` coroutine produces the reply."""

    isLeaf = True
    name = "API"

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self._authenticator = authenticator

    def principal(self, request: IRequest) -> Principal:
        try:
            return self._authenticator.authenticate(request)
        except AuthError as e:
            challenge = ((b"www-authenticate", b"Bearer"),) if e.status == 401 else ()
            raise Refused(e.status, e.reason, *challenge) from None

    async def answer(self, request: IRequest) -> Reply:
        raise NotImplementedError

    def render(self, request: IRequest) -> int:
        gone: list[Failure] = []
        # Every request a Site dispatches is a server.Request; IRequest lacks notifyFinish.
        cast(Request, request).notifyFinish().addErrback(gone.append)
        d = Deferred.fromCoroutine(self._answer(request))
        d.addErrback(self._crashed)
        d.addCallback(self._send, request, gone)
        return NOT_DONE_YET

    async def _answer(self, request: IRequest) -> Reply:
        try:
            return await self.answer(request)
        except Refused as e:
            return e.reply

    def _crashed(self, failure: Failure) -> Reply:
        _log.failure("{api} request failed", failure, api=self.name)
        return error_reply(500, "internal error")

    def _send(self, reply: Reply, request: IRequest, gone: list[Failure]) -> None:
        if gone:
            return
        request.setResponseCode(reply.status)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if reply.content_type is not None:
            request.setHeader(b"content-type", reply.content_type)
        for name, value in reply.headers:
            request.setHeader(name, value)
        if reply.body:
            request.write(reply.body)
        request.finish()


def path_segments(request: IRequest) -> list[bytes]:
    """The path below the resource, without a trailing empty segment."""
    path = list(request.postpath or [])
    if path and path[-1] == b"":
        path.pop()
    return path


def argument(request: IRequest, name: bytes) -> str | None:
    values = request.args.get(name) if request.args else None
    return values[0].decode("utf-8", "replace") if values else None
