"""The /api/keys HTTP API: in memory through StubTreq, and over a real port with Redis."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from agentd.api import MAX_JSON_DEPTH, JSONTooDeep, parse_json
from agentd.auth import Authenticator
from agentd.keys.api import MAX_BODY_BYTES, KeysResource
from agentd.keys.records import MemoryKeyRecords, RedisKeyRecords
from agentd.keys.source import PROVIDER_ENV
from agentd.keys.store import KeyStore
from agentd.redisstore import RedisStore
from tests.servers import RedisServer
from tests.test_keys import (
    ALICE_KEY,
    BOB_KEY,
    NEW_KEK,
    OPERATOR_ANTHROPIC,
    START,
    operator_env,
    result,
)
from tests.test_keys import failure as failure_of

AUTH = Authenticator(secret="a-test-secret-that-is-long-enough-for-hs256")
ALICE = AUTH.mint("alice")
BOB = AUTH.mint("bob")


def site_root(keystore: KeyStore, allowed_origins: tuple[str, ...] = ()) -> Resource:
    """Mounted where agentd's Site mounts it."""
    root = Resource()
    api = Resource()
    root.putChild(b"api", api)
    api.putChild(b"keys", KeysResource(keystore, AUTH, allowed_origins))
    return root


@dataclass
class Answer:
    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return values[0] if values else None


class Client:
    """Synchronous requests against the resource tree through StubTreq."""

    def __init__(self, keystore: KeyStore, allowed_origins: tuple[str, ...] = ()) -> None:
        # StubTreq copies treq's functions onto itself at run time.
        self.stub: Any = StubTreq(site_root(keystore, allowed_origins))

    def request(
        self,
        method: str,
        path: str,
        token: str | None = ALICE,
        body: bytes | None = None,
        content_type: str | None = "application/json",
        origins: list[str] | None = None,
    ) -> Answer:
        headers: dict[bytes | str, bytes | str | list[str]] = {}
        if origins is not None:
            headers["Origin"] = origins
        if token is not None:
            headers["Cookie"] = f"agentd_token={token}"
        if content_type is not None:
            headers["Content-Type"] = content_type
        d = self.stub.request(method, f"http://agentd.test{path}", headers=headers, data=body)
        self.stub.flush()
        response = result(d)
        content = self.stub.content(response)
        self.stub.flush()
        raw = dict(response.headers.getAllRawHeaders())
        return Answer(response.code, {k.lower(): v for k, v in raw.items()}, result(content))

    def put(self, provider: str, key: str, token: str = ALICE) -> Answer:
        return self.request(
            "PUT", f"/api/keys/{provider}", token, json.dumps({"key": key}).encode()
        )


@pytest.fixture
def keystore() -> KeyStore:
    clock = Clock()
    clock.advance(START)
    return KeyStore(MemoryKeyRecords(), [NEW_KEK], operator_env(), clock)


@pytest.fixture
def client(keystore: KeyStore) -> Client:
    return Client(keystore)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/keys"), ("PUT", "/api/keys/anthropic"), ("DELETE", "/api/keys/anthropic")],
)
@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing token"),
        ("not-a-jwt", "invalid token"),
        (AUTH.mint("alice", ttl=-60), "token expired"),
        (Authenticator(secret="another-secret-that-is-long-enough-too").mint("alice"), "invalid"),
    ],
)
def test_requests_without_a_valid_token_are_refused(
    client: Client, keystore: KeyStore, method: str, path: str, token: str | None, reason: str
) -> None:
    answer = client.request(method, path, token, json.dumps({"key": BOB_KEY}).encode())
    assert answer.status == 401
    assert answer.json()["error"].startswith(reason)
    assert answer.header(b"www-authenticate") == b"Bearer"
    assert result(keystore.list("alice")) == []


def test_store_list_replace_and_delete(client: Client, keystore: KeyStore) -> None:
    assert client.put("anthropic", ALICE_KEY).status == 204
    listed = client.request("GET", "/api/keys")
    assert listed.status == 200
    assert listed.json() == {
        "keys": [{"provider": "anthropic", "last4": "ABCD", "setAt": "2025-01-02T03:04:05Z"}],
        "providers": list(PROVIDER_ENV),
    }
    assert result(keystore.keys_for("alice")).env["ANTHROPIC_API_KEY"] == ALICE_KEY

    assert client.put("anthropic", BOB_KEY).status == 204
    assert client.request("GET", "/api/keys").json()["keys"][0]["last4"] == "WXYZ"
    assert result(keystore.keys_for("alice")).env["ANTHROPIC_API_KEY"] == BOB_KEY

    assert client.request("DELETE", "/api/keys/anthropic").status == 204
    assert client.request("GET", "/api/keys").json()["keys"] == []
    gone = client.request("DELETE", "/api/keys/anthropic")
    assert gone.status == 404
    assert gone.json() == {"error": "no anthropic key is stored"}
    assert result(keystore.keys_for("alice")).env["ANTHROPIC_API_KEY"] == OPERATOR_ANTHROPIC


def test_get_shows_only_the_last_four_characters(client: Client) -> None:
    client.put("anthropic", ALICE_KEY)
    body = client.request("GET", "/api/keys").body.decode()
    assert "ABCD" in body
    for start in range(len(ALICE_KEY) - 4):
        assert ALICE_KEY[start : start + 5] not in body


def test_another_user_cannot_read_use_or_delete_the_key(client: Client, keystore: KeyStore) -> None:
    client.put("anthropic", ALICE_KEY)
    assert client.request("GET", "/api/keys", BOB).json()["keys"] == []
    assert client.request("DELETE", "/api/keys/anthropic", BOB).status == 404
    assert result(keystore.keys_for("bob")).env["ANTHROPIC_API_KEY"] == OPERATOR_ANTHROPIC
    assert client.request("GET", "/api/keys").json()["keys"][0]["last4"] == "ABCD"
    assert result(keystore.keys_for("alice")).env["ANTHROPIC_API_KEY"] == ALICE_KEY


@pytest.mark.parametrize(
    "path", ["/api/keys/gemini", "/api/keys/ANTHROPIC", "/api/keys/anthropic/extra"]
)
def test_unknown_providers_and_paths_are_404(client: Client, path: str) -> None:
    assert client.put("anthropic", ALICE_KEY).status == 204
    for method in ("PUT", "DELETE", "GET"):
        answer = client.request(method, path, body=json.dumps({"key": BOB_KEY}).encode())
        assert answer.status == 404, method
    assert client.request("GET", "/api/keys").json()["keys"][0]["last4"] == "ABCD"


def test_a_trailing_slash_is_the_same_path(client: Client) -> None:
    assert client.put("anthropic/", ALICE_KEY).status == 204
    assert client.request("GET", "/api/keys/").json()["keys"][0]["provider"] == "anthropic"


@pytest.mark.parametrize(
    "key", ["sk-1234", "x" * 513, "sk-has a-space-inside", "sk-ключ-12345678", "sk-nul\x00-12345"]
)
def test_implausible_keys_are_400_and_never_echoed(client: Client, key: str) -> None:
    answer = client.put("anthropic", key)
    assert answer.status == 400
    assert "printable ASCII" in answer.json()["error"]
    assert key not in answer.body.decode("utf-8", "replace")
    assert client.request("GET", "/api/keys").json()["keys"] == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'"sk-ant-just-a-string"',
        b'{"key": 12345678}',
        b'{"key": "sk-ant-0123456789", "extra": 1}',
        b"{}",
        b"\xff\xfe",
    ],
)
def test_bodies_that_are_not_one_key_are_400(client: Client, body: bytes) -> None:
    answer = client.request("PUT", "/api/keys/anthropic", body=body)
    assert answer.status == 400
    assert answer.json() == {"error": 'body must be {"key": "..."}'}


def test_deeply_nested_bodies_are_400_without_a_failure_logged(
    client: Client, logged: list[LogEvent]
) -> None:
    for depth in (2000, 300, MAX_JSON_DEPTH + 1):
        body = b'{"key":' + b"[" * depth + b"]" * depth + b"}"
        answer = client.request("PUT", "/api/keys/anthropic", body=body)
        assert answer.status == 400
        # Past 1024 levels the parser itself gives up, before any depth can be counted.
        expected = 'must be {"key": "..."}' if depth > 1024 else "nests deeper than 32 levels"
        assert answer.json() == {"error": f"body {expected}"}
    assert [formatEvent(e) for e in logged if e.get("log_failure") or e.get("isError")] == []


def test_the_json_parser_allows_exactly_max_json_depth_levels() -> None:
    def nested(depth: int) -> bytes:
        return b"[" * (depth - 1) + b'{"a": 1}' + b"]" * (depth - 1)

    deepest = nested(MAX_JSON_DEPTH)
    assert parse_json(deepest) == json.loads(deepest)
    with pytest.raises(JSONTooDeep):
        parse_json(nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(ValueError):
        parse_json(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ValueError):
        parse_json(b'{"a": NaN}')


@pytest.fixture
def guarded(keystore: KeyStore) -> Client:
    return Client(keystore, allowed_origins=("https://app.example",))


def test_changes_from_another_origin_are_403_and_change_nothing(
    guarded: Client, keystore: KeyStore
) -> None:
    body = json.dumps({"key": ALICE_KEY}).encode()
    for origin in ("https://evil.example", "null", "http://agentd.test"):
        for method in ("PUT", "DELETE"):
            answer = guarded.request(method, "/api/keys/anthropic", body=body, origins=[origin])
            assert answer.status == 403, (method, origin)
            assert answer.json() == {"error": "origin not allowed"}
    assert result(keystore.list("alice")) == []
    assert guarded.request("PUT", "/api/keys/anthropic", body=body).status == 204
    app = ["https://app.example"]
    assert guarded.request("PUT", "/api/keys/anthropic", body=body, origins=app).status == 204
    assert guarded.request("DELETE", "/api/keys/anthropic", origins=app).status == 204


def test_without_allowed_origins_only_the_same_host_may_change_keys(client: Client) -> None:
    body = json.dumps({"key": ALICE_KEY}).encode()
    evil = client.request("PUT", "/api/keys/anthropic", body=body, origins=["http://evil.test"])
    assert evil.status == 403
    same = client.request("PUT", "/api/keys/anthropic", body=body, origins=["http://agentd.test"])
    assert same.status == 204


def test_two_origin_headers_are_403_whatever_the_method(guarded: Client) -> None:
    twice = ["https://app.example", "https://app.example"]
    assert guarded.request("GET", "/api/keys", origins=twice).status == 403
    body = json.dumps({"key": ALICE_KEY}).encode()
    assert guarded.request("PUT", "/api/keys/anthropic", body=body, origins=twice).status == 403
    assert guarded.request("GET", "/api/keys", origins=["https://evil.example"]).status == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_bodies_must_be_declared_json(client: Client, content_type: str | None) -> None:
    answer = client.request(
        "PUT",
        "/api/keys/anthropic",
        body=json.dumps({"key": ALICE_KEY}).encode(),
        content_type=content_type,
    )
    assert answer.status == 415
    assert client.request("GET", "/api/keys").json()["keys"] == []


def test_json_with_a_charset_parameter_is_json(client: Client) -> None:
    answer = client.request(
        "PUT",
        "/api/keys/anthropic",
        body=json.dumps({"key": ALICE_KEY}).encode(),
        content_type="Application/JSON; charset=utf-8",
    )
    assert answer.status == 204


def test_bodies_over_the_limit_are_413(client: Client) -> None:
    padded = json.dumps({"key": ALICE_KEY}).encode()
    fits = padded + b" " * (MAX_BODY_BYTES - len(padded))
    assert client.request("PUT", "/api/keys/anthropic", body=fits).status == 204
    answer = client.request("PUT", "/api/keys/anthropic", body=fits + b" ")
    assert answer.status == 413
    assert str(MAX_BODY_BYTES) in answer.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/api/keys", b"GET"),
        ("DELETE", "/api/keys", b"GET"),
        ("GET", "/api/keys/anthropic", b"PUT, DELETE"),
        ("POST", "/api/keys/anthropic", b"PUT, DELETE"),
    ],
)
def test_other_methods_are_405_with_allow(
    client: Client, method: str, path: str, allow: bytes
) -> None:
    answer = client.request(method, path)
    assert answer.status == 405
    assert answer.header(b"allow") == allow


def test_without_a_key_encryption_key_the_api_answers_503() -> None:
    disabled = Client(KeyStore(MemoryKeyRecords(), [], operator_env(), Clock()))
    for method, path in (
        ("GET", "/api/keys"),
        ("PUT", "/api/keys/anthropic"),
        ("DELETE", "/api/keys/anthropic"),
    ):
        answer = disabled.request(method, path, body=json.dumps({"key": ALICE_KEY}).encode())
        assert answer.status == 503
        assert "encryption_keys" in answer.json()["error"]


def test_answers_are_json_and_never_cached(client: Client) -> None:
    for answer in (client.request("GET", "/api/keys"), client.put("gemini", ALICE_KEY)):
        assert answer.header(b"content-type") == b"application/json"
        assert answer.header(b"cache-control") == b"no-store"
        assert answer.header(b"x-content-type-options") == b"nosniff"
    assert client.put("anthropic", ALICE_KEY).header(b"cache-control") == b"no-store"


def test_keys_never_reach_the_log(client: Client, logged: list[LogEvent]) -> None:
    client.put("anthropic", ALICE_KEY)
    client.put("openai", "sk-has a-space-inside")
    client.request("GET", "/api/keys")
    client.request("DELETE", "/api/keys/anthropic")
    texts = [formatEvent(event) for event in logged]
    assert "user alice stored their anthropic key" in texts
    assert "user alice deleted their anthropic key" in texts
    for event, text in zip(logged, texts, strict=True):
        assert ALICE_KEY not in text and ALICE_KEY not in repr(event)
        assert "sk-has a-space-inside" not in text and "sk-has" not in repr(event)


class BrokenRecords(MemoryKeyRecords):
    def set(self, user: str, provider: str, record: str) -> Deferred[None]:
        raise RuntimeError("a bug")


def test_an_unexpected_failure_is_500_without_details(logged: list[LogEvent]) -> None:
    broken = Client(KeyStore(BrokenRecords(), [NEW_KEK], {}, Clock()))
    answer = broken.put("anthropic", ALICE_KEY)
    assert answer.status == 500
    assert answer.json() == {"error": "internal error"}
    assert any(event.get("log_failure") for event in logged)


class SlowRecords(MemoryKeyRecords):
    def __init__(self) -> None:
        super().__init__()
        self.pending: Deferred[dict[str, str]] = Deferred()

    def get_all(self, user: str) -> Deferred[dict[str, str]]:
        return self.pending


def test_no_answer_is_written_to_a_client_that_left(logged: list[LogEvent]) -> None:
    records = SlowRecords()
    slow = Client(KeyStore(records, [NEW_KEK], {}, Clock()))
    d = slow.stub.request(
        "GET", "http://agentd.test/api/keys", headers={"Cookie": f"agentd_token={ALICE}"}
    )
    slow.stub.flush()
    d.cancel()
    slow.stub.flush()
    records.pending.callback({})
    gc.collect()
    assert [formatEvent(e) for e in logged if e.get("log_failure") or e.get("isError")] == []
    assert isinstance(failure_of(d), ResponseNeverReceived)


# Over a real listening port, with Redis.


@implementer(IBodyProducer)
class ChunkedBody:
    """A body of undeclared length, which the client sends chunked (no Content-Length)."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes) -> None:
        self.data = data

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_the_api_over_a_real_port_with_redis(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, reactor, timeout=0.3)
    keystore = KeyStore(RedisKeyRecords(store), [NEW_KEK], operator_env(), reactor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Site(site_root(keystore))
    )
    base = f"http://127.0.0.1:{port.getHost().port}/api/keys"
    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    cookies = {"agentd_token": ALICE}

    async def put_chunked(body: bytes) -> int:
        response = await http.put(
            f"{base}/openai",
            data=ChunkedBody(body),
            headers=Headers({"Content-Type": ["application/json"]}),
            cookies=cookies,
        )
        return int(response.code)

    try:
        put = await http.put(f"{base}/anthropic", json={"key": ALICE_KEY}, cookies=cookies)
        assert put.code == 204
        listed = await http.get(base, cookies=cookies)
        assert listed.code == 200
        keys = (await listed.json())["keys"]
        assert [(k["provider"], k["last4"]) for k in keys] == [("anthropic", "ABCD")]
        assert ALICE_KEY not in redis_server.cli("HGETALL", "agentd:userkeys:alice")
        assert (await keystore.keys_for("alice")).env["ANTHROPIC_API_KEY"] == ALICE_KEY

        body = json.dumps({"key": BOB_KEY}).encode()
        assert await put_chunked(body) == 204
        assert await put_chunked(body.ljust(MAX_BODY_BYTES + 1)) == 413

        redis_server.stop()
        unavailable = await http.get(base, cookies=cookies)
        assert unavailable.code == 503
        assert await unavailable.json() == {
            "error": "stored keys are unavailable right now; try again"
        }
    finally:
        await port.stopListening()
        await store.disconnect()
