"""Read a py-spy recording (``py-spy record -f raw``): where the time went, and whose it is.

Each sample is charged to the innermost frame that belongs to a named owner (agentd, the
Redis client, the metrics library, autobahn, the benchmark driver), so Twisted's Deferred
machinery counts against whoever called it, and whatever no owner called (the reactor
reading and writing sockets and pipes) stays the reactor's. Then the functions with the most
samples of their own, and those with the most samples below them.

    .venv/bin/python -m bench.profiles profile.txt [--top 15]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# (fragment of a frame's file, start of its function name, owner): first match wins. The
# rate-limit ceiling benchmark's stand-ins are charged to what they stand for.
OWNERS = (
    ("agentd/", "", "agentd"),
    ("txredisapi", "", "txredisapi"),
    ("bench/ratelimit_ceiling.py", "library_fixed.", "txredisapi"),
    ("bench/ratelimit_ceiling.py", "TurnPipeline.", "thin pipeline"),
    ("prometheus_client/", "", "prometheus_client"),
    ("autobahn/", "", "autobahn"),
    ("bench/", "", "benchmark driver"),
    ("orjson", "", "orjson"),
)
# Where the reactor hands an event to a protocol or a timed call: frames above are the loop.
DISPATCH = frozenset({"_PollLikeMixin._doReadOrWrite", "ReactorBase.runUntilCurrent"})
REACTOR = "Twisted reactor and system calls"
# Leaf frames of a thread waiting, which py-spy's idle detection lets through on some
# kernels: the reactor in epoll_wait, a thread-pool worker waiting for work.
WAITING = frozenset({"EPollReactor.doPoll", "Condition.wait"})
_DSO_LINE = re.compile(r"^\s*(?P<share>\d+\.\d+)%\s+(?P<dso>\S.*?)\s*$", re.MULTILINE)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    function: str
    file: str

    @property
    def name(self) -> str:
        return f"{self.function} ({self.file})"


def parse_frame(text: str) -> Frame:
    match = _FRAME.match(text)
    if match is None:
        return Frame(text, "")
    return Frame(match["function"], match["file"])


def read(path: Path) -> list[tuple[list[Frame], int]]:
    """The busy stacks, outermost frame first, each with its sample count."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = [parse_frame(f) for f in stack.split(";")]
            if frames[-1].function not in WAITING:
                stacks.append((frames, int(count)))
    return stacks


def owner(stack: Iterable[Frame]) -> str:
    for frame in reversed(list(stack)):
        if frame.function in DISPATCH:
            break
        for fragment, function, name in OWNERS:
            if fragment in frame.file and frame.function.startswith(function):
                return name
    return REACTOR


def below(stacks: list[tuple[list[Frame], int]], function: str) -> list[tuple[list[Frame], int]]:
    """Only the samples taken inside ``function`` (a substring of a frame's function name)."""
    return [(s, n) for s, n in stacks if any(function in f.function for f in s)]


def summarize(
    stacks: list[tuple[list[Frame], int]], top: int, top_agentd: int | None = None
) -> dict[str, list[tuple[str, int]]]:
    owners: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, count in stacks:
        owners[owner(stack)] += count
        own[stack[-1].name] += count
        for name in {f.name for f in stack}:
            inclusive[name] += count
    return {
        "owners": owners.most_common(),
        "self": own.most_common(top),
        "inclusive": inclusive.most_common(top),
        "agentd_inclusive": [
            (name, n) for name, n in inclusive.most_common() if "(agentd/" in name
        ][: top if top_agentd is None else top_agentd],
    }


def render(summary: dict[str, list[tuple[str, int]]], total: int) -> str:
    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    lines = [f"{total} samples", "", "by owner (innermost owned frame):"]
    lines += [f"  {pct(n)}  {name}" for name, n in summary["owners"]]
    lines += ["", "self time:"]
    lines += [f"  {pct(n)}  {name}" for name, n in summary["self"]]
    lines += ["", "inclusive time:"]
    lines += [f"  {pct(n)}  {name}" for name, n in summary["inclusive"]]
    lines += ["", "inclusive time, agentd's functions:"]
    lines += [f"  {pct(n)}  {name}" for name, n in summary["agentd_inclusive"]]
    return "\n".join(lines)


@contextlib.contextmanager
def recording(pid: int, out: Path, rate: int = 500) -> Iterator[None]:
    """py-spy samples ``pid`` while the block runs, into ``out`` (folded stacks)."""
    binary = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if binary is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    argv = [binary, "record", "-r", str(rate), "-f", "raw", "-o", str(out), "-p", str(pid)]
    # py-spy says so on stdout once it samples: a block shorter than its start-up would
    # otherwise leave it nothing to write.
    with _sampling(argv, out, "py-spy wrote nothing", ready=b"py-spy> Sampling"):
        yield


@contextlib.contextmanager
def cpu_recording(pid: int, out: Path) -> Iterator[None]:
    """perf samples ``pid`` while the block runs, only while it is on a CPU (``cpu-clock``),
    into ``out``: what ``cpu_by_object`` reads. py-spy samples a process whenever it is not
    idle in a known wait, including while it waits for a CPU or is preempted in a system call
    by the peer it woke, so its shares are of time, not of CPU."""
    binary = shutil.which("perf")
    if binary is None:
        raise RuntimeError("perf is not installed (Debian: linux-perf)")
    argv = [binary, "record", "-e", "cpu-clock", "-F", "999", "-p", str(pid), "-o", str(out)]
    with _sampling(argv, out, "perf recorded nothing", attach=True):
        yield


@contextlib.contextmanager
def _sampling(
    argv: list[str], out: Path, failed: str, attach: bool = False, ready: bytes | None = None
) -> Iterator[None]:
    """Run the sampler ``argv`` while the block runs, then stop it with SIGINT (both py-spy
    and perf write their file then); ``failed`` and the sampler's last words when there is no
    ``out``. The block waits until the sampler has attached: with ``attach``, until ``out``
    exists (perf creates it once it has, a moment before it samples); with ``ready``, until
    the sampler writes a line starting so on stdout. Either wait gives up after 10 seconds."""
    stdout = subprocess.PIPE if ready is not None else subprocess.DEVNULL
    sampler = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    try:
        if attach:
            while not out.exists() and sampler.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
        if ready is not None:
            _wait_for_line(sampler, ready, deadline)
        yield
    finally:
        sampler.send_signal(signal.SIGINT)
        _, errors = sampler.communicate(timeout=60)
    if not out.exists():
        raise RuntimeError(f"{failed}: {errors.decode()[-300:]}")


def _wait_for_line(process: subprocess.Popen[bytes], start: bytes, deadline: float) -> None:
    """Read ``process``'s stdout until a line begins with ``start``, it ends, or ``deadline``."""
    assert process.stdout is not None
    fd, pending = process.stdout.fileno(), b""
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        pending += chunk
        if any(line.startswith(start) for line in pending.split(b"\n")):
            return


def cpu_by_object(path: Path) -> list[tuple[str, float]]:
    """The shares (percent of CPU samples) of the binaries the process ran in: the Python
    interpreter, the kernel, libc, each extension module."""
    argv = ["perf", "report", "-i", str(path), "--stdio", "--no-children", "-g", "none"]
    report = subprocess.run([*argv, "--sort", "dso"], capture_output=True, text=True, check=True)
    return dso_shares(report.stdout)


def dso_shares(report: str) -> list[tuple[str, float]]:
    """The (binary, percent) rows of ``perf report --no-children -g none --sort dso``."""
    return [(_object_name(m["dso"]), float(m["share"])) for m in _DSO_LINE.finditer(report)]


def _object_name(dso: str) -> str:
    if dso == "[kernel.kallsyms]":
        return "kernel"
    return dso.split(".cpython-")[0].split(".so")[0]


def top(path: Path, count: int = 15) -> dict[str, list[tuple[str, float]]]:
    """The shares (percent of samples) by owner, self time and inclusive time; agentd's own
    functions three times as deep, so a change's function is found in an earlier revision."""
    stacks = read(path)
    total = sum(n for _, n in stacks) or 1
    return {
        table: [(name, round(100 * n / total, 1)) for name, n in rows]
        for table, rows in summarize(stacks, count, 3 * count).items()
    } | {"samples": [("all", float(total))]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("recording", type=Path, help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--inside", default="", help="only samples inside this function")
    args = parser.parse_args(argv)
    stacks = read(args.recording)
    if args.inside:
        stacks = below(stacks, args.inside)
    total = sum(n for _, n in stacks)
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(render(summarize(stacks, args.top), total))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
