"""The HTTP API through which users store, replace, list and delete their own provider keys.

Mounted at ``/api/keys`` and authenticated with the same JWTs as the WebSocket; the user is
always the token's subject, so nobody can reach another user's keys::

    GET    /api/keys              200 {"keys": [{"provider", "last4", "setAt"}], "providers": [...]}
    PUT    /api/keys/{provider}   204; body {"key": "..."} as application/json
    DELETE /api/keys/{provider}   204, or 404 when no key is stored

Failures answer ``{"error": "..."}``. No answer, log line or error ever contains a key.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from agentd.api import APIResource, Reply, error_reply, json_body, path_segments
from agentd.auth import Authenticator
from agentd.keys.records import KeyStoreUnavailable
from agentd.keys.source import PROVIDER_ENV
from agentd.keys.store import InvalidKey, KeyStore, UserKeysDisabled
from agentd.refusal import Refused

MAX_BODY_BYTES = 4096

_log = Logger()


class KeysResource(APIResource):
    """``/api/keys`` and ``/api/keys/{provider}``; see the module doc."""

    name = "user keys API"

    def __init__(
        self,
        keystore: KeyStore,
        authenticator: Authenticator,
        allowed_origins: tuple[str, ...] = (),
    ) -> None:
        super().__init__(authenticator, allowed_origins)
        self._keystore = keystore

    async def answer(self, request: IRequest) -> Reply:
        try:
            return await self._route(request)
        except InvalidKey as e:
            return error_reply(400, str(e))
        except UserKeysDisabled as e:
            return error_reply(503, str(e))
        except KeyStoreUnavailable as e:
            _log.error("user keys API: {error}", error=str(e))
            return error_reply(503, "stored keys are unavailable right now; try again")

    async def _route(self, request: IRequest) -> Reply:
        user = self.principal(request).user
        path = path_segments(request)
        if len(path) > 1:
            raise Refused(404, "not found")
        if not path:
            if request.method != b"GET":
                raise Refused(405, "use GET", (b"allow", b"GET"))
            self._check_enabled()
            listed = await self._keystore.list(user)
            return Reply.json(200, {"keys": listed, "providers": list(PROVIDER_ENV)})
        provider = path[0].decode("utf-8", "replace")
        if provider not in PROVIDER_ENV:
            raise Refused(404, f"unknown provider; known: {', '.join(PROVIDER_ENV)}")
        if request.method == b"PUT":
            self._check_enabled()
            await self._keystore.put(user, provider, _key_from(request))
            return Reply(204)
        if request.method == b"DELETE":
            self._check_enabled()
            if not await self._keystore.delete(user, provider):
                raise Refused(404, f"no {provider} key is stored")
            return Reply(204)
        raise Refused(405, "use PUT or DELETE", (b"allow", b"PUT, DELETE"))

    def _check_enabled(self) -> None:
        if not self._keystore.user_keys_enabled:
            raise UserKeysDisabled


def _key_from(request: IRequest) -> str:
    expected = '{"key": "..."}'
    data = json_body(request, MAX_BODY_BYTES, expected)
    if not isinstance(data, dict) or set(data) != {"key"} or not isinstance(data["key"], str):
        raise Refused(400, f"body must be {expected}")
    return data["key"]
