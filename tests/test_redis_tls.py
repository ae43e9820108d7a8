"""agentd and Redis over TLS: a real redis-server (and Sentinels) with a test CA's certificates."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from agentd.config import ConfigError, from_dict
from agentd.tap import build
from tests.certs import TestCA
from tests.harness import RunningAgentd, base_config, merge, token
from tests.redisgroup import SentinelGroup
from tests.servers import RedisServer, ServerTLS
from tests.waiting import eventually
from tests.wsclient import connect

BIN = Path(sys.executable).parent


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


def server_tls(ca: TestCA, name: str, hosts: tuple[str, ...] = ("127.0.0.1",)) -> ServerTLS:
    cert, key = ca.issue(name, hosts)
    return ServerTLS(ca.ca_file, cert, key)


@pytest.fixture
def tls_redis(tmp_path: Path, ca: TestCA) -> Iterator[RedisServer]:
    """A redis-server that takes only TLS connections with a client certificate."""
    server = RedisServer(tmp_path / "redis", tls=server_tls(ca, "redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def tls_section(ca: TestCA, url: str) -> dict[str, Any]:
    cert, key = ca.issue("agentd")
    return {"url": url, "tls_ca": str(ca.ca_file), "tls_cert": str(cert), "tls_key": str(key)}


async def one_prompt(gateway: RunningAgentd, user: str) -> None:
    client = await connect(gateway.ws_url(token=token(user)))
    await client.recv()
    client.send({"type": "prompt", "id": "p", "text": "hi"})
    assert (await client.recv_until("done"))[-1]["id"] == "p"
    client.close()


async def redis_health(gateway: RunningAgentd) -> dict[str, Any]:
    """The ``redis`` check of agentd's /health, which must be ok."""
    response = await gateway.get("/health")
    check = json.loads(await response.content())["checks"]["redis"]
    assert check["status"] == "ok", check
    detail: dict[str, Any] = check["detail"]
    return detail


def billed(server: RedisServer, user: str) -> str:
    day = datetime.datetime.now(datetime.UTC).date().isoformat()
    return server.cli("--raw", "HGET", f"{{usage}}:day:user:{user}:{day}", "queries").strip()


@pytest_twisted.ensureDeferred
async def test_limits_and_usage_live_in_a_redis_reached_over_tls_with_a_client_certificate(
    tmp_path, ca, tls_redis, agentd
):
    gateway = agentd(merge(base_config(tmp_path), redis=tls_section(ca, tls_redis.url)))
    await one_prompt(gateway, "alice")
    await eventually(lambda: billed(tls_redis, "alice") == "1", what="the query billed")
    assert tls_redis.cli("LLEN", "rl:{alice}:prompts").strip() == "(integer) 1"
    detail = await redis_health(gateway)
    assert detail["primary"] == f"127.0.0.1:{tls_redis.port}"
    assert detail["mode"] == "standalone"


def test_a_server_certificate_from_another_ca_is_refused_when_agentd_is_built(tmp_path, tls_redis):
    stranger = TestCA(tmp_path / "other-ca", "another CA")
    config = from_dict(
        merge(base_config(tmp_path), redis=tls_section(stranger, tls_redis.url)), env={}
    )
    from twisted.internet import reactor

    with pytest.raises(ConfigError) as refused:
        build(config, reactor)
    message = str(refused.value)
    assert message.startswith("[redis] tls_ca: the certificate of 127.0.0.1:")
    assert "does not verify" in message


def test_a_certificate_for_another_name_is_refused_naming_the_url(tmp_path, ca):
    server = RedisServer(tmp_path / "redis", tls=server_tls(ca, "elsewhere", ("10.9.8.7",)))
    server.start()
    try:
        config = from_dict(merge(base_config(tmp_path), redis=tls_section(ca, server.url)), env={})
        from twisted.internet import reactor

        with pytest.raises(ConfigError) as refused:
            build(config, reactor)
    finally:
        server.stop()
    assert str(refused.value).startswith(
        f"[redis] url: the certificate of 127.0.0.1:{server.port} is not valid for 127.0.0.1"
    )


def test_twistd_stops_at_startup_with_one_line_when_the_ca_is_wrong(tmp_path, tls_redis):
    stranger = TestCA(tmp_path / "other-ca", "another CA")
    section = tls_section(stranger, tls_redis.url)
    lines = ['[auth]\njwt_secret = "a-secret-long-enough-for-hs256-0123456789"', "[redis]"]
    lines += [f'{key} = "{value}"' for key, value in section.items()]
    path = tmp_path / "agentd.toml"
    path.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    proc = subprocess.run(
        [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "agentd", "--config", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    output = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(output) == 1, output
    assert output[0].startswith("agentd: configuration error: [redis] tls_ca: the certificate of")


@pytest_twisted.ensureDeferred
async def test_sentinels_and_the_primary_they_name_are_reached_over_tls(tmp_path, ca, agentd):
    group = SentinelGroup(tmp_path / "redis", tls=server_tls(ca, "redis"))
    try:
        group.start()
        gateway = agentd(merge(base_config(tmp_path), redis=group.redis_config()))
        await one_prompt(gateway, "bob")
        await eventually(lambda: billed(group.primary, "bob") == "1", what="the query billed")
        detail = await redis_health(gateway)
        assert detail["primary"] == f"127.0.0.1:{group.primary.port}"
        assert detail["mode"] == "sentinel mymaster"
    finally:
        group.stop()
