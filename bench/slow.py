"""Item 5: a slow consumer. The agent floods; the client reads 10 KB a second.

The echo agent is asked for a gigabyte (a million 1 KiB deltas). A client that reads 1 KB
every 100 ms must hold the agent back instead of making agentd buffer the flood: agentd's
RSS is sampled every second and should stay flat. websocketd, fed the same flood, is shown
for comparison.
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

from bench.procs import Process
from bench.suite import ECHO, Context, sampled_rss
from bench.ws import BlockingClient

READ_BYTES = 1000
READ_EVERY = 0.1  # 10 KB/s


def flood(server: Process, port: int, path: str, seconds: float) -> dict[str, Any]:
    client = BlockingClient("127.0.0.1", port, path)
    options = {"repeat": 1_000_000, "delta_bytes": 1024}
    prompt = {"type": "prompt", "id": "flood", "text": "x", "options": options}
    client.send(json.dumps(prompt).encode())
    received = 0
    with sampled_rss(server.pid, 1.0) as samples:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            received += len(client.sock.recv(READ_BYTES))
            time.sleep(READ_EVERY)
    client.drop()
    rss = [kib for _, kib in samples]
    return {
        "rss_kib": samples,
        "rss_start_kib": rss[0],
        "rss_end_kib": rss[-1],
        "rss_max_kib": max(rss),
        "growth_kib": rss[-1] - rss[0],
        "client_kb_per_s": round(received / seconds / 1000, 1),
    }


def run(ctx: Context) -> dict[str, Any]:
    seconds = 1.5 if ctx.smoke else 15.0
    results: dict[str, Any] = {"seconds": seconds, "read_bytes_per_s": READ_BYTES / READ_EVERY}
    sshd = ctx.sshd()
    setups = {
        "agentd": lambda: ctx.agentd("slow-local"),
        "agentd-ssh": lambda: ctx.agentd("slow-ssh", vms=sshd.vms_section()),
    }
    for name, start in setups.items():
        agentd = start()
        results[name] = flood(agentd, agentd.port, agentd.path("bench", "echo", "slow"), seconds)
        agentd.stop()
        ctx.log(f"slow {name}: RSS grew {results[name]['growth_kib']} KiB")
    websocketd = ctx.websocketd(shlex.split(ECHO.replace("{agent}", "echo")))
    results["websocketd"] = flood(websocketd, websocketd.port, "/", seconds)
    websocketd.stop()
    return results
