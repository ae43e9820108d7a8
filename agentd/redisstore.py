"""The one Redis client agentd shares: built from a URL, every call bounded by a timeout.

txredisapi waits forever for a reply while it is disconnected and reconnecting, so every call
made through ``RedisStore.call`` gets its own deadline and its latency and failures measured
per operation. Callers decide what a failure means (fall back, spool, degrade).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from agentd import metrics

T = TypeVar("T")


class RedisURLError(ValueError):
    """The Redis URL cannot be used; the message says why (never the password)."""


@dataclass(frozen=True)
class RedisTarget:
    host: str = ""
    port: int = 6379
    unix_path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_redis_url(url: str) -> RedisTarget:
    """``redis://[user:password@]host[:port][/db]`` or ``unix:///path/redis.sock[?db=N]``."""
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if parts.scheme == "unix":
        if not parts.path:
            raise RedisURLError("unix:// URL needs a socket path")
        db_values = parse_qs(parts.query).get("db", ["0"])
        return RedisTarget(
            unix_path=parts.path, db=_db(db_values[0]), username=username, password=password
        )
    if parts.scheme != "redis":
        raise RedisURLError("must start with redis:// or unix://")
    if not parts.hostname:
        raise RedisURLError("redis:// URL needs a host")
    try:
        port = parts.port or 6379
    except ValueError:
        raise RedisURLError("port must be a number between 1 and 65535") from None
    path = parts.path.strip("/")
    return RedisTarget(
        host=parts.hostname,
        port=port,
        db=_db(path or "0"),
        username=username,
        password=password,
    )


def _db(text: str) -> int:
    if not text.isdigit():
        raise RedisURLError("database must be a number")
    return int(text)


class RedisStore:
    """A lazily connecting, self-reconnecting Redis pool whose every call has a timeout."""

    def __init__(
        self,
        url: str,
        clock: IReactorTime,
        timeout: float = 0.1,
        poolsize: int = 4,
    ) -> None:
        target = parse_redis_url(url)
        self.timeout = timeout
        self._clock = clock
        common: dict[str, Any] = {
            "dbid": target.db,
            "poolsize": poolsize,
            "reconnect": True,
            "password": target.password,
            "username": target.username,
            "connectTimeout": max(timeout * 10, 1.0),
            "convertNumbers": False,
        }
        if target.unix_path:
            self.connection = txredisapi.lazyUnixConnectionPool(target.unix_path, **common)
        else:
            self.connection = txredisapi.lazyConnectionPool(target.host, target.port, **common)

    def call(
        self,
        operation: str,
        command: Callable[[Any], Deferred[T]],
        timeout: float | None = None,
    ) -> Deferred[T]:
        """Run ``command(connection)``; fail with ``TimeoutError`` after the timeout.

        ``operation`` labels the latency and error metrics (a fixed word, never a key).
        """
        started = time.perf_counter()
        d = command(self.connection)
        d.addTimeout(self.timeout if timeout is None else timeout, self._clock)

        def measured(result: T) -> T:
            metrics.REDIS_LATENCY.labels(operation).observe(time.perf_counter() - started)
            return result

        def failed(failure: Failure) -> Failure:
            metrics.REDIS_ERRORS.labels(operation).inc()
            return failure

        d.addCallbacks(measured, failed)
        return d

    def eval(
        self,
        operation: str,
        script: str,
        keys: Sequence[str],
        args: Sequence[Any],
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """EVALSHA, falling back to EVAL on NOSCRIPT (which is not an outage)."""
        return self.call(operation, lambda c: c.eval(script, list(keys), list(args)), timeout)

    def ping(self, timeout: float | None = None) -> Deferred[Any]:
        return self.call("ping", lambda c: c.ping(), timeout)

    def disconnect(self) -> Deferred[None]:
        done: Deferred[None] = self.connection.disconnect()
        return done
