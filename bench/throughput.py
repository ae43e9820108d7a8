"""Item 1: streaming throughput, agent to browser, and what the SSH hop costs.

One client per target reads an answer of K deltas of 100 B or 4 KiB as fast as it can.
Targets: agentd with the local transport, websocketd running the same agent program, agentd
over a real sshd, and the OpenSSH client reading the agent through that sshd (the SSH hop
alone, no WebSocket). Runs of all targets are interleaved, so drift on a shared machine hits
each alike; the CPU each process used during a run shows which side saturated.
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

from bench.procs import CpuMeter
from bench.suite import ECHO, Context, SshPipeTarget, Target, WebSocketTarget, summary

SIZES = {"100B": 100, "4KiB": 4096}


def targets(ctx: Context) -> list[Target]:
    sshd = ctx.sshd()
    local = ctx.agentd("throughput-local")
    ssh = ctx.agentd("throughput-ssh", vms=sshd.vms_section())
    websocketd = ctx.websocketd(shlex.split(ECHO.replace("{agent}", "echo")))
    return [
        WebSocketTarget("agentd", local, local.port, local.path("bench", "echo", "t1"), True),
        WebSocketTarget("websocketd", websocketd, websocketd.port, "/", False),
        WebSocketTarget("agentd-ssh", ssh, ssh.port, ssh.path("bench", "echo", "t2"), True),
        SshPipeTarget("ssh", ctx.ssh_command(sshd, ECHO.replace("{agent}", "echo")), sshd),
    ]


def stream(target: Target, deltas: int, size: int) -> dict[str, Any]:
    prompt_id = f"t{time.monotonic_ns()}"
    options = {"repeat": deltas, "delta_bytes": size}
    prompt = {"type": "prompt", "id": prompt_id, "text": "x", "options": options}
    expected = deltas + 2 + target.extra_messages  # start, deltas, done (+ ack)
    meter = CpuMeter(target.pids()).start()
    client_cpu = time.process_time()
    started = time.perf_counter()
    target.send(json.dumps(prompt).encode())
    messages, payload = target.count_until(expected)
    seconds = time.perf_counter() - started
    cpu = meter.stop()
    cpu["client"] = round((time.process_time() - client_cpu) / seconds, 3)
    return {
        "messages_per_s": messages / seconds,
        "mb_per_s": payload / seconds / 1e6,
        "cpu": cpu,
    }


def run(ctx: Context) -> dict[str, Any]:
    counts = {"100B": 2_000, "4KiB": 500} if ctx.smoke else {"100B": 300_000, "4KiB": 40_000}
    all_targets = targets(ctx)
    for target in all_targets:
        target.open()
        target.answer({"type": "prompt", "id": "warm", "text": "warm up"})
    results: dict[str, Any] = {}
    try:
        for label, size in SIZES.items():
            raw: dict[str, list[dict[str, Any]]] = {t.name: [] for t in all_targets}
            for n in range(ctx.runs):
                for target in all_targets:
                    raw[target.name].append(stream(target, counts[label], size))
                ctx.log(
                    f"throughput {label} run {n + 1}: "
                    + ", ".join(f"{k} {v[-1]['messages_per_s']:,.0f}/s" for k, v in raw.items())
                )
            results[label] = {
                name: {
                    "messages_per_s": summary([r["messages_per_s"] for r in runs], 0),
                    "mb_per_s": summary([r["mb_per_s"] for r in runs], 1),
                    "cpu": {
                        process: summary([r["cpu"][process] for r in runs], 2)["median"]
                        for process in runs[0]["cpu"]
                    },
                }
                for name, runs in raw.items()
            }
            medians = {n: r["messages_per_s"]["median"] for n, r in results[label].items()}
            results[label]["ratios"] = {
                "agentd_vs_websocketd": round(medians["agentd"] / medians["websocketd"], 2),
                "ssh_hop_cost_pct": round(100 * (1 - medians["agentd-ssh"] / medians["agentd"]), 1),
            }
        results["deltas"] = counts
    finally:
        for target in all_targets:
            target.close()
    return results
