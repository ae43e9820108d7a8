"""Item 3: what one agentd process holds: idle WebSockets, and live agent sessions over SSH.

``idle``: N WebSocket connections opened from several load-generator processes and held
(answering agentd's pings); agentd's RSS before and after gives the memory per connection,
its CPU over a full ping interval the cost of keeping them.

``sessions``: N sessions each running a live agent over SSH. The agent is ``cat`` (it sends
each prompt straight back, so every session proves its round trip), sshd runs with OpenSSH's
default ``MaxSessions 10`` (substituted for the shipped 64) while agentd is allowed 64
channels a connection, so the pool must learn from refused channels and open more
connections. Reported: agentd's RSS per session, its idle CPU, the SSH connections it opened.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from bench.procs import Agentd, CpuMeter, descendants, rss_kib
from bench.suite import Context, all_events
from bench.ws import BlockingClient

# agentd's default auto_ping_seconds: idle CPU is measured over one whole interval.
PING_SECONDS = 20.0


def warm(agentd: Agentd, user: str, prompt: dict[str, Any] | None, until: str) -> None:
    """One connection first, so what is loaded once is in the baseline, not the figure."""
    client = BlockingClient("127.0.0.1", agentd.port, agentd.path("bench", "echo", user))
    client.recv()
    if prompt is not None:
        client.send(json.dumps(prompt).encode())
        while f'"type":"{until}"'.encode() not in client.recv():
            pass
    client.close()


def hold(
    ctx: Context,
    agentd: Agentd,
    total: int,
    prefix: str,
    extra: list[str],
    idle_seconds: float,
    inspect: Callable[[], dict[str, Any]] = dict,
) -> dict[str, Any]:
    time.sleep(0.2 if ctx.smoke else 1.0)
    baseline = agentd.rss_kib()
    count = 1 if total <= 500 else 4
    started = time.monotonic()
    workers = ctx.workers(
        count, total, ["--port", str(agentd.port), "--concurrency", "100", *extra], prefix
    )
    opening = CpuMeter({"agentd": agentd.pid, "load_generators": [w.pid for w in workers]})
    opening.start()
    try:
        ready = all_events(workers, "ready")
        opened_in = time.monotonic() - started
        opening_cpu = opening.stop()
        connected = sum(r["connected"] for r in ready)
        errors = [e for r in ready for e in r["errors"]]
        time.sleep(0.2 if ctx.smoke else 2.0)
        held = agentd.rss_kib()
        meter = CpuMeter({"agentd": agentd.pid}).start()
        time.sleep(idle_seconds)
        cpu = meter.stop()["agentd"]
        after = agentd.rss_kib()
        result = {
            "wanted": total,
            "connected": connected,
            "errors": errors[:5],
            "seconds_to_open": round(opened_in, 2),
            "cpu_while_opening": opening_cpu,
            "load_generators": count,
            "agentd_rss_baseline_kib": baseline,
            "agentd_rss_held_kib": held,
            "agentd_rss_after_idle_kib": after,
            "kib_per_connection": round((max(held, after) - baseline) / max(connected, 1), 2),
            "idle_cpu_share": cpu,
            "idle_seconds": idle_seconds,
            "load_generators_rss_kib": sum(rss_kib(w.pid) for w in workers),
        }
        result.update(inspect())
        return result
    finally:
        for worker in workers:
            worker.close()


def idle(ctx: Context) -> dict[str, Any]:
    total = 200 if ctx.smoke else 10_000
    agentd = ctx.agentd("idle")
    warm(agentd, "warm", None, "")
    return hold(ctx, agentd, total, "idle", [], 0.5 if ctx.smoke else PING_SECONDS)


def sessions(ctx: Context) -> dict[str, Any]:
    total = 20 if ctx.smoke else 1000
    sshd = ctx.sshd(max_sessions=10)
    agentd = ctx.agentd(
        "sessions",
        agents={"names": ["echo"], "command": "sh -c 'exec cat' {agent}"},
        vms=sshd.vms_section(max_channels_per_connection=64),
    )
    prompt = {"type": "prompt", "id": "p", "text": "are you there?"}
    warm(agentd, "warm", prompt, "prompt")
    assert sshd.process is not None
    sshd_pid = sshd.process.pid

    def vm_side_kib() -> int:
        return sum(rss_kib(p) for p in [sshd_pid, *descendants(sshd_pid)])

    vm_before = vm_side_kib()

    def inspect() -> dict[str, Any]:
        return {
            "ssh_connections": int(agentd.metric("agentd_ssh_connections")),
            "ssh_channels": int(agentd.metric("agentd_ssh_channels")),
            "ssh_connect_failures": int(agentd.metric("agentd_ssh_connect_failures_total")),
            "channel_refusals": sum(
                1 for line in (agentd.work / "agentd.log").open() if "refused channel" in line
            ),
            "vm_side_rss_kib_added": vm_side_kib() - vm_before,
        }

    result = hold(
        ctx,
        agentd,
        total,
        "live",
        ["--prompt", json.dumps(prompt), "--until", "prompt"],
        0.5 if ctx.smoke else PING_SECONDS,
        inspect,
    )
    result["kib_per_session"] = result.pop("kib_per_connection")
    result["sshd_max_sessions"] = 10
    result["agentd_max_channels_per_connection"] = 64
    return result
