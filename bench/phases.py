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
from bench.__main__ import with_baselines
from bench.prompts import WARM_UP, agentd_sections
from bench.suite import Context, WebSocketTarget, percentile

STORES = ("memory", "redis")
BLOCK = 100 * FLUSH_CHUNK


def place_medians(latencies: list[float]) -> list[float]:
    """The median latency of the prompts at each place, in milliseconds."""
    return [
        1000 * percentile(sorted(latencies[place::FLUSH_CHUNK]), 0.5)
        for place in range(FLUSH_CHUNK)
    ]


Target = tuple[str, str]  # the agentd's revision label, its store


def open_clients(
    ctx: Context, versions: dict[str, Path | None], stores: list[str]
) -> dict[Target, WebSocketTarget]:
    """An agentd for each revision and store, and a warm client on each."""
    redis_url = ctx.redis().url if "redis" in stores else None
    clients: dict[Target, WebSocketTarget] = {}
    for label, source in versions.items():
        for store in stores:
            sections = agentd_sections(redis_url if store == "redis" else None)
            n = len(clients)
            agentd = ctx.agentd(f"phases-{store}-{n}", None, source, True, [], **sections)
            path = agentd.path("bench", "echo", f"u{n}")
            client = WebSocketTarget(store, agentd, agentd.port, path, True)
            client.open()
            for i in range(WARM_UP):
                client.answer({"type": "prompt", "id": f"w{i}", "text": "hello"})
            clients[label, store] = client
    return clients


def measure(clients: dict[Target, WebSocketTarget], prompts: int) -> dict[Target, list[float]]:
    """Each client's prompt-to-done latencies, in seconds, the clients taking turns."""
    latencies: dict[Target, list[float]] = {key: [] for key in clients}
    for sent in range(0, prompts, BLOCK):
        for key, client in clients.items():
            for i in range(sent, min(sent + BLOCK, prompts)):
                started = time.perf_counter()
                client.answer({"type": "prompt", "id": f"p{i}", "text": "hello"})
                latencies[key].append(time.perf_counter() - started)
    return latencies


def print_table(latencies: dict[Target, list[float]]) -> None:
    places = " | ".join(str(place) for place in range(FLUSH_CHUNK))
    print(f"| agentd | store | {places} | slowest over the places' median |")
    print("|---|---|" + "---|" * FLUSH_CHUNK + "---|")
    for (label, store), values in latencies.items():
        medians = place_medians(values)
        excess = max(medians) - statistics.median(medians)
        cells = " | ".join(f"{m:.3f}" for m in medians)
        print(f"| {label} | {store} | {cells} | +{excess:.3f} ms |", flush=True)


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
            versions = with_baselines(args.baseline, Path(work))
            with ctx.scope():
                clients = open_clients(ctx, versions, args.store or list(STORES))
                latencies = measure(clients, args.prompts)
                for client in clients.values():
                    client.close()
            print_table(latencies)
        finally:
            ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
