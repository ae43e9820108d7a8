"""The agents file on the VM: agent name -> provider, model, system prompt and limits.

The file (``/etc/agentd/agents.toml``, or the path in ``AGENTD_AGENTS``) has one table per
agent::

    [agents.claude]
    provider = "anthropic"          # anthropic | openai | echo
    model = "claude-sonnet-4-5"
    system = "You are a careful coding assistant."
    max_tokens = 8192               # most output tokens per answer
    timeout_seconds = 300           # whole-query limit (default 300)
    max_retries = 2                 # the SDK's own retries (default: the SDK's)

The built-in ``echo`` agent always exists unless the file defines its own ``echo``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentd.tomltables import TomlError, load_file, read_table, rule

DEFAULT_PATH = "/etc/agentd/agents.toml"
PROVIDERS = ("anthropic", "openai", "echo")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AgentsFileError(TomlError):
    """The agents file cannot be used; the message names the file and the key."""


class UnknownAgent(LookupError):
    """The requested agent is neither in the agents file nor built in."""


@dataclass(frozen=True)
class AgentSpec:
    name: str
    provider: str = field(
        metadata=rule(lambda p: p in PROVIDERS, f"must be one of {', '.join(PROVIDERS)}")
    )
    model: str = field(metadata=rule(bool, "required, a non-empty string"))
    system: str = ""
    max_tokens: int = field(
        default=4096, metadata=rule(lambda n: n >= 1, "must be a positive integer")
    )
    timeout_seconds: float = field(
        default=300.0, metadata=rule(lambda t: t > 0, "must be a positive number")
    )
    max_retries: int | None = field(
        default=None, metadata=rule(lambda n: 0 <= n <= 10, "must be an integer from 0 to 10")
    )


ECHO = AgentSpec(name="echo", provider="echo", model="echo")


def _spec(path: str, name: str, raw: Any) -> AgentSpec:
    where = f"{path}: agents.{name}"
    if not NAME_RE.match(name):
        raise AgentsFileError(where, "not a valid agent name")
    if isinstance(raw, dict) and raw.get("provider") == "echo":
        # The echo agent needs no model; every other provider does.
        raw = {"model": "echo", **raw}
    return read_table(AgentSpec, raw, where, AgentsFileError, fixed={"name": name})


def load(path: str) -> dict[str, AgentSpec]:
    """Every agent the file at ``path`` defines, validated."""
    data = load_file(path, AgentsFileError)
    unknown = sorted(set(data) - {"agents"})
    if unknown:
        raise AgentsFileError(f"{path}: {unknown[0]}", "unknown table")
    raw_agents = data.get("agents", {})
    if not isinstance(raw_agents, dict):
        raise AgentsFileError(f"{path}: agents", "must be a table of agents")
    return {name: _spec(path, name, raw) for name, raw in raw_agents.items()}


def find(name: str, env: Mapping[str, str]) -> AgentSpec:
    """The agent called ``name``: from ``AGENTD_AGENTS`` (which must exist) or the default file
    (which may be absent), else built in."""
    path = env.get("AGENTD_AGENTS")
    if path:
        agents = load(path)
    elif os.path.exists(DEFAULT_PATH):
        agents = load(DEFAULT_PATH)
    else:
        agents = {}
    agents.setdefault(ECHO.name, ECHO)
    try:
        return agents[name]
    except KeyError:
        raise UnknownAgent(name) from None
