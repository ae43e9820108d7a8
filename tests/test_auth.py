"""JWT verification: which algorithm fits which key, refusals at startup, and every token a
client can make answered 401, in the Authenticator and over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.logger import LogEvent, LogLevel

from agentd.auth import Authenticator, AuthError
from agentd.config import AuthConfig, ConfigError
from tests.harness import base_config, merge
from tests.wsclient import connect, handshake_headers

SECRET = "auth-test-secret-0123456789abcdef-0123"
PRIVATE: dict[str, Any] = {
    "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "p256": ec.generate_private_key(ec.SECP256R1()),
    "p384": ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate(),
}


def public_pem(name: str) -> bytes:
    return (
        PRIVATE[name]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def claims(ttl: int = 600) -> dict[str, Any]:
    return {"sub": "alice", "projects": ["demo"], "exp": int(time.time()) + ttl}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], key: bytes | None = None) -> str:
    """A token PyJWT would refuse to sign: unsigned, or HS256 keyed with a public key."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest() if key else b""
    return f"{signing_input}.{b64(signature)}"


# One token of each kind; the verifier's key decides which, if any, is the right one.
TOKENS: dict[str, str] = {
    "HS256": jwt.encode(claims(), SECRET, algorithm="HS256"),
    "RS256": jwt.encode(claims(), PRIVATE["rsa"], algorithm="RS256"),
    "ES256": jwt.encode(claims(), PRIVATE["p256"], algorithm="ES256"),
    "ES384": jwt.encode(claims(), PRIVATE["p384"], algorithm="ES384"),
    "EdDSA": jwt.encode(claims(), PRIVATE["ed25519"], algorithm="EdDSA"),
    "none": handmade({"alg": "none", "typ": "JWT"}),
    "garbage header": "eyJhbGciOiJ" + ".e30.c2ln",
    "header not JSON": f"{b64(b'{alg: HS256')}.e30.c2ln",
    "deeply nested header": f"{b64(b'[' * 5000 + b']' * 5000)}.e30.c2ln",
    "alg is a list": handmade({"alg": ["HS256"]}),
}
# The classic key confusion: HS256 "signed" with the verifier's own public key as the secret.
CONFUSED = {name: handmade({"alg": "HS256", "typ": "JWT"}, public_pem(name)) for name in PRIVATE}
VERIFIERS = {
    "secret": ({"jwt_secret": SECRET}, "HS256"),
    "rsa": ({"public": "rsa"}, "RS256"),
    "p256": ({"public": "p256"}, "ES256"),
    "ed25519": ({"public": "ed25519"}, "EdDSA"),
}


def verifier(name: str) -> Authenticator:
    spec, _ = VERIFIERS[name]
    if "public" in spec:
        return Authenticator(public_key=public_pem(spec["public"]))
    return Authenticator(secret=spec["jwt_secret"])


def tokens_for(name: str) -> Iterator[tuple[str, str]]:
    yield from TOKENS.items()
    if name in CONFUSED:
        yield "HS256 keyed with the public key", CONFUSED[name]


@pytest.mark.parametrize("key", list(VERIFIERS))
def test_only_the_token_that_fits_the_key_is_accepted_and_every_other_is_401(key: str) -> None:
    authenticator = verifier(key)
    right = VERIFIERS[key][1]
    for alg, token in tokens_for(key):
        if alg == right:
            assert authenticator.verify(token).user == "alice"
            continue
        with pytest.raises(AuthError) as refused:
            authenticator.verify(token)
        assert (refused.value.status, refused.value.reason) == (401, "invalid token"), alg


def public_openssh(name: str) -> bytes:
    return (
        PRIVATE[name]
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )


@pytest.mark.parametrize("form", [public_pem, public_openssh], ids=["pem", "openssh"])
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("rsa", ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")),
        ("p256", ("ES256",)),
        ("p384", ("ES384",)),
        ("ed25519", ("EdDSA",)),
    ],
)
def test_default_algorithms_are_those_that_fit_the_public_key(
    key: str, expected: Any, form: Any
) -> None:
    authenticator = Authenticator(public_key=form(key))
    assert authenticator.algorithms == expected
    token = next(t for alg, t in TOKENS.items() if alg in expected)
    assert authenticator.verify(token).user == "alice"


def test_default_algorithms_for_a_secret_follow_its_length() -> None:
    assert Authenticator(secret="s" * 32).algorithms == ("HS256",)
    assert Authenticator(secret="s" * 48).algorithms == ("HS256", "HS384")
    assert Authenticator(secret="s" * 64).algorithms == ("HS256", "HS384", "HS512")


def key_file(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.pem"
    path.write_bytes(public_pem(name))
    return str(path)


@pytest.mark.parametrize(
    ("key", "algorithms", "problem"),
    [
        ("rsa", ("RS256", "HS256", "none"), "HS256 with a public key"),
        ("rsa", ("RS256", "none"), '"none"'),
        ("rsa", ("ES256",), "ES256 does not fit an RSA key"),
        ("p256", ("ES384",), "ES384 does not fit an EC key on secp256r1"),
        ("p256", ("HS256",), "HS256 with a public key"),
        ("ed25519", ("RS256",), "RS256 does not fit an Ed25519"),
        ("ed25519", ("NONE",), '"none"'),
        ("secret", ("RS256",), "RS256 does not fit a jwt_secret of 38 bytes"),
        ("secret", ("HS512",), "HS512 does not fit a jwt_secret of 38 bytes"),
        ("secret", ("none",), '"none"'),
        ("secret", ("HS257",), "'HS257' is not a supported JWT algorithm"),
    ],
)
def test_algorithms_that_do_not_fit_the_key_stop_startup_naming_the_setting(
    tmp_path: Path, key: str, algorithms: tuple[str, ...], problem: str
) -> None:
    if key == "secret":
        config = AuthConfig(jwt_secret=SECRET, jwt_algorithms=algorithms)
    else:
        config = AuthConfig(jwt_public_key_file=key_file(tmp_path, key), jwt_algorithms=algorithms)
    with pytest.raises(ConfigError) as error:
        Authenticator.from_config(config)
    assert error.value.key == "[auth] jwt_algorithms"
    assert problem in error.value.problem


def test_unusable_keys_and_short_secrets_stop_startup_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        Authenticator.from_config(AuthConfig(jwt_secret="s" * 31))
    assert error.value.key == "[auth] jwt_secret"
    assert "s" * 31 not in str(error.value)

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    path = tmp_path / "weak.pem"
    path.write_bytes(
        weak.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ConfigError) as error:
        Authenticator.from_config(AuthConfig(jwt_public_key_file=str(path)))
    assert error.value.key == "[auth] jwt_public_key_file"
    assert "1024 bits" in error.value.problem

    path.write_bytes(b"not a key at all")
    with pytest.raises(ConfigError) as error:
        Authenticator.from_config(AuthConfig(jwt_public_key_file=str(path)))
    assert error.value.key == "[auth] jwt_public_key_file"

    with pytest.raises(ConfigError) as error:
        Authenticator.from_config(AuthConfig(jwt_public_key_file=str(tmp_path)))
    assert error.value.key == "[auth] jwt_public_key_file"


def test_max_token_lifetime_refuses_tokens_that_live_longer() -> None:
    limited = Authenticator(secret=SECRET, max_lifetime_seconds=3600)
    assert limited.verify(jwt.encode(claims(ttl=3500), SECRET, algorithm="HS256")).user == "alice"
    with pytest.raises(AuthError) as refused:
        limited.verify(jwt.encode(claims(ttl=7200), SECRET, algorithm="HS256"))
    assert (refused.value.status, refused.value.reason) == (401, "token lifetime too long")
    unlimited = Authenticator(secret=SECRET)
    assert unlimited.verify(jwt.encode(claims(ttl=7200), SECRET, algorithm="HS256")).user == "alice"
    with pytest.raises(ValueError, match="max_token_lifetime_seconds"):
        limited.mint("alice", ttl=7200)
    assert limited.verify(limited.mint("alice", ttl=3600)).user == "alice"


# Over real HTTP: the WebSocket route and /api/keys of a running agentd.


def failures(events: list[LogEvent]) -> list[LogEvent]:
    return [
        e
        for e in events
        if e.get("log_failure") or e.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]


@pytest.mark.parametrize("key", list(VERIFIERS))
@pytest_twisted.ensureDeferred
async def test_every_token_that_does_not_fit_is_401_over_http_without_a_traceback(
    tmp_path, agentd, logged, key
):
    spec, right = VERIFIERS[key]
    if "public" in spec:
        auth = {"jwt_secret": "", "jwt_public_key_file": key_file(tmp_path, spec["public"])}
    else:
        auth = {"jwt_secret": SECRET}
    gateway = agentd(merge(base_config(tmp_path), auth=auth))
    route = gateway.http + "/projects/demo/agent/echo"
    for alg, token in tokens_for(key):
        if alg == right:
            continue
        bearer = {"Authorization": f"Bearer {token}"}
        upgrade = await treq.get(route, headers={**handshake_headers(), **bearer})
        assert upgrade.code == 401, alg
        assert (await upgrade.json()) == {"error": "invalid token"}
        keys = await treq.get(gateway.http + "/api/keys", headers=bearer)
        assert keys.code == 401, alg
        assert (await keys.json()) == {"error": "invalid token"}
    assert failures(logged) == []
    client = await connect(gateway.ws_url(), headers={"Authorization": f"Bearer {TOKENS[right]}"})
    assert (await client.recv())["type"] == "session"
    client.close()
    await client.closed
    keys = await treq.get(
        gateway.http + "/api/keys", headers={"Authorization": f"Bearer {TOKENS[right]}"}
    )
    assert keys.code != 401
    await keys.content()
