"""Development mode: the banner's URLs come from the listen endpoint, parsed as Twisted does."""

from __future__ import annotations

import pytest

from agentd import config as config_module
from agentd.auth import Authenticator
from agentd.config import ConfigError
from agentd.devmode import banner, dev_secret, endpoint_url


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("tcp:8080", "http://127.0.0.1:8080"),
        ("tcp:port=8080", "http://127.0.0.1:8080"),
        ("tcp:8080:interface=0.0.0.0", "http://127.0.0.1:8080"),
        ("tcp:8080:interface=127.0.0.2:backlog=1024", "http://127.0.0.2:8080"),
        ("tcp:8080:10.1.2.3", "http://10.1.2.3:8080"),
        ("tcp:interface=10.1.2.3:port=8080", "http://10.1.2.3:8080"),
        ("tcp6:8080:interface=\\:\\:1", "http://[::1]:8080"),
        ("tcp6:8080:interface=\\:\\:", "http://[::1]:8080"),
        ("tcp6:8080", "http://[::1]:8080"),
        ("tcp6:8080:50:fe80\\:\\:1", "http://[fe80::1]:8080"),
        (
            "ssl:8443:privateKey=/etc/agentd/key.pem:certKey=/etc/agentd/cert.pem",
            "https://127.0.0.1:8443",
        ),
        ("ssl:port=8443:privateKey=k.pem:interface=10.0.0.1", "https://10.0.0.1:8443"),
        ("unix:/run/agentd.sock", None),
        ("unix:address=/run/agentd.sock:mode=660", None),
    ],
)
def test_endpoint_url_reads_endpoint_strings_as_twisted_does(
    endpoint: str, url: str | None
) -> None:
    assert endpoint_url(endpoint) == url


def test_the_banner_gives_working_urls_or_says_why_there_is_none() -> None:
    authenticator = Authenticator.from_config(
        config_module.from_dict({}, env={}).auth, dev_secret="x" * 43
    )
    text = banner(authenticator, "ssl:8443:privateKey=k.pem:interface=10.0.0.1")
    assert "  demo console: https://10.0.0.1:8443/?token=" in text
    assert "  WebSocket:    wss://10.0.0.1:8443/projects/demo/agent/echo?token=" in text
    text = banner(authenticator, "unix:/run/agentd.sock")
    assert "listening on unix:/run/agentd.sock: no URL a browser can open" in text
    assert "  token:        " in text


def test_only_the_embedded_defaults_get_a_development_secret(tmp_path) -> None:
    secret = dev_secret(config_module.load(None, env={}), tmp_path)
    assert len(secret) >= 43
    with pytest.raises(ConfigError, match=r"\[auth\] jwt_secret"):
        dev_secret(config_module.from_dict({}, env={}, source="agentd.toml"), tmp_path)
    configured = config_module.from_dict({"auth": {"jwt_secret": "s" * 32}}, env={})
    assert dev_secret(configured, tmp_path) == ""


def test_the_development_secret_outlives_a_restart_and_is_private(tmp_path) -> None:
    defaults = config_module.load(None, env={})
    first = dev_secret(defaults, tmp_path / "state")
    assert dev_secret(defaults, tmp_path / "state") == first
    kept = tmp_path / "state" / "dev-jwt-secret"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    kept.chmod(0o644)  # readable by others: not trusted, replaced
    assert dev_secret(defaults, tmp_path / "state") != first
    assert kept.stat().st_mode & 0o777 == 0o600
    assert dev_secret(defaults, tmp_path / "other") != first
