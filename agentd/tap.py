"""``twistd agentd``: command-line options, and the wiring of every part into one service."""

from __future__ import annotations

import random
import time
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from twisted.web.server import Site

from agentd import __version__, metrics
from agentd.auth import Authenticator
from agentd.config import Config, ConfigError, load
from agentd.devmode import BannerService, banner, dev_secret
from agentd.edge import ConnectionLimits
from agentd.errors import ErrorCode
from agentd.gateway import AgentWebSocketFactory
from agentd.health import HealthReporter, HealthResource, redis_check
from agentd.jsonlog import install_json_logging
from agentd.keys.api import KeysResource
from agentd.keys.store import KeyStore
from agentd.lifecycle import AgentdService
from agentd.listen import BackoffEndpoint
from agentd.pricing import PriceTable
from agentd.ratelimit import RateLimiter
from agentd.redisgate import RedisPromptLimits
from agentd.redishealth import RedisHealth
from agentd.redisstore import RedisStore
from agentd.route import Admission, AgentRoute
from agentd.session.gate import PromptLimits
from agentd.session.registry import SessionRegistry
from agentd.session.services import PromptGate, SessionServices
from agentd.transport import AgentTransport
from agentd.transport.local import LocalTransport
from agentd.transport.ssh.transport import SSHTransport
from agentd.usage.api import UsageResource
from agentd.usage.recorder import UsageRecorder
from agentd.usage.records import UsageEvent
from agentd.web import build_site, metrics_site


class Options(usage.Options):
    synopsis = "[--config PATH] [--listen ENDPOINT ...]"
    optParameters = [["config", "c", None, "TOML configuration file (default: embedded defaults)"]]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on a Twisted endpoint string (repeatable; overrides [server] listen)."""
        self["listen"].append(endpoint)

    opt_l = opt_listen


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
    agentd.setServiceParent(root)  # type: ignore[no-untyped-call]  # unannotated in Twisted
    return root


def build(config: Config, reactor: Any) -> AgentdService:
    """Everything agentd runs, wired from one validated Config."""
    metrics.initialize(config.agents.names, tuple(code.value for code in ErrorCode))
    secret = dev_secret(config)
    authenticator = Authenticator.from_config(config.auth, dev_secret=secret)

    store, redis_health = None, None
    if config.redis.configured:
        store = RedisStore.from_config(config.redis, reactor)
        # One state for every user of this Redis; jittered, so that instances sharing it do
        # not all return (and replay their spools) at the same moment.
        shared = RedisHealth.of_store(store, reactor, rand=random.random)
        # A connection made again, to the primary after a failover perhaps: no need to wait
        # for the probe's backoff to find it.
        store.primary.observe(lambda _: shared.reconnected())
        redis_health = shared
    prices = (
        PriceTable.load(config.usage.prices_file)
        if config.usage.prices_file
        else PriceTable.empty()
    )
    limiter = RateLimiter.from_config(config.ratelimit, store, reactor, redis_health)
    usage_recorder = UsageRecorder.from_config(
        config.usage, store, reactor, prices, health=redis_health
    )
    keystore = KeyStore.from_config(config.keys, store, reactor)
    transport = _transport(config, reactor)
    budgets = usage_recorder.budgets
    gate: PromptGate = PromptLimits(limiter, budgets)
    if store is not None and redis_health is not None:
        # The limiter and the budgets share this Redis: one round trip decides a prompt.
        gate = RedisPromptLimits(store, redis_health, limiter, budgets)

    services = SessionServices(
        transport=transport,
        clock=reactor,
        grace_seconds=config.sessions.grace_seconds,
        replay_messages=config.sessions.replay_messages,
        replay_bytes=config.sessions.replay_bytes,
        gate=gate,
        usage=usage_recorder,
        keys=keystore,
        usage_event=UsageEvent.from_agent_usage,
    )
    registry = SessionRegistry(services)
    service = AgentdService(
        config, reactor, reactor, registry, transport, limiter, usage_recorder, store, redis_health
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
    # Redis, the usage spool, the limiter and the way to the agents: none alone makes agentd
    # unhealthy, as each has a fallback, so its failure degrades service rather than stops it.
    checks = []
    if store is not None and redis_health is not None:
        checks.append(redis_check(redis_health, detail=store.primary.health_detail))
    parts: tuple[HealthReporter, ...] = (usage_recorder, limiter, transport)
    for part in parts:
        checks.extend(part.health_checks())
    health = HealthResource(
        checks=checks,
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
        _listen(reactor, endpoint, site, service)
    for endpoint in config.server.metrics_listen:
        _listen(reactor, endpoint, metrics_site(metrics.REGISTRY, limits), service)
    if secret:
        # Added last, so that it prints once the listeners have started.
        dev = BannerService(banner(authenticator, config.server.listen[0]))
        dev.setServiceParent(service)  # type: ignore[no-untyped-call]  # unannotated in Twisted
    return service


def _listen(reactor: Any, endpoint: str, site: Site, parent: MultiService) -> None:
    # Twisted leaves the endpoint service unannotated.
    listening = BackoffEndpoint(serverFromString(reactor, endpoint), reactor)
    listener = StreamServerEndpointService(listening, site)  # type: ignore[no-untyped-call]
    # An address already in use (or a port it may not bind) stops agentd at startup, as
    # twistd's own strports services do, instead of leaving it running without a listener.
    listener._raiseSynchronously = True
    listener.setServiceParent(parent)  # type: ignore[no-untyped-call]
