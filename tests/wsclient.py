"""A small WebSocket client for tests, on the test's own reactor (autobahn)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint


class _Protocol(WebSocketClientProtocol):
    client: WsClient

    def onOpen(self) -> None:
        self.client.opened.callback(self.client)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.client.raw.append(payload)
        self.client.queue.put(orjson.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.client.close_code = code
        self.client.close_reason = reason
        if not self.client.opened.called:
            self.client.opened.errback(ConnectionError(f"closed before open: {code} {reason}"))
        self.client.closed.callback((code, reason))


class WsClient:
    def __init__(self) -> None:
        self.queue: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.raw: list[bytes] = []
        self.opened: Deferred[WsClient] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.protocol: _Protocol | None = None

    def send(self, message: dict[str, Any] | bytes, binary: bool = False) -> None:
        assert self.protocol is not None
        payload = message if isinstance(message, bytes) else orjson.dumps(message)
        self.protocol.sendMessage(payload, isBinary=binary)

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        d = self.queue.get()
        d.addTimeout(timeout, reactor)
        return await d

    async def recv_until(self, kind: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Messages up to and including the first of type ``kind``."""
        seen = []
        while True:
            message = await self.recv(timeout)
            seen.append(message)
            if message.get("type") == kind:
                return seen

    def close(self, code: int = 1000) -> None:
        if self.protocol is not None:
            self.protocol.sendClose(code)

    def abort(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.abortConnection()


async def connect(url: str, headers: dict[str, str] | None = None, **options: Any) -> WsClient:
    parts = urlsplit(url)
    client = WsClient()
    factory = WebSocketClientFactory(url, headers=headers or {})
    factory.setProtocolOptions(maxFramePayloadSize=0, maxMessagePayloadSize=0, **options)

    def build(addr: Any) -> _Protocol:
        protocol = _Protocol()
        protocol.factory = factory
        protocol.client = client
        client.protocol = protocol
        return protocol

    factory.buildProtocol = build  # type: ignore[method-assign]
    endpoint = TCP4ClientEndpoint(reactor, parts.hostname, parts.port or 80, timeout=5)
    await endpoint.connect(factory)
    d = client.opened
    d.addTimeout(10, reactor)
    return await d


def handshake_headers() -> dict[str, str]:
    return {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
