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
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_public_key
from twisted.web.iweb import IRequest

from agentd.config import USER_RE, AuthConfig, ConfigError

# RFC 7518 section 3.2: an HMAC key must be at least as long as the hash's output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_KNOWN = (*_HMAC_MIN_BYTES, *_RSA, *_EC_BY_CURVE.values(), "EdDSA")
MIN_RSA_BITS = 2048
_KEY_FILE = "[auth] jwt_public_key_file"
_ALGORITHMS_KEY = "[auth] jwt_algorithms"


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
    """Verifies JWTs with one HMAC secret or one public key, and only with the algorithms that
    fit it: a token whose ``alg`` names anything else (``none``, HMAC against a public key, a
    curve the key is not on) is an invalid token, never an error."""

    def __init__(
        self,
        secret: str = "",
        public_key: bytes | None = None,
        algorithms: Iterable[str] = (),
        leeway: float = 5.0,
        max_lifetime_seconds: float = 0.0,
    ) -> None:
        """Raises ConfigError, naming the setting, for a key or algorithm list that cannot be
        used safely."""
        if bool(secret) == bool(public_key):
            raise ValueError("exactly one of secret and public_key is needed")
        self._secret = secret
        self._key: Any
        if public_key:
            self._key = _load_public_key(public_key)
            fitting, described = _public_key_algorithms(self._key)
        else:
            self._key = secret
            fitting, described = _secret_algorithms(secret)
        self._algorithms = _accepted_algorithms(tuple(algorithms), fitting, described)
        self._leeway = leeway
        self._max_lifetime = max_lifetime_seconds

    @property
    def algorithms(self) -> tuple[str, ...]:
        return self._algorithms

    @property
    def max_lifetime_seconds(self) -> float:
        return self._max_lifetime

    @classmethod
    def from_config(cls, config: AuthConfig, dev_secret: str = "") -> Authenticator:
        if config.jwt_public_key_file:
            try:
                public_key = Path(config.jwt_public_key_file).read_bytes()
            except OSError as e:
                raise ConfigError(_KEY_FILE, e.strerror or "cannot be read") from None
            return cls(
                public_key=public_key,
                algorithms=config.jwt_algorithms,
                max_lifetime_seconds=config.max_token_lifetime_seconds,
            )
        return cls(
            secret=config.jwt_secret or dev_secret,
            algorithms=config.jwt_algorithms,
            max_lifetime_seconds=config.max_token_lifetime_seconds,
        )

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=list(self._algorithms),
                options={"require": ["sub", "exp"]},
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
            # PyJWTError covers InvalidKeyError, which is not an InvalidTokenError; the others
            # are what a malformed token could make any parser below PyJWT raise.
            raise AuthError(401, "invalid token") from None
        if self._max_lifetime and int(claims["exp"]) - time.time() > (
            self._max_lifetime + self._leeway
        ):
            raise AuthError(401, "token lifetime too long")
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
        """A signed token (HMAC secrets only: agentd never holds a private key)."""
        if not self._secret:
            raise ValueError("tokens can only be minted with a jwt_secret")
        if self._max_lifetime and ttl > self._max_lifetime:
            raise ValueError("ttl is longer than [auth] max_token_lifetime_seconds")
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": user,
            "projects": list(projects),
            "iat": now,
            "exp": now + int(ttl),
        }
        if role:
            claims["role"] = role
        return jwt.encode(claims, self._secret, algorithm=self._algorithms[0])


def _load_public_key(data: bytes) -> PublicKeyTypes:
    try:
        if b"-----BEGIN" in data:
            return load_pem_public_key(data)
        return load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(_KEY_FILE, "not a PEM or OpenSSH public key") from None


def _public_key_algorithms(key: PublicKeyTypes) -> tuple[tuple[str, ...], str]:
    """The algorithms that verify with ``key``, and how to name the key in an error."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                _KEY_FILE, f"an RSA key of {key.key_size} bits is too short (at least 2048)"
            )
        return _RSA, "an RSA key"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_BY_CURVE:
        return (_EC_BY_CURVE[key.curve.name],), f"an EC key on {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",), "an Ed25519 or Ed448 key"
    raise ConfigError(
        _KEY_FILE, "must be an RSA, EC (P-256, P-384 or P-521), Ed25519 or Ed448 public key"
    )


def _secret_algorithms(secret: str) -> tuple[tuple[str, ...], str]:
    size = len(secret.encode("utf-8"))
    if size < _HMAC_MIN_BYTES["HS256"]:
        raise ConfigError(
            "[auth] jwt_secret",
            f"must be at least {_HMAC_MIN_BYTES['HS256']} bytes long (or AGENTD_JWT_SECRET)",
        )
    fitting = tuple(name for name, least in _HMAC_MIN_BYTES.items() if size >= least)
    return fitting, f"a jwt_secret of {size} bytes"


def _accepted_algorithms(
    configured: tuple[str, ...], fitting: tuple[str, ...], described: str
) -> tuple[str, ...]:
    for name in configured:
        if name.lower() == "none":
            raise ConfigError(_ALGORITHMS_KEY, '"none" would accept unsigned tokens')
        if name not in _KNOWN:
            raise ConfigError(_ALGORITHMS_KEY, f"{name!r} is not a supported JWT algorithm")
        if name in _HMAC_MIN_BYTES and fitting[0] not in _HMAC_MIN_BYTES:
            # Key confusion: the public key would serve as the HMAC secret, which anyone has.
            raise ConfigError(
                _ALGORITHMS_KEY, f"{name} with a public key would let anyone sign tokens"
            )
        if name not in fitting:
            raise ConfigError(
                _ALGORITHMS_KEY, f"{name} does not fit {described}; it fits {', '.join(fitting)}"
            )
    return tuple(dict.fromkeys(configured)) or fitting


def token_from_request(request: IRequest) -> str | None:
    header = _header(request, b"authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    cookie: bytes | None = request.getCookie(b"agentd_token")
    if cookie:
        return cookie.decode("utf-8", "replace")
    values: list[bytes] | None = request.args.get(b"token")
    if values and values[0]:
        return values[0].decode("utf-8", "replace")
    return None


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def request_origin_allowed(request: IRequest, allowed: Iterable[str]) -> bool:
    """False for two Origin headers too: which one a proxy or library reads is anyone's guess."""
    if len(request.requestHeaders.getRawHeaders(b"origin") or ()) > 1:
        return False
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
