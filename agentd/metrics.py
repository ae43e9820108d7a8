"""Every Prometheus metric agentd exports, defined once, in agentd's own registry.

Labels stay low-cardinality: never user, project, session or query ids. The ``agent`` label
only ever takes a configured agent name.

The metrics counted for every prompt or message are ``agentd.tally``'s: plain numbers, counted
on the reactor's thread only, and exported as prometheus_client's own would be.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from agentd import tally

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# The original plan's three, with its names, labels and buckets.
ACTIVE_CONNECTIONS = Gauge(
    "agent_active_connections",
    "Number of active agent connections (attached WebSockets)",
    ["agent"],
    registry=REGISTRY,
)
QUERY_DURATION = tally.Histogram(
    "agent_query_duration_seconds",
    "Time from an accepted prompt to the agent's done or error",
    ["agent"],
    buckets=(1, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
ERRORS = Counter(
    "agent_errors_total",
    "Errors sent to clients, by error code",
    ["agent", "error_type"],
    registry=REGISTRY,
)

# Queries.
QUERIES = tally.Counter(
    "agentd_queries_total",
    "Finished queries by outcome (done, aborted, error, exited)",
    ["agent", "outcome"],
    registry=REGISTRY,
)
QUERIES_IN_FLIGHT = tally.Gauge(
    "agentd_queries_in_flight",
    "Queries accepted and not yet finished",
    ["agent"],
    registry=REGISTRY,
)
FIRST_DELTA = tally.Histogram(
    "agentd_time_to_first_delta_seconds",
    "Time from an accepted prompt to the agent's first output",
    ["agent"],
    buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)

# Sessions and reconnection.
SESSIONS = Gauge("agentd_sessions", "Live sessions by state", ["state"], registry=REGISTRY)
SESSION_EVENTS = Counter(
    "agentd_session_events_total",
    "Session lifecycle events "
    "(created, detached, resumed, expired, superseded, ended, reattached, refused)",
    ["event"],
    registry=REGISTRY,
)
REPLAY_OVERFLOWS = Counter(
    "agentd_replay_overflows_total",
    "Resumes that could not replay everything the client missed",
    registry=REGISTRY,
)
AGENT_PROCESSES = Counter(
    "agentd_agent_processes_total",
    "Agent processes started and how they ended",
    ["agent", "event"],
    registry=REGISTRY,
)
AGENT_BAD_LINES = Counter(
    "agentd_agent_bad_lines_total",
    "Agent stdout lines that were not JSON objects (logged, not forwarded)",
    ["agent"],
    registry=REGISTRY,
)
HANDSHAKES = Counter(
    "agentd_handshakes_total",
    "WebSocket upgrade attempts by HTTP status answered",
    ["status"],
    registry=REGISTRY,
)

# The HTTP edge: deadlines, connection caps, accept failures.
UNAUTHENTICATED_CONNECTIONS = Gauge(
    "agentd_unauthenticated_connections",
    "HTTP connections that are not (yet) an authenticated WebSocket",
    registry=REGISTRY,
)
CONNECTIONS_LIMITED = Counter(
    "agentd_connections_limited_total",
    "Connections a cap on unauthenticated connections closed, by limit (total, per_address) "
    "and action (evicted: a waiting connection made room; refused: the new one was closed)",
    ["limit", "action"],
    registry=REGISTRY,
)
REQUEST_TIMEOUTS = Counter(
    "agentd_request_timeouts_total",
    "Connections closed because a request's head or body was not complete in time",
    ["phase"],
    registry=REGISTRY,
)
ACCEPT_ERRORS = Counter(
    "agentd_accept_errors_total",
    "Failed accepts that paused listening, by error (EMFILE, ENFILE, ENOBUFS, ENOMEM)",
    ["error"],
    registry=REGISTRY,
)

# Relay.
MESSAGES = tally.Counter(
    "agentd_messages_total",
    "Messages relayed, by direction (to_agent, to_client)",
    ["direction"],
    registry=REGISTRY,
)
BYTES = tally.Counter(
    "agentd_bytes_total", "Bytes relayed, by direction", ["direction"], registry=REGISTRY
)
FLOW_PAUSES = Counter(
    "agentd_flow_pauses_total",
    "Times a slow client paused an agent's output",
    registry=REGISTRY,
)

# SSH.
SSH_CONNECT_ATTEMPTS = Counter(
    "agentd_ssh_connect_attempts_total", "SSH connection attempts to VMs", registry=REGISTRY
)
SSH_CONNECT_FAILURES = Counter(
    "agentd_ssh_connect_failures_total",
    "Failed SSH connection attempts by reason (refused, timeout, unreachable, lost, "
    "auth, host_key, other)",
    ["reason"],
    registry=REGISTRY,
)
SSH_CONNECT_SECONDS = Histogram(
    "agentd_ssh_connect_seconds",
    "Time to establish an authenticated SSH connection",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
SSH_CONNECTIONS = Gauge("agentd_ssh_connections", "Live SSH connections to VMs", registry=REGISTRY)
SSH_CHANNELS = Gauge(
    "agentd_ssh_channels",
    "Open SSH channels (one per attached session: an exec or a holder's socket)",
    registry=REGISTRY,
)
ATTACHES = Counter(
    "agentd_attaches_total",
    "Attaches to session holders, by how they were made: at the holder's socket, or"
    " through the attach command (starting a holder, serving a lost one's journal, or a VM"
    " that refuses socket channels)",
    ["via"],
    registry=REGISTRY,
)

# Rate limiting.
RATELIMIT_DECISIONS = tally.Counter(
    "agentd_ratelimit_decisions_total",
    "Rate-limit decisions by policy (prompts, connections, sessions) and result "
    "(allowed, rejected)",
    ["policy", "result"],
    registry=REGISTRY,
)
# Redis availability (agentd.redishealth), one state for every fallback. Named for the limiter,
# whose in-process limits are what operators watch; the dashboard and alerts query this name.
REDIS_DEGRADED = Gauge(
    "agentd_ratelimit_degraded",
    "1 while Redis fails: rate limits are in process, usage is spooled, budgets are not checked",
    registry=REGISTRY,
)

# Redis.
REDIS_ERRORS = Counter(
    "agentd_redis_errors_total",
    "Redis calls that failed or timed out, by operation",
    ["operation"],
    registry=REGISTRY,
)
REDIS_LATENCY = tally.Histogram(
    "agentd_redis_latency_seconds",
    "Redis call latency by operation",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
    registry=REGISTRY,
)
# The address is one of the few servers that are ever primary: a low, bounded cardinality.
REDIS_PRIMARY = Gauge(
    "agentd_redis_primary",
    "1 for the Redis primary agentd writes to, by address (host:port)",
    ["address"],
    registry=REGISTRY,
)
REDIS_PRIMARY_CHANGED = Gauge(
    "agentd_redis_primary_changed_timestamp_seconds",
    "When agentd first reached its current Redis primary (UNIX time)",
    registry=REGISTRY,
)
REPLICA_CONFIRMATIONS = tally.Counter(
    "agentd_redis_replica_confirmations_total",
    "Writes (usage, stored keys) a replica confirmed, did not confirm in time, or that had "
    "no replica to wait for (confirmed, unconfirmed, no_replica)",
    ["result"],
    registry=REGISTRY,
)

# Usage and billing.
USAGE_EVENTS = tally.Counter(
    "agentd_usage_events_total",
    "Usage events by result (recorded, duplicate, spooled, unconfirmed, replayed, failed)",
    ["result"],
    registry=REGISTRY,
)
USAGE_SPOOL_DEPTH = Gauge(
    "agentd_usage_spool_depth",
    "Usage events waiting in the local spool for Redis",
    registry=REGISTRY,
)
TOKENS = tally.Counter(
    "agentd_tokens_total",
    "Tokens used, by agent and type (input, output, cache_read, cache_write)",
    ["agent", "type"],
    registry=REGISTRY,
)
COST = tally.Counter("agentd_cost_usd_total", "Cost in USD, by agent", ["agent"], registry=REGISTRY)
BUDGET_REJECTIONS = Counter(
    "agentd_budget_rejections_total",
    "Prompts refused because a monthly budget was reached, by scope (user, project)",
    ["scope"],
    registry=REGISTRY,
)
BUDGET_SOFT_WARNINGS = Counter(
    "agentd_budget_soft_warnings_total",
    "Times a user or project crossed the soft budget threshold in a month",
    ["scope"],
    registry=REGISTRY,
)

# Process state.
DRAINING = Gauge("agentd_draining", "1 while agentd is shutting down gracefully", registry=REGISTRY)


def initialize(agents: tuple[str, ...], error_codes: tuple[str, ...]) -> None:
    """Create every known label combination at zero, so the first event is an increase.

    Prometheus' ``increase()`` and ``rate()`` cannot see a series' first sample as a change;
    a counter that appears at 1 would hide the event that created it from the alerts.
    """
    for agent in agents:
        ACTIVE_CONNECTIONS.labels(agent)
        QUERY_DURATION.labels(agent)
        QUERIES_IN_FLIGHT.labels(agent)
        FIRST_DELTA.labels(agent)
        AGENT_BAD_LINES.labels(agent)
        COST.labels(agent)
        for code in error_codes:
            ERRORS.labels(agent, code)
        for outcome in ("done", "aborted", "error", "exited"):
            QUERIES.labels(agent, outcome)
        for event in ("started", "ended", "failed"):
            AGENT_PROCESSES.labels(agent, event)
        for kind in ("input", "output", "cache_read", "cache_write"):
            TOKENS.labels(agent, kind)
    for state in ("attached", "detached"):
        SESSIONS.labels(state)
    for via in ("socket", "command"):
        ATTACHES.labels(via)
    for event in ("created", "detached", "resumed", "expired", "superseded", "ended"):
        SESSION_EVENTS.labels(event)
    for limit in ("total", "per_address"):
        for action in ("evicted", "refused"):
            CONNECTIONS_LIMITED.labels(limit, action)
    for phase in ("head", "body"):
        REQUEST_TIMEOUTS.labels(phase)
    for error in ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"):
        ACCEPT_ERRORS.labels(error)
    for direction in ("to_agent", "to_client"):
        MESSAGES.labels(direction)
        BYTES.labels(direction)
    for reason in ("refused", "timeout", "unreachable", "lost", "auth", "host_key", "other"):
        SSH_CONNECT_FAILURES.labels(reason)
    for policy in ("prompts", "connections", "sessions"):
        for result in ("allowed", "rejected"):
            RATELIMIT_DECISIONS.labels(policy, result)
    for result in ("recorded", "duplicate", "spooled", "unconfirmed", "replayed", "failed"):
        USAGE_EVENTS.labels(result)
    for result in ("confirmed", "unconfirmed", "no_replica"):
        REPLICA_CONFIRMATIONS.labels(result)
    for scope in ("user", "project"):
        BUDGET_REJECTIONS.labels(scope)
        BUDGET_SOFT_WARNINGS.labels(scope)
