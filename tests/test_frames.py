"""The client's frames: whole masked text frames, which agentd reads itself, and everything
else, which autobahn's parser handles, give the same answers and refusals in the same order.

Each case is read whole, and one byte per read, which only autobahn's parser can read; seeded
random sequences of frames are also read a frame per read and cut at random."""

from __future__ import annotations

import os
import random
from typing import Any

import orjson
import pytest

from agentd.gateway import AgentWebSocket
from bench.ws import split
from tests.test_flood import QueueingTransport, open_connection
from tests.test_session import make

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10


def frame(
    payload: bytes,
    opcode: int = TEXT,
    fin: bool = True,
    mask: bytes | None = None,
    length_bytes: int | None = None,
) -> bytes:
    """A client frame with a random mask key (``mask=b""``: unmasked), its length in the
    shortest form unless ``length_bytes`` (2 or 8) says otherwise."""
    key = os.urandom(4) if mask is None else mask
    size = len(payload)
    if length_bytes is None:
        length_bytes = 0 if size < 126 else 2 if size < 65536 else 8
    code = {0: size, 2: 126, 8: 127}[length_bytes]
    head = bytes(((0x80 if fin else 0) | opcode, (0x80 if key else 0) | code))
    head += size.to_bytes(length_bytes, "big") if length_bytes else b""
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if key else payload
    return head + key + body


def frames_sent(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of every whole frame agentd wrote (server frames are unmasked)."""
    return [(opcode, data[start:end]) for opcode, start, end in split(data)[0]]


def answers(data: bytes) -> list[Any]:
    """What agentd wrote: each JSON message's id (or its error's text), and each close frame
    as ("close", code)."""
    seen: list[Any] = []
    for opcode, payload in frames_sent(data):
        if opcode == CLOSE:
            seen.append(("close", int.from_bytes(payload[:2], "big")))
        elif opcode == PONG:
            seen.append(("pong", payload))
        else:
            message = orjson.loads(payload)
            seen.append(message.get("id", message.get("error")))
    return seen


def connection(max_message_bytes: int = 1 << 20) -> tuple[AgentWebSocket, QueueingTransport]:
    _, _, registry = make()
    return open_connection(registry, limit=1 << 20, max_message_bytes=max_message_bytes)


def ping(ping_id: Any, pad: int = 0) -> bytes:
    """A ping message; ``pad`` spaces make it longer without changing its meaning."""
    return orjson.dumps({"type": "ping", "id": ping_id}) + b" " * pad


def read_whole(data: bytes, **options: Any) -> list[Any]:
    return read_in_parts([data], **options)


def read_in_parts(parts: list[bytes], **options: Any) -> list[Any]:
    protocol, transport = connection(**options)
    for part in parts:
        protocol.dataReceived(part)
    return answers(transport.value())


def read_byte_by_byte(data: bytes, **options: Any) -> list[Any]:
    """Every frame cut by the reads: autobahn's parser alone reads them."""
    return read_in_parts([data[i : i + 1] for i in range(len(data))], **options)


# Each: the client's bytes, and agentd's answers to them, in order.
CASES = {
    "short and 16-bit lengths, empty and 64 KiB - 1": (
        frame(ping(1))
        + frame(ping(2, pad=200))
        + frame(ping(3, pad=65535 - len(ping(3))))
        + frame(b"")
        + frame(ping(4)),
        [1, 2, 3, "message is not valid JSON", 4],
    ),
    "a 64-bit length": (
        frame(ping(1, pad=70_000)) + frame(ping(2)),
        [1, 2],
    ),
    "a fragmented message between whole ones": (
        frame(ping(1))
        + frame(b'{"type":"ping",', fin=False)
        + frame(b'"id":2}', opcode=CONTINUATION)
        + frame(ping(3)),
        [1, 2, 3],
    ),
    "a reserved opcode": (
        frame(ping(1)) + frame(ping(2), opcode=3),
        [1, ("close", 1002)],
    ),
    "a continuation with no message begun": (
        frame(ping(1)) + frame(ping(2), opcode=CONTINUATION),
        [1, ("close", 1002)],
    ),
    "a whole text frame inside a fragmented message": (
        frame(ping(1)) + frame(b'{"type":', fin=False) + frame(ping(2)),
        [1, ("close", 1002)],
    ),
    "UTF-8 cut between the fragments of a message": (
        frame(b'"\xc3', fin=False) + frame(b'\xa9"', opcode=CONTINUATION) + frame(ping(2)),
        ["message must be a JSON object", 2],
    ),
    "a ping control frame between messages": (
        frame(ping(1)) + frame(b"hi", opcode=PING) + frame(ping(2)),
        [1, ("pong", b"hi"), 2],
    ),
    "a binary message": (
        frame(ping(1)) + frame(ping(2), opcode=BINARY) + frame(ping(3)),
        [1, "messages must be JSON text", 3],
    ),
    "UTF-8 text that is not JSON": (
        frame("é".encode()) + frame(ping(2)),
        ["message is not valid JSON", 2],
    ),
    "bad UTF-8 after a whole message": (
        frame(ping(1)) + frame(b'{"type":"ping","id":"\xff"}') + frame(ping(3)),
        [1, ("close", 1007)],
    ),
    "a surrogate encoded in UTF-8": (
        frame(b'"\xed\xa0\x80"'),
        [("close", 1007)],
    ),
    "an unmasked frame": (
        frame(ping(1)) + frame(ping(2), mask=b""),
        [1, ("close", 1002)],
    ),
    "a length not in its shortest form": (
        frame(ping(1)) + frame(ping(2), length_bytes=2),
        [1, ("close", 1002)],
    ),
    "reserved bits set": (
        frame(ping(1)) + bytes([0xC1]) + frame(ping(2))[1:],
        [1, ("close", 1002)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_whole_frames_in_one_read_are_answered_as_frames_cut_by_every_read(case: str) -> None:
    data, expected = CASES[case]
    assert read_whole(data) == expected
    assert read_byte_by_byte(data) == expected


def test_a_message_over_the_limit_closes_the_connection_however_it_is_read() -> None:
    data = frame(ping(1)) + frame(ping(2, pad=300)) + frame(ping(3))
    assert read_whole(data, max_message_bytes=256) == [1, ("close", 1009)]
    assert read_byte_by_byte(data, max_message_bytes=256) == [1, ("close", 1009)]
    at_limit = frame(ping(1, pad=256 - len(ping(1)))) + frame(ping(2))
    assert read_whole(at_limit, max_message_bytes=256) == [1, 2]


def test_a_frame_cut_by_the_read_is_answered_once_whole_after_those_before_it() -> None:
    protocol, transport = connection()
    data = frame(ping(1)) + frame(ping(2, pad=300)) + frame(ping(3))
    cut = len(frame(ping(1))) + 100
    protocol.dataReceived(data[:cut])
    assert answers(transport.value()) == [1]
    protocol.dataReceived(data[cut:])
    assert answers(transport.value()) == [1, 2, 3]
    # Once autobahn's buffer is empty again, whole frames are read directly once more.
    protocol.dataReceived(frame(ping(4)))
    assert answers(transport.value()) == [1, 2, 3, 4]
    assert protocol.data == b""


def test_a_fragmented_message_is_read_to_its_end_across_reads() -> None:
    protocol, transport = connection()
    protocol.dataReceived(frame(b'{"type":"ping",', fin=False))
    protocol.dataReceived(frame(b'"id":1}', opcode=CONTINUATION))
    assert answers(transport.value()) == [1]
    # A whole text frame in the next read, while another message is still open: refused as
    # autobahn refuses it, not read as a message of its own.
    protocol.dataReceived(frame(b'{"type":"ping",', fin=False))
    protocol.dataReceived(frame(ping(2)))
    assert answers(transport.value()) == [1, ("close", 1002)]


def test_nothing_after_a_close_frame_is_answered() -> None:
    data = frame(ping(1)) + frame((1000).to_bytes(2, "big"), opcode=CLOSE) + frame(ping(2))
    assert read_whole(data) == [1, ("close", 1000)]


def test_whole_text_frames_are_read_without_autobahns_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    protocol, transport = connection()
    parsed: list[bytes] = []

    def process_data() -> bool:
        parsed.append(protocol.data)
        return False

    monkeypatch.setattr(protocol, "processData", process_data)
    protocol.dataReceived(frame(ping(1)) + frame(ping(2, pad=1000)))
    assert answers(transport.value()) == [1, 2]
    assert parsed == []
    protocol.dataReceived(frame(b"", opcode=PING))
    assert len(parsed) == 1, "a control frame goes to autobahn"


def some_frames(rng: random.Random) -> list[bytes]:
    """One to five frames, mostly whole pings, among them every kind autobahn must read."""
    kinds = [
        lambda: frame(ping(rng.randrange(1000), pad=rng.choice([0, 10, 130, 300]))),
        lambda: frame(b'{"type":"ping",', fin=False) + frame(b'"id":5}', opcode=CONTINUATION),
        lambda: frame(b'{"type":"ping",', fin=False),
        lambda: frame(b"x", opcode=PING),
        lambda: frame(ping(1), opcode=BINARY),
        lambda: frame(b'"\xff"'),
        lambda: frame(ping(1), mask=b""),
        lambda: frame(ping(2), length_bytes=2),
        lambda: frame(ping(3), opcode=CONTINUATION),
        lambda: bytes([0xC1]) + frame(ping(4))[1:],
        lambda: frame(ping(5, pad=300), length_bytes=8),
    ]
    weights = [10, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    return [rng.choices(kinds, weights)[0]() for _ in range(rng.randrange(1, 6))]


@pytest.mark.parametrize("seed", range(4))
def test_random_frames_are_answered_alike_however_the_reads_cut_them(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        frames = some_frames(rng)
        data = b"".join(frames)
        cuts = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1)))
        at_random = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        for limit in (1 << 20, 200):
            expected = read_byte_by_byte(data, max_message_bytes=limit)
            assert read_whole(data, max_message_bytes=limit) == expected, frames
            assert read_in_parts(frames, max_message_bytes=limit) == expected, frames
            assert read_in_parts(at_random, max_message_bytes=limit) == expected, frames
