"""Item 4: a reconnect storm. N clients streaming over SSH lose their connections at once.

Each client runs a session whose agent (``bench/agents/ticker``, a few MB a process) streams
numbered deltas; once every client has some, each load generator resets all its connections
in one go (no close frame) and every client resumes at once with its ``session`` and
``last_seq``, as agent-client.js does. Measured: the time from the drop until the last client
has its ``resumed`` session message, and after every answer's ``done``, whether any message
was lost (a gap in seq, a missing delta) or duplicated.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench.suite import TICKER, Context, all_events


def storm(
    ctx: Context, clients: int, deltas: int, delay_ms: int, backlog: int | None
) -> dict[str, Any]:
    sshd = ctx.sshd(max_sessions=10)
    agentd = ctx.agentd(
        f"storm-{clients}",
        backlog=backlog,
        agents={"names": ["echo"], "command": f"{TICKER} {{agent}}"},
        vms=sshd.vms_section(),
    )
    options = {"repeat": deltas, "delay_ms": delay_ms}
    prompt = {"type": "prompt", "id": "s", "text": "x", "options": options}
    args = ["--port", str(agentd.port), "--prompt", json.dumps(prompt), "--until", "delta"]
    args += ["--deltas", str(deltas), "--concurrency", "100"]
    workers = ctx.workers(1 if clients <= 250 else 4, clients, args, f"storm{clients}-")
    try:
        ready = all_events(workers, "ready")
        connected = sum(r["connected"] for r in ready)
        if connected < clients:
            raise RuntimeError(f"only {connected} of {clients} clients started: {ready}")
        time.sleep(0.1 if ctx.smoke else 0.5)
        for worker in workers:
            worker.command("drop")
        resumed = all_events(workers, "resumed")
        finished = all_events(workers, "finished")
    finally:
        for worker in workers:
            worker.close()
        agentd.stop()
    dropped_at = min(r["dropped_at"] for r in resumed)
    return {
        "clients": clients,
        "listen_backlog": backlog or 50,
        "seconds_to_resume_all": round(max(r["last_resumed_at"] for r in resumed) - dropped_at, 3),
        "resumed": sum(r["resumed"] for r in resumed),
        "resume_failures": sum(r["failed"] for r in resumed),
        "finished": sum(f["finished"] for f in finished),
        "lost": sum(f["gaps"] for f in finished) + sum(f["wrong_answers"] for f in finished),
        "duplicated": sum(f["duplicated"] for f in finished),
        "incomplete_resumes": sum(f["incomplete_resumes"] for f in finished),
        "errors": [e for r in resumed + finished for e in r["errors"]][:5],
        "deltas_per_answer": deltas,
        "delta_interval_ms": delay_ms,
    }


def run(ctx: Context) -> dict[str, Any]:
    # (clients, listen backlog): Twisted's default backlog of 50, and agentd's default of 1024.
    cases = [(10, None)] if ctx.smoke else [(100, None), (1000, None), (1000, 1024)]
    deltas = 20 if ctx.smoke else 200  # 50 ms apart: still streaming when the storm hits
    results: dict[str, Any] = {}
    for clients, backlog in cases:
        runs = [storm(ctx, clients, deltas, 50, backlog) for _ in range(min(ctx.runs, 3))]
        seconds = [r["seconds_to_resume_all"] for r in runs]
        label = f"{clients} clients" + ("" if backlog is None else f", listen backlog {backlog}")
        results[label] = {
            "seconds_to_resume_all": {
                "median": sorted(seconds)[len(seconds) // 2],
                "min": min(seconds),
                "max": max(seconds),
                "runs": seconds,
            },
            "lost": sum(r["lost"] for r in runs),
            "duplicated": sum(r["duplicated"] for r in runs),
            "incomplete_resumes": sum(r["incomplete_resumes"] for r in runs),
            "finished": sum(r["finished"] for r in runs),
            "expected": clients * len(runs),
            "runs": runs,
        }
        ctx.log(f"storm {label}: resumed in {seconds} s")
    return results
