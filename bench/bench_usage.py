"""Usage events recorded per second, and what recording adds to a ``done`` reaching the client.

Starts its own redis-server on a free loopback port and measures, from this one process with
agentd's default Redis timeout (100 ms):

- ``record``: closed-loop throughput, ``--window`` records in flight, each a new query of one of
  100 users in 10 projects; the latency of each record (call to Redis confirmation), the time
  spent inside the ``record()`` call itself (what runs before the caller moves on), and Redis
  commands per event from ``INFO commandstats``;
- ``record_unloaded``: one record at a time;
- ``burst``: ``--burst`` records issued in one reactor turn, how many outlast the timeout and go
  to the spool, and how long until every one is in Redis;
- ``spool``: Redis stopped: records per second made durable in the spool file (fsync per batch
  on a worker thread), next to the cost of one fsync on that file system;
- ``replay``: Redis back: a new recorder replays that spool; events per second;
- ``forwarding``: a loopback TCP relay agent -> gateway -> browser, the gateway in this reactor,
  the agent and the browser in a helper process (``--relay-peer``, one thread, one clock). For
  each ``done`` line the gateway does what agentd's session does: parse it, build the usage
  event, call ``record()``, then forward the line. Latency from the agent's write to the
  browser's read at ``--rate`` lines per second, without recording, recording to Redis, and
  spooling with Redis stopped; ``--runs`` runs per mode, medians reported.

    .venv/bin/python bench/bench_usage.py --out usage.json
    .venv/bin/python bench/bench_usage.py --smoke --out /tmp/usage-smoke.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task, threads  # noqa: E402
from twisted.internet.endpoints import TCP4ServerEndpoint  # noqa: E402
from twisted.internet.interfaces import IReactorTCP, IReactorTime  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

from agentd import metrics  # noqa: E402
from agentd.config import RedisConfig, UsageConfig  # noqa: E402
from agentd.pricing import PriceTable  # noqa: E402
from agentd.redisstore import RedisStore  # noqa: E402
from agentd.usage.recorder import UsageRecorder  # noqa: E402
from agentd.usage.records import UsageEvent  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

TIMEOUT = RedisConfig().timeout_ms / 1000
PRICES = PriceTable.load(ROOT / "etc" / "prices.toml")
USAGE = {"inputTokens": 1200, "outputTokens": 300, "cacheReadTokens": 5000, "model": "gpt-5"}


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and max in microseconds."""
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6, 1)

    return {"p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1] * 1e6, 1)}


def event(n: int, prefix: str) -> UsageEvent:
    made = UsageEvent.from_agent_usage(
        USAGE,
        query_id=f"{prefix}-{n}",
        user=f"user{n % 100}",
        project=f"project{n % 10}",
        agent="echo",
        timestamp=time.time(),
    )
    assert made is not None
    return made


def spooled() -> float:
    return metrics.USAGE_EVENTS.labels("spooled").value


class Bench:
    def __init__(self, reactor: Any, server: RedisServer, work: Path) -> None:
        self.reactor = reactor
        self.server = server
        self.work = work
        self.open: list[tuple[UsageRecorder, RedisStore]] = []

    def recorder(self, spool: str) -> UsageRecorder:
        store = RedisStore(self.server.url, self.reactor, timeout=TIMEOUT)
        recorder = UsageRecorder.from_config(
            UsageConfig(spool_dir=str(self.work / spool)), store, self.reactor, PRICES
        )
        recorder.start()
        self.open.append((recorder, store))
        return recorder

    async def close(self) -> None:
        for recorder, store in self.open:
            await recorder.stop()
            await store.disconnect()
        self.open = []

    async def sleep(self, seconds: float) -> None:
        await task.deferLater(self.reactor, seconds, lambda: None)

    async def until_drained(self, recorder: UsageRecorder, timeout: float = 120.0) -> float:
        started = time.perf_counter()
        while recorder.spool_depth:
            if time.perf_counter() - started > timeout:
                raise RuntimeError("the spool did not drain")
            await self.sleep(0.005)
        return time.perf_counter() - started

    async def closed_loop(
        self, recorder: UsageRecorder, count: int, window: int, prefix: str
    ) -> dict[str, Any]:
        """``window`` records in flight until ``count`` have fired."""
        events = [event(n, prefix) for n in range(count)]
        latencies: list[float] = []
        inside: list[float] = []
        finished: defer.Deferred[None] = defer.Deferred()
        state = {"next": 0, "done": 0}

        def launch() -> None:
            n = state["next"]
            state["next"] += 1
            sent = time.perf_counter()
            d = recorder.record(events[n])
            inside.append(time.perf_counter() - sent)
            d.addCallback(fired, sent)

        def fired(_: None, sent: float) -> None:
            latencies.append(time.perf_counter() - sent)
            state["done"] += 1
            if state["next"] < count:
                launch()
            elif state["done"] == count:
                finished.callback(None)

        before = spooled()
        started = time.perf_counter()
        for _ in range(min(window, count)):
            launch()
        await finished
        elapsed = time.perf_counter() - started
        return {
            "events": count,
            "window": window,
            "events_per_second": round(count / elapsed),
            "latency_us": percentiles(latencies),
            "inside_record_call_us": percentiles(inside),
            "spooled": int(spooled() - before),
        }

    def evalsha_calls(self) -> int:
        stats = self.server.cli("--raw", "INFO", "commandstats")
        calls = 0
        for line in stats.splitlines():
            if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
                calls += int(line.split("calls=")[1].split(",")[0])
        return calls

    def total_commands(self) -> int:
        stats = self.server.cli("--raw", "INFO", "commandstats")
        return sum(
            int(line.split("calls=")[1].split(",")[0])
            for line in stats.splitlines()
            if line.startswith("cmdstat_")
            and not line.startswith(("cmdstat_info", "cmdstat_config"))
        )

    async def record(self, count: int, window: int) -> dict[str, Any]:
        recorder = self.recorder("record")
        await recorder.record(event(0, "warm"))
        self.server.cli("CONFIG", "RESETSTAT")
        result = await self.closed_loop(recorder, count, window, "loop")
        result["redis_commands_per_event"] = round(self.total_commands() / count, 3)
        result["scripts_per_event"] = round(self.evalsha_calls() / count, 3)
        await self.until_drained(recorder)
        return result

    async def unloaded(self, samples: int) -> dict[str, Any]:
        recorder = self.recorder("unloaded")
        latencies = []
        for n in range(samples):
            sent = time.perf_counter()
            await recorder.record(event(n, "one"))
            latencies.append(time.perf_counter() - sent)
        return {"samples": samples, "latency_us": percentiles(latencies)}

    async def burst(self, size: int) -> dict[str, Any]:
        recorder = self.recorder("burst")
        await recorder.record(event(0, "warm-burst"))
        before = spooled()
        started = time.perf_counter()
        await defer.gatherResults([recorder.record(event(n, "burst")) for n in range(size)])
        fired = time.perf_counter() - started
        drained = await self.until_drained(recorder)
        return {
            "events": size,
            "spooled": int(spooled() - before),
            "all_fired_ms": round(fired * 1e3, 1),
            "all_in_redis_ms": round((fired + drained) * 1e3, 1),
        }

    async def spool_and_replay(self, count: int, window: int) -> dict[str, Any]:
        recorder = self.recorder("outage")
        self.server.stop()
        await recorder.record(event(0, "first-after-outage"))  # times out, opens the spool
        result = await self.closed_loop(recorder, count, window, "spool")
        await self.close()
        self.server.start()
        successor = self.recorder("outage")
        depth = successor.spool_depth
        replay_seconds = await self.until_drained(successor)
        return {
            "spool": {**result, "fsync_us": fsync_cost(self.work / "outage")},
            "replay": {"events": depth, "events_per_second": round(depth / replay_seconds)},
        }

    async def forwarding(self, messages: int, rate: float, runs: int) -> dict[str, Any]:
        """Runs alternate without and with recording (this machine's noise hits both alike);
        the Redis-down runs come last. Each mode reports the median over its runs."""
        runs_of: dict[str, list[dict[str, Any]]] = {}
        recorder = self.recorder("forward")
        for run in range(runs):
            runs_of.setdefault("no_recording", []).append(
                await self.relay(None, messages, rate, "off")
            )
            runs_of.setdefault("recording_to_redis", []).append(
                await self.relay(recorder, messages, rate, f"redis{run}")
            )
        outage = self.recorder("forward-outage")
        self.server.stop()
        for run in range(runs):
            runs_of.setdefault("recording_redis_down", []).append(
                await self.relay(outage, messages, rate, f"down{run}")
            )
        self.server.start()
        report: dict[str, Any] = {"rate_per_second": rate, "messages": messages, "runs": runs}
        for mode, results in runs_of.items():
            report[mode] = {
                "latency_us": median_of([r["latency_us"] for r in results]),
                "runs": results,
            }
            inside = [r["inside_record_call_us"] for r in results if "inside_record_call_us" in r]
            if inside:
                report[mode]["inside_record_call_us"] = median_of(inside)
        off = report["no_recording"]["latency_us"]
        for mode in ("recording_to_redis", "recording_redis_down"):
            report[mode]["added_us"] = {
                q: round(report[mode]["latency_us"][q] - off[q], 1) for q in ("p50", "p99")
            }
        return report

    async def relay(
        self, recorder: UsageRecorder | None, messages: int, rate: float, prefix: str
    ) -> dict[str, Any]:
        """The gateway here; the agent and the browser in another process with their own
        clock, so the latency is when the bytes leave this reactor, not when it reads them."""
        reactor = self.reactor
        inside: list[float] = []
        client_side: list[Any] = []

        class Gateway(Protocol):
            buffer = b""

            def connectionMade(self) -> None:
                self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

            def dataReceived(self, data: bytes) -> None:
                *lines, self.buffer = (self.buffer + data).split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if recorder is not None:
                        started = time.perf_counter()
                        usage = UsageEvent.from_agent_usage(
                            message["usage"],
                            query_id=f"{prefix}-{message['id']}",
                            user="alice",
                            project="p1",
                            agent="echo",
                            timestamp=time.time(),
                        )
                        assert usage is not None
                        recorder.record(usage)
                        inside.append(time.perf_counter() - started)
                    client_side[0].write(line + b"\n")

        class ClientSide(Protocol):
            def connectionMade(self) -> None:
                self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
                client_side.append(self.transport)

        agent_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Gateway)
        )
        client_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(ClientSide)
        )
        peer = [sys.executable, __file__, "--relay-peer"]
        peer += [str(agent_port.getHost().port), str(client_port.getHost().port)]
        peer += [str(messages), str(rate)]
        output = await threads.deferToThread(
            subprocess.run, peer, capture_output=True, text=True, check=True, timeout=600
        )
        await agent_port.stopListening()
        await client_port.stopListening()
        for transport in client_side:
            transport.loseConnection()
        result: dict[str, Any] = {"latency_us": percentiles(json.loads(output.stdout))}
        if inside:
            result["inside_record_call_us"] = percentiles(inside)
        return result


def median_of(figures: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(f[key] for f in figures), 1) for key in figures[0]}


def relay_peer(agent_port: int, client_port: int, messages: int, rate: float) -> None:
    """The agent and the browser of ``Bench.relay``: one thread, one clock. Prints the
    latencies (seconds) as JSON."""
    browser = socket.create_connection(("127.0.0.1", client_port))
    time.sleep(0.2)  # the gateway has its browser before the first done arrives
    agent = socket.create_connection(("127.0.0.1", agent_port))
    for connection in (browser, agent):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    browser.setblocking(False)
    latencies: list[float] = []
    buffer = b""
    start = time.perf_counter() + 0.05
    sent = 0
    while len(latencies) < messages:
        now = time.perf_counter()
        if sent < messages and now >= start + sent / rate:
            line = {"type": "done", "id": sent, "sent": now, "usage": USAGE}
            agent.sendall(json.dumps(line).encode() + b"\n")
            sent += 1
            continue
        wait = max(0.0, start + sent / rate - now) if sent < messages else 1.0
        readable, _, _ = select.select([browser], [], [], wait)
        if readable:
            arrived = time.perf_counter()
            buffer += browser.recv(65536)
            *lines, buffer = buffer.split(b"\n")
            latencies += [arrived - json.loads(line)["sent"] for line in lines]
    agent.close()
    browser.close()
    print(json.dumps(latencies))


def fsync_cost(directory: Path, samples: int = 200) -> dict[str, float]:
    """One 300-byte append plus fsync, on the spool's file system."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    timings = []
    try:
        for _ in range(samples):
            started = time.perf_counter()
            os.write(fd, b"x" * 299 + b"\n")
            os.fsync(fd)
            timings.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return percentiles(timings)


def environment(server: RedisServer) -> dict[str, Any]:
    version = subprocess.run(
        [server.binary, "--version"], capture_output=True, text=True, check=True
    ).stdout.split()
    return {
        "python": platform.python_version(),
        "twisted": importlib.metadata.version("twisted"),
        "txredisapi": importlib.metadata.version("txredisapi"),
        "redis": next((v[2:] for v in version if v.startswith("v=")), "unknown"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "redis_timeout_ms": TIMEOUT * 1000,
    }


async def main(reactor: Any, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as work:
        server = RedisServer(Path(work) / "redis")
        server.start()
        bench = Bench(reactor, server, Path(work))
        try:
            report: dict[str, Any] = {"environment": environment(server)}
            report["record"] = await bench.record(args.events, args.window)
            report["record_unloaded"] = await bench.unloaded(args.samples)
            report["burst"] = await bench.burst(args.burst)
            await bench.close()
            report.update(await bench.spool_and_replay(args.events, args.window))
            report["forwarding"] = await bench.forwarding(args.messages, args.rate, args.runs)
        finally:
            await bench.close()
            server.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--events", type=int, default=20_000, help="per throughput measurement")
    parser.add_argument("--window", type=int, default=64, help="records in flight")
    parser.add_argument("--samples", type=int, default=2000, help="unloaded latency samples")
    parser.add_argument("--burst", type=int, default=1000, help="records issued at once")
    parser.add_argument("--messages", type=int, default=3000, help="done lines per relay mode")
    parser.add_argument("--rate", type=float, default=500.0, help="done lines per second")
    parser.add_argument("--runs", type=int, default=5, help="relay runs per mode")
    args = parser.parse_args(argv)
    if args.smoke:
        args.events, args.samples, args.burst, args.messages, args.runs = 1000, 200, 200, 200, 1
    return args


if __name__ == "__main__":
    if sys.argv[1:2] == ["--relay-peer"]:
        relay_peer(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        sys.exit(0)
    arguments = parse(sys.argv[1:])

    def run(reactor: IReactorTime | IReactorTCP) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(main(reactor, arguments))

    task.react(run)
