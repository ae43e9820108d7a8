"""``python -m bench.holder``: what the session holder adds to an agent's stream, and costs idle.

Streams an answer of K deltas of 100 B or 4 KiB from the echo agent two ways, interleaved
over several runs: read straight from the agent's stdout (what agentd's transports read
today), and through the holder (agent -> holder, which numbers and journals every line ->
``agentd-agent attach`` -> the reader). The reader walks bytes without decoding JSON and,
on the holder path, confirms what it read once per read, as a live agentd would, so the
journal's bound never holds the agent back. It also measures the holder's memory and CPU
while idle, and how long an attach takes to deliver its first replayed line.

    .venv/bin/python -m bench.holder            # about a minute on 2 cores
    .venv/bin/python -m bench.holder --smoke    # tiny counts, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procs import CpuMeter, cpu_seconds, rss_kib
from bench.suite import percentile, summary

ROOT = Path(__file__).resolve().parent.parent
AGENT = [sys.executable, "-m", "agentd.agent.cli", "--test-options"]
SIZES = {"100B": 100, "4KiB": 4096}
SESSION = "bench-holder-0123456789"
READ_BYTES = 1 << 20


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Stream:
    """A process that answers prompts on stdout: the agent itself, or an attach to it."""

    def __init__(self, argv: list[str], numbered: bool) -> None:
        self.numbered = numbered
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_env(),
            cwd=ROOT,
        )
        assert self.proc.stdin and self.proc.stdout
        self.stdin = self.proc.stdin
        self.fd = self.proc.stdout.fileno()
        self.last_seq = 0

    def send(self, message: dict[str, Any]) -> None:
        self.stdin.write(json.dumps(message).encode() + b"\n")
        self.stdin.flush()

    def answer(self, message: dict[str, Any]) -> tuple[int, int]:
        """Send a prompt and read until its ``done``: the lines and bytes read."""
        self.send(message)
        lines = size = 0
        tail = b""
        while True:
            chunk = os.read(self.fd, READ_BYTES)
            if not chunk:
                raise RuntimeError("the stream ended")
            lines += chunk.count(b"\n")
            size += len(chunk)
            if self.numbered:
                self._confirm(chunk)
            window = tail + chunk
            if b'"type":"done"' in window:
                return lines, size
            tail = window[-64:]

    def _confirm(self, chunk: bytes) -> None:
        start = chunk.rfind(b'{"seq":')
        end = chunk.find(b",", start)
        if start >= 0 and end > start:
            self.last_seq = int(chunk[start + 7 : end])
            self.send({"type": "confirm", "seq": self.last_seq})

    def first_line(self) -> dict[str, Any]:
        data = b""
        while not data.endswith(b"\n"):
            data += os.read(self.fd, 1)
        return json.loads(data)

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=30)


def attach_argv(sessions: Path, session: str = SESSION, after: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agentd.agent.entry",
        "attach",
        *("--session", session, "--user", "bench", "--project", "bench", "--agent", "echo"),
        *("--after", str(after), "--sessions-dir", str(sessions), "--start"),
        *("--agent-command", shlex.join(AGENT) + " {agent}"),
    ]


def stream_runs(sessions: Path, runs: int, counts: dict[str, int]) -> dict[str, Any]:
    direct = Stream([*AGENT, "echo"], numbered=False)
    held = Stream(attach_argv(sessions), numbered=True)
    hello = held.first_line()
    pids = {"holder": hello["holderPid"], "agent": hello["agentPid"], "attach": held.proc.pid}
    warm = {"type": "prompt", "id": "warm", "text": "warm up"}
    direct.answer(warm)
    held.answer(warm)
    results: dict[str, Any] = {}
    for name, size in SIZES.items():
        figures: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        for run in range(runs):
            prompt = {"text": "x", "options": {"repeat": counts[name], "delta_bytes": size}}
            for target, stream, meter_pids in (
                ("direct", direct, {"agent": direct.proc.pid}),
                ("holder", held, pids),
            ):
                meter = CpuMeter(meter_pids).start()
                began = time.perf_counter()
                lines, _ = stream.answer({"type": "prompt", "id": f"{name}-{run}", **prompt})
                seconds = time.perf_counter() - began
                shares = meter.stop()
                figures.setdefault(target, []).append(lines / seconds)
                for process, share in shares.items():
                    cpu.setdefault(f"{target}.{process}", []).append(share)
                if target == "holder":
                    per_line = shares["holder"] * seconds / lines * 1e6
                    figures.setdefault("holder_cpu_us_per_line", []).append(per_line)
        ratios = [h / d for h, d in zip(figures["holder"], figures["direct"], strict=True)]
        results[name] = {
            "lines_per_s": {t: summary(figures[t], 0) for t in ("direct", "holder")},
            "ratio": summary(ratios, 3),
            "holder_cpu_us_per_line": summary(figures["holder_cpu_us_per_line"], 2),
            "cpu": {k: summary(v, 2) for k, v in cpu.items()},
        }
    direct.close()
    time.sleep(1.0)
    results["idle_after_streaming"] = idle(pids["holder"])
    held.close()
    return results


def idle(pid: int, seconds: float = 2.0) -> dict[str, Any]:
    """The holder's RSS, and its CPU over ``seconds`` with nothing attached or running."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return {
        "rss_kib": rss_kib(pid),
        "cpu_share": round((cpu_seconds(pid) - before) / seconds, 4),
    }


def attach_latency(sessions: Path, attaches: int) -> dict[str, Any]:
    """Spawning ``agentd-agent attach`` against a live holder: until the ``attached`` line,
    and until the first of 100 replayed lines. Also: starting a holder and its agent."""
    started = []
    for n in range(3):
        began = time.perf_counter()
        fresh = Stream(attach_argv(sessions, f"bench-start-{n:011d}"), numbered=True)
        fresh.first_line()
        started.append((time.perf_counter() - began) * 1000)
        fresh.close()
    first = Stream(attach_argv(sessions, "bench-latency-0123456"), numbered=True)
    first.first_line()
    first.answer(
        {"type": "prompt", "id": "p", "text": "x", "options": {"repeat": 200, "delta_bytes": 100}}
    )
    first.close()
    attached, replayed = [], []
    for _ in range(attaches):
        began = time.perf_counter()
        stream = Stream(attach_argv(sessions, "bench-latency-0123456", after=100), numbered=True)
        stream.first_line()
        attached.append((time.perf_counter() - began) * 1000)
        while "seq" not in stream.first_line():
            pass
        replayed.append((time.perf_counter() - began) * 1000)
        stream.close()
    attached.sort()
    replayed.sort()
    return {
        "attached_ms": {"p50": percentile(attached, 0.5), "p99": percentile(attached, 0.99)},
        "first_replayed_ms": {
            "p50": percentile(replayed, 0.5),
            "p99": percentile(replayed, 0.99),
        },
        "start_ms": summary(started, 1),
    }


def render(results: dict[str, Any]) -> str:
    lines = [
        "| deltas | direct lines/s | through the holder | ratio | holder CPU per line |",
        "|---|---|---|---|---|",
    ]
    for name in SIZES:
        r = results["stream"][name]
        lines.append(
            f"| {name} | {r['lines_per_s']['direct']['median']:,.0f} "
            f"| {r['lines_per_s']['holder']['median']:,.0f} | {r['ratio']['median']:.2f}x "
            f"| {r['holder_cpu_us_per_line']['median']:.2f} µs |"
        )
    fresh, streamed = results["idle_fresh"], results["stream"]["idle_after_streaming"]
    latency = results["latency"]
    lines += [
        "",
        f"holder idle RSS: {fresh['rss_kib']:,} KiB fresh, {streamed['rss_kib']:,} KiB after "
        f"streaming; idle CPU {streamed['cpu_share']:.2%} of a core",
        f"attach to a live holder: attached p50 {latency['attached_ms']['p50']:.1f} ms, p99 "
        f"{latency['attached_ms']['p99']:.1f} ms; first replayed line p99 "
        f"{latency['first_replayed_ms']['p99']:.1f} ms; a new holder and agent "
        f"{latency['start_ms']['median']:.0f} ms",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.holder")
    parser.add_argument("--smoke", action="store_true", help="tiny counts, one run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    runs = 1 if args.smoke else args.runs
    counts = {"100B": 2_000, "4KiB": 500} if args.smoke else {"100B": 300_000, "4KiB": 40_000}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="agentd-bench-holder-") as work:
        sessions = Path(work) / "sessions"
        try:
            probe = Stream(attach_argv(sessions, "bench-idle-0123456789"), numbered=True)
            hello = probe.first_line()
            time.sleep(1.0)
            results["idle_fresh"] = idle(hello["holderPid"])
            probe.close()
            results["stream"] = stream_runs(sessions, runs, counts)
            results["latency"] = attach_latency(sessions, 5 if args.smoke else 50)
        finally:
            # Holders outlive their attaches by design: end every one this run started.
            for pid_file in sessions.glob("*/holder.pid"):
                try:
                    os.killpg(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    print(json.dumps(results, indent=2))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
