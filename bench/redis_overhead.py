"""Item 6: what rate limiting and usage recording against a real Redis add to a prompt.

Two views. End to end: the same agentd (local transport, echo agent) without and with
``[redis] url``, one prompt at a time, the time to its ``ack`` (which waits for the rate-limit
and budget checks) and to its ``done`` (after which the usage is recorded). Then the
component benchmarks ``bench/bench_ratelimit.py``, ``bench/ratelimit_ceiling.py`` (what caps
checks per second from one process) and ``bench/bench_usage.py``, run as they are and
reported in full in the JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.suite import Context, percentile, summary
from bench.ws import BlockingClient

HERE = Path(__file__).resolve().parent


def prompts(port: int, path: str, count: int) -> dict[str, float]:
    client = BlockingClient("127.0.0.1", port, path)
    client.recv()
    acks, dones = [], []
    for n in range(count + 20):
        started = time.perf_counter()
        client.send(json.dumps({"type": "prompt", "id": f"r{n}", "text": "hello"}).encode())
        ack = 0.0
        while True:
            message = client.recv()
            if not ack and b'"ack"' in message:
                ack = time.perf_counter() - started
            if b'"done"' in message:
                break
        if n >= 20:  # the first prompts start the agent and warm the Redis scripts
            acks.append(ack)
            dones.append(time.perf_counter() - started)
    client.close()
    acks.sort()
    dones.sort()
    return {
        "ack_p50": percentile(acks, 0.5) * 1000,
        "ack_p99": percentile(acks, 0.99) * 1000,
        "done_p50": percentile(dones, 0.5) * 1000,
        "done_p99": percentile(dones, 0.99) * 1000,
    }


def component(script: str, smoke: bool, out: Path) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / script), "--out", str(out)] + (["--smoke"] if smoke else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"error": f"{script} exited with {done.returncode}: {done.stderr[-500:]}"}
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def run(ctx: Context) -> dict[str, Any]:
    count = 100 if ctx.smoke else 1000
    redis = ctx.redis()
    plain = ctx.agentd("no-redis")
    stored = ctx.agentd("redis", redis={"url": redis.url})
    raw: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    for n in range(ctx.runs):
        raw["without"].append(prompts(plain.port, plain.path("bench", "echo", f"a{n}"), count))
        raw["with"].append(prompts(stored.port, stored.path("bench", "echo", f"b{n}"), count))
    end_to_end: dict[str, Any] = {
        side: {key: summary([r[key] for r in runs], 3) for key in runs[0]}
        for side, runs in raw.items()
    }
    end_to_end["added_ms"] = {
        key: round(end_to_end["with"][key]["median"] - end_to_end["without"][key]["median"], 3)
        for key in raw["with"][0]
    }
    end_to_end["prompts_per_run"] = count
    return {
        "end_to_end": end_to_end,
        "ratelimit": component("bench_ratelimit.py", ctx.smoke, ctx.work / "ratelimit.json"),
        "ceiling": component("ratelimit_ceiling.py", ctx.smoke, ctx.work / "ceiling.json"),
        "usage": component("bench_usage.py", ctx.smoke, ctx.work / "usage.json"),
    }
