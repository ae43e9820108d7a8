"""A twisted.web request as agentd's resources use it, typed.

Twisted leaves ``Request.setHeader``, ``write``, ``finish`` and ``getClientAddress``
unannotated; resources answer through this view of the same object instead, so that what
they pass and get back is checked.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress


class WebRequest(Protocol):
    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def getHeader(self, key: bytes) -> bytes | None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...

    def getClientAddress(self) -> IAddress: ...
