"""The ``[redis]`` section: Sentinel, TLS and confirmation keys, each error naming its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor

from agentd.config import ConfigError, from_dict
from agentd.redisstore import RedisStore, RedisTarget, RedisURLError, parse_redis_url
from tests.certs import TestCA

SENTINELS = {"sentinels": ["127.0.0.1:26379", "[::1]:26380"], "master_name": "mymaster"}


def redis_section(**values: Any) -> Any:
    return from_dict({"redis": values}, env={}).redis


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"url": "http://redis/0"}, "[redis] url: must start with redis://, rediss:// or unix://"),
        ({"sentinels": ["127.0.0.1:26379"]}, "[redis] master_name: sentinels and master_name"),
        ({"master_name": "mymaster"}, "[redis] sentinels: sentinels and master_name go together"),
        ({**SENTINELS, "sentinels": ["redis"]}, "[redis] sentinels: 'redis' is not host:port"),
        ({**SENTINELS, "sentinels": ["h:0"]}, "[redis] sentinels: 'h:0' is not host:port"),
        ({**SENTINELS, "url": "redis://redis:6379/0"}, "[redis] url: with sentinels, name no host"),
        ({**SENTINELS, "url": "unix:///run/redis.sock"}, "[redis] url: with sentinels"),
        ({"url": "redis://r/0", "sentinel_password": "s"}, "[redis] sentinel_password: needs"),
        ({**SENTINELS, "sentinel_password": "envv:X"}, "[redis] sentinel_password: must be"),
        ({"url": "redis://r/0", "tls_ca": "/etc/hosts"}, "[redis] tls_ca: needs a rediss:// url"),
        ({"url": "rediss://r/0", "tls_ca": "/no/ca.pem"}, "[redis] tls_ca: /no/ca.pem: no such"),
        ({"url": "rediss://r/0", "tls_cert": "/etc/hosts"}, "[redis] tls_key: tls_cert and"),
        ({"url": "redis://r/0", "confirm_timeout_ms": -1}, "[redis] confirm_timeout_ms: must not"),
        ({"url": "redis://r/0", "replica_grace_seconds": -1}, "[redis] replica_grace_seconds:"),
    ],
)
def test_an_unusable_redis_section_is_refused_naming_the_key(
    section: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        redis_section(**section)
    assert str(refused.value).startswith(expected)


def test_sentinel_mode_takes_credentials_database_and_tls_from_a_url_without_a_host(
    tmp_path: Path,
) -> None:
    ca = TestCA(tmp_path)
    cert, key = ca.issue("agentd")
    redis = redis_section(
        **SENTINELS,
        url="rediss://agentd:secret@/2",
        sentinel_password="env:SENTINEL_PASSWORD",
        tls_ca=str(ca.ca_file),
        tls_cert=str(cert),
        tls_key=str(key),
    )
    assert redis.configured
    assert parse_redis_url(redis.url, sentinel=True) == RedisTarget(
        host="", port=6379, db=2, username="agentd", password="secret", tls=True
    )
    assert parse_redis_url("", sentinel=True) == RedisTarget()
    with pytest.raises(RedisURLError):
        parse_redis_url("redis://somewhere/0", sentinel=True)


def test_rediss_urls_turn_tls_on() -> None:
    assert parse_redis_url("rediss://redis.internal:6380/1") == RedisTarget(
        host="redis.internal", port=6380, db=1, tls=True
    )
    assert not parse_redis_url("redis://redis.internal/1").tls


def test_the_sentinel_password_variable_is_never_forwarded_to_agents() -> None:
    with pytest.raises(ConfigError) as refused:
        from_dict(
            {
                "redis": {**SENTINELS, "sentinel_password": "env:SENTINEL_PASSWORD"},
                "vms": {"forward_env": ["SENTINEL_PASSWORD"]},
            },
            env={},
        )
    assert str(refused.value) == (
        "[vms] forward_env: SENTINEL_PASSWORD holds [redis] sentinel_password; never forwarded"
    )


def test_a_ca_file_that_holds_no_certificate_is_refused_when_the_store_is_built(
    tmp_path: Path,
) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    redis = redis_section(url="rediss://127.0.0.1:1/0", tls_ca=str(bogus))
    with pytest.raises(ConfigError) as refused:
        RedisStore.from_config(redis, reactor)
    assert str(refused.value) == f"[redis] tls_ca: {bogus}: not PEM certificates"


def test_an_unset_sentinel_password_variable_is_refused_when_the_store_is_built() -> None:
    redis = redis_section(**SENTINELS, sentinel_password="env:UNSET_SENTINEL_PASSWORD")
    with pytest.raises(ConfigError) as refused:
        RedisStore.from_config(redis, reactor, environ={})
    assert str(refused.value) == (
        "[redis] sentinel_password: environment variable UNSET_SENTINEL_PASSWORD is not set"
    )
