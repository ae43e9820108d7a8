"""The HTTP API through which users store, replace, list and delete their own provider keys.

Mounted at ``/api/keys`` and authenticated with the same JWTs as the WebSocket; the user is
always the token's subject, so nobody can reach another user's keys::

    GET    /api/keys              200 {"keys": [{"provider", "last4", "setAt"}], "providers": [...]}
    PUT    /api/keys/{provider}   204; body {"key": "..."} as application/json
    DELETE /api/keys/{provider}   204, or 404 when no key is stored

Failures answer ``{"error": "..."}``. No answer, log line or error ever contains a key.
"""

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

from agentd.auth import Authenticator, AuthError
from agentd.keys import (
    PROVIDER_ENV,
    InvalidKey,
    KeyStore,
    KeyStoreUnavailable,
    UserKeysDisabled,
)

MAX_BODY_BYTES = 4096

_log = Logger()


@dataclass(frozen=True)
class _Reply:
    status: int
    body: dict[str, Any] | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()


class _Refused(Exception):
    def __init__(self, status: int, error: str, *headers: tuple[bytes, bytes]) -> None:
        super().__init__(error)
        self.reply = _Reply(status, {"error": error}, headers)


class KeysResource(Resource):
    """``/api/keys`` and ``/api/keys/{provider}``; see the module doc."""

    isLeaf = True

    def __init__(self, keystore: KeyStore, authenticator: Authenticator) -> None:
        super().__init__()
        self._keystore = keystore
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
            return await self._route(request)
        except _Refused as e:
            return e.reply
        except InvalidKey as e:
            return _Reply(400, {"error": str(e)})
        except UserKeysDisabled as e:
            return _Reply(503, {"error": str(e)})
        except KeyStoreUnavailable as e:
            _log.error("user keys API: {error}", error=str(e))
            return _Reply(503, {"error": "stored keys are unavailable right now; try again"})

    async def _route(self, request: IRequest) -> _Reply:
        try:
            user = self._authenticator.authenticate(request).user
        except AuthError as e:
            challenge = ((b"www-authenticate", b"Bearer"),) if e.status == 401 else ()
            raise _Refused(e.status, e.reason, *challenge) from None
        path = list(request.postpath or [])
        if path and path[-1] == b"":
            path.pop()
        if len(path) > 1:
            raise _Refused(404, "not found")
        if not path:
            if request.method != b"GET":
                raise _Refused(405, "use GET", (b"allow", b"GET"))
            self._check_enabled()
            listed = await self._keystore.list(user)
            return _Reply(200, {"keys": listed, "providers": list(PROVIDER_ENV)})
        provider = path[0].decode("utf-8", "replace")
        if provider not in PROVIDER_ENV:
            raise _Refused(404, f"unknown provider; known: {', '.join(PROVIDER_ENV)}")
        if request.method == b"PUT":
            self._check_enabled()
            await self._keystore.put(user, provider, _key_from(request))
            return _Reply(204)
        if request.method == b"DELETE":
            self._check_enabled()
            if not await self._keystore.delete(user, provider):
                raise _Refused(404, f"no {provider} key is stored")
            return _Reply(204)
        raise _Refused(405, "use PUT or DELETE", (b"allow", b"PUT, DELETE"))

    def _check_enabled(self) -> None:
        if not self._keystore.user_keys_enabled:
            raise UserKeysDisabled

    def _crashed(self, failure: Failure) -> _Reply:
        _log.failure("user keys API request failed", failure)
        return _Reply(500, {"error": "internal error"})

    def _send(self, reply: _Reply, request: IRequest, gone: list[Failure]) -> None:
        if gone:
            return
        request.setResponseCode(reply.status)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        for name, value in reply.headers:
            request.setHeader(name, value)
        if reply.body is not None:
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(reply.body).encode("utf-8"))
        request.finish()


def _key_from(request: IRequest) -> str:
    content_type = request.getHeader(b"content-type") or b""
    if content_type.split(b";")[0].strip().lower() != b"application/json":
        raise _Refused(415, "send the body as application/json")
    declared = request.getHeader(b"content-length")
    too_large = _Refused(413, f"body must be at most {MAX_BODY_BYTES} bytes")
    if declared is not None and declared.strip().isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = request.content.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise too_large
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict) or set(data) != {"key"} or not isinstance(data["key"], str):
        raise _Refused(400, 'body must be {"key": "..."}')
    return data["key"]
