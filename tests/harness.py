"""Runs a real agentd (the same ``build`` twistd uses) in the test's reactor."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jwt
import treq
from twisted.internet import reactor

from agentd import config as config_module
from agentd.lifecycle import AgentdService
from agentd.tap import build
from tests.servers import SshServer, agent_command, attach_command, free_port, sessions_dir

SECRET = "test-secret-0123456789abcdef-0123456789abcdef"


class RunningAgentd:
    def __init__(self, service: AgentdService, port: int) -> None:
        self.service = service
        self.port = port
        self.registry = service.registry

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, project: str = "demo", agent: str = "echo", **params: Any) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"ws://127.0.0.1:{self.port}/projects/{project}/agent/{agent}" + (
            f"?{query}" if query else ""
        )

    def get(self, path: str, **kwargs: Any) -> Any:
        return treq.get(self.http + path, **kwargs)


def token(
    user: str = "alice", projects: list[str] | None = None, ttl: int = 600, **claims: Any
) -> str:
    import time

    body = {"sub": user, "projects": projects or ["demo"], "exp": int(time.time()) + ttl, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


def auth(user: str = "alice", projects: list[str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, projects)}"}


def base_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "server": {"listen": [f"tcp:{free_port()}:interface=127.0.0.1"], "drain_seconds": 0.0},
        "auth": {"jwt_secret": SECRET},
        "agents": {
            "names": ["echo"],
            "command": agent_command(),
            "attach_command": attach_command(),
            "sessions_dir": str(sessions_dir(tmp_path)),
        },
        "sessions": {"grace_seconds": 0.0},
        "usage": {"spool_dir": str(tmp_path / "spool")},
        "log": {"level": "debug"},
    }


def ssh_config(tmp_path: Path, sshd: SshServer) -> dict[str, Any]:
    config = base_config(tmp_path)
    config["vms"] = sshd.vms_section(
        connect_attempts=2,
        connect_backoff_base_seconds=0.05,
        connect_timeout_seconds=5.0,
    )
    return config


def merge(config: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(config)
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return merged


def start(config: dict[str, Any]) -> RunningAgentd:
    built = config_module.from_dict(config, env={}, source="test")
    service = build(built, reactor)
    service.startService()
    port = int(built.server.listen[0].split(":")[1])
    return RunningAgentd(service, port)
