"""Real servers for the test suite: redis-server and OpenSSH sshd on loopback ports."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def require_binary(name: str, *extra_dirs: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *extra_dirs]))
    if path is None:
        raise RuntimeError(f"{name} is not installed; run the README's test command as root once")
    return path


class RedisServer:
    """A private redis-server on a free loopback port that tests can stop, kill and restart."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.binary = require_binary("redis-server", "/usr/sbin")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str) -> str:
        """Run redis-cli against this server and return its output."""
        cli = require_binary("redis-cli", "/usr/sbin")
        out = subprocess.run(
            [cli, "-p", str(self.port), "--no-raw", *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout


REPO = Path(__file__).resolve().parent.parent
SHIPPED_SSHD_CONFIG = REPO / "vm-image" / "sshd_config"


def agent_command(test_options: bool = True) -> str:
    """How the VM side runs the agent CLI in tests: the installed console script importing
    this checkout's code (agents get no PYTHONPATH from agentd or sshd), by default with the
    test options that tests drive the echo agent by."""
    script = Path(sys.executable).parent / "agentd-agent"
    flag = " --test-options" if test_options else ""
    return f"env PYTHONPATH={shlex.quote(str(REPO))} {script}{flag} {{agent}}"


def keygen(path: Path, comment: str = "agentd-test") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    return path


class SshServer:
    """OpenSSH sshd on a free loopback port, configured from vm-image/sshd_config.

    Only the lines that must differ on a test machine are replaced: the port and listen
    address, file locations, and the login user (the user running the tests; sshd as an
    unprivileged user can only log that same user in).
    """

    def __init__(
        self,
        directory: Path,
        max_sessions: int | None = None,
        overrides: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.binary = require_binary("sshd", "/usr/sbin")
        self.max_sessions = max_sessions
        self.overrides = overrides or {}
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o755)
        self.host_key = keygen(directory / "ssh_host_ed25519_key", "host")
        self.client_key = keygen(directory / "id_ed25519", "agentd")
        self.authorized_keys = directory / "authorized_keys"
        self.authorized_keys.write_bytes((directory / "id_ed25519.pub").read_bytes())
        self.known_hosts = directory / "known_hosts"
        host_pub = (directory / "ssh_host_ed25519_key.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.user = pwd_name()
        self.config = directory / "sshd_config"
        self.config.write_text(self.render_config())

    def render_config(self) -> str:
        replacements = {
            "Port": str(self.port),
            "ListenAddress": "127.0.0.1",
            "HostKey": str(self.host_key),
            "PidFile": str(self.directory / "sshd.pid"),
            "AuthorizedKeysFile": str(self.authorized_keys),
            "AllowUsers": self.user,
        }
        if os.geteuid() == 0:
            replacements["PermitRootLogin"] = "prohibit-password"
        if self.max_sessions is not None:
            replacements["MaxSessions"] = str(self.max_sessions)
        replacements.update(self.overrides)
        lines = []
        for line in SHIPPED_SSHD_CONFIG.read_text().splitlines():
            keyword = line.split(" ", 1)[0]
            if keyword in replacements:
                line = f"{keyword} {replacements[keyword]}"
            lines.append(line)
        # Temporary directories are not owned the way StrictModes wants.
        lines.append("StrictModes no")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "-D", "-e", "-f", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "sshd.log", "ab"),
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def vms_section(self, **extra: Any) -> dict[str, Any]:
        """The ``[vms]`` configuration that reaches this sshd."""
        return {
            "transport": "ssh",
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "private_key": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            **extra,
        }

    def log(self) -> str:
        path = self.directory / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""


def pwd_name() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name
