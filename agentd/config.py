"""agentd's configuration: a TOML file read into frozen dataclasses; every error names its key.

Every key is optional. Without a file, agentd runs on embedded defaults: in-memory store,
local transport, the ``echo`` agent and a freshly generated development JWT secret.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agentd.keys.source import PROVIDER_ENV
from agentd.secrets import SecretError, check_reference
from agentd.tomltables import TomlError, load_file, read_table

PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")


class ConfigError(TomlError):
    """One line naming the key and the problem."""


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1:backlog=1024",)
    metrics_listen: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_message_bytes: int = 1_048_576
    auto_ping_seconds: float = 20.0
    drain_seconds: float = 5.0
    demo_page: bool = True
    request_head_timeout_seconds: float = 10.0
    request_body_timeout_seconds: float = 30.0
    max_unauthenticated_connections: int = 1024
    max_unauthenticated_per_address: int = 256
    trusted_proxies: tuple[str, ...] = ()
    client_address_header: str = ""


@dataclass(frozen=True)
class AuthConfig:
    jwt_secret: str = field(default="", repr=False)
    jwt_public_key_file: str = ""
    jwt_algorithms: tuple[str, ...] = ()
    max_token_lifetime_seconds: float = 0.0


@dataclass(frozen=True)
class AgentsConfig:
    names: tuple[str, ...] = ("echo",)
    command: str = "agentd-agent {agent}"
    # What agentd runs (on the VM, or here) to reach a session's holder; see agent-cli.md.
    attach_command: str = "agentd-agent attach"
    # Where holders keep their sessions (on the VM, or here): agentd gives the attach this
    # directory and connects to a live holder's socket in it directly. "" is ~/.agentd/sessions
    # of agentd's user locally, and /home/<[vms] user>/.agentd/sessions on a VM.
    sessions_dir: str = ""


@dataclass(frozen=True)
class VmsConfig:
    transport: str = "local"
    host: str = "{project}.vms.internal"
    hosts: Mapping[str, str] = field(default_factory=dict)
    port: int = 2222
    user: str = "coder"
    private_key: str = ""
    known_hosts: str = ""
    forward_env: tuple[str, ...] = ()
    connect_timeout_seconds: float = 10.0
    connect_attempts: int = 3
    connect_backoff_base_seconds: float = 0.5
    connect_backoff_cap_seconds: float = 10.0
    max_channels_per_connection: int = 10


@dataclass(frozen=True)
class SessionsConfig:
    grace_seconds: float = 120.0
    idle_seconds: float = 3600.0
    replay_messages: int = 10_000
    replay_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class RedisConfig:
    url: str = field(default="", repr=False)
    timeout_ms: int = 100
    # Sentinel mode: both set. The url then names no host (Sentinel does), only the scheme,
    # credentials and database of the primary.
    sentinels: tuple[str, ...] = ()
    master_name: str = ""
    sentinel_password: str = field(default="", repr=False)
    # rediss:// only: the CA that signs the servers' certificates (empty: the system's), and
    # the client certificate and key the servers may ask for.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    confirm_timeout_ms: int = 100
    replica_grace_seconds: float = 300.0

    @property
    def configured(self) -> bool:
        """Whether agentd uses Redis at all (otherwise: in-memory stores)."""
        return bool(self.url or self.sentinels)


@dataclass(frozen=True)
class RateLimitConfig:
    prompts_per_minute: int = 60
    window_seconds: float = 60.0
    connections_per_minute: int = 30
    max_sessions_per_user: int = 20


@dataclass(frozen=True)
class UsageConfig:
    retention_days: int = 90
    spool_dir: str = ""
    prices_file: str = ""
    monthly_budget_usd: float = 0.0
    soft_budget_ratio: float = 0.8
    batch_ms: int = 20


@dataclass(frozen=True)
class KeysConfig:
    """Each value is "env:NAME", "file:/absolute/path" or the secret itself (see docs/keys.md)."""

    anthropic: str = field(default="", repr=False)
    openai: str = field(default="", repr=False)
    encryption_keys: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    file: str = "-"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    vms: VmsConfig = field(default_factory=VmsConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "embedded defaults"

    def with_listen(self, listen: tuple[str, ...]) -> Config:
        return dataclasses.replace(self, server=dataclasses.replace(self.server, listen=listen))


# Environment variables that override keys, so secrets need not live in the file.
ENV_OVERRIDES = {
    "AGENTD_JWT_SECRET": ("auth", "jwt_secret"),
    "AGENTD_REDIS_URL": ("redis", "url"),
    "AGENTD_ANTHROPIC_API_KEY": ("keys", "anthropic"),
    "AGENTD_OPENAI_API_KEY": ("keys", "openai"),
}


_SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "source"
}


def _validate(config: Config) -> None:
    s, v = config.server, config.vms
    if not s.listen:
        raise ConfigError("[server] listen", "needs at least one endpoint")
    if not 1024 <= s.max_message_bytes <= 64 * 1024 * 1024:
        raise ConfigError("[server] max_message_bytes", "must be between 1024 and 67108864")
    if s.auto_ping_seconds < 0 or s.drain_seconds < 0:
        raise ConfigError("[server]", "durations must not be negative")
    for key in ("request_head_timeout_seconds", "request_body_timeout_seconds"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"[server] {key}", "must be positive")
    for key in ("max_unauthenticated_connections", "max_unauthenticated_per_address"):
        if getattr(s, key) < 1:
            raise ConfigError(f"[server] {key}", "must be at least 1")
    for proxy in s.trusted_proxies:
        try:
            if proxy != "unix":
                ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                "[server] trusted_proxies", f"{proxy!r} is not an address, a CIDR or unix"
            ) from None
    if s.client_address_header and not re.fullmatch(r"[A-Za-z0-9-]+", s.client_address_header):
        raise ConfigError("[server] client_address_header", "must be a header name")
    if bool(s.trusted_proxies) != bool(s.client_address_header):
        raise ConfigError(
            "[server] client_address_header" if s.trusted_proxies else "[server] trusted_proxies",
            "trusted_proxies and client_address_header go together",
        )
    for origin in s.allowed_origins:
        if not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError("[server] allowed_origins", f"{origin!r} is not scheme://host[:port]")
    if not config.agents.names:
        raise ConfigError("[agents] names", "needs at least one agent")
    for agent in config.agents.names:
        if not AGENT_NAME_RE.fullmatch(agent):
            raise ConfigError("[agents] names", f"{agent!r} is not a valid agent name")
    if "{agent}" not in config.agents.command:
        raise ConfigError("[agents] command", "must contain {agent}")
    try:
        config.agents.command.format(agent="x")
    except (KeyError, IndexError, ValueError):
        raise ConfigError("[agents] command", "may only use the {agent} placeholder") from None
    if not config.agents.attach_command.strip():
        raise ConfigError("[agents] attach_command", "must not be empty")
    if "--sessions-dir" in config.agents.attach_command:
        raise ConfigError("[agents] attach_command", "give the directory as [agents] sessions_dir")
    sessions_dir = config.agents.sessions_dir
    if sessions_dir and (not sessions_dir.startswith("/") or not sessions_dir.isprintable()):
        raise ConfigError("[agents] sessions_dir", "must be an absolute path")
    if v.transport not in ("local", "ssh"):
        raise ConfigError("[vms] transport", 'must be "local" or "ssh"')
    if not 1 <= v.port <= 65535:
        raise ConfigError("[vms] port", "must be between 1 and 65535")
    if v.connect_attempts < 1:
        raise ConfigError("[vms] connect_attempts", "must be at least 1")
    if v.max_channels_per_connection < 1:
        raise ConfigError("[vms] max_channels_per_connection", "must be at least 1")
    try:
        v.host.format(project="x")
    except (KeyError, IndexError, ValueError):
        raise ConfigError("[vms] host", "may only use the {project} placeholder") from None
    for env in v.forward_env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
            raise ConfigError("[vms] forward_env", f"{env!r} is not an environment variable name")
    secret_env = _secret_variables(config)
    for env in v.forward_env:
        if env in secret_env:
            raise ConfigError(
                "[vms] forward_env", f"{env} holds {secret_env[env]}; never forwarded"
            )
    if v.transport == "ssh":
        if not v.private_key:
            raise ConfigError("[vms] private_key", 'required when transport = "ssh"')
        if not v.known_hosts:
            raise ConfigError("[vms] known_hosts", 'required when transport = "ssh"')
        for key in ("private_key", "known_hosts"):
            path = getattr(v, key)
            if not Path(path).is_file():
                raise ConfigError(f"[vms] {key}", f"{path}: no such file")
    if config.sessions.grace_seconds < 0:
        raise ConfigError("[sessions] grace_seconds", "must not be negative")
    if config.sessions.idle_seconds < 1:
        raise ConfigError("[sessions] idle_seconds", "must be at least 1")
    if config.sessions.replay_messages < 1 or config.sessions.replay_bytes < 1024:
        raise ConfigError("[sessions]", "replay_messages >= 1 and replay_bytes >= 1024")
    _validate_redis(config.redis)
    r = config.ratelimit
    if r.prompts_per_minute < 1 or r.connections_per_minute < 1 or r.max_sessions_per_user < 1:
        raise ConfigError("[ratelimit]", "limits must be at least 1")
    if r.window_seconds <= 0:
        raise ConfigError("[ratelimit] window_seconds", "must be positive")
    if config.usage.retention_days < 1:
        raise ConfigError("[usage] retention_days", "must be at least 1")
    if config.usage.monthly_budget_usd < 0:
        raise ConfigError("[usage] monthly_budget_usd", "must not be negative")
    if not 0 < config.usage.soft_budget_ratio <= 1:
        raise ConfigError("[usage] soft_budget_ratio", "must be in (0, 1]")
    if not 0 <= config.usage.batch_ms <= 1000:
        raise ConfigError("[usage] batch_ms", "must be between 0 and 1000")
    for name, reference in _key_references(config.keys):
        try:
            check_reference(reference)
        except SecretError as e:
            raise ConfigError(f"[keys] {name}", str(e)) from None
    a = config.auth
    if a.max_token_lifetime_seconds < 0:
        raise ConfigError("[auth] max_token_lifetime_seconds", "must not be negative")
    if a.jwt_public_key_file and not Path(a.jwt_public_key_file).is_file():
        raise ConfigError("[auth] jwt_public_key_file", f"{a.jwt_public_key_file}: no such file")
    if config.log.level not in ("debug", "info", "warn", "error"):
        raise ConfigError("[log] level", "must be debug, info, warn or error")


def _validate_redis(r: RedisConfig) -> None:
    scheme = urlsplit(r.url).scheme if r.url else ""
    if r.url and scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("[redis] url", "must start with redis://, rediss:// or unix://")
    if r.timeout_ms < 1:
        raise ConfigError("[redis] timeout_ms", "must be at least 1")
    if r.confirm_timeout_ms < 0:
        raise ConfigError("[redis] confirm_timeout_ms", "must not be negative")
    if r.replica_grace_seconds < 0:
        raise ConfigError("[redis] replica_grace_seconds", "must not be negative")
    if bool(r.sentinels) != bool(r.master_name):
        raise ConfigError(
            "[redis] master_name" if r.sentinels else "[redis] sentinels",
            "sentinels and master_name go together",
        )
    for sentinel in r.sentinels:
        if parse_host_port(sentinel) is None:
            raise ConfigError("[redis] sentinels", f"{sentinel!r} is not host:port")
    if r.sentinels and r.url:
        if scheme == "unix" or urlsplit(r.url).netloc.rpartition("@")[2]:
            raise ConfigError(
                "[redis] url",
                "with sentinels, name no host: Sentinel finds the primary "
                "(redis[s]://[user:password@]/db)",
            )
    if r.sentinel_password:
        if not r.sentinels:
            raise ConfigError("[redis] sentinel_password", "needs [redis] sentinels")
        try:
            check_reference(r.sentinel_password)
        except SecretError as e:
            raise ConfigError("[redis] sentinel_password", str(e)) from None
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(r, key)
        if not path:
            continue
        if scheme != "rediss":
            raise ConfigError(f"[redis] {key}", "needs a rediss:// url")
        if not Path(path).is_file():
            raise ConfigError(f"[redis] {key}", f"{path}: no such file")
    if bool(r.tls_cert) != bool(r.tls_key):
        raise ConfigError(
            "[redis] tls_key" if r.tls_cert else "[redis] tls_cert",
            "tls_cert and tls_key go together",
        )


def parse_host_port(text: str) -> tuple[str, int] | None:
    """``host:port`` or ``[ipv6]:port`` as (host, port), or None when it is neither."""
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    if any(c.isspace() or c in "/[]" for c in host):
        return None
    return host, int(port)


def _key_references(k: KeysConfig) -> list[tuple[str, str]]:
    references = [("anthropic", k.anthropic), ("openai", k.openai)]
    return references + [(f"encryption_keys[{i}]", r) for i, r in enumerate(k.encryption_keys)]


def _secret_variables(config: Config) -> dict[str, str]:
    """Variables agentd reads its own secrets from, with what each holds: an agent that saw
    them could mint tokens, read the key store or spend the operator's provider account."""
    found = {name: f"[{section}] {key}" for name, (section, key) in ENV_OVERRIDES.items()}
    found.update({name: "a provider key, set per session" for name in PROVIDER_ENV.values()})
    references = [(f"[keys] {name}", r) for name, r in _key_references(config.keys)]
    references.append(("[redis] sentinel_password", config.redis.sentinel_password))
    for name, reference in references:
        kind, _, target = reference.partition(":")
        if kind == "env":
            found[target] = name
    return found


def from_dict(
    data: Mapping[str, Any], env: Mapping[str, str] | None = None, source: str = "<dict>"
) -> Config:
    """Build a validated Config from parsed TOML, applying environment overrides."""
    sections: dict[str, dict[str, Any]] = {}
    for name, raw in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"[{name}]", "unknown section")
        if not isinstance(raw, dict):
            raise ConfigError(f"[{name}]", "must be a table")
        sections[name] = dict(raw)
    for variable, (section, key) in ENV_OVERRIDES.items():
        value = (os.environ if env is None else env).get(variable)
        if value:
            sections.setdefault(section, {})[key] = value
    built: dict[str, Any] = {
        name: read_table(cls, sections.get(name, {}), f"[{name}]", ConfigError, separator=" ")
        for name, cls in _SECTIONS.items()
    }
    config = Config(**built, source=source)
    _validate(config)
    return config


def load(path: str | None, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the file at ``path``; None means embedded defaults."""
    if path is None:
        return from_dict({}, env, source="embedded defaults")
    return from_dict(load_file(path, ConfigError), env, source=path)
