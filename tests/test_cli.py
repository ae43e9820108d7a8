"""The ``agentd`` administrative commands: ``check-config`` and ``token``."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentd import cli
from agentd.auth import Authenticator
from agentd.config import ENV_OVERRIDES
from tests.test_auth import SECRET, public_pem


@pytest.fixture(autouse=True)
def no_secrets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ENV_OVERRIDES:
        monkeypatch.delenv(variable, raising=False)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    return str(path)


def test_check_config_refuses_algorithms_that_do_not_fit_the_key(tmp_path, capsys) -> None:
    key = tmp_path / "rsa.pem"
    key.write_bytes(public_pem("rsa"))
    path = write(
        tmp_path,
        f'[auth]\njwt_public_key_file = "{key}"\njwt_algorithms = ["RS256", "HS256", "none"]\n',
    )
    assert cli.main(["check-config", path]) == 2
    assert "configuration error: [auth] jwt_algorithms: " in capsys.readouterr().err

    path = write(tmp_path, f'[auth]\njwt_public_key_file = "{key}"\njwt_algorithms = ["PS256"]\n')
    assert cli.main(["check-config", path]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("listen", "origins", "warned"),
    [
        ("tcp:8080:interface=0.0.0.0", "[]", True),
        ("tcp:8080", "[]", True),
        ("tcp:port=8080:interface=10.0.0.11:backlog=1024", "[]", True),
        ("tcp:8080:interface=0.0.0.0", '["https://app.example"]', False),
        ("tcp:8080:interface=127.0.0.1:backlog=1024", "[]", False),
        ("unix:/run/agentd.sock", "[]", False),
    ],
)
def test_check_config_warns_of_dns_rebinding_but_still_passes(
    tmp_path, capsys, listen: str, origins: str, warned: bool
) -> None:
    path = write(
        tmp_path,
        f'[server]\nlisten = ["{listen}"]\nallowed_origins = {origins}\n'
        f'[auth]\njwt_secret = "{SECRET}"\n',
    )
    assert cli.main(["check-config", path]) == 0
    out = capsys.readouterr()
    assert ": ok (" in out.out
    assert ("warning: [server] allowed_origins is empty" in out.err) is warned
    assert SECRET not in out.out + out.err


@pytest.mark.parametrize(
    ("endpoint", "beyond"),
    [
        ("tcp:8080", True),
        ("tcp:8080:interface=127.0.0.1", False),
        ("tcp:8080:127.0.0.2", False),
        ("tcp:8080:interface=localhost", False),
        ("tcp6:8080:interface=\\:\\:1", False),
        ("tcp6:8080", True),
        ("tcp:8080:interface=0.0.0.0", True),
        ("tcp:8080:interface=agentd.internal", True),
        ("ssl:8443:privateKey=/k\\:ey.pem:interface=127.0.0.1", False),
        ("ssl:8443:privateKey=/key.pem", True),
        ("unix:/run/agentd.sock", False),
        ("systemd:domain=INET:index=0", True),
    ],
)
def test_which_listen_endpoints_reachbeyond_loopback(endpoint: str, beyond: bool) -> None:
    assert cli.beyond_loopback(endpoint) is beyond


def test_token_refuses_a_ttl_beyond_the_configured_lifetime(tmp_path, capsys) -> None:
    path = write(tmp_path, f'[auth]\njwt_secret = "{SECRET}"\nmax_token_lifetime_seconds = 3600\n')
    base = ["token", "--user", "alice", "--project", "demo", "--config", path]
    assert cli.main([*base, "--ttl", "7200"]) == 2
    assert "--ttl 7200 is longer than [auth] max_token_lifetime_seconds" in capsys.readouterr().err
    assert cli.main([*base, "--ttl", "3600"]) == 0
    token = capsys.readouterr().out.strip()
    assert Authenticator(secret=SECRET, max_lifetime_seconds=3600).verify(token).user == "alice"
