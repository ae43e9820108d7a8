"""Finding the Redis primary through Sentinel, and hearing at once when Sentinel switches it.

Before every connection to the primary, ``discover`` asks all the Sentinels (``SENTINEL
MASTERS``) and takes the first that reports the master up; it fails as soon as every Sentinel
has answered without one, so that a connection attempt during a failover is retried shortly
instead of waiting. Each Sentinel also has a subscription to ``+switch-master``: a primary
that hangs rather than dies keeps its connections open, and only that message says to leave
it. A subscription that (re)connects asks again, in case a switch happened meanwhile.

txredisapi's ``Sentinel`` class is not used: its connections to the Sentinels share one TLS
context, so each Sentinel's certificate cannot be verified against its own name, and its
primary connections use no TLS at all and look for a new primary only when a connection
drops. What agentd does use of txredisapi's Sentinel support is the protocol that checks
``ROLE`` on every new connection and closes one that does not reach a master, the
reconnection policy of ``SentinelConnectionFactory`` (see ``agentd.redisstore``), and the
parsing of ``SENTINEL MASTERS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from agentd.redisprimary import Address

SWITCH_CHANNEL = "+switch-master"

_log = Logger()


class PrimaryNotFound(Exception):
    """No Sentinel reports the master up: a failover is in progress, or none is reachable."""


class _SwitchListener(txredisapi.SubscriberProtocol):  # type: ignore[misc]  # untyped base
    """A subscription to ``+switch-master`` on one Sentinel."""

    factory: _SwitchFactory

    def connectionMade(self) -> Any:
        self.whenConnected().addCallback(self._listen)
        return super().connectionMade()

    def _listen(self, _: object) -> None:
        self.subscribe(SWITCH_CHANNEL).addErrback(lambda _: None)  # lost: resubscribed later
        self.factory.subscribed()

    def messageReceived(self, pattern: object, channel: object, message: object) -> None:
        self.factory.announced(str(message))


class _SwitchFactory(txredisapi.SubscriberFactory):  # type: ignore[misc]  # untyped base
    protocol = _SwitchListener

    def __init__(
        self,
        password: str | None,
        announced: Callable[[str], None],
        subscribed: Callable[[], None],
    ) -> None:
        super().__init__(isLazy=True)
        self.password = password
        self.announced = announced
        self.subscribed = subscribed


class SentinelPrimary:
    """The primary of ``master_name`` as its Sentinels see it; see the module doc.

    ``endpoint`` reaches one Sentinel (with TLS when configured); ``timeout`` bounds each
    Sentinel's answer.
    """

    def __init__(
        self,
        sentinels: Sequence[tuple[str, int]],
        master_name: str,
        *,
        endpoint: Callable[[str, int], IStreamClientEndpoint],
        password: str | None,
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        self.master_name = master_name
        self.sentinels = tuple(sentinels)
        self._clock = clock
        self._timeout = timeout
        self._observers: list[Callable[[Address], None]] = []
        self._last_switch: Address | None = None
        self._factories: list[Any] = []
        self._queries: list[Any] = []
        for host, port in sentinels:
            query = txredisapi.RedisFactory(
                f"sentinel {host}:{port}",
                None,
                1,
                isLazy=True,
                password=password,
                convertNumbers=False,
            )
            listener = _SwitchFactory(password, self._announced, self._resync)
            for factory in (query, listener):
                factory.deferred.addErrback(lambda _: None)  # failures are logged
                factory.startConnecting(endpoint(host, port))
                self._factories.append(factory)
            self._queries.append(query.handler)

    def observe_switches(self, observer: Callable[[Address], None]) -> None:
        """Call ``observer`` with the primary Sentinel switched to, or found after a Sentinel
        connection was (re)made; it may be the primary already in use."""
        self._observers.append(observer)

    def discover(self) -> Deferred[Address]:
        """The address of the master as the first Sentinel reporting it up gives it; fails
        with ``PrimaryNotFound`` once every Sentinel has answered or timed out without one."""
        found: Deferred[Address] = Deferred()
        pending = [len(self._queries)]

        def answered(masters: dict[str, Any]) -> None:
            state = masters.get(self.master_name)
            if state and not found.called and _up(state):
                found.callback(Address(str(state["ip"]), int(state["port"])))

        def settled(_: object) -> None:
            pending[0] -= 1
            if not pending[0] and not found.called:
                found.errback(PrimaryNotFound(f"no Sentinel reports {self.master_name} up"))

        for query in self._queries:
            asked: Deferred[dict[str, Any]] = query.sentinel_masters()
            asked.addTimeout(self._timeout, self._clock)
            asked.addCallback(answered)
            asked.addErrback(lambda _: None)
            asked.addBoth(settled)
        return found

    def disconnect(self) -> Deferred[list[Any]]:
        return gatherResults([f.disconnect() for f in self._factories], consumeErrors=True)

    def _announced(self, message: str) -> None:
        parts = message.split()
        if len(parts) != 5 or parts[0] != self.master_name or not parts[4].isdigit():
            return
        address = Address(parts[3], int(parts[4]))
        if address == self._last_switch:
            return  # every Sentinel announces the same switch
        self._last_switch = address
        _log.info(
            "Sentinel switched {name} from {old} to {new}",
            name=self.master_name,
            old=str(Address(parts[1], int(parts[2]) if parts[2].isdigit() else 0)),
            new=str(address),
        )
        self._tell(address)

    def _resync(self) -> None:
        self.discover().addCallbacks(self._tell, _ignore)

    def _tell(self, address: Address) -> None:
        for observer in tuple(self._observers):
            observer(address)


def _ignore(_: Failure) -> None:
    """A Sentinel that cannot say now: the next connection attempt asks again."""


def _up(state: dict[str, Any]) -> bool:
    return bool(state["is_master"]) and not state["is_sdown"] and not state["is_odown"]
