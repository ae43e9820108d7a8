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
from dataclasses import dataclass
from typing import Any

DEFAULT_PATH = "/etc/agentd/agents.toml"
PROVIDERS = ("anthropic", "openai", "echo")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEYS = {"provider", "model", "system", "max_tokens", "timeout_seconds", "max_retries"}


class AgentsFileError(ValueError):
    """The agents file cannot be used; the message names the file and the key."""


class UnknownAgent(LookupError):
    """The requested agent is neither in the agents file nor built in."""


@dataclass(frozen=True)
class AgentSpec:
    name: str
    provider: str
    model: str
    system: str = ""
    max_tokens: int = 4096
    timeout_seconds: float = 300.0
    max_retries: int | None = None


ECHO = AgentSpec(name="echo", provider="echo", model="echo")


def _spec(path: str, name: str, raw: Any) -> AgentSpec:
    where = f"{path}: agents.{name}"
    if not NAME_RE.match(name):
        raise AgentsFileError(f"{where}: not a valid agent name")
    if not isinstance(raw, dict):
        raise AgentsFileError(f"{where}: must be a table")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise AgentsFileError(f"{where}.{unknown[0]}: unknown key")
    provider = raw.get("provider")
    if provider not in PROVIDERS:
        raise AgentsFileError(f"{where}.provider: must be one of {', '.join(PROVIDERS)}")
    model = raw.get("model", "echo" if provider == "echo" else None)
    if not isinstance(model, str) or not model:
        raise AgentsFileError(f"{where}.model: required, a non-empty string")
    system = raw.get("system", "")
    if not isinstance(system, str):
        raise AgentsFileError(f"{where}.system: must be a string")
    max_tokens = raw.get("max_tokens", AgentSpec.max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise AgentsFileError(f"{where}.max_tokens: must be a positive integer")
    timeout = raw.get("timeout_seconds", AgentSpec.timeout_seconds)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout:
        raise AgentsFileError(f"{where}.timeout_seconds: must be a positive number")
    retries = raw.get("max_retries")
    if retries is not None and (
        isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10
    ):
        raise AgentsFileError(f"{where}.max_retries: must be an integer from 0 to 10")
    return AgentSpec(
        name=name,
        provider=provider,
        model=model,
        system=system,
        max_tokens=max_tokens,
        timeout_seconds=float(timeout),
        max_retries=retries,
    )


def load(path: str) -> dict[str, AgentSpec]:
    """Every agent the file at ``path`` defines, validated."""
    # Imported here: without an agents file, the echo agent starts without a TOML parser.
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise AgentsFileError(f"{path}: no such file") from None
    except OSError as e:
        raise AgentsFileError(f"{path}: {e.strerror or 'cannot be read'}") from None
    except tomllib.TOMLDecodeError as e:
        raise AgentsFileError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"agents"})
    if unknown:
        raise AgentsFileError(f"{path}: {unknown[0]}: unknown table")
    raw_agents = data.get("agents", {})
    if not isinstance(raw_agents, dict):
        raise AgentsFileError(f"{path}: agents: must be a table of agents")
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
