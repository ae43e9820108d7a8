"""Which Redis primary agentd writes to and since when: for /health, the metrics and the logs.

Every connection that becomes usable reports the address it reached; a different address than
before is a change of primary (a Sentinel failover, or a name that now resolves elsewhere).
Observers hear of every usable connection, so that a Redis known to be down can be probed at
once instead of at the next step of the probe's backoff.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from agentd import metrics

_log = Logger()


@dataclass(frozen=True)
class Address:
    """A Redis server: host and port, or a Unix socket path (port 0)."""

    host: str
    port: int = 0

    def __str__(self) -> str:
        if not self.port:
            return f"unix:{self.host}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class PrimaryRecord:
    """The primary agentd uses (``None`` before the first connection) and when it became it."""

    def __init__(self, mode: str, now: Callable[[], float] = time.time) -> None:
        self.mode = mode
        self.address: Address | None = None
        self.since: float | None = None
        self.changes = 0
        self._now = now
        self._observers: list[Callable[[Address], None]] = []

    def observe(self, observer: Callable[[Address], None]) -> None:
        """Call ``observer`` each time a connection to the primary becomes usable."""
        self._observers.append(observer)

    def connected(self, address: Address) -> None:
        """A connection to ``address`` passed its checks and takes commands."""
        if address != self.address:
            previous, self.address, self.since = self.address, address, self._now()
            metrics.REDIS_PRIMARY.clear()
            metrics.REDIS_PRIMARY.labels(str(address)).set(1)
            metrics.REDIS_PRIMARY_CHANGED.set(self.since)
            if previous is None:
                _log.info("Redis primary: {address} ({mode})", address=str(address), mode=self.mode)
            else:
                self.changes += 1
                _log.warn(
                    "Redis primary changed from {previous} to {address} ({mode})",
                    previous=str(previous),
                    address=str(address),
                    mode=self.mode,
                )
        for observer in tuple(self._observers):
            observer(address)

    def health_detail(self) -> dict[str, Any]:
        """What /health shows about the primary."""
        since = None
        if self.since is not None:
            moment = datetime.datetime.fromtimestamp(self.since, datetime.UTC)
            since = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "mode": self.mode,
            "primary": None if self.address is None else str(self.address),
            "primary_since": since,
            "primary_changes": self.changes,
        }
