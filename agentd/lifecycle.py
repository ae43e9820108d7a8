"""agentd's lifetime: start the listeners, and on stop or SIGTERM let go within seconds.

Stopping drains: /health/ready answers 503 and new WebSocket upgrades are refused with 503
while the listeners stay open, and clients are closed with 1012 ("restarting") so they
resume at once on another instance. Sessions live in their holders on the VMs, so nothing
has to finish here: agentd lets go of every attach (waiting at most ``[server]
drain_seconds`` for them to exit), then the usage recorder, the limiter, the transport and
the listeners stop. The agents run on.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any, Protocol

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from agentd import __version__, metrics
from agentd.config import Config
from agentd.listen import open_file_limit
from agentd.ratelimit import RateLimiter
from agentd.redishealth import RedisHealth
from agentd.redisstore import RedisStore
from agentd.session.registry import SessionRegistry
from agentd.transport import AgentTransport
from agentd.usage.recorder import UsageRecorder

_log = Logger()

# The close code that tells a client to resume at once, elsewhere (RFC 6455's registry).
RESTARTING = 1012


class SignalReactor(Protocol):
    """The part of the reactor SIGTERM handling uses: a signal handler runs between
    reactor iterations, so it hands its work to the reactor thread."""

    def callWhenRunning(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None: ...

    def stop(self) -> None: ...


class AgentdService(MultiService):
    """Starts the listeners; on stop, drains sessions before ending agents and usage."""

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        reactor: SignalReactor,
        registry: SessionRegistry,
        transport: AgentTransport,
        limiter: RateLimiter,
        usage: UsageRecorder,
        store: RedisStore | None,
        redis_health: RedisHealth | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self.config = config
        self.clock = clock
        self.reactor = reactor
        self.registry = registry
        self.transport = transport
        self.limiter = limiter
        self.usage = usage
        self.store = store
        self.redis_health = redis_health
        self.draining = False
        self.handle_signals = False

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        except CannotListenError as e:
            # One line an operator can act on, not a traceback of the reactor's internals.
            where = f"{e.interface or '*'}:{e.port}"
            raise SystemExit(f"agentd: cannot listen on {where}: {e.socketError}") from None

    def startService(self) -> None:
        self.usage.start()
        super().startService()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        if self.handle_signals:
            # twistd's own handler makes the process end by the signal (status 143); a
            # graceful drain that completes is a clean exit, status 0. The reactor installs
            # its handlers as it starts running, so ours goes in after that.
            self.reactor.callWhenRunning(signal.signal, signal.SIGTERM, self.sigterm)
        _log.info(
            "agentd {version} started ({source}); transport {transport}",
            version=__version__,
            source=self.config.source,
            transport=self.config.vms.transport,
        )
        files, cap = open_file_limit(), self.config.server.max_unauthenticated_connections
        if files < 2 * cap:
            _log.warn(
                "open file limit {files} leaves little room beside [server] "
                "max_unauthenticated_connections = {cap}; raise LimitNOFILE "
                "(docs/operations.md)",
                files=files,
                cap=cap,
            )

    @defer.inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        # Draining: /health/ready answers 503 and new WebSocket upgrades are refused with 503
        # while the listeners stay open, so load balancers see why. Clients are closed with
        # 1012 and resume at once on another instance; sessions and their agents live on in
        # their holders, so there is nothing to wait for but the attaches letting go.
        self.draining = True
        metrics.DRAINING.set(1)
        _log.info("draining: refusing new connections; closing clients with 1012")
        self.registry.close_all(RESTARTING, "server restarting")
        yield (
            self.registry.leave_all()
            .addTimeout(self.config.server.drain_seconds, self.clock)
            .addErrback(lambda _: None)
        )
        yield self.usage.stop()
        self.limiter.stop()
        yield self.transport.stop()
        yield defer.maybeDeferred(super().stopService)
        if self.redis_health is not None:
            self.redis_health.stop()
        if self.store is not None:
            yield self.store.disconnect().addErrback(lambda _: None)
        _log.info("agentd stopped")

    def sigterm(self, signum: int, frame: FrameType | None) -> None:
        """The SIGTERM handler: the first stops the reactor, which stops this service."""
        if not self.draining:
            self.reactor.callFromThread(self.reactor.stop)

    def ready(self) -> bool:
        return bool(self.running) and not self.draining
