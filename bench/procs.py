"""The programs under test as child processes of the suite, and what /proc says about them.

agentd runs as ``twistd -n agentd`` from a generated TOML file, so its memory and CPU are its
own; websocketd, sshd and redis-server are the system's binaries on loopback ports.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jwt

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import free_port, require_binary, wait_for_port  # noqa: E402

BIN = Path(sys.executable).parent
SECRET = "bench-secret-0123456789abcdef-0123456789abcdef"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Enough descriptors for 10,000 WebSockets plus agents; the hard limit caps it.
WANTED_FILES = 65536


def agentd_environment(source: Path | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of an agentd from ``source`` (an earlier revision's tree), or from this
    checkout: its tree comes first on the path either way, not the one the virtualenv was
    installed from (another work tree's, perhaps)."""
    env = {k: v for k, v in environ.items() if not k.startswith("AGENTD_")}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    return env


def raise_file_limit() -> int:
    """Raise this process's open-file limit as far as allowed; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = WANTED_FILES if hard == resource.RLIM_INFINITY else min(hard, WANTED_FILES)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def token(user: str, projects: Iterable[str] = ("*",), ttl: int = 3600) -> str:
    claims = {"sub": user, "projects": list(projects), "exp": int(time.time()) + ttl}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def rss_kib(pid: int) -> int:
    """Resident memory of a process; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system time of the process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Sched(NamedTuple):
    """What the scheduler counted for a process, summed over its live threads."""

    cpu_ns: int  # on a CPU, user and system
    waiting_ns: int  # ready to run, waiting for a CPU
    runs: int  # times put on a CPU: each wake-up, and each return after being preempted

    def since(self, earlier: Sched) -> Sched:
        return Sched(*(now - then for now, then in zip(self, earlier, strict=True)))

    def plus(self, more: Sched) -> Sched:
        return Sched(*(mine + theirs for mine, theirs in zip(self, more, strict=True)))


def sched(pid: int) -> Sched:
    """The scheduler's counts of ``pid`` from each thread's ``schedstat``.

    ``/proc/PID/stat`` counts CPU time in clock ticks (10 ms), a few per cent of what
    websocketd spends on a round of prompts; ``schedstat`` counts in nanoseconds. Gateways
    keep their threads (Twisted's pool, Go's Ms), so none of the counts leave with a thread
    that ended.
    """
    total = [0, 0, 0]
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for n in range(3):
            total[n] += int(fields[n])
    return Sched(*total)


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    found, queue = [], children(pid)
    while queue:
        child = queue.pop()
        found.append(child)
        queue.extend(children(child))
    return found


class CpuMeter:
    """CPU used by named processes between ``start`` and ``stop``, as a share of one core."""

    def __init__(self, pids: Mapping[str, int | list[int]]) -> None:
        self._pids = {name: [p] if isinstance(p, int) else list(p) for name, p in pids.items()}
        self._start: dict[str, float] = {}
        self._started = 0.0
        self.shares: dict[str, float] = {}

    def _totals(self) -> dict[str, float]:
        totals = {}
        for name, pids in self._pids.items():
            total = 0.0
            for pid in pids:
                try:
                    total += cpu_seconds(pid)
                except (FileNotFoundError, ProcessLookupError):
                    continue
            totals[name] = total
        return totals

    def start(self) -> CpuMeter:
        self._start = self._totals()
        self._started = time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._started
        end = self._totals()
        self.shares = {
            name: round((end[name] - self._start.get(name, 0.0)) / elapsed, 3) for name in end
        }
        return self.shares


def toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """The small TOML subset agentd's configuration needs."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return "[" + ", ".join(value(x) for x in v) + "]"

    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {value(v)}" for k, v in keys.items())
    return "\n".join(lines) + "\n"


class Process:
    """A child process the suite started and ends."""

    name = "process"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Agentd(Process):
    """``twistd -n agentd`` on a free loopback port from a configuration dict."""

    name = "agentd"

    def __init__(
        self,
        work: Path,
        sections: Mapping[str, Mapping[str, Any]],
        backlog: int | None = None,
        source: Path | None = None,
    ) -> None:
        super().__init__()
        self.source = source  # another tree to import agentd from, or this checkout
        self.twistd_options: list[str] = []  # before the plugin's name, such as --profile
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        config = {name: dict(keys) for name, keys in sections.items()}
        listen = f"tcp:{self.port}:interface=127.0.0.1"
        # Twisted's default listen backlog is 50 connections waiting to be accepted.
        config.setdefault("server", {})["listen"] = [
            listen if backlog is None else f"{listen}:backlog={backlog}"
        ]
        config["server"].setdefault("demo_page", False)
        config["server"].setdefault("drain_seconds", 0.0)
        config.setdefault("auth", {})["jwt_secret"] = SECRET
        config.setdefault("usage", {}).setdefault("spool_dir", str(work / "spool"))
        config.setdefault("log", {}).setdefault("file", str(work / "agentd.log"))
        self.config_path = work / "agentd.toml"
        self.config_path.write_text(toml(config))
        self.work = work

    def start(self, wait: bool = True) -> Agentd:
        """Start twistd; with ``wait``, return once it listens (else see ``ready``)."""
        env = agentd_environment(self.source, os.environ)
        self.proc = subprocess.Popen(
            [
                str(BIN / "twistd"),
                "--nodaemon",
                "--pidfile=",
                *self.twistd_options,
                "agentd",
                "--config",
                str(self.config_path),
            ],
            cwd=self.work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "twistd.err", "ab"),
        )
        if wait:
            self.ready()
        return self

    def ready(self) -> None:
        wait_for_port(self.port, timeout=30)

    def path(self, project: str, agent: str, user: str, **params: Any) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"token": token(user), **params}.items())
        return f"/projects/{project}/agent/{agent}?{query}"

    def metric(self, name: str) -> float:
        """A value from /metrics (the sum over its label sets)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


class Websocketd(Process):
    """websocketd serving ``command`` on a free loopback port, one process per connection."""

    name = "websocketd"

    def __init__(self, command: list[str]) -> None:
        super().__init__()
        self.port = free_port()
        self.command = command

    def start(self) -> Websocketd:
        binary = require_binary("websocketd")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--port={self.port}",
                "--address=127.0.0.1",
                "--loglevel=error",
                *self.command,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=30)
        return self

    @staticmethod
    def version() -> str:
        out = subprocess.run(
            [require_binary("websocketd"), "--version"], capture_output=True, text=True
        )
        return out.stdout.strip() or out.stderr.strip()
