"""Real servers for the test suite: redis-server (and Sentinel) and OpenSSH sshd on loopback."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ServerTLS:
    """A Redis server's (or Sentinel's) certificate, key and the CA it trusts for clients and
    for the servers it connects to itself."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_args(self, port: int) -> list[str]:
        return [
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(self.cert_file),
            "--tls-key-file",
            str(self.key_file),
            "--tls-ca-cert-file",
            str(self.ca_file),
            "--tls-replication",
            "yes",
        ]

    def cli_args(self) -> list[str]:
        return [
            "--tls",
            "--cacert",
            str(self.ca_file),
            "--cert",
            str(self.cert_file),
            "--key",
            str(self.key_file),
        ]


def redis_command(port: int, *args: str, tls: ServerTLS | None = None) -> list[str]:
    """The redis-cli command line that runs ``args`` against 127.0.0.1:``port``."""
    cli = require_binary("redis-cli", "/usr/sbin")
    return [cli, "-p", str(port), *(tls.cli_args() if tls else []), "--no-raw", *args]


def redis_cli(port: int, *args: str, tls: ServerTLS | None = None) -> str:
    """Run redis-cli against 127.0.0.1:``port`` and return its output."""
    out = subprocess.run(
        redis_command(port, *args, tls=tls),
        check=True,
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout


class ServerProcess:
    """A server a test runs on ``port``: started, waited for, and stopped at the end."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    def run(self, argv: list[str], log: Path | None = None) -> None:
        """Start ``argv`` (its stderr to ``log``) and wait until it listens on ``port``."""
        stderr = open(log, "ab") if log is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class RedisServer(ServerProcess):
    """A private redis-server on a free loopback port that tests can stop, kill and restart.

    ``args`` are more command-line options (``--replicaof``, ``--enable-debug-command``);
    with ``tls`` it takes only TLS connections.
    """

    def __init__(
        self, directory: Path, args: Sequence[str] = (), tls: ServerTLS | None = None
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.binary = require_binary("redis-server", "/usr/sbin")
        self.args = list(args)
        self.tls = tls

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        listen = self.tls.server_args(self.port) if self.tls else ["--port", str(self.port)]
        self.run(
            [
                self.binary,
                *listen,
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
                *self.args,
            ]
        )

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
        return redis_cli(self.port, *args, tls=self.tls)

    def command_calls(self) -> dict[str, int]:
        """Calls per command since the server started or its last CONFIG RESETSTAT;
        subcommands (``config|resetstat``, the reset itself) left out."""
        stats = self.cli("--raw", "INFO", "commandstats")
        calls = re.findall(r"^cmdstat_(\w+):calls=(\d+)", stats, re.MULTILINE)
        return {name: int(count) for name, count in calls}


class RedisSentinel(ServerProcess):
    """A Redis Sentinel on a free loopback port, watching one master with short timeouts so
    that a failover takes seconds: down after ``down_after_ms``, a quorum of ``quorum``."""

    def __init__(
        self,
        directory: Path,
        master_port: int,
        master_name: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 2000,
        tls: ServerTLS | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.binary = require_binary("redis-server", "/usr/sbin")
        self.tls = tls
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / "sentinel.log"
        self.config = directory / "sentinel.conf"
        # Sentinel rewrites its configuration file as it learns: it must be its own.
        self.config.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"dir {directory}",
                    f"logfile {self.log}",
                    f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}",
                    f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
                    f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
                    "",
                ]
            )
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        listen = self.tls.server_args(self.port) if self.tls else ["--port", str(self.port)]
        self.run([self.binary, str(self.config), "--sentinel", *listen])

    def cli(self, *args: str) -> str:
        return redis_cli(self.port, *args, tls=self.tls)

    def switch_times(self) -> list[float]:
        """When this Sentinel announced ``+switch-master`` (UNIX time, from its log)."""
        times = []
        for line in self.log.read_text(errors="replace").splitlines():
            if "+switch-master" in line:
                stamp = " ".join(line.split()[1:5])  # "30 Nov 2026 17:47:43.740"
                moment = time.strptime(stamp.rsplit(".", 1)[0], "%d %b %Y %H:%M:%S")
                times.append(time.mktime(moment) + int(stamp.rsplit(".", 1)[1]) / 1000)
        return times


REPO = Path(__file__).resolve().parent.parent
SHIPPED_SSHD_CONFIG = REPO / "vm-image" / "sshd_config"


def agent_command(test_options: bool = True) -> str:
    """How the VM side runs the agent CLI in tests: the installed console script importing
    this checkout's code (agents get no PYTHONPATH from agentd or sshd), by default with the
    test options that tests drive the echo agent by."""
    script = Path(sys.executable).parent / "agentd-agent"
    flag = " --test-options" if test_options else ""
    return f"env PYTHONPATH={shlex.quote(str(REPO))} {script}{flag} {{agent}}"


def attach_command(repo: Path = REPO, sessions_dir: Path | None = None) -> str:
    """How agentd attaches to a session in tests: ``agentd-agent attach`` of this checkout
    (or of the tree ``repo``). The test's own sessions directory is ``[agents] sessions_dir``;
    revisions before that key take it here, as ``sessions_dir``."""
    script = Path(sys.executable).parent / "agentd-agent"
    command = f"env PYTHONPATH={shlex.quote(str(repo))} {script} attach"
    if sessions_dir is not None:
        command += f" --sessions-dir {shlex.quote(str(sessions_dir))}"
    return command


def sessions_dir(tmp_path: Path) -> Path:
    """A test's sessions directory, also reached as ``tmp_path / "sessions"``: a directory
    beside ``tmp_path`` with a short name, so that a holder's socket path fits in the 107
    bytes a unix socket address holds and agentd connects to it directly, as it would on a
    VM (``~/.agentd/sessions``); under ``tmp_path`` it would not."""
    link = tmp_path / "sessions"
    if link.is_symlink():
        return link.resolve()
    short = Path(tempfile.mkdtemp(prefix="s", dir=tmp_path.parent))
    link.symlink_to(short)
    return short


def is_holder(pid: int) -> bool:
    """Whether ``pid`` is a live session holder (not a zombie, not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"agentd.agent.holder" in cmdline and state != "Z"


def holder_pids(sessions_dir: Path) -> set[int]:
    """The live holders of the sessions anywhere under ``sessions_dir``."""
    pids = set()
    for directory, _, files in os.walk(sessions_dir, followlinks=True):
        if "holder.pid" not in files:
            continue
        try:
            pid = int((Path(directory) / "holder.pid").read_text())
        except (FileNotFoundError, ValueError):
            continue
        if is_holder(pid):
            pids.add(pid)
    return pids


def kill_holders(sessions_dir: Path) -> None:
    """End every holder anywhere under ``sessions_dir`` and its agent (by process group):
    holders outlive agentd by design, and a test leaves none running."""
    pids = holder_pids(sessions_dir)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(is_holder(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def keygen(path: Path, comment: str = "agentd-test") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    return path


class SshServer(ServerProcess):
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
        self.run([self.binary, "-D", "-e", "-f", str(self.config)], self.directory / "sshd.log")

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


class HaProxy(ServerProcess):
    """HAProxy on a free loopback port balancing round-robin over backends, no stickiness,
    as a load balancer in front of agentd instances is configured (docs/operations.md)."""

    def __init__(self, directory: Path, backends: list[int]) -> None:
        self.directory = directory
        self.port = free_port()
        self.binary = require_binary("haproxy", "/usr/sbin")
        self.backends = backends
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "haproxy.cfg"
        servers = "\n".join(
            f"  server agentd{i} 127.0.0.1:{port} check inter 100ms fall 1 rise 1"
            for i, port in enumerate(backends)
        )
        self.config.write_text(
            "defaults\n"
            "  mode http\n"
            "  timeout connect 1s\n"
            "  timeout client 30s\n"
            "  timeout server 30s\n"
            # A WebSocket is a tunnel once upgraded: this is its idle timeout.
            "  timeout tunnel 60s\n"
            # A backend refusing connections (restarting) is retried on another one.
            "  retries 3\n"
            "  option redispatch\n"
            "frontend websockets\n"
            f"  bind 127.0.0.1:{self.port}\n"
            "  default_backend agentd\n"
            "backend agentd\n"
            "  balance roundrobin\n"
            # Draining instances answer 503 here and are taken out of the rotation.
            "  option httpchk GET /health/ready\n"
            "  http-check expect status 200\n"
            f"{servers}\n"
        )

    def start(self) -> None:
        self.run([self.binary, "-db", "-f", str(self.config)], self.directory / "haproxy.log")
