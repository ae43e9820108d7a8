"""Prompt latency by a prompt's place among the usage records that go to the store together.

agentd records a query's usage in chunks of ``FLUSH_CHUNK`` records, and the session tells
the holder which queries are recorded with its next prompt. With one client sending one
prompt at a time, whatever such a chunk costs lands on the same prompts of every
``FLUSH_CHUNK``, and the latency of the prompts at that place rises above the others'. The
median over all prompts hides it; this shows it. For each store and revision, one agentd and
one client; the agentds take turns in blocks of prompts (a multiple of ``FLUSH_CHUNK``, so a
prompt keeps its place), so a busy neighbour hits them alike.

    .venv/bin/python -m bench.phases                          # this checkout, 8,000 prompts
    .venv/bin/python -m bench.phases --baseline 1bbcd03 --store redis

Each row gives the median prompt-to-done latency at each place, in milliseconds, and how far
the slowest place's median is above the median of the places' medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from agentd.usage.recorder import FLUSH_CHUNK
from bench.__main__ import checkout
from bench.prompts import WARM_UP
from bench.suite import Context, WebSocketTarget, percentile

STORES = ("memory", "redis")
BLOCK = 100 * FLUSH_CHUNK


def place_medians(latencies: list[float]) -> list[float]:
    """The median latency of the prompts at each place, in milliseconds."""
    return [
        1000 * percentile(sorted(latencies[place::FLUSH_CHUNK]), 0.5)
        for place in range(FLUSH_CHUNK)
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__)
    parser.add_argument("--prompts", type=int, default=8000, help="per agentd (default 8,000)")
    parser.add_argument("--store", action="append", choices=STORES, help="default: both")
    parser.add_argument(
        "--baseline", action="append", default=[], metavar="REV", help="also this revision"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agentd-phases-") as work:
        ctx = Context(smoke=False, runs=1, work=Path(work), log=print)
        try:
            versions: dict[str, Path | None] = {"this checkout": None}
            versions.update(checkout(rev, Path(work)) for rev in args.baseline)
            with ctx.scope():
                clients: dict[tuple[str, str], WebSocketTarget] = {}
                redis_url = ctx.redis().url if "redis" in (args.store or STORES) else None
                for label, source in versions.items():
                    for store in args.store or STORES:
                        sections: dict[str, dict[str, object]] = {
                            "server": {"auto_ping_seconds": 0}
                        }
                        if store == "redis":
                            sections["redis"] = {"url": redis_url}
                        name = f"phases-{store}-{len(clients)}"
                        agentd = ctx.agentd(name, None, source, True, [], **sections)
                        path = agentd.path("bench", "echo", f"u{len(clients)}")
                        client = WebSocketTarget(store, agentd, agentd.port, path, True)
                        client.open()
                        for i in range(WARM_UP):
                            client.answer({"type": "prompt", "id": f"w{i}", "text": "hello"})
                        clients[label, store] = client
                latencies: dict[tuple[str, str], list[float]] = {key: [] for key in clients}
                sent = 0
                while sent < args.prompts:
                    block = min(BLOCK, args.prompts - sent)
                    for key, client in clients.items():
                        for i in range(sent, sent + block):
                            started = time.perf_counter()
                            client.answer({"type": "prompt", "id": f"p{i}", "text": "hello"})
                            latencies[key].append(time.perf_counter() - started)
                    sent += block
                for client in clients.values():
                    client.close()
            places = " | ".join(str(place) for place in range(FLUSH_CHUNK))
            print(f"| agentd | store | {places} | slowest over the places' median |")
            print("|---|---|" + "---|" * FLUSH_CHUNK + "---|")
            for (label, store), values in latencies.items():
                medians = place_medians(values)
                excess = max(medians) - statistics.median(medians)
                cells = " | ".join(f"{m:.3f}" for m in medians)
                print(f"| {label} | {store} | {cells} | +{excess:.3f} ms |", flush=True)
        finally:
            ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
