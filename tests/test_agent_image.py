"""The VM image: the Dockerfile's structure, and the shipped sshd_config as sshd reads it."""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
from pathlib import Path

import pytest

from agentd.agent import agents
from agentd.pricing import PriceTable
from tests.fake_providers import REPO

IMAGE = REPO / "vm-image"


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in (IMAGE / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        result.append((keyword.upper(), " ".join(arguments.split())))
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def copies() -> dict[str, list[str]]:
    """COPY destination -> sources."""
    result = {}
    for keyword, arguments in instructions():
        if keyword == "COPY":
            *sources, destination = shlex.split(arguments)
            result[destination] = sources
    return result


def test_dockerfile_starts_from_python_3_11() -> None:
    keyword, image = instructions()[0]
    assert keyword == "FROM"
    assert image.startswith("python:3.11")


def test_dockerfile_ships_the_sshd_config_agents_file_and_price_table() -> None:
    assert copies()["/etc/ssh/sshd_config"] == ["vm-image/sshd_config"]
    assert copies()["/etc/agentd/agents.toml"] == ["vm-image/agents.toml"]
    assert copies()["/etc/agentd/prices.toml"] == ["etc/prices.toml"]
    assert agents.DEFAULT_PATH == "/etc/agentd/agents.toml"


def test_every_copy_source_exists_in_the_build_context() -> None:
    for destination, sources in copies().items():
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source} {destination}: no such path"


def test_dockerfile_creates_coder_with_a_usable_key_login() -> None:
    runs = " && ".join(arguments for keyword, arguments in instructions() if keyword == "RUN")
    assert "useradd --create-home --shell /bin/bash coder" in runs
    # Without this, "UsePAM no" makes sshd treat useradd's locked account as unusable.
    assert "usermod --password '*' coder" in runs
    assert "install -d -m 0700 -o coder -g coder /home/coder/.ssh" in runs


def test_dockerfile_installs_agentd_with_the_agent_extra_on_the_path() -> None:
    runs = " && ".join(arguments for keyword, arguments in instructions() if keyword == "RUN")
    assert 'pip install --no-cache-dir "/src[agent]"' in runs
    assert "ln -s /opt/agentd/bin/agentd-agent /usr/local/bin/agentd-agent" in runs
    assert "openssh-server" in runs


def test_dockerfile_exposes_the_port_sshd_listens_on() -> None:
    exposed = [arguments for keyword, arguments in instructions() if keyword == "EXPOSE"]
    assert exposed == ["2222"]
    assert "Port 2222" in (IMAGE / "sshd_config").read_text().splitlines()


def test_entrypoint_is_executable_valid_sh_and_starts_sshd_with_the_shipped_config() -> None:
    [entrypoint] = [arguments for keyword, arguments in instructions() if keyword == "ENTRYPOINT"]
    assert entrypoint == '["/usr/local/sbin/agentd-vm-entrypoint"]'
    assert copies()["/usr/local/sbin/agentd-vm-entrypoint"] == ["vm-image/entrypoint.sh"]
    script = IMAGE / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True)
    assert script.read_text().rstrip().endswith("exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config")


def test_shipped_agents_are_valid_and_every_model_has_a_price() -> None:
    shipped = agents.load(str(IMAGE / "agents.toml"))
    prices = PriceTable.load(REPO / "etc" / "prices.toml")
    assert {spec.provider for spec in shipped.values()} == {"anthropic", "openai"}
    for name, spec in shipped.items():
        assert prices.price(spec.model) is not None, f"agents.{name}.model has no price"
        assert spec.system


def sshd_config_for_test(tmp_path: Path) -> Path:
    """The shipped sshd_config with only Port, HostKey, PidFile and AllowUsers replaced."""
    host_key = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    replacements = {
        "Port": "2299",
        "HostKey": str(host_key),
        "PidFile": str(tmp_path / "sshd.pid"),
        "AllowUsers": pwd.getpwuid(os.geteuid()).pw_name,
    }
    lines = []
    for line in (IMAGE / "sshd_config").read_text().splitlines():
        keyword = line.split(" ", 1)[0]
        lines.append(f"{keyword} {replacements.pop(keyword)}" if keyword in replacements else line)
    assert not replacements, f"the shipped sshd_config lacks {sorted(replacements)}"
    config = tmp_path / "sshd_config"
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.fixture
def sshd_binary() -> str:
    for candidate in ("/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if os.access(candidate, os.X_OK):
            if os.geteuid() == 0:
                Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
            return candidate
    pytest.fail("OpenSSH sshd is not installed")


def test_shipped_sshd_config_passes_sshd_test_mode(tmp_path: Path, sshd_binary: str) -> None:
    config = sshd_config_for_test(tmp_path)
    result = subprocess.run(
        [sshd_binary, "-t", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_shipped_sshd_config_means_key_only_logins_and_accepts_the_agent_env(
    tmp_path: Path, sshd_binary: str
) -> None:
    config = sshd_config_for_test(tmp_path)
    result = subprocess.run(
        [sshd_binary, "-T", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    effective: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        keyword, _, value = line.partition(" ")
        effective.setdefault(keyword, []).append(value)
    assert effective["passwordauthentication"] == ["no"]
    assert effective["kbdinteractiveauthentication"] == ["no"]
    assert effective["pubkeyauthentication"] == ["yes"]
    assert effective["permitrootlogin"] == ["no"]
    accepted = " ".join(effective["acceptenv"]).split()
    for variable in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "AGENTD_*"):
        assert variable in accepted
