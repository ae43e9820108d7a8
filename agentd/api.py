"""What agentd's JSON HTTP APIs share: one reply shape, token and Origin checks,
one bounded JSON parser, and the asynchronous render that answers nobody once the client has
gone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import orjson
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from agentd.auth import Authenticator, AuthError, Principal, request_origin_allowed
from agentd.refusal import Header, Refused
from agentd.webrequest import WebRequest

_log = Logger()

# Deep enough for any message agentd or an agent defines; orjson itself stops at 1024 levels
# but cannot encode more than 255, and a Python consumer stops near its recursion limit.
MAX_JSON_DEPTH = 32
# Methods a browser page on another site can send without a preflight, and that change nothing.
_SAFE_METHODS = (b"GET", b"HEAD")


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
    return refused_reply(Refused(status, error, *headers))


def refused_reply(refused: Refused) -> Reply:
    return Reply(refused.status, refused.body, b"application/json", refused.headers)


class APIResource(Resource):
    """A leaf resource whose ``answer`` coroutine produces the reply."""

    isLeaf = True
    name = "API"

    def __init__(self, authenticator: Authenticator, allowed_origins: tuple[str, ...] = ()) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self._authenticator = authenticator
        self._allowed_origins = allowed_origins

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
        web: WebRequest = cast(Request, request)
        web.notifyFinish().addErrback(gone.append)
        d = Deferred.fromCoroutine(self._answer(request))
        d.addErrback(self._crashed)
        d.addCallback(self._send, web, gone)
        return NOT_DONE_YET

    async def _answer(self, request: IRequest) -> Reply:
        try:
            self._check_origin(request)
            return await self.answer(request)
        except Refused as e:
            return refused_reply(e)

    def _check_origin(self, request: IRequest) -> None:
        """The WebSocket route's Origin rule, for every request that changes something.

        A browser's CORS preflight already stops another site's PUT or DELETE; this does not
        depend on it. Two Origin headers are refused whatever the method.
        """
        duplicated = len(request.requestHeaders.getRawHeaders(b"origin") or ()) > 1
        if (duplicated or request.method not in _SAFE_METHODS) and not request_origin_allowed(
            request, self._allowed_origins
        ):
            raise Refused(403, "origin not allowed")

    def _crashed(self, failure: Failure) -> Reply:
        _log.failure("{api} request failed", failure, api=self.name)
        return error_reply(500, "internal error")

    def _send(self, reply: Reply, request: WebRequest, gone: list[Failure]) -> None:
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


class JSONTooDeep(ValueError):
    def __init__(self) -> None:
        super().__init__(f"nests deeper than {MAX_JSON_DEPTH} levels")


# orjson builds exactly these types, so an identity check suffices.
_CONTAINERS = (dict, list)


def parse_json(data: bytes | str) -> Any:
    """The JSON value in ``data``; ValueError if it is not JSON, JSONTooDeep if it nests
    arrays and objects deeper than ``MAX_JSON_DEPTH``."""
    value = orjson.loads(data)
    # Only containers are walked: a prompt (one object of strings) costs one step.
    pending = [(value, 1)] if type(value) in _CONTAINERS else []
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise JSONTooDeep
        for child in item.values() if type(item) is dict else item:
            if type(child) in _CONTAINERS:
                pending.append((child, depth + 1))
    return value


def json_body(request: IRequest, max_bytes: int, expected: str) -> Any:
    """The request's JSON body: declared as application/json, at most ``max_bytes`` bytes.

    ``expected`` describes the body for the 400 answer when it is not JSON.
    """
    content_type = _header(request, b"content-type")
    if content_type.split(b";")[0].strip().lower() != b"application/json":
        raise Refused(415, "send the body as application/json")
    too_large = Refused(413, f"body must be at most {max_bytes} bytes")
    declared = _header(request, b"content-length")
    if declared.strip().isdigit() and int(declared) > max_bytes:
        raise too_large
    body = request.content.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise too_large
    try:
        return parse_json(body)
    except JSONTooDeep as e:
        raise Refused(400, f"body {e}") from None
    except ValueError:
        raise Refused(400, f"body must be {expected}") from None


def _header(request: IRequest, name: bytes) -> bytes:
    """The last value of the request's header ``name``, as twisted.web's getHeader reads it."""
    values: list[bytes] = request.requestHeaders.getRawHeaders(name) or []
    return values[-1] if values else b""
