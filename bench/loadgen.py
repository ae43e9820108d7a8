"""A load-generating worker: many WebSocket clients in one asyncio process.

The suite starts several of these when one process would be the bottleneck, and steers them
over stdin and stdout with one JSON object a line:

- on start, each client connects (``--concurrency`` handshakes at a time), optionally sends
  ``--prompt`` and waits for a message of type ``--until``; then ``{"event": "ready", ...}``;
- ``drop``: every connection is reset at once (no close frame, like a dead network), and
  every client resumes with its ``session`` and ``last_seq`` at once; ``{"event": "resumed"}``
  when all are back, then ``{"event": "finished"}`` when each has read its ``done``, with what
  was lost or duplicated;
- ``close`` (or end of stdin): close every connection and exit.

    python -m bench.loadgen --port 8080 --users u:0:2500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bench.procs import raise_file_limit, token
from bench.ws import AsyncClient, open_async


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def kind(message: dict[str, Any]) -> str:
    return str(message.get("type"))


class Conversation:
    """One client, remembering what agent-client.js remembers: session and last seq."""

    def __init__(self, args: argparse.Namespace, user: str) -> None:
        self.args = args
        self.user = user
        self.client: AsyncClient | None = None
        self.session = ""
        self.last_seq = 0
        self.deltas: list[str] = []
        self.duplicated = 0
        self.gaps = 0
        self.incomplete_resumes = 0
        self.done = False

    def path(self) -> str:
        query = f"token={token(self.user)}"
        if self.session:
            query += f"&session={self.session}&last_seq={self.last_seq}"
        return f"/projects/{self.args.project}/agent/{self.args.agent}?{query}"

    async def connect(self) -> dict[str, Any]:
        self.client = await open_async("127.0.0.1", self.args.port, self.path())
        hello = json.loads(await self.client.recv(self.args.timeout))
        if hello.get("type") != "session":
            raise RuntimeError(f"expected the session message, got {hello.get('type')}")
        if self.session and not hello.get("complete", False):
            self.incomplete_resumes += 1
        self.session = hello["session"]
        return hello

    def take(self, message: dict[str, Any]) -> None:
        seq = message.get("seq", 0)
        if seq <= self.last_seq:
            self.duplicated += 1
            return
        if seq != self.last_seq + 1:
            self.gaps += seq - self.last_seq - 1
        self.last_seq = seq
        if kind(message) == "delta":
            self.deltas.append(message.get("text", ""))
        elif kind(message) == "done":
            self.done = True

    async def read_until(self, wanted: str) -> None:
        assert self.client is not None
        while True:
            message = json.loads(await self.client.recv(self.args.timeout))
            self.take(message)
            if kind(message) == wanted:
                return

    async def start(self) -> None:
        await self.connect()
        if self.args.prompt:
            assert self.client is not None
            self.client.send(self.args.prompt.encode())
            if self.args.until:
                await self.read_until(self.args.until)

    async def drain(self) -> None:
        """Take what has already arrived, without waiting."""
        assert self.client is not None
        while not self.client.queue.empty():
            self.take(json.loads(self.client.queue.get_nowait()))

    async def resume(self) -> float:
        hello = await self.connect()
        if not hello.get("resumed"):
            raise RuntimeError("the session was not resumed")
        return time.monotonic()

    async def finish(self) -> None:
        while not self.done:
            await self.read_until("done")


async def gather_limited(coroutines: list[Any], limit: int) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(coroutine: Any) -> Any:
        async with gate:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines), return_exceptions=True)


def failures(results: list[Any]) -> list[str]:
    return [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]


async def main(args: argparse.Namespace) -> None:
    raise_file_limit()
    prefix, first, count = args.users.split(":")
    users = [f"{prefix}{n}" for n in range(int(first), int(first) + int(count))]
    conversations = [Conversation(args, user) for user in users]
    started = time.monotonic()
    results = await gather_limited([c.start() for c in conversations], args.concurrency)
    errors = failures(results)
    emit(
        "ready",
        connected=len(conversations) - len(errors),
        failed=len(errors),
        errors=errors[:5],
        seconds=round(time.monotonic() - started, 3),
    )
    live = [c for c, r in zip(conversations, results, strict=True) if r is None]
    stdin = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while True:
        command = (await stdin.readline()).decode().strip()
        if command == "drop":
            await drop_and_resume(live)
        else:
            break
    for c in live:
        if c.client is not None and c.client.transport is not None:
            c.client.transport.close()
    emit("closed")


async def drop_and_resume(live: list[Conversation]) -> None:
    for c in live:
        await c.drain()
    dropped_at = time.monotonic()
    for c in live:
        assert c.client is not None
        c.client.drop()
    resumed = await asyncio.gather(*(c.resume() for c in live), return_exceptions=True)
    errors = failures(resumed)
    times = [r for r in resumed if isinstance(r, float)]
    emit(
        "resumed",
        dropped_at=dropped_at,
        last_resumed_at=max(times, default=dropped_at),
        resumed=len(times),
        failed=len(errors),
        errors=errors[:5],
    )
    back = [c for c, r in zip(live, resumed, strict=True) if isinstance(r, float)]
    finished = await asyncio.gather(*(c.finish() for c in back), return_exceptions=True)
    errors = failures(finished)
    expected = [str(n) for n in range(1, live[0].args.deltas + 1)] if live else []
    emit(
        "finished",
        finished=sum(1 for c in back if c.done),
        failed=len(errors),
        errors=errors[:5],
        duplicated=sum(c.duplicated for c in back),
        gaps=sum(c.gaps for c in back),
        incomplete_resumes=sum(c.incomplete_resumes for c in back),
        wrong_answers=sum(1 for c in back if c.deltas != expected),
    )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--users", required=True, help="PREFIX:FIRST:COUNT, one client each")
    parser.add_argument("--project", default="bench")
    parser.add_argument("--agent", default="echo")
    parser.add_argument("--prompt", default="", help="JSON text sent once connected")
    parser.add_argument("--until", default="", help="then wait for a message of this type")
    parser.add_argument("--deltas", type=int, default=0, help="deltas each answer should have")
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes at a time")
    parser.add_argument("--timeout", type=float, default=60.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
