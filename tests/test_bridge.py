"""The whole path, browser -> agentd -> sshd -> agent CLI and back, against real servers."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.http_headers import Headers

from tests import harness
from tests.harness import auth, base_config, merge, ssh_config, token
from tests.samples import sample
from tests.servers import keygen
from tests.waiting import eventually
from tests.wsclient import connect, handshake_headers


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def converse(
    url: str, text: str, prompt_id: str = "p1", **extra: Any
) -> list[dict[str, Any]]:
    client = await connect(url)
    hello = await client.recv()
    assert hello["type"] == "session"
    client.send({"type": "prompt", "id": prompt_id, "text": text, **extra})
    messages = await client.recv_until("done")
    client.close()
    await client.closed
    return messages


def check_echo(messages: list[dict[str, Any]], text: str) -> None:
    seqs = [m["seq"] for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq must count up by one"
    kinds = [m["type"] for m in messages]
    assert "ack" in kinds and kinds[-1] == "done"
    assert "".join(m["text"] for m in messages if m["type"] == "delta") == text
    done = messages[-1]
    assert done["agent"] == "echo"
    assert done["usage"]["inputTokens"] == len(text.split())


@pytest_twisted.ensureDeferred
async def test_prompt_streams_the_echo_reply_over_real_sshd(tmp_path, sshd, agentd):
    gateway = agentd(ssh_config(tmp_path, sshd))
    text = "hello from the browser, through sshd"
    messages = await converse(gateway.ws_url(token=token()), text)
    check_echo(messages, text)
    assert messages[0]["seq"] == 1


@pytest_twisted.ensureDeferred
async def test_prompt_streams_the_echo_reply_with_the_local_transport(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    text = "local agents answer too"
    check_echo(await converse(gateway.ws_url(token=token()), text), text)


@pytest_twisted.ensureDeferred
async def test_token_from_header_cookie_and_query_are_all_accepted(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    url = gateway.ws_url()
    for headers in ({"Authorization": f"Bearer {token()}"}, {"Cookie": f"agentd_token={token()}"}):
        client = await connect(url, headers=headers)
        assert (await client.recv())["type"] == "session"
        client.close()
        await client.closed


def _forged_none_token() -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {"sub": "alice", "projects": ["*"], "exp": int(time.time()) + 600}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


REJECTIONS = [
    ("no token", "/projects/demo/agent/echo", {}, 401),
    ("expired", "/projects/demo/agent/echo", {"token": token(ttl=-60)}, 401),
    (
        "wrong signature",
        "/projects/demo/agent/echo",
        {
            "token": jwt.encode(
                {"sub": "alice", "projects": ["demo"], "exp": int(time.time()) + 600},
                "another-secret-of-sufficient-length-xxxxxxxx",
                algorithm="HS256",
            )
        },
        401,
    ),
    ("alg none", "/projects/demo/agent/echo", {"token": _forged_none_token()}, 401),
    (
        "no exp",
        "/projects/demo/agent/echo",
        {
            "token": jwt.encode(
                {"sub": "alice", "projects": ["demo"]}, harness.SECRET, algorithm="HS256"
            )
        },
        401,
    ),
    ("wrong project", "/projects/other/agent/echo", {"token": token()}, 403),
    ("unknown agent", "/projects/demo/agent/claude", {"token": token()}, 404),
    ("malformed project", "/projects/-bad/agent/echo", {"token": token()}, 404),
    (
        "shell in project",
        "/projects/a;touch%20pwned/agent/echo",
        {"token": token(projects=["*"])},
        404,
    ),
    ("shell in agent", "/projects/demo/agent/echo;id", {"token": token()}, 404),
    ("extra path", "/projects/demo/agent/echo/x", {"token": token()}, 404),
    ("bad last_seq", "/projects/demo/agent/echo", {"token": token(), "last_seq": "-1"}, 400),
    ("superscript last_seq", "/projects/demo/agent/echo", {"token": token(), "last_seq": "²"}, 400),
]


@pytest.mark.parametrize(
    ("why", "path", "params", "status"), REJECTIONS, ids=[r[0] for r in REJECTIONS]
)
@pytest_twisted.ensureDeferred
async def test_rejected_before_the_upgrade_then_a_good_client_is_served(
    tmp_path, agentd, why, path, params, status
):
    gateway = agentd(base_config(tmp_path))
    response = await treq.get(gateway.http + path, params=params, headers=handshake_headers())
    assert response.code == status, why
    body = await response.text()
    assert params.get("token", "\0") not in body
    assert "Traceback" not in body
    text = "still serving"
    check_echo(await converse(gateway.ws_url(token=token()), text), text)


@pytest_twisted.ensureDeferred
async def test_origin_is_checked(tmp_path, agentd):
    gateway = agentd(
        merge(base_config(tmp_path), server={"allowed_origins": ["https://app.example"]})
    )
    headers = {**handshake_headers(), "Origin": "https://evil.example"}
    response = await treq.get(
        gateway.http + "/projects/demo/agent/echo", params={"token": token()}, headers=headers
    )
    assert response.code == 403
    client = await connect(gateway.ws_url(token=token()), headers={"Origin": "https://app.example"})
    assert (await client.recv())["type"] == "session"
    client.close()


@pytest_twisted.ensureDeferred
async def test_same_host_origin_is_allowed_when_no_origins_are_configured(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    headers = {**handshake_headers(), "Origin": "http://elsewhere.example"}
    response = await treq.get(
        gateway.http + "/projects/demo/agent/echo", params={"token": token()}, headers=headers
    )
    assert response.code == 403
    client = await connect(
        gateway.ws_url(token=token()), headers={"Origin": f"http://127.0.0.1:{gateway.port}"}
    )
    assert (await client.recv())["type"] == "session"
    client.close()


@pytest_twisted.ensureDeferred
async def test_two_origin_headers_are_refused_even_when_both_are_allowed(tmp_path, agentd):
    gateway = agentd(
        merge(base_config(tmp_path), server={"allowed_origins": ["https://app.example"]})
    )
    headers = Headers({**handshake_headers(), "Origin": ["https://app.example"] * 2})
    response = await treq.get(
        gateway.http + "/projects/demo/agent/echo", params={"token": token()}, headers=headers
    )
    assert response.code == 403
    assert await response.json() == {"error": "origin not allowed"}
    client = await connect(gateway.ws_url(token=token()), headers={"Origin": "https://app.example"})
    assert (await client.recv())["type"] == "session"
    client.close()


@pytest_twisted.ensureDeferred
async def test_plain_get_with_a_good_token_is_told_to_upgrade(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    response = await gateway.get("/projects/demo/agent/echo", headers=auth())
    assert response.code == 426


@pytest_twisted.ensureDeferred
async def test_unknown_vm_host_key_is_refused_with_vm_unavailable(tmp_path, sshd, agentd):
    stranger = keygen(tmp_path / "stranger").with_suffix(".pub").read_text().split()
    sshd.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {stranger[0]} {stranger[1]}\n")
    gateway = agentd(ssh_config(tmp_path, sshd))
    before = sample("agentd_ssh_connect_failures_total", reason="host_key")
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": "p1", "text": "hi"})
    error = (await client.recv_until("error"))[-1]
    assert error["code"] == "vm_unavailable" and error["id"] == "p1"
    # a host-key failure is not retried
    assert sample("agentd_ssh_connect_failures_total", reason="host_key") == before + 1
    client.close()


@pytest_twisted.ensureDeferred
async def test_host_key_for_another_port_does_not_match(tmp_path, sshd, agentd):
    host_pub = (sshd.directory / "ssh_host_ed25519_key.pub").read_text().split()
    sshd.known_hosts.write_text(f"[127.0.0.1]:{sshd.port + 1} {host_pub[0]} {host_pub[1]}\n")
    gateway = agentd(ssh_config(tmp_path, sshd))
    before = sample("agentd_ssh_connect_failures_total", reason="host_key")
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": "p1", "text": "hi"})
    assert (await client.recv_until("error"))[-1]["code"] == "vm_unavailable"
    # refused for its host key (the right key, listed for another port), not for anything else
    assert sample("agentd_ssh_connect_failures_total", reason="host_key") == before + 1
    client.close()


@pytest_twisted.ensureDeferred
async def test_hashed_known_hosts_entries_match_host_and_port(tmp_path, sshd, agentd):
    import subprocess

    subprocess.run(
        ["ssh-keygen", "-H", "-f", str(sshd.known_hosts)], check=True, capture_output=True
    )
    assert sshd.known_hosts.read_text().startswith("|1|")
    gateway = agentd(ssh_config(tmp_path, sshd))
    check_echo(await converse(gateway.ws_url(token=token()), "hashed ok"), "hashed ok")


@pytest_twisted.ensureDeferred
async def test_sshd_down_gives_vm_unavailable_after_retries_and_recovers(tmp_path, sshd, agentd):
    gateway = agentd(ssh_config(tmp_path, sshd))
    sshd.stop()
    before = sample("agentd_ssh_connect_failures_total", reason="refused")
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": "p1", "text": "hi"})
    assert (await client.recv_until("error"))[-1]["code"] == "vm_unavailable"
    assert sample("agentd_ssh_connect_failures_total", reason="refused") == before + 2  # 2 attempts
    sshd.start()
    client.send({"type": "prompt", "id": "p2", "text": "back again"})
    messages = await client.recv_until("done")
    assert "".join(m["text"] for m in messages if m["type"] == "delta") == "back again"
    client.close()


@pytest_twisted.ensureDeferred
async def test_wrong_client_key_is_an_auth_failure_not_retried(tmp_path, sshd, agentd):
    config = ssh_config(tmp_path, sshd)
    config["vms"]["private_key"] = str(keygen(tmp_path / "other_key"))
    gateway = agentd(config)
    before = sample("agentd_ssh_connect_failures_total", reason="auth")
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": "p1", "text": "hi"})
    assert (await client.recv_until("error"))[-1]["code"] == "vm_unavailable"
    assert sample("agentd_ssh_connect_failures_total", reason="auth") == before + 1


BAD_MESSAGES = [
    b"not json",
    b"[1, 2]",
    b'"a string"',
    b'{"no": "type"}',
    b'{"type": "launch"}',
    b'{"type": 7}',
    b'{"type": "prompt", "text": "no id"}',
    b'{"type": "prompt", "id": 5, "text": "numeric id"}',
    b'{"type": "prompt", "id": "x", "text": ["not", "a", "string"]}',
    b'{"type": "prompt", "id": "' + b"x" * 257 + b'", "text": "long id"}',
    b"\xff\xfe",
]


@pytest_twisted.ensureDeferred
async def test_malformed_client_messages_get_bad_request_and_the_connection_stays(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    for payload in BAD_MESSAGES:
        if payload == b"\xff\xfe":
            client.send(payload, binary=True)
        else:
            client.protocol.sendMessage(payload, isBinary=False)
        reply = await client.recv()
        assert reply["type"] == "error" and reply["code"] == "bad_request", payload
    client.send({"type": "ping", "id": "k"})
    assert (await client.recv())["type"] == "pong"
    client.send({"type": "prompt", "id": "ok", "text": "fine now"})
    assert (await client.recv_until("done"))[-1]["type"] == "done"
    client.close()


@pytest_twisted.ensureDeferred
async def test_deeply_nested_messages_are_bad_requests_before_any_agent_work(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    # 300 levels: orjson reads them, but could not write them to the agent (255 at most).
    deep = b'{"type":"prompt","id":"deep","text":"x","extra":' + b"[" * 300 + b"]" * 300 + b"}"
    client.protocol.sendMessage(deep, isBinary=False)
    reply = await client.recv()
    assert (reply["type"], reply["code"]) == ("error", "bad_request")
    assert reply["error"] == "message nests deeper than 32 levels"
    assert gateway.registry.by_key and all(s.link is None for s in gateway.registry.by_key.values())
    client.send({"type": "prompt", "id": "ok", "text": "fine now", "extra": [[["shallow"]]]})
    assert (await client.recv_until("done"))[-1]["type"] == "done"
    client.close()


@pytest_twisted.ensureDeferred
async def test_oversized_message_closes_with_1009_and_others_are_served(tmp_path, agentd):
    gateway = agentd(merge(base_config(tmp_path), server={"max_message_bytes": 4096}))
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": "big", "text": "x" * 10_000})
    code, _ = await client.closed
    assert code == 1009
    check_echo(await converse(gateway.ws_url(token=token()), "small is fine"), "small is fine")


@pytest_twisted.ensureDeferred
async def test_non_json_agent_output_is_counted_not_forwarded(tmp_path, agentd):
    script = tmp_path / "noisy_agent.py"
    script.write_text(
        "import sys, json\n"
        "for line in sys.stdin:\n"
        "    msg = json.loads(line)\n"
        "    print('this is not json', flush=True)\n"
        "    print('[1, 2, 3]', flush=True)\n"
        "    delta = {'type': 'delta', 'id': msg['id'], 'text': 'ok', 'seq': 999}\n"
        "    print(json.dumps(delta), flush=True)\n"
        "    print(json.dumps({'type': 'done', 'id': msg['id'], 'agent': 'echo'}), flush=True)\n"
    )
    gateway = agentd(
        merge(base_config(tmp_path), agents={"command": f"{sys.executable} {script} {{agent}}"})
    )
    before = sample("agentd_agent_bad_lines_total", agent="echo")
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": "p", "text": "x"})
    messages = await client.recv_until("done")
    assert [m["type"] for m in messages] == ["ack", "delta", "done"]
    assert [m["seq"] for m in messages] == [1, 2, 3], "the holder's seq replaces the agent's"
    assert sample("agentd_agent_bad_lines_total", agent="echo") == before + 2
    client.close()


@pytest_twisted.ensureDeferred
async def test_agent_exit_is_reported_and_the_next_prompt_starts_a_new_agent(
    tmp_path, sshd, agentd
):
    gateway = agentd(ssh_config(tmp_path, sshd))
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": "p1", "text": "bye", "options": {"exit": 3}})
    error = (await client.recv_until("error"))[-1]
    assert error["code"] == "agent_exited" and error["exitStatus"] == 3
    client.send({"type": "prompt", "id": "p2", "text": "alive again"})
    messages = await client.recv_until("done")
    assert "".join(m["text"] for m in messages if m["type"] == "delta") == "alive again"
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_session_left_idle_with_nobody_attached_ends_its_agent_after_idle_seconds(
    tmp_path, agentd
):
    pidfile = tmp_path / "agent.pid"
    script = tmp_path / "pid_agent.py"
    script.write_text(
        "import os, sys, json\n"
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "for line in sys.stdin:\n"
        "    msg = json.loads(line)\n"
        "    print(json.dumps({'type': 'done', 'id': msg['id']}), flush=True)\n"
    )
    gateway = agentd(
        merge(
            base_config(tmp_path),
            agents={"command": f"{sys.executable} {script} {{agent}}"},
            sessions={"idle_seconds": 2.0},
        )
    )
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": "p", "text": "x"})
    await client.recv_until("done")
    pid = int(pidfile.read_text())
    client.close()
    await client.closed
    left = time.monotonic()
    await eventually(lambda: gateway.registry.by_id == {}, what="agentd letting go")
    os.kill(pid, 0)  # the agent outlives the connection and agentd's hold on it
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await sleep(0.05)
    else:
        pytest.fail("the idle session's agent outlived idle_seconds")
    assert time.monotonic() - left >= 1.5, "the agent ended before the session was idle"


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_pauses_the_agent_and_memory_stays_bounded(
    tmp_path, sshd, agentd
):
    gateway = agentd(merge(ssh_config(tmp_path, sshd), sessions={"replay_bytes": 1_048_576}))
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    pauses = sample("agentd_flow_pauses_total")
    # The agent wants to send 200,000 deltas of 4 KiB: 800 MiB.
    client.send(
        {
            "type": "prompt",
            "id": "flood",
            "text": "x",
            "options": {"repeat": 200_000, "delta_bytes": 4096},
        }
    )
    await client.recv()  # ack
    client.protocol.transport.pauseProducing()  # the browser stops reading
    rss_before = _rss_bytes()
    await sleep(3)
    grown = _rss_bytes() - rss_before
    session = next(iter(gateway.registry.by_id.values()))
    assert sample("agentd_flow_pauses_total") > pauses, "the agent was never paused"
    assert session.replay.size <= 1_048_576 + 8192
    assert grown < 64 * 1024 * 1024, f"agentd grew by {grown} bytes for a stalled client"
    received_while_paused = len(client.raw)
    assert received_while_paused < 100_000, "the flood was not held back"
    client.abort()


@pytest_twisted.ensureDeferred
async def test_an_agent_line_at_the_size_limit_is_relayed_with_its_seq(tmp_path, agentd):
    limit = 4096
    script = tmp_path / "full_line_agent.py"
    script.write_text(
        "import sys, json\n"
        "for line in sys.stdin:\n"
        "    msg = json.loads(line)\n"
        f"    head = json.dumps({{'type': 'delta', 'id': msg['id'], 'text': ''}})\n"
        f"    text = 'x' * ({limit} - len(head))\n"
        "    print(json.dumps({'type': 'delta', 'id': msg['id'], 'text': text}), flush=True)\n"
        "    print(json.dumps({'type': 'done', 'id': msg['id']}), flush=True)\n"
    )
    gateway = agentd(
        merge(
            base_config(tmp_path),
            server={"max_message_bytes": limit},
            agents={"command": f"{sys.executable} {script} {{agent}}"},
        )
    )
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": "p", "text": "x"})
    messages = await client.recv_until("done")
    delta = messages[1]
    assert delta["type"] == "delta" and len(client.raw[2]) > limit
    client.close()
