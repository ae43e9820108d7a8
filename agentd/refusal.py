"""The one shape of every HTTP refusal agentd answers: a status, ``{"error": ...}`` as JSON,
and the headers that go with it (Retry-After, Allow, WWW-Authenticate, Upgrade)."""

from __future__ import annotations

import json
from http import HTTPStatus

from twisted.web.resource import Resource

from agentd.webrequest import WebRequest

Header = tuple[bytes, bytes]


class Refused(Exception):
    """Refuse a request with ``status`` and ``{"error": error}``; ``retry_after`` in seconds."""

    def __init__(
        self, status: int, error: str, *headers: Header, retry_after: int | None = None
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        if retry_after is not None:
            headers = (*headers, (b"retry-after", str(retry_after).encode()))
        self.headers = headers

    @property
    def body(self) -> bytes:
        return json.dumps({"error": self.error}).encode("utf-8")

    def answer(self, request: WebRequest) -> bytes:
        """Set the status and headers on ``request``; the body to write is returned."""
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        for name, value in self.headers:
            request.setHeader(name, value)
        return self.body

    def response(self) -> bytes:
        """The whole HTTP/1.1 response, for a connection that is closed after it: written
        straight to the transport when no request can carry it (a deadline in the middle of
        a request's head, a body too large to read)."""
        body = self.body
        lines = [
            f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}".encode(),
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            b"connection: close",
            *(name + b": " + value for name, value in self.headers),
        ]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


class RefusedResource(Resource):
    """A leaf that refuses every request the same way (404 below an unknown path)."""

    isLeaf = True

    def __init__(self, refused: Refused) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self.refused = refused

    def render(self, request: WebRequest) -> bytes:
        return self.refused.answer(request)


NOT_FOUND = RefusedResource(Refused(404, "not found"))
