"""``twistd agentd``: command-line options and the wiring of every part into one service."""

from __future__ import annotations

import random
import secrets
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from agentd import __version__, metrics
from agentd.auth import Authenticator
from agentd.config import Config, ConfigError, load
from agentd.edge import ConnectionLimits
from agentd.errors import ErrorCode
from agentd.gateway import Admission, AgentRoute, AgentWebSocketFactory
from agentd.health import CheckResult, HealthCheck, HealthResource, redis_check
from agentd.jsonlog import install_json_logging
from agentd.keys.api import KeysResource
from agentd.keys.store import KeyStore
from agentd.listen import BackoffEndpoint, open_file_limit
from agentd.pricing import PriceTable
from agentd.ratelimit import RateLimiter
from agentd.redishealth import RedisHealth
from agentd.redisstore import RedisStore
from agentd.session import SessionRegistry, SessionServices
from agentd.transport import AgentTransport
from agentd.transport.local import LocalTransport
from agentd.transport.ssh.transport import SSHTransport
from agentd.usage.api import UsageResource
from agentd.usage.recorder import UsageRecorder
from agentd.usage.records import UsageEvent
from agentd.web import build_site, metrics_site

_log = Logger()


class Options(usage.Options):
    synopsis = "[--config PATH] [--listen ENDPOINT ...]"
    optParameters = [["config", "c", None, "TOML configuration file (default: embedded defaults)"]]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on a Twisted endpoint string (repeatable; overrides [server] listen)."""
        self["listen"].append(endpoint)

    opt_l = opt_listen


class AgentdService(MultiService):
    """Starts the listeners; on stop, drains sessions before ending agents and usage."""

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        registry: SessionRegistry,
        transport: AgentTransport,
        limiter: RateLimiter,
        usage: UsageRecorder,
        store: RedisStore | None,
        banner: str | None,
        redis_health: RedisHealth | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.clock = clock
        self.registry = registry
        self.transport = transport
        self.limiter = limiter
        self.usage = usage
        self.store = store
        self.banner = banner
        self.redis_health = redis_health
        self.draining = False
        self.handle_signals = False
        self._drain_cut: Callable[[], None] | None = None

    def startService(self) -> None:
        self.usage.start()
        super().startService()
        if self.handle_signals:
            # twistd's own handler makes the process end by the signal (status 143); a
            # graceful drain that completes is a clean exit, status 0. The reactor installs
            # its handlers as it starts running, so ours goes in after that.
            self.clock.callWhenRunning(signal.signal, signal.SIGTERM, self._sigterm)  # type: ignore[attr-defined]
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
        if self.banner:
            # Development mode only: the freshly generated token is meant to be copied.
            # Straight to the terminal: twistd routes sys.stderr into the (redacting) log.
            print(self.banner, file=sys.__stderr__, flush=True)

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        # Draining: /health/ready answers 503 and new WebSocket upgrades are refused with 503
        # while the listeners stay open, so load balancers see why; clients reconnect
        # elsewhere on 1001 while running queries finish.
        self.draining = True
        metrics.DRAINING.set(1)
        _log.info("draining: refusing new connections; closing clients with 1001")
        self.registry.close_all(1001, "server going away")
        yield self._drain(self.config.server.drain_seconds)
        yield self.registry.end_all().addTimeout(10, self.clock).addErrback(lambda _: None)
        yield self.usage.stop()
        self.limiter.stop()
        yield self.transport.stop()
        yield defer.maybeDeferred(super().stopService)
        if self.redis_health is not None:
            self.redis_health.stop()
        if self.store is not None:
            yield self.store.disconnect().addErrback(lambda _: None)
        _log.info("agentd stopped")

    def _drain(self, seconds: float) -> Deferred[None]:
        """Wait until no query is in flight, the drain time is over, or a second SIGTERM."""
        done: Deferred[None] = Deferred()
        deadline = self.clock.seconds() + seconds

        def check() -> None:
            if done.called:
                return
            if self.registry.busy() == 0 or self.clock.seconds() >= deadline:
                poll.stop()
                done.callback(None)

        poll = LoopingCall(check)
        poll.clock = self.clock

        def cut() -> None:
            if not done.called:
                poll.stop()
                done.callback(None)

        self._drain_cut = cut
        poll.start(0.1, now=True)
        return done

    def _sigterm(self, signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        if not self.draining:
            reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]
        elif self._drain_cut is not None:
            _log.info("second SIGTERM: ending the drain now")
            reactor.callFromThread(self._drain_cut)  # type: ignore[attr-defined]

    def ready(self) -> bool:
        return bool(self.running) and not self.draining


def _transport(config: Config, reactor: Any) -> AgentTransport:
    kind = LocalTransport if config.vms.transport == "local" else SSHTransport
    return kind.from_config(config, reactor)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """The service twistd runs: JSON logging at the root, agentd below it."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        config = load(options["config"])
        if options["listen"]:
            config = config.with_listen(tuple(options["listen"]))
        root = install_json_logging(config.log)
        agentd = build(config, reactor)
    except ConfigError as e:
        raise SystemExit(f"agentd: configuration error: {e}") from None
    agentd.handle_signals = True
    agentd.setServiceParent(root)
    return root


def build(config: Config, reactor: Any) -> AgentdService:
    """Everything agentd runs, wired from one validated Config."""
    metrics.initialize(config.agents.names, tuple(code.value for code in ErrorCode))
    dev_secret, banner = "", None
    if not config.auth.jwt_secret and not config.auth.jwt_public_key_file:
        if config.source != "embedded defaults":
            raise ConfigError(
                "[auth] jwt_secret", "required (or jwt_public_key_file, or AGENTD_JWT_SECRET)"
            )
        dev_secret = secrets.token_urlsafe(32)
    authenticator = Authenticator.from_config(config.auth, dev_secret=dev_secret)

    store, redis_health = None, None
    if config.redis.url:
        store = RedisStore(config.redis.url, reactor, timeout=config.redis.timeout_ms / 1000)
        # One state for every user of this Redis; jittered, so that instances sharing it do
        # not all return (and replay their spools) at the same moment.
        redis_health = RedisHealth.of_store(store, reactor, rand=random.random)
    prices = (
        PriceTable.load(config.usage.prices_file)
        if config.usage.prices_file
        else (PriceTable.empty())
    )
    limiter = RateLimiter.from_config(config.ratelimit, store, reactor, redis_health)
    usage_recorder = UsageRecorder.from_config(
        config.usage, store, reactor, prices, health=redis_health
    )
    keystore = KeyStore.from_config(config.keys, store, reactor)
    transport = _transport(config, reactor)

    services = SessionServices(
        transport=transport,
        clock=reactor,
        grace_seconds=config.sessions.grace_seconds,
        replay_messages=config.sessions.replay_messages,
        replay_bytes=config.sessions.replay_bytes,
        limiter=limiter,
        usage=usage_recorder,
        keys=keystore,
        usage_event=UsageEvent.from_agent_usage,
    )
    registry = SessionRegistry(services)
    service = AgentdService(
        config, reactor, registry, transport, limiter, usage_recorder, store, banner, redis_health
    )
    factory = AgentWebSocketFactory(
        registry, config.server.max_message_bytes, config.server.auto_ping_seconds
    )
    admission = Admission(
        authenticator=authenticator,
        agents=frozenset(config.agents.names),
        allowed_origins=config.server.allowed_origins,
        registry=registry,
        max_sessions_per_user=config.ratelimit.max_sessions_per_user,
        limiter=limiter,
        draining=lambda: service.draining,
    )
    health = HealthResource(
        checks=_health_checks(redis_health, usage_recorder, limiter, transport),
        clock=reactor,
        version=__version__,
        started_at=time.time(),
        ready=service.ready,
    )
    # One budget for every listener: the caps protect this process's file descriptors.
    limits = ConnectionLimits.from_config(config.server, reactor)
    separate_metrics = bool(config.server.metrics_listen)
    site = build_site(
        agent_route=AgentRoute(admission, factory),
        health=health,
        registry=None if separate_metrics else metrics.REGISTRY,
        api={
            b"usage": UsageResource(usage_recorder, authenticator, config.server.allowed_origins),
            b"keys": KeysResource(keystore, authenticator, config.server.allowed_origins),
        },
        demo_page=config.server.demo_page,
        limits=limits,
    )
    for endpoint in config.server.listen:
        listener = StreamServerEndpointService(
            BackoffEndpoint(serverFromString(reactor, endpoint), reactor), site
        )
        listener.setServiceParent(service)
    for endpoint in config.server.metrics_listen:
        listener = StreamServerEndpointService(
            BackoffEndpoint(serverFromString(reactor, endpoint), reactor),
            metrics_site(metrics.REGISTRY, limits),
        )
        listener.setServiceParent(service)
    if dev_secret:
        token = authenticator.mint("dev", ["*"], ttl=7 * 24 * 3600)
        url = _dev_url(config.server.listen[0])
        service.banner = (
            "agentd is running in development mode (embedded defaults, throwaway JWT secret).\n"
            f"  demo console: {url}/?token={token}&project=demo&agent=echo\n"
            f"  WebSocket:    {url.replace('http', 'ws', 1)}/projects/demo/agent/echo"
            f"?token={token}\n"
            f"  token:        {token}"
        )
    return service


def _dev_url(endpoint: str) -> str:
    parts = endpoint.split(":")
    port = parts[1] if len(parts) > 1 else "8080"
    host = "127.0.0.1"
    for part in parts[2:]:
        if part.startswith("interface="):
            host = part.split("=", 1)[1] or host
    scheme = "https" if parts[0] == "ssl" else "http"
    return f"{scheme}://{host}:{port}"


def _health_checks(
    redis_health: RedisHealth | None,
    usage_recorder: UsageRecorder,
    limiter: RateLimiter,
    transport: AgentTransport,
) -> list[HealthCheck]:
    """Redis, the usage spool, the limiter and the SSH side; none alone makes agentd unhealthy:
    each has a fallback, so its failure degrades service rather than stopping it."""
    checks = []
    if redis_health is not None:
        checks.append(redis_check(redis_health))

    def usage_probe() -> CheckResult:
        detail = usage_recorder.health()
        return CheckResult("ok" if detail.get("ok") else "degraded", detail)

    def limiter_probe() -> CheckResult:
        degraded = limiter.degraded
        return CheckResult("degraded" if degraded else "ok", {"fallback": degraded})

    checks.append(HealthCheck("usage", usage_probe))
    checks.append(HealthCheck("ratelimit", limiter_probe))
    checks.extend(transport.health_checks())
    return checks
