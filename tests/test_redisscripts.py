"""Scripts through the pool: what reaches Redis is what txredisapi's own eval sends.

The encoding is compared with txredisapi's for every kind of argument; the calls run against
a real redis-server, whose command statistics show what was sent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import TimeoutError

from agentd.redisscripts import leaner
from agentd.redisstore import RedisStore
from tests.servers import RedisServer

ECHO = "return {KEYS[1], ARGV[1], ARGV[2]}"

ARGUMENTS: list[Any] = [
    "EVALSHA",
    "",
    "{usage}:day:user:alice:2026-11-30",
    "naïve ✓",
    b"\x00\xff raw",
    bytearray(b"array"),
    0,
    -17,
    2**70,
    True,
    1.5,
    1.7e15,
    None,
]


def built(protocol: type, *args: Any, charset: str | None = "utf-8") -> bytes:
    command: bytes = protocol(charset)._build_command(*args)
    return command


def test_commands_are_encoded_byte_for_byte_as_txredisapi_encodes_them() -> None:
    original = txredisapi.RedisProtocol
    direct = leaner(original)
    assert built(direct, *ARGUMENTS) == built(original, *ARGUMENTS)
    for argument in ARGUMENTS:
        assert built(direct, argument) == built(original, argument)
    assert built(direct, *ARGUMENTS, charset=None) == built(original, *ARGUMENTS, charset=None)
    latin = ["café", b"x", 3]
    assert built(direct, *latin, charset="latin-1") == built(original, *latin, charset="latin-1")
    # A command of strings, bytes and integers alone, as agentd's scripts are called: the
    # one hiredis encodes.
    common = ["EVALSHA", "0" * 40, 2, "naïve ✓", b"\x00\xff raw", 0, -17, 2**70, ""]
    assert built(direct, *common) == built(original, *common)
    # A short command comes from the encodings kept, a long one is encoded each time.
    assert built(direct, *common) == built(original, *common)
    long = common * 3
    assert built(direct, *long) == built(direct, *long) == built(original, *long)
    for charset in ("utf8", "UTF-8"):
        assert built(direct, *common, charset=charset) == built(original, *common, charset=charset)


# Replies as hiredis gives them: integers, bulk strings, nil, nested arrays.
REPLIES: list[Any] = [
    [1, 60, 0, 1250, 0, b"250000000", None],
    [0, 60, 1500],
    [b"12", b"3.5", b"-7", b"x", b"\xff", b"", None, True, 2.5, [1, [b"2", [b"caf\xc3\xa9"]]]],
    b"OK",
    7,
    [],
]


@pytest.mark.parametrize("convert_numbers", [False, True])
@pytest.mark.parametrize("charset", ["utf-8", None])
def test_replies_are_converted_as_txredisapi_converts_them(convert_numbers, charset) -> None:
    original = txredisapi.HiredisProtocol
    ours, theirs = leaner(original)(charset), original(charset)
    ours.convertNumbers = theirs.convertNumbers = convert_numbers
    for reply in REPLIES:
        assert repr(ours.tryConvertData(reply)) == repr(theirs.tryConvertData(reply))


def test_what_txredisapi_refuses_to_encode_is_refused_alike() -> None:
    for charset, text in (("utf-8", "\ud800"), ("ascii", "café")):
        with pytest.raises(txredisapi.InvalidData) as expected:
            built(txredisapi.RedisProtocol, text, charset=charset)
        with pytest.raises(txredisapi.InvalidData) as got:
            built(leaner(txredisapi.RedisProtocol), text, charset=charset)
        assert str(got.value) == str(expected.value)


@pytest_twisted.async_yield_fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    """A store on one connection to the test's redis-server."""
    store = RedisStore(redis_server.url, reactor, timeout=2.0, poolsize=1)
    yield store
    await store.disconnect()


def script_calls(server: RedisServer) -> dict[str, int]:
    return {name: n for name, n in server.command_calls().items() if name.startswith("eval")}


@pytest_twisted.ensureDeferred
async def test_a_script_is_sent_once_per_connection_then_called_by_its_sha(
    store: RedisStore, redis_server: RedisServer
) -> None:
    for n in range(5):
        reply = await store.eval("test", ECHO, ["k"], ["é", n])
        assert reply == ["k", "é", str(n)]
    assert script_calls(redis_server) == {"eval": 1, "evalsha": 4}


@pytest_twisted.ensureDeferred
async def test_a_server_that_lost_its_scripts_gets_the_script_again(
    store: RedisStore, redis_server: RedisServer
) -> None:
    await store.eval("test", ECHO, ["k"], ["a", "b"])
    redis_server.cli("SCRIPT", "FLUSH")
    redis_server.cli("CONFIG", "RESETSTAT")
    assert await store.eval("test", ECHO, ["k"], ["a", "b"]) == ["k", "a", "b"]
    assert await store.eval("test", ECHO, ["k"], ["c", "d"]) == ["k", "c", "d"]
    # One EVALSHA met NOSCRIPT, EVAL loaded the script, the next call used its SHA again.
    assert script_calls(redis_server) == {"evalsha": 2, "eval": 1}


@pytest_twisted.ensureDeferred
async def test_errors_arrive_as_failed_calls(store: RedisStore) -> None:
    await store.eval("test", ECHO, ["k"], ["a", "b"])  # connected, the script known
    with pytest.raises(txredisapi.ResponseError):
        await store.eval("test", "return redis.call('NOSUCHCOMMAND')", [], [])
    # Encoding fails before anything is sent: a failed call too, never an exception.
    called = store.eval("test", ECHO, ["\ud800"], ["a", "b"])
    with pytest.raises(txredisapi.InvalidData):
        await called
    assert await store.eval("test", ECHO, ["k"], ["still", "fine"]) == ["k", "still", "fine"]


@pytest_twisted.ensureDeferred
async def test_a_command_leaves_before_the_reactor_runs_again(
    store: RedisStore, redis_server: RedisServer
) -> None:
    await store.eval("test", ECHO, ["k"], ["a", "b"])  # connected, the script known
    called = store.eval("test", ECHO, ["k"], ["c", "d"])
    # Without yielding to the reactor: only a command already written can reach Redis.
    deadline = time.monotonic() + 2
    while script_calls(redis_server).get("evalsha", 0) < 1:
        assert time.monotonic() < deadline, "the command waits for the reactor"
        time.sleep(0.01)
    assert await called == ["k", "c", "d"]


@pytest_twisted.ensureDeferred
async def test_the_calls_of_one_reactor_turn_share_one_connection(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, reactor, timeout=2.0, poolsize=3)
    try:
        await store.eval("test", ECHO, ["k"], ["a", "b"])  # connected, the script known
        for n in range(10):
            pair = [store.eval("test", ECHO, ["k"], [n, side]) for side in ("gate", "usage")]
            assert [await d for d in pair] == [["k", str(n), "gate"], ["k", str(n), "usage"]]
        clients = redis_server.cli("CLIENT", "LIST").splitlines()
        scripting = [c for c in clients if " cmd=eval" in c]
        assert len(clients) >= 3, "the pool has three connections"
        assert len(scripting) == 1, "every script call went to the one connection"
    finally:
        await store.disconnect()


SLOW = """
local started = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - started[1]) * 1000000 + (now[2] - started[2]) > 200000
return 'slow'
"""


@pytest_twisted.ensureDeferred
async def test_a_reply_after_its_deadline_is_dropped_and_the_next_call_gets_its_own(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, reactor, timeout=0.05)
    try:
        await store.eval("test", ECHO, ["k"], ["a", "b"], timeout=2.0)
        await store.eval("slow", SLOW, [], [], timeout=2.0)  # the script known
        slow = store.eval("slow", SLOW, [], [])
        after = store.eval("test", ECHO, ["k"], ["after", "it"], timeout=2.0)
        with pytest.raises(TimeoutError):
            await slow
        assert await after == ["k", "after", "it"]
        assert await store.eval("test", ECHO, ["k"], ["c", "d"]) == ["k", "c", "d"]
    finally:
        await store.disconnect()
