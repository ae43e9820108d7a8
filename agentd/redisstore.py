"""The one Redis client agentd shares: it finds the primary, and every call has a timeout.

txredisapi waits forever for a reply while it is disconnected and reconnecting, so every call
made through ``RedisStore.call`` gets its own deadline and its latency and failures measured
per operation. Callers decide what a failure means (fall back, spool, degrade).

The primary is the URL's server, or in Sentinel mode the one the Sentinels name
(``agentd.redissentinel``), reached over TLS for ``rediss://`` (``agentd.redistls``). Each
connection reports the address it reached to ``primary`` (``agentd.redisprimary``); one that
reaches a new primary closes those to the old one. A ``READONLY`` or ``MASTERDOWN`` reply
means the server agentd writes to has become a replica: the primary is changing. That call
fails like any other, so its caller falls back or spools and replays later, and every
connection is closed to be made again to the primary. Writes that must survive a failover
are confirmed on a replica with ``confirm`` (``agentd.redisconfirm``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit
from weakref import WeakKeyDictionary

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from agentd import metrics
from agentd.config import ConfigError, RedisConfig, parse_host_port
from agentd.deadlines import Deadlines
from agentd.redisconfirm import NotPrimary, ReplicaConfirmer, Witness
from agentd.redisprimary import Address, PrimaryRecord
from agentd.redisscripts import Scripts, leaner
from agentd.redissentinel import SentinelPrimary
from agentd.redistls import RedisTLS
from agentd.secrets import SecretError, resolve_secret

T = TypeVar("T")

_log = Logger()

# Each operation's children, bound at first use: labels() is a locked lookup, and every
# prompt makes calls.
_LATENCY = functools.cache(metrics.REDIS_LATENCY.labels)
_ERRORS = functools.cache(metrics.REDIS_ERRORS.labels)
# Replies from a server that is no longer the primary.
_REPLICA_REPLIES = ("READONLY", "MASTERDOWN")
# In Sentinel mode a lost connection is retried at once, then within this: every attempt asks
# the Sentinels first, and the sooner one follows a failover, the sooner agentd writes again.
SENTINEL_RECONNECT_MAX_SECONDS = 0.5


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
    tls: bool = False


def parse_redis_url(url: str, sentinel: bool = False) -> RedisTarget:
    """``redis[s]://[user:password@]host[:port][/db]`` or ``unix:///path/redis.sock[?db=N]``.

    With ``sentinel``, the URL names no host (``redis[s]://[user:password@]/db``, or nothing):
    Sentinel does.
    """
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if sentinel and not url:
        return RedisTarget()
    if parts.scheme == "unix" and not sentinel:
        if not parts.path:
            raise RedisURLError("unix:// URL needs a socket path")
        db_values = parse_qs(parts.query).get("db", ["0"])
        return RedisTarget(
            unix_path=parts.path, db=_db(db_values[0]), username=username, password=password
        )
    if parts.scheme not in ("redis", "rediss"):
        raise RedisURLError(
            "must start with redis:// or rediss://"
            if sentinel
            else "must start with redis://, rediss:// or unix://"
        )
    path = parts.path.strip("/")
    tls = parts.scheme == "rediss"
    if sentinel:
        if parts.netloc.rpartition("@")[2]:
            raise RedisURLError("with sentinels, name no host: Sentinel finds the primary")
        return RedisTarget(db=_db(path or "0"), username=username, password=password, tls=tls)
    if not parts.hostname:
        raise RedisURLError(f"{parts.scheme}:// URL needs a host")
    try:
        port = parts.port or 6379
    except ValueError:
        raise RedisURLError("port must be a number between 1 and 65535") from None
    return RedisTarget(
        host=parts.hostname,
        port=port,
        db=_db(path or "0"),
        username=username,
        password=password,
        tls=tls,
    )


def _db(text: str) -> int:
    if not text.isdigit():
        raise RedisURLError("database must be a number")
    return int(text)


def _replica_reply(failure: Failure) -> bool:
    """Whether ``failure`` says the server is a replica now (it refuses writes)."""
    if failure.check(NotPrimary):
        return True
    return bool(
        failure.check(txredisapi.ResponseError) and str(failure.value).startswith(_REPLICA_REPLIES)
    )


@implementer(IStreamClientEndpoint)
class _PrimaryEndpoint:
    """Connects to wherever ``locate`` says the primary is, and reports what it reached."""

    def __init__(
        self,
        locate: Callable[[], Deferred[Address]],
        endpoint: Callable[[Address], IStreamClientEndpoint],
        reached: Callable[[Any, Address], None],
    ) -> None:
        self._locate = locate
        self._endpoint = endpoint
        self._reached = reached

    def connect(self, factory: Any) -> Deferred[Any]:
        def connect(address: Address) -> Deferred[Any]:
            connecting: Deferred[Any] = self._endpoint(address).connect(factory)
            return connecting.addCallback(reached, address)

        def reached(protocol: Any, address: Address) -> Any:
            self._reached(protocol, address)
            return protocol

        return self._locate().addCallback(connect)


def _measured(result: T, operation: str, started: float) -> T:
    _LATENCY(operation).observe(time.perf_counter() - started)
    return result


class RedisStore:
    """A lazily connecting, self-reconnecting Redis pool whose every call has a timeout.

    ``tls`` secures every connection; with ``sentinel``, the primary is the one its Sentinels
    name. ``confirm_timeout`` and ``replica_grace`` are ``ReplicaConfirmer``'s ``wait`` and
    ``grace``.
    """

    def __init__(
        self,
        url: str,
        clock: IReactorTime,
        timeout: float = 0.1,
        poolsize: int = 4,
        *,
        tls: RedisTLS | None = None,
        sentinel: SentinelPrimary | None = None,
        confirm_timeout: float = 0.1,
        replica_grace: float = 300.0,
    ) -> None:
        target = parse_redis_url(url, sentinel=sentinel is not None)
        self.timeout = timeout
        self._clock = clock
        self._deadlines = Deadlines(clock)
        self._target = target
        self._tls = tls
        self._sentinel = sentinel
        self._connect_timeout = max(timeout * 10, 1.0)
        # Bounds the ROLE check of a new connection to a server that hangs; longer than any
        # call's own timeout, so that it never cuts one short.
        self._reply_timeout = max(timeout * 10, 3.0, confirm_timeout + 1.0)
        self.primary = PrimaryRecord(
            f"sentinel {sentinel.master_name}" if sentinel is not None else "standalone"
        )
        self._addresses: WeakKeyDictionary[Any, Address] = WeakKeyDictionary()
        self._factories: list[Any] = []
        self._replica_logged = False
        pool = self._pool(poolsize)
        self.connection = pool.handler
        self._scripts = Scripts(pool)
        # WAIT blocks the connection it is sent on: confirmations get one of their own.
        self._confirm_factory = self._pool(1)
        self._confirmer = ReplicaConfirmer(
            self._confirm_connection,
            clock,
            timeout=timeout,
            wait=confirm_timeout,
            grace=replica_grace,
            # Only Sentinel changes the primary between a write and its confirmation.
            verify=sentinel is not None,
            failed=self._confirm_failed,
        )
        if sentinel is not None:
            sentinel.observe_switches(self._switched)

    @classmethod
    def from_config(
        cls,
        config: RedisConfig,
        clock: IReactorTime,
        timeout: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> RedisStore:
        """The store ``[redis]`` describes; ``ConfigError`` names the key at fault.

        With TLS, one server is asked now (the URL's, or a Sentinel): a certificate that does
        not verify stops agentd here rather than leave it retrying forever.
        """
        timeout = config.timeout_ms / 1000 if timeout is None else timeout
        connect_timeout = max(timeout * 10, 1.0)
        try:
            target = parse_redis_url(config.url, sentinel=bool(config.sentinels))
        except RedisURLError as e:
            raise ConfigError("[redis] url", str(e)) from None
        tls = RedisTLS.from_config(config) if target.tls else None
        sentinel = None
        if config.sentinels:
            password = None
            if config.sentinel_password:
                try:
                    password = resolve_secret(config.sentinel_password, environ)
                except SecretError as e:
                    raise ConfigError("[redis] sentinel_password", str(e)) from None
            addresses = [parse_host_port(s) for s in config.sentinels]
            sentinels = [address for address in addresses if address is not None]
            if tls is not None:
                tls.check_first(sentinels, connect_timeout, "[redis] sentinels")
            sentinel = SentinelPrimary(
                sentinels,
                config.master_name,
                endpoint=lambda host, port: _tcp_endpoint(host, port, tls, connect_timeout),
                password=password,
                clock=clock,
                timeout=connect_timeout,
            )
        elif tls is not None:
            tls.check_first([(target.host, target.port)], connect_timeout, "[redis] url")
        return cls(
            config.url,
            clock,
            timeout,
            tls=tls,
            sentinel=sentinel,
            confirm_timeout=config.confirm_timeout_ms / 1000,
            replica_grace=config.replica_grace_seconds,
        )

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
        self._deadlines.add(d, self.timeout if timeout is None else timeout)
        d.addCallbacks(
            _measured, self._failed, callbackArgs=(operation, started), errbackArgs=(operation,)
        )
        return d

    def _failed(self, failure: Failure, operation: str) -> Failure:
        _ERRORS(operation).inc()
        if _replica_reply(failure):
            self._primary_changing(failure)
        return failure

    def eval(
        self,
        operation: str,
        script: str,
        keys: Sequence[str],
        args: Sequence[Any],
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """EVALSHA, falling back to EVAL on NOSCRIPT (which is not an outage)."""
        return self.call(operation, lambda _: self._scripts.run(script, keys, args), timeout)

    def ping(self, timeout: float | None = None) -> Deferred[Any]:
        return self.call("ping", lambda c: c.ping(), timeout)

    def confirm(self, witness: Witness) -> Deferred[bool]:
        """True once a replica has the write ``witness`` shows, or when the primary has no
        replica to wait for; False when none confirmed it in time. Never fails."""
        return self._confirmer.confirm(witness)

    def confirm_all(self, witnesses: Sequence[Witness]) -> Deferred[list[bool]]:
        """``confirm`` for each witness, in one round."""
        return self._confirmer.confirm_all(witnesses)

    def disconnect(self) -> Deferred[None]:
        closing = [factory.disconnect() for factory in self._factories]
        if self._sentinel is not None:
            closing.append(self._sentinel.disconnect())
        done = gatherResults(closing, consumeErrors=True)
        return done.addCallback(lambda _: None)

    # Connections

    def _pool(self, size: int) -> Any:
        t = self._target
        common: dict[str, Any] = {
            "isLazy": True,
            "password": t.password,
            "username": t.username,
            "convertNumbers": False,
        }
        if self._sentinel is not None:
            # Its protocol closes a new connection whose ROLE is not master.
            factory = txredisapi.SentinelConnectionFactory(
                sentinel_manager=None,
                service_name=self._sentinel.master_name,
                is_master=True,
                uuid=None,
                dbid=t.db,
                poolsize=size,
                replyTimeout=self._reply_timeout,
                **common,
            )
            factory.maxDelay = SENTINEL_RECONNECT_MAX_SECONDS
        else:
            handler = (
                txredisapi.UnixConnectionHandler if t.unix_path else txredisapi.ConnectionHandler
            )
            name = t.unix_path or f"{t.host}:{t.port}"
            factory = txredisapi.RedisFactory(name, t.db, size, handler=handler, **common)
        factory.protocol = leaner(factory.protocol)
        # Nobody waits for the whole pool of a lazy factory; txredisapi logs its failures.
        factory.deferred.addErrback(lambda _: None)
        factory.startConnecting(_PrimaryEndpoint(self._locate, self._endpoint, self._reached))
        self._factories.append(factory)
        return factory

    def _locate(self) -> Deferred[Address]:
        if self._sentinel is not None:
            return self._sentinel.discover()
        t = self._target
        return succeed(Address(t.unix_path) if t.unix_path else Address(t.host, t.port))

    def _endpoint(self, address: Address) -> IStreamClientEndpoint:
        if not address.port:
            endpoint: IStreamClientEndpoint = UNIXClientEndpoint(
                reactor, address.host, timeout=self._connect_timeout
            )
            return endpoint
        return _tcp_endpoint(address.host, address.port, self._tls, self._connect_timeout)

    def _reached(self, protocol: Any, address: Address) -> None:
        # Keyed by transport: the reconnecting service hands out a proxy of the protocol.
        self._addresses[protocol.transport] = address
        protocol.whenConnected().addCallback(lambda _: self._usable(address))

    def _usable(self, address: Address) -> None:
        changed = address != self.primary.address
        self._replica_logged = False
        self.primary.connected(address)
        if changed:
            self._close_connections(keep=address)

    def _switched(self, address: Address) -> None:
        """Sentinel names ``address`` the primary: leave any other, even one that hangs."""
        if self.primary.address is not None and address != self.primary.address:
            self._close_connections(keep=address)

    def _primary_changing(self, failure: Failure) -> None:
        if not self._replica_logged:
            self._replica_logged = True
            _log.warn(
                "Redis at {address} is not the primary ({reply}): the primary is changing; "
                "reconnecting",
                address=str(self.primary.address),
                reply=str(failure.value)[:80],
            )
        self._close_connections(keep=None)

    def _close_connections(self, keep: Address | None) -> None:
        for factory in self._factories:
            for connection in list(factory.pool):
                if self._addresses.get(connection.transport) != keep:
                    connection.transport.abortConnection()

    def _confirm_connection(self) -> Deferred[tuple[Any, Address | None]]:
        d: Deferred[Any] = self._confirm_factory.getConnection(peek=True)
        return d.addCallback(
            lambda connection: (connection, self._addresses.get(connection.transport))
        )

    def _confirm_failed(self, failure: Failure) -> None:
        if _replica_reply(failure):
            self._primary_changing(failure)


def _tcp_endpoint(
    host: str, port: int, tls: RedisTLS | None, timeout: float
) -> IStreamClientEndpoint:
    if tls is not None:
        return tls.endpoint(reactor, host, port, timeout)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    return endpoint
