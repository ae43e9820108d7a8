"""Provider keys end to end over real sshd: the right key reaches the right agent, and no key
appears in logs, process listings or anything sent to a client."""

from __future__ import annotations

import hashlib
import json
import subprocess
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.logger import eventAsText, globalLogPublisher

from tests.harness import merge, ssh_config, token
from tests.servers import SshServer
from tests.wsclient import connect

OPERATOR_KEY = "sk-ant-operator-0123456789abcdefXYZ"
USER_KEY = "sk-ant-user-alice-9876543210fedcbaQRS"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def log_lines():
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(eventAsText(event, includeTimestamp=False))
        lines.append(json.dumps({k: repr(v) for k, v in event.items()}))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


async def reported_keys(gateway: Any, user: str, raw: list[bytes]) -> dict[str, str | None]:
    client = await connect(gateway.ws_url(token=token(user)))
    await client.recv()
    client.send(
        {
            "type": "prompt",
            "id": "k",
            "text": "which key",
            "options": {"report_keys": True, "delay_ms": 200},
        }
    )
    await client.recv_until("start")
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sk-ant-" not in listing, "a key is visible in the process list"
    done = (await client.recv_until("done"))[-1]
    raw.extend(client.raw)
    client.close()
    await client.closed
    return done["keys"]


@pytest_twisted.ensureDeferred
async def test_users_key_reaches_their_agent_and_the_operators_key_everyone_else(
    tmp_path, sshd, redis_server, agentd, monkeypatch, log_lines
):
    monkeypatch.setenv("TEST_OPERATOR_ANTHROPIC", OPERATOR_KEY)
    from agentd.keys.sealing import generate_kek

    monkeypatch.setenv("TEST_KEK", generate_kek())
    config = merge(
        ssh_config(tmp_path, sshd),
        redis={"url": redis_server.url, "timeout_ms": 500},
        keys={"anthropic": "env:TEST_OPERATOR_ANTHROPIC", "encryption_keys": ["env:TEST_KEK"]},
    )
    gateway = agentd(config)
    alice = {"Authorization": f"Bearer {token('alice')}"}
    put = await treq.put(
        gateway.http + "/api/keys/anthropic",
        json={"key": USER_KEY},
        headers=alice,
    )
    assert put.code == 204, await put.text()
    listing = await (await treq.get(gateway.http + "/api/keys", headers=alice)).json()
    assert USER_KEY not in json.dumps(listing)
    assert USER_KEY.encode() not in redis_server.cli("HGETALL", "agentd:userkeys:alice").encode()

    raw: list[bytes] = []
    alice_keys = await reported_keys(gateway, "alice", raw)
    bob_keys = await reported_keys(gateway, "bob", raw)
    assert alice_keys["ANTHROPIC_API_KEY"] == digest(USER_KEY)
    assert bob_keys["ANTHROPIC_API_KEY"] == digest(OPERATOR_KEY)
    assert alice_keys["OPENAI_API_KEY"] is None  # neither stored nor configured

    everything = "\n".join(log_lines) + b"".join(raw).decode()
    for secret in (USER_KEY, OPERATOR_KEY):
        assert secret not in everything
        assert secret[-12:] not in everything


@pytest_twisted.ensureDeferred
async def test_vm_refusing_the_key_variable_fails_the_session_clearly(
    tmp_path, agentd, monkeypatch, log_lines
):
    sshd = SshServer(tmp_path / "strict-sshd", overrides={"AcceptEnv": "LANG"})
    sshd.start()
    try:
        monkeypatch.setenv("TEST_OPERATOR_ANTHROPIC", OPERATOR_KEY)
        config = merge(
            ssh_config(tmp_path, sshd), keys={"anthropic": "env:TEST_OPERATOR_ANTHROPIC"}
        )
        gateway = agentd(config)
        client = await connect(gateway.ws_url(token=token()))
        await client.recv()
        client.send({"type": "prompt", "id": "p", "text": "hi"})
        error = (await client.recv_until("error"))[-1]
        assert error["code"] == "vm_unavailable"
        assert "ANTHROPIC_API_KEY" not in error["error"]
        assert any("env_refused" in line and "ANTHROPIC_API_KEY" in line for line in log_lines)
        assert not any(OPERATOR_KEY in line for line in log_lines)
        client.close()
    finally:
        sshd.stop()
