"""Item 2: round-trip latency, a prompt to its first delta and to its done, p50 and p99.

One prompt at a time on one warm connection per target, the echo agent answering two words:
agentd (local transport), websocketd with the same agent, agentd over sshd, and a direct
``ssh`` pipe to the agent through the same sshd. Runs are interleaved across targets. The
CPU the server process (agentd, websocketd, the ssh client) used per prompt is reported too:
on an idle machine it is most of what a gateway adds.
"""

from __future__ import annotations

import time
from typing import Any

from bench.procs import CpuMeter
from bench.suite import Context, Target, percentile, summary
from bench.throughput import targets


def sample(target: Target, prompts: int, run: int) -> dict[str, float]:
    firsts, dones = [], []
    meter = CpuMeter(target.pids()).start()
    started = time.perf_counter()
    for n in range(prompts):
        # Ids are unique per session: agentd answers a repeated id with a duplicate ack only.
        prompt = {"type": "prompt", "id": f"l{run}-{n}", "text": "hello world"}
        first, done = target.answer(prompt)
        firsts.append(first)
        dones.append(done)
    elapsed = time.perf_counter() - started
    server, *_ = meter.stop().items()
    firsts.sort()
    dones.sort()
    return {
        "server_cpu_us_per_prompt": server[1] * elapsed / prompts * 1e6,
        "first_p50": percentile(firsts, 0.50) * 1000,
        "first_p99": percentile(firsts, 0.99) * 1000,
        "done_p50": percentile(dones, 0.50) * 1000,
        "done_p99": percentile(dones, 0.99) * 1000,
    }


def run(ctx: Context) -> dict[str, Any]:
    prompts = 100 if ctx.smoke else 1000
    all_targets = targets(ctx)
    for target in all_targets:
        target.open()
        target.answer({"type": "prompt", "id": "warm", "text": "warm up"})
    raw: dict[str, list[dict[str, float]]] = {t.name: [] for t in all_targets}
    try:
        for n in range(ctx.runs):
            for target in all_targets:
                raw[target.name].append(sample(target, prompts, n))
            ctx.log(
                f"latency run {n + 1}: "
                + ", ".join(f"{k} done p99 {v[-1]['done_p99']:.2f} ms" for k, v in raw.items())
            )
    finally:
        for target in all_targets:
            target.close()
    results: dict[str, Any] = {
        name: {key: summary([r[key] for r in runs], 3) for key in runs[0]}
        for name, runs in raw.items()
    }

    def added(key: str, target: str, peer: str) -> float:
        return round(results[target][key]["median"] - results[peer][key]["median"], 3)

    results["added_ms"] = {
        "agentd_over_websocketd_done_p99": added("done_p99", "agentd", "websocketd"),
        "agentd_over_websocketd_first_p99": added("first_p99", "agentd", "websocketd"),
        "agentd_over_websocketd_done_p50": added("done_p50", "agentd", "websocketd"),
        "agentd_ssh_over_ssh_done_p99": added("done_p99", "agentd-ssh", "ssh"),
        "agentd_ssh_over_ssh_done_p50": added("done_p50", "agentd-ssh", "ssh"),
    }
    results["prompts_per_run"] = prompts
    return results
