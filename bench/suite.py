"""What every scenario shares: the servers it starts, the peers it compares, and statistics.

A ``Context`` starts what a scenario asks for (agentd as ``twistd``, websocketd, a real sshd
and redis-server, all on loopback) and ends all of it when the suite is done. A ``Target`` is
one thing a client can stream from: agentd, websocketd, or the OpenSSH client running the
agent on the far side of sshd.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import Agentd, Process, Websocketd, descendants, rss_kib
from bench.ws import BlockingClient
from tests.servers import (
    REPO,
    RedisServer,
    SshServer,
    agent_command,
    attach_command,
    kill_holders,
)

# The echo agent as the tests run it: with the test options the scenarios ask it for
# (repeat, delta_bytes, delay_ms in a prompt's options), importing this checkout's code.
ECHO = agent_command()
# How often the agentd client confirms what it read (agent-client.js: once a second).
CONFIRM_EVERY = 10_000
TICKER = str(Path(__file__).resolve().parent / "agents" / "ticker")
# Every scenario sends more prompts than the production limit of 60 a minute allows.
UNLIMITED = {"prompts_per_minute": 10_000_000, "connections_per_minute": 10_000_000}
# Every client comes from 127.0.0.1, where production clients come from many addresses: one
# address may hold as many unauthenticated connections as the whole process (1,024, the
# default), so a storm of 1,000 reconnects meets the same limit it would from 1,000 clients.
ONE_ADDRESS = {"max_unauthenticated_per_address": 1024}


def echo_command(source: Path | None = None) -> str:
    """The echo agent's command, importing this checkout's code or ``source``'s."""
    if source is None:
        return ECHO
    return ECHO.replace(shlex.quote(str(REPO)), shlex.quote(str(source)), 1)


class BenchSshServer(SshServer):
    """The tests' sshd (vm-image/sshd_config) with one more substitution for this machine.

    sshd logs in as the user running the suite, whose shell reads its ``~/.bashrc`` for every
    exec session; on a developer's machine that may start version managers and take a second
    under load, which a VM's ``coder`` account does not. ``SetEnv HOME`` points the shell at
    an empty home, so each session starts as it would on a VM.
    """

    def render_config(self) -> str:
        home = self.directory / "home"
        home.mkdir(exist_ok=True)
        return super().render_config() + f"SetEnv HOME={home}\n"


@dataclass
class Context:
    smoke: bool
    runs: int
    work: Path
    log: Callable[[str], None]
    # Scenarios that can also record agentd with py-spy, after measuring, do so.
    profile: bool = False
    # Earlier revisions of agentd (label -> source tree) that scenarios able to compare
    # versions run beside this checkout's.
    baselines: dict[str, Path] = field(default_factory=dict)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _scope: contextlib.ExitStack | None = None
    _sshd: dict[int | None, SshServer] = field(default_factory=dict)
    _started: int = 0

    def close(self) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """What a scenario starts ends with it; sshd is shared by all of them."""
        with contextlib.ExitStack() as stack:
            self._scope = stack
            try:
                yield
            finally:
                self._scope = None

    @property
    def _current(self) -> contextlib.ExitStack:
        return self._scope if self._scope is not None else self._stack

    def sshd(self, max_sessions: int | None = None) -> SshServer:
        """A real sshd from vm-image/sshd_config; ``max_sessions`` substitutes MaxSessions."""
        if max_sessions not in self._sshd:
            self._started += 1
            server = BenchSshServer(self.work / f"sshd-{self._started}", max_sessions=max_sessions)
            server.start()
            self._stack.callback(server.stop)
            self._sshd[max_sessions] = server
        return self._sshd[max_sessions]

    def redis(self) -> RedisServer:
        self._started += 1
        server = RedisServer(self.work / f"redis-{self._started}")
        server.start()
        self._current.callback(server.stop)
        return server

    def agentd(
        self,
        name: str,
        backlog: int | None = None,
        source: Path | None = None,
        wait: bool = True,
        twistd_options: Sequence[str] = (),
        **sections: dict[str, Any],
    ) -> Agentd:
        """agentd from this checkout, or from ``source`` (an earlier revision's tree), which
        then runs the echo agent of that revision too. Without ``wait``, the caller waits
        with ``ready()``, so several can start at once."""
        sections.setdefault("agents", {"names": ["echo"], "command": echo_command(source)})
        tree = REPO if source is None else source
        # What the revision's configuration knows: holders (``attach_command``) came with
        # durable sessions, and ``sessions_dir`` after them.
        config_source = (tree / "agentd" / "config.py").read_text()
        if "attach_command" in config_source:
            # Sessions are held in this run's own directory, and their holders end with it.
            # (Revisions before durable sessions run their agents directly.)
            sessions = self.work / "sessions" / (source.name if source is not None else "now")
            agents = sections["agents"]
            if "sessions_dir" in config_source:
                agents.setdefault("attach_command", attach_command(tree))
                agents.setdefault("sessions_dir", str(sessions))
            else:  # revisions before [agents] sessions_dir
                agents.setdefault("attach_command", attach_command(tree, sessions))
            self._current.callback(kill_holders, sessions)
        sections["ratelimit"] = {**UNLIMITED, **sections.get("ratelimit", {})}
        sections["server"] = {**ONE_ADDRESS, **sections.get("server", {})}
        self._started += 1
        process = Agentd(self.work / f"agentd-{self._started}-{name}", sections, backlog, source)
        process.twistd_options = list(twistd_options)
        self._current.callback(process.stop)
        return process.start(wait)

    def websocketd(self, command: list[str]) -> Websocketd:
        process = Websocketd(command)
        self._current.callback(process.stop)
        return process.start()

    def ssh_command(self, sshd: SshServer, command: str) -> list[str]:
        """The OpenSSH client running ``command`` on the far side of ``sshd``."""
        return [
            "ssh",
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={sshd.known_hosts}",
            "-i",
            str(sshd.client_key),
            "-p",
            str(sshd.port),
            f"{sshd.user}@127.0.0.1",
            command,
        ]

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, **kwargs)

        def end() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

        self._current.callback(end)
        return proc

    def workers(self, count: int, total: int, args: list[str], prefix: str) -> list[Worker]:
        """``count`` load-generator processes sharing ``total`` clients."""
        workers = []
        first = 0
        for n in range(count):
            size = total // count + (1 if n < total % count else 0)
            proc = self.spawn(
                [
                    sys.executable,
                    "-m",
                    "bench.loadgen",
                    "--users",
                    f"{prefix}:{first}:{size}",
                    *args,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=Path(__file__).resolve().parent.parent,
            )
            workers.append(Worker(proc))
            first += size
        return workers


class Worker:
    """One ``bench.loadgen`` process, steered line by line."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def event(self, expected: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a load generator ended before reporting {expected!r}")
        event: dict[str, Any] = json.loads(line)
        if event.get("event") != expected:
            raise RuntimeError(f"expected {expected!r} from a load generator, got {event}")
        return event

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.command("close")
        with contextlib.suppress(RuntimeError):
            self.event("closed")
        self.proc.wait(timeout=60)


def all_events(workers: Sequence[Worker], expected: str) -> list[dict[str, Any]]:
    return [w.event(expected) for w in workers]


# -- what a client streams from ------------------------------------------------------------


class Target:
    """A server (or pipe) that runs the echo agent for one client connection."""

    name = ""
    extra_messages = 0  # messages per answer beyond the agent's own (agentd's ack)

    def open(self) -> None:
        raise NotImplementedError

    def send(self, line: bytes) -> None:
        raise NotImplementedError

    def recv(self) -> bytes:
        raise NotImplementedError

    def count_until(self, count: int) -> tuple[int, int]:
        raise NotImplementedError

    def pids(self) -> dict[str, list[int]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def answer(self, prompt: dict[str, Any]) -> tuple[float, float]:
        """Send a prompt; seconds to its first delta and to its done."""
        started = time.perf_counter()
        self.send(json.dumps(prompt).encode())
        first = 0.0
        while True:
            message = self.recv()
            if not first and b'"delta"' in message:
                first = time.perf_counter() - started
            if b'"done"' in message:
                return first, time.perf_counter() - started


class WebSocketTarget(Target):
    def __init__(self, name: str, server: Process, port: int, path: str, ack: bool) -> None:
        self.name = name
        self.server = server
        self.port = port
        self.path = path
        self.extra_messages = 1 if ack else 0
        self.client: BlockingClient | None = None
        self.session = ""  # agentd's session id, once open

    def open(self) -> None:
        self.client = BlockingClient("127.0.0.1", self.port, self.path)
        if self.extra_messages:
            self.session = json.loads(self.client.recv()).get("session", "")

    def send(self, line: bytes) -> None:
        assert self.client is not None
        self.client.send(line)

    def recv(self) -> bytes:
        assert self.client is not None
        return self.client.recv()

    def count_until(self, count: int) -> tuple[int, int]:
        assert self.client is not None
        confirm = CONFIRM_EVERY if self.extra_messages else 0  # websocketd would pass it on
        seen, size, last = self.client.count_until(count, confirm_every=confirm)
        if b'"done"' not in last:
            raise RuntimeError(f"{self.name}: the stream did not end with done")
        return seen, size

    def pids(self) -> dict[str, list[int]]:
        return {self.server.name: [self.server.pid], "agent": descendants(self.server.pid)}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class SshPipeTarget(Target):
    """The OpenSSH client with the agent on the far side: lines on a pipe, no WebSocket."""

    def __init__(self, name: str, argv: list[str], sshd: SshServer) -> None:
        self.name = name
        self.argv = argv
        self.sshd = sshd
        self.proc: subprocess.Popen[bytes] | None = None
        self.buffer = b""

    def open(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )

    def send(self, line: bytes) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")

    def _more(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
        if not chunk:
            raise ConnectionError("ssh ended")
        self.buffer += chunk

    def recv(self) -> bytes:
        while b"\n" not in self.buffer:
            self._more()
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def count_until(self, count: int) -> tuple[int, int]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        seen = self.buffer.count(b"\n")
        size = len(self.buffer)
        tail = self.buffer[-512:]
        while seen < count:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise ConnectionError("ssh ended")
            seen += chunk.count(b"\n")
            size += len(chunk)
            tail = (tail + chunk)[-512:]
        if b'"done"' not in tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]:
            raise RuntimeError(f"{self.name}: the stream did not end with done")
        self.buffer = b""
        return seen, size - seen

    def pids(self) -> dict[str, list[int]]:
        assert self.proc is not None
        assert self.sshd.process is not None
        sshd = self.sshd.process.pid
        return {"ssh": [self.proc.pid], "sshd+agent": [sshd, *descendants(sshd)]}

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


# -- statistics -----------------------------------------------------------------------------


def summary(values: Sequence[float], digits: int = 1) -> dict[str, Any]:
    """Median and spread (min to max, and that range as a share of the median) of runs."""
    median = statistics.median(values)
    low, high = min(values), max(values)
    return {
        "median": round(median, digits),
        "min": round(low, digits),
        "max": round(high, digits),
        "spread_pct": round(100 * (high - low) / median, 1) if median else 0.0,
        "runs": [round(v, digits) for v in values],
    }


def percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def sampled_rss(pid: int, every: float) -> Iterator[list[tuple[float, int]]]:
    """RSS of ``pid`` every ``every`` seconds on a thread, while the block runs."""
    import threading

    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                samples.append((round(time.monotonic() - started, 2), rss_kib(pid)))
            stop.wait(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def require(program: str) -> str:
    path = shutil.which(program, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
    if path is None:
        raise RuntimeError(f"{program} is not installed (scripts/system-deps installs it)")
    return path
