"""Who is asking: JWT verification, where a request's token comes from, and Origin checks.

A token is looked for in the ``Authorization: Bearer`` header, then the ``agentd_token``
cookie, then the ``token`` query parameter (browsers cannot set headers on a WebSocket).
Claims: ``sub`` (user id, required), ``exp`` (required), ``projects`` (project ids, ``"*"``
for all) and optionally ``role: "admin"``. Error texts never contain the token.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from twisted.web.iweb import IRequest

from agentd.config import USER_RE, AuthConfig

_ASYMMETRIC = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA")


class AuthError(Exception):
    """The request is refused; ``status`` is 401 or 403, ``reason`` safe to show."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    user: str
    projects: frozenset[str]
    admin: bool = False

    def may_access(self, project: str) -> bool:
        return "*" in self.projects or project in self.projects


class Authenticator:
    """Verifies JWTs with one HS256 secret or one public key; never accepts ``alg: none``."""

    def __init__(
        self,
        secret: str = "",
        public_key: bytes | None = None,
        algorithms: Iterable[str] = (),
        leeway: float = 5.0,
    ) -> None:
        if bool(secret) == bool(public_key):
            raise ValueError("exactly one of secret and public_key is needed")
        self._secret = secret
        self._key: Any = public_key if public_key else secret
        self._algorithms = list(algorithms) or (list(_ASYMMETRIC) if public_key else ["HS256"])
        self._leeway = leeway

    @classmethod
    def from_config(cls, config: AuthConfig, dev_secret: str = "") -> Authenticator:
        if config.jwt_public_key_file:
            return cls(
                public_key=Path(config.jwt_public_key_file).read_bytes(),
                algorithms=config.jwt_algorithms,
            )
        return cls(secret=config.jwt_secret or dev_secret, algorithms=config.jwt_algorithms)

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={"require": ["sub", "exp"]},
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.InvalidTokenError:
            raise AuthError(401, "invalid token") from None
        user = claims.get("sub")
        if not isinstance(user, str) or not USER_RE.fullmatch(user):
            raise AuthError(401, "invalid token subject")
        projects = claims.get("projects", [])
        if isinstance(projects, str):
            projects = [projects]
        if not isinstance(projects, list) or not all(isinstance(p, str) for p in projects):
            raise AuthError(401, "invalid projects claim")
        return Principal(
            user=user, projects=frozenset(projects), admin=claims.get("role") == "admin"
        )

    def authenticate(self, request: IRequest) -> Principal:
        token = token_from_request(request)
        if not token:
            raise AuthError(401, "missing token")
        return self.verify(token)

    def mint(
        self,
        user: str,
        projects: Iterable[str] = ("*",),
        ttl: float = 3600,
        role: str | None = None,
    ) -> str:
        """A signed token (HS256 secrets only: agentd never holds a private key)."""
        if not self._secret:
            raise ValueError("tokens can only be minted with a jwt_secret")
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": user,
            "projects": list(projects),
            "iat": now,
            "exp": now + int(ttl),
        }
        if role:
            claims["role"] = role
        return jwt.encode(claims, self._secret, algorithm="HS256")


def token_from_request(request: IRequest) -> str | None:
    header = _header(request, b"authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    cookie = request.getCookie(b"agentd_token")
    if cookie:
        return cookie.decode("utf-8", "replace")
    values = request.args.get(b"token")
    if values and values[0]:
        return values[0].decode("utf-8", "replace")
    return None


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def request_origin_allowed(request: IRequest, allowed: Iterable[str]) -> bool:
    return origin_allowed(_header(request, b"origin"), _header(request, b"host"), allowed)


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str]) -> bool:
    """Browsers always send Origin; non-browser clients may omit it.

    With an empty allow-list only same-host origins (the Host header's host and port) pass.
    """
    if origin is None:
        return True
    allowed = tuple(allowed)
    if allowed:
        return origin in allowed
    if not host:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    default = "443" if parts.scheme == "https" else "80"
    origin_host = (
        parts.netloc if ":" in parts.netloc.rsplit("]", 1)[-1] else f"{parts.netloc}:{default}"
    )
    request_host = host if ":" in host.rsplit("]", 1)[-1] else f"{host}:{default}"
    return origin_host.lower() == request_host.lower()
