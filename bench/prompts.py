"""Item 7: what one prompt costs, side by side: websocketd, agentd in memory, agentd on Redis.

Every target runs the same agent, the echo agent, and every prompt is one word, so each
answer is one ``start``, one ``delta`` and one ``done``: all that differs is the gateway.
One client per target sends prompts one at a time on a warm connection. Within each round
the targets take turns in blocks of ``BLOCK`` prompts, and the order of the targets rotates
each round, so a busy neighbour on a shared machine, whose load changes from one second to
the next, hits every target alike. Per round and target:

- the gateway process's CPU per prompt, from the run time ``/proc`` gives each of its threads
  (in nanoseconds, where ``/proc/PID/stat`` counts 10 ms ticks), and its inverse, prompts
  per second per core of that process;
- how often per prompt the scheduler put the gateway on a CPU (its wake-ups: each is a
  sleep in ``epoll_wait`` and a wake-up the kernel pays for), and how long per prompt it
  waited for a CPU once ready to run (on a machine of two cores, time the client, the
  gateway, the holder, the agent and Redis take from each other);
- for agentd with durable sessions, the CPU per prompt of the session's holder, which
  agentd adds between itself and the agent (websocketd runs the agent as its child);
- prompt to ``done`` latency, p50, p90 and p99, as the client sees it;
- for agentd on Redis, redis-server's CPU per prompt: what the gate's script and the record
  of the prompt's usage cost the Redis all instances share (each target's own blocks).

Ratios and differences are taken within each round (side by side), then the median over
rounds is reported with its range. With ``--baseline REV`` (repeatable), agentd at that
revision, in memory and on Redis, with that revision's echo agent, runs in the same rounds,
so each change is measured before and after side by side.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from bench import profiles
from bench.procs import Agentd, Sched, sched
from bench.suite import ECHO, Context, WebSocketTarget, percentile, summary

PERCENTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}
# Prompts a target answers before the next takes its turn: a fraction of a second.
BLOCK = 100
# Prompts per target before the first round: the agent starts, Redis loads its scripts.
WARM_UP = 30


def agentd_sections(redis_url: str | None) -> dict[str, dict[str, Any]]:
    """agentd's configuration for one prompt at a time: in memory, or on the Redis at
    ``redis_url``.

    A client waits its turn, not reading, while every other target runs a round (a minute
    with earlier revisions beside this one): agentd's pings would go unanswered and it would
    close the connection. One ping every 20 s costs nothing per prompt.
    """
    quiet: dict[str, dict[str, Any]] = {"server": {"auto_ping_seconds": 0}}
    return quiet if redis_url is None else {**quiet, "redis": {"url": redis_url}}


def targets(ctx: Context) -> tuple[list[WebSocketTarget], int]:
    """The targets, and the pid of the redis-server the agentd on Redis share."""
    redis = ctx.redis()
    websocketd = ctx.websocketd(shlex.split(ECHO.replace("{agent}", "echo")))
    found = [WebSocketTarget("websocketd", websocketd, websocketd.port, "/", False)]
    versions: dict[str, Path | None] = {"": None, **{f"@{k}": v for k, v in ctx.baselines.items()}}
    stores = {"memory": agentd_sections(None), "redis": agentd_sections(redis.url)}
    for suffix, source in versions.items():
        for store, sections in stores.items():
            name = f"agentd-{store}{suffix}"
            # Each target its own user, so no two share rate-limit or usage keys in Redis.
            user = f"u{len(found)}"
            process = ctx.agentd(name.replace("@", "-at-"), None, source, False, **sections)
            path = process.path("bench", "echo", user)
            found.append(WebSocketTarget(name, process, process.port, path, True))
    for target in found[1:]:
        assert isinstance(target.server, Agentd)
        target.server.ready()
    assert redis.process is not None
    return found, redis.process.pid


def holders(ctx: Context, targets: list[WebSocketTarget]) -> dict[str, int]:
    """The pid of each target's session holder, for agentd revisions with durable sessions
    (the holder starts at the session's first prompt)."""
    found = {}
    for target in targets:
        if isinstance(target.server, Agentd) and target.session:
            pid_files = list((ctx.work / "sessions").glob(f"*/{target.session}/holder.pid"))
            if pid_files:
                found[target.name] = int(pid_files[0].read_text())
    return found


def one_round(
    targets: list[WebSocketTarget],
    prompts: int,
    run: int,
    redis_pid: int,
    holder_pids: dict[str, int],
) -> dict[str, dict[str, float]]:
    """``prompts`` one-word prompts to each target, one at a time, the targets taking turns in
    blocks: each target's figures (see the module's description), with its holder's CPU per
    prompt when it has one, and for those on Redis, redis-server's CPU per prompt during
    their blocks."""
    dones: dict[str, list[float]] = {target.name: [] for target in targets}
    gateway = dict.fromkeys(dones, Sched(0, 0, 0))
    redis_ns = dict.fromkeys(dones, 0)
    holder_ns = dict.fromkeys(dones, 0)
    for first in range(0, prompts, BLOCK):
        for target in targets:
            name = target.name
            holder = holder_pids.get(name)
            before = sched(target.server.pid)
            redis_before = sched(redis_pid).cpu_ns
            holder_before = 0 if holder is None else sched(holder).cpu_ns
            for n in range(first, min(first + BLOCK, prompts)):
                prompt = {"type": "prompt", "id": f"p{run}-{n}", "text": "hello"}
                dones[name].append(target.answer(prompt)[1])
            gateway[name] = gateway[name].plus(sched(target.server.pid).since(before))
            redis_ns[name] += sched(redis_pid).cpu_ns - redis_before
            if holder is not None:
                holder_ns[name] += sched(holder).cpu_ns - holder_before
    figures = {}
    for name, times in dones.items():
        count = len(times)
        figures[name] = _figures(gateway[name], sorted(times))
        if name in holder_pids:
            figures[name]["holder_cpu_us_per_prompt"] = holder_ns[name] / count / 1000
        if name.startswith("agentd-redis"):
            figures[name]["redis_cpu_us_per_prompt"] = redis_ns[name] / count / 1000
    return figures


def _figures(used: Sched, dones: list[float]) -> dict[str, float]:
    count = len(dones)
    cpu_us = used.cpu_ns / count / 1000
    figures = {
        "cpu_us_per_prompt": cpu_us,
        "prompts_per_core_s": 1e6 / cpu_us if cpu_us else 0,
        "wakeups_per_prompt": used.runs / count,
        "cpu_wait_us_per_prompt": used.waiting_ns / count / 1000,
    }
    for name, q in PERCENTILES.items():
        figures[f"done_{name}"] = percentile(dones, q) * 1000
    return figures


def pairs(names: list[str]) -> dict[str, tuple[str, str]]:
    """What is compared with what: each agentd with websocketd, Redis with memory in each
    version, and this checkout with each earlier version."""
    found = {}
    for name in names:
        if name.startswith("agentd"):
            found[f"{name}_vs_websocketd"] = (name, "websocketd")
        if name.startswith("agentd-redis"):
            memory = name.replace("redis", "memory", 1)
            found[f"{name}_vs_{memory}"] = (name, memory)
        if "@" in name:
            now = name.split("@")[0]
            found[f"{now}_vs_{name}"] = (now, name)
    return found


def compare(raw: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Ratios and differences of each round's figures, side by side, and their medians."""
    rounds = range(len(raw["websocketd"]))
    compared: dict[str, Any] = {}
    for label, (side, peer) in pairs(list(raw)).items():
        with_holder = [
            (raw[side][n]["cpu_us_per_prompt"] + raw[side][n]["holder_cpu_us_per_prompt"])
            / raw[peer][n]["cpu_us_per_prompt"]
            for n in rounds
            if peer == "websocketd" and "holder_cpu_us_per_prompt" in raw[side][n]
        ]
        compared[label] = {
            "cpu_ratio": _ratio(raw, side, peer, "cpu_us_per_prompt"),
            "with_holder_cpu_ratio": summary(with_holder, 2) if with_holder else None,
            "holder_cpu_ratio": _ratio(raw, side, peer, "holder_cpu_us_per_prompt"),
            "redis_cpu_ratio": _ratio(raw, side, peer, "redis_cpu_us_per_prompt"),
            **{
                f"done_{name}_added_ms": summary(
                    [raw[side][n][f"done_{name}"] - raw[peer][n][f"done_{name}"] for n in rounds],
                    3,
                )
                for name in PERCENTILES
            },
        }
    return compared


def _ratio(
    raw: dict[str, list[dict[str, float]]], side: str, peer: str, key: str
) -> dict[str, Any] | None:
    """The median and range over the rounds of ``side``'s ``key`` over ``peer``'s, where
    both have it."""
    ratios = [
        mine[key] / theirs[key]
        for mine, theirs in zip(raw[side], raw[peer], strict=True)
        if theirs.get(key) and key in mine
    ]
    return summary(ratios, 2) if ratios else None


def run(ctx: Context) -> dict[str, Any]:
    prompts = 20 if ctx.smoke else 2000
    all_targets, redis_pid = targets(ctx)
    for target in all_targets:
        target.open()
        for n in range(3 if ctx.smoke else WARM_UP):
            target.answer({"type": "prompt", "id": f"warm{n}", "text": "hello"})
    holder_pids = holders(ctx, all_targets)
    raw: dict[str, list[dict[str, float]]] = {t.name: [] for t in all_targets}
    load = []
    recorded: dict[str, dict[str, Any]] = {}
    try:
        for n in range(ctx.runs):
            load.append(os.getloadavg()[0])
            shift = n % len(all_targets)
            turns = all_targets[shift:] + all_targets[:shift]
            measured = one_round(turns, prompts, n, redis_pid, holder_pids)
            for name, figures in measured.items():
                raw[name].append(figures)
            ctx.log(
                f"prompts run {n + 1}: "
                + ", ".join(
                    f"{name} {r[-1]['cpu_us_per_prompt']:.0f} µs CPU, "
                    f"p99 {r[-1]['done_p99']:.2f} ms"
                    for name, r in raw.items()
                )
            )
        if ctx.profile:
            recorded = profile(ctx, all_targets, prompts, redis_pid, holder_pids)
    finally:
        for target in all_targets:
            target.close()
    results: dict[str, Any] = {
        name: {key: summary([r[key] for r in runs], 3) for key in runs[0]}
        for name, runs in raw.items()
    }
    results["compared"] = compare(raw)
    results["prompts_per_run"] = prompts
    results["load_average_1m"] = summary(load, 2)
    if recorded:
        results["profiles"] = recorded
    return results


def profile(
    ctx: Context,
    all_targets: list[WebSocketTarget],
    prompts: int,
    redis_pid: int,
    holder_pids: dict[str, int],
) -> dict[str, dict[str, Any]]:
    """Two more rounds of each agentd, after the measured ones (sampling slows the process it
    samples): one under py-spy, the shares of its time by owner and by function; one under
    perf, the shares of its CPU by binary (the interpreter, the kernel, libc, extensions),
    when perf is there and allowed to record."""
    recorded: dict[str, dict[str, Any]] = {}
    for target in all_targets:
        if not target.name.startswith("agentd"):
            continue
        out = ctx.work / f"profile-{target.name}.txt"
        with profiles.recording(target.server.pid, out):
            one_round([target], prompts, ctx.runs, redis_pid, holder_pids)
        recorded[target.name] = profiles.top(out)
        ctx.log(f"prompts: profiled {target.name} ({out})")
        cpu = ctx.work / f"perf-{target.name}.data"
        try:
            with profiles.cpu_recording(target.server.pid, cpu):
                # New prompt ids: a repeated one is acknowledged again, not answered.
                one_round([target], prompts, ctx.runs + 1, redis_pid, holder_pids)
            recorded[target.name]["cpu_by_object"] = profiles.cpu_by_object(cpu)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            ctx.log(f"prompts: no perf recording of {target.name}: {e}")
    return recorded
