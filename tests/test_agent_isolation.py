"""What reaches an agent from agentd, and what an agent can put into agentd's log, end to end:
its environment over both transports, the prompt fields a browser can set, its stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, globalLogPublisher

from agentd.jsonlog import json_line
from agentd.keys.sealing import generate_kek
from tests.harness import SECRET, base_config, merge, ssh_config, token
from tests.servers import agent_command
from tests.wsclient import WsClient, connect

JWT_SECRET = "agentd-jwt-secret-that-mints-admin-tokens-0123456789"
OPERATOR_KEY = "sk-ant-operator-0123456789abcdefXYZ"
USER_KEY = "sk-ant-user-alice-9876543210fedcbaQRS"
FORWARDED = "forwarded-on-purpose"


def reporting_agent(tmp_path: Path) -> str:
    """An agent command that answers each prompt with its environment and the line it got."""
    script = tmp_path / "report_agent.py"
    script.write_text(
        "import json, os, sys\n"
        "for line in sys.stdin:\n"
        "    msg = json.loads(line)\n"
        "    done = {'type': 'done', 'id': msg['id'], 'env': dict(os.environ), 'line': msg}\n"
        "    print(json.dumps(done), flush=True)\n"
    )
    return f"{sys.executable} {script} {{agent}}"


async def ask(client: WsClient, prompt_id: str, **fields: Any) -> dict[str, Any]:
    client.send({"type": "prompt", "id": prompt_id, "text": "hi", **fields})
    return (await client.recv_until("done"))[-1]


async def session(gateway: Any, user: str = "alice") -> WsClient:
    client = await connect(gateway.ws_url(token=token(user)))
    assert (await client.recv())["type"] == "session"
    return client


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest.mark.parametrize("transport", ["local", "ssh"])
@pytest_twisted.ensureDeferred
async def test_an_agent_sees_its_sessions_key_and_forward_env_but_none_of_agentds_secrets(
    tmp_path, request, agentd, monkeypatch, transport
):
    kek = generate_kek()
    monkeypatch.setenv("AGENTD_JWT_SECRET", JWT_SECRET)
    monkeypatch.setenv("AGENTD_KEK", kek)
    monkeypatch.setenv("ANTHROPIC_API_KEY", OPERATOR_KEY)
    monkeypatch.setenv("AGENTD_FORWARDED", FORWARDED)
    monkeypatch.setenv("UNRELATED_SETTING", "stays-with-agentd")
    if transport == "ssh":
        config = ssh_config(tmp_path, request.getfixturevalue("sshd"))
    else:
        config = base_config(tmp_path)
    gateway = agentd(
        merge(
            config,
            agents={"command": reporting_agent(tmp_path)},
            vms={"forward_env": ["AGENTD_FORWARDED", "NOT_SET_ANYWHERE"]},
            keys={"anthropic": "env:ANTHROPIC_API_KEY", "encryption_keys": ["env:AGENTD_KEK"]},
        )
    )
    put = await treq.put(
        gateway.http + "/api/keys/anthropic",
        json={"key": USER_KEY},
        headers={"Authorization": f"Bearer {token('alice')}"},
    )
    assert put.code == 204, await put.text()

    seen: dict[str, dict[str, str]] = {}
    for user in ("alice", "bob"):
        client = await session(gateway, user)
        seen[user] = (await ask(client, "env"))["env"]
        client.close()
        await client.closed

    alice, bob = seen["alice"], seen["bob"]
    assert alice["ANTHROPIC_API_KEY"] == USER_KEY
    assert bob["ANTHROPIC_API_KEY"] == OPERATOR_KEY
    for env in (alice, bob):
        assert env["AGENTD_FORWARDED"] == FORWARDED
        for name in ("AGENTD_JWT_SECRET", "AGENTD_KEK", "UNRELATED_SETTING", "NOT_SET_ANYWHERE"):
            assert name not in env
        for secret in (JWT_SECRET, SECRET, kek):
            assert secret not in json.dumps(env)
        assert "PATH" in env and "HOME" in env
    assert OPERATOR_KEY not in json.dumps(alice)


@pytest_twisted.ensureDeferred
async def test_the_agent_gets_only_type_id_text_and_options_of_a_browsers_prompt(tmp_path, agentd):
    gateway = agentd(merge(base_config(tmp_path), agents={"command": reporting_agent(tmp_path)}))
    client = await session(gateway)
    done = await ask(
        client,
        "p1",
        exit=3,
        repeat=5,
        delta_bytes=1_048_576,
        report_keys=True,
        options={"effort": "low", "nested": [1, {"a": None}]},
    )
    assert done["line"] == {
        "type": "prompt",
        "id": "p1",
        "text": "hi",
        "options": {"effort": "low", "nested": [1, {"a": None}]},
    }
    done = await ask(client, "p2", exit=3)
    assert done["line"] == {"type": "prompt", "id": "p2", "text": "hi"}
    client.close()


@pytest.mark.parametrize(
    ("options", "problem"),
    [([1, 2], "must be an object"), ("repeat", "must be an object"), ({"x": "y" * 4096}, "4096")],
)
@pytest_twisted.ensureDeferred
async def test_options_that_are_not_a_small_object_are_a_bad_request(
    tmp_path, agentd, options, problem
):
    gateway = agentd(base_config(tmp_path))
    client = await session(gateway)
    client.send({"type": "prompt", "id": "p", "text": "hi", "options": options})
    error = await client.recv()
    assert error["type"] == "error" and error["code"] == "bad_request"
    assert error["id"] == "p" and problem in error["error"]
    assert next(iter(gateway.registry.by_id.values())).link is None, "an agent was started"
    client.close()


@pytest_twisted.ensureDeferred
async def test_test_options_at_the_top_of_a_browsers_prompt_have_no_effect(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))  # the echo agent, with --test-options
    client = await session(gateway)
    client.send(
        {"type": "prompt", "id": "p", "text": "a b", "exit": 3, "repeat": 4, "report_keys": True}
    )
    messages = await client.recv_until("done")
    assert [m["text"] for m in messages if m["type"] == "delta"] == ["a ", "b"]
    assert "keys" not in messages[-1]
    assert not any(m.get("code") == "agent_exited" for m in messages)
    # The same option where it belongs works, under the test flag.
    client.send({"type": "prompt", "id": "q", "text": "a b", "options": {"repeat": 2}})
    messages = await client.recv_until("done")
    assert [m["text"] for m in messages if m["type"] == "delta"] == ["a ", "b"] * 2
    client.close()


@pytest_twisted.ensureDeferred
async def test_without_the_test_flag_the_agent_refuses_test_options_from_a_browser(
    tmp_path, agentd, monkeypatch
):
    monkeypatch.setenv("ANTHROPIC_API_KEY", OPERATOR_KEY)
    gateway = agentd(
        merge(
            base_config(tmp_path),
            agents={"command": agent_command(test_options=False)},
            keys={"anthropic": "env:ANTHROPIC_API_KEY"},
        )
    )
    client = await session(gateway)
    for n, options in enumerate(({"report_keys": True}, {"exit": 3}, {"repeat": 1_000_000})):
        client.send({"type": "prompt", "id": f"test{n}", "text": "hi", "options": options})
        error = (await client.recv_until("error"))[-1]
        assert error["code"] == "bad_request" and "--test-options" in error["error"]
        assert error["id"] == f"test{n}"
        client.send({"type": "prompt", "id": f"plain{n}", "text": "hi"})
        messages = await client.recv_until("done")
        assert not any(m.get("code") == "agent_exited" for m in messages)
        assert messages[-1]["usage"]["outputTokens"] == 1 and "keys" not in messages[-1]
    client.close()


@pytest_twisted.ensureDeferred
async def test_thirty_stderr_lines_of_900_kb_leave_a_bounded_log(tmp_path, agentd, events):
    script = tmp_path / "noisy_agent.py"
    script.write_text(
        "import json, sys\n"
        "big = 'x' * 900_000\n"
        "shapes = [\n"
        "    {'level': 'warn', 'message': big},\n"
        "    {'level': 'error', 'message': 'm', 'detail': big},\n"
        "    {'level': 'info', 'message': 'm', 'nested': [[[[big]]]]},\n"
        "    {'level': 'warn', 'message': 'm', **{f'k{i}': 'v' * 900 for i in range(1000)}},\n"
        "    {'level': 'warn', 'message': 'm', big: 1},\n"
        "]\n"
        "for line in sys.stdin:\n"
        "    msg = json.loads(line)\n"
        "    for n in range(30):\n"
        "        sys.stderr.write(json.dumps(shapes[n % len(shapes)]) + '\\n')\n"
        "    sys.stderr.flush()\n"
        "    print(json.dumps({'type': 'done', 'id': msg['id']}), flush=True)\n"
    )
    gateway = agentd(
        merge(
            base_config(tmp_path),
            agents={"command": f"{sys.executable} {script} {{agent}}"},
            server={"max_message_bytes": 1_048_576},
        )
    )
    client = await session(gateway)
    await ask(client, "p")

    def relayed() -> list[LogEvent]:
        return [e for e in events if e.get("log_format") == "agent: {agent_message}"]

    for _ in range(200):
        if len(relayed()) >= 30:
            break
        await deferLater(reactor, 0.05, lambda: None)
    lines = [json_line(e) for e in relayed()]
    assert len(lines) == 30
    assert max(map(len, lines)) < 40_000
    assert sum(map(len, lines)) < 30 * 40_000  # 27 MB before fields were cut
    client.close()


@pytest.mark.parametrize(
    ("forwarded", "holds"),
    [
        ("AGENTD_JWT_SECRET", "[auth] jwt_secret"),
        ("AGENTD_REDIS_URL", "[redis] url"),
        ("ANTHROPIC_API_KEY", "a provider key"),
        ("OPERATOR_KEY_VAR", "[keys] anthropic"),
        ("KEK_VAR", "[keys] encryption_keys[0]"),
    ],
)
def test_forward_env_refuses_the_variables_agentd_reads_its_secrets_from(
    forwarded: str, holds: str
) -> None:
    from agentd.config import ConfigError, from_dict

    data = {
        "vms": {"forward_env": ["PATH_EXTRA", forwarded]},
        "keys": {"anthropic": "env:OPERATOR_KEY_VAR", "encryption_keys": ["env:KEK_VAR"]},
    }
    with pytest.raises(ConfigError) as refused:
        from_dict(data, env={})
    assert refused.value.key == "[vms] forward_env"
    assert forwarded in str(refused.value) and holds in str(refused.value)
