"""The results file: the figures against their targets first, then every figure in detail."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench import durable


def _range(s: dict[str, Any], unit: str = "", fmt: str = "{:,.0f}") -> str:
    return (
        f"{fmt.format(s['median'])}{unit} ({fmt.format(s['min'])}..{fmt.format(s['max'])}, "
        f"±{abs(s['spread_pct']) / 2:.0f}%)"
    )


def _optional(s: dict[str, Any], key: str, unit: str = "", fmt: str = "{:,.0f}") -> str:
    """``s[key]``'s median and range, or nothing when this target or pair has no such figure."""
    figure = s.get(key)
    return "" if figure is None else _range(figure, unit, fmt)


def _median(s: dict[str, Any], key: str, fmt: str) -> str:
    """``s[key]``'s median alone, or nothing when this target has no such figure."""
    figure = s.get(key)
    return "" if figure is None else fmt.format(figure["median"])


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def targets(s: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []

    def add(item: str, figure: str, value: str, target: str, ok: bool | None) -> None:
        rows.append([item, figure, value, target, "—" if ok is None else _met(ok)])

    t = s.get("throughput", {})
    if "100B" in t:
        for label in ("100B", "4KiB"):
            r = t[label]["ratios"]
            target = "≥ 0.8x (aim 1x)" if label == "100B" else "—"
            ok = r["agentd_vs_websocketd"] >= 0.8 if label == "100B" else None
            add(
                "1",
                f"agentd / websocketd, {label} deltas, msg/s",
                f"{r['agentd_vs_websocketd']}x",
                target,
                ok,
            )
        for label in ("100B", "4KiB"):
            cost = t[label]["ratios"]["ssh_hop_cost_pct"]
            add("1", f"SSH hop cost, {label} deltas", f"{cost}%", "≤ 30%", cost <= 30)
    lat = s.get("latency", {})
    if "added_ms" in lat:
        a = lat["added_ms"]
        add(
            "2",
            "agentd over websocketd, done p99",
            f"{a['agentd_over_websocketd_done_p99']:+.2f} ms",
            "≤ +1 ms",
            a["agentd_over_websocketd_done_p99"] <= 1,
        )
        add(
            "2",
            "agentd over websocketd, first delta p99",
            f"{a['agentd_over_websocketd_first_p99']:+.2f} ms",
            "≤ +1 ms",
            a["agentd_over_websocketd_first_p99"] <= 1,
        )
        add(
            "2",
            "agentd over SSH vs ssh pipe, done p99",
            f"{a['agentd_ssh_over_ssh_done_p99']:+.2f} ms",
            "—",
            None,
        )
    compared = s.get("prompts", {}).get("compared", {})
    if compared:
        cpu = s["prompts"]["agentd-redis"]["cpu_us_per_prompt"]["median"]
        redis_ws = compared["agentd-redis_vs_websocketd"]
        memory_ws = compared["agentd-memory_vs_websocketd"]
        redis_memory = compared["agentd-redis_vs_agentd-memory"]
        goals: tuple[tuple[str, dict[str, Any], float | None], ...] = (
            ("Redis", redis_ws, 4.0),
            ("in-memory", memory_ws, None),
        )
        for label, pair, goal in goals:
            ratio = pair["cpu_ratio"]
            add(
                "7",
                f"agentd ({label}) / websocketd, CPU per prompt",
                "n/a" if ratio is None else f"{ratio['median']:.2f}x",
                "—" if goal is None else f"≤ {goal:g}x",
                None if goal is None or ratio is None else ratio["median"] <= goal,
            )
        add("7", "agentd (Redis) CPU per prompt", f"{cpu:,.0f} µs", "≤ 600 µs", cpu <= 600)
        for label, pair, limit in (
            ("agentd (Redis) over websocketd", redis_ws, 1.0),
            ("agentd (in-memory) over websocketd", memory_ws, 1.0),
            ("agentd, Redis over in-memory", redis_memory, 0.3),
        ):
            added = pair["done_p99_added_ms"]["median"]
            add("7", f"{label}, done p99", f"{added:+.2f} ms", f"≤ +{limit:g} ms", added <= limit)
    idle = s.get("idle", {})
    if "kib_per_connection" in idle:
        add(
            "3",
            f"{idle['connected']:,} idle WebSockets, RSS each",
            f"{idle['kib_per_connection']} KiB",
            "≤ 20 KiB",
            idle["kib_per_connection"] <= 20 and idle["connected"] == idle["wanted"],
        )
    live = s.get("sessions", {})
    if "kib_per_session" in live:
        add(
            "3",
            f"{live['connected']:,} live SSH sessions over {live['ssh_connections']} "
            "connections, RSS each",
            f"{live['kib_per_session']} KiB",
            "all live",
            live["connected"] == live["wanted"],
        )
    storm = s.get("storm", {})
    for label, r in storm.items():
        if not isinstance(r, dict) or "seconds_to_resume_all" not in r:
            continue
        clean = r["lost"] == 0 and r["duplicated"] == 0 and r["finished"] == r["expected"]
        seconds = r["seconds_to_resume_all"]["median"]
        add(
            "4",
            f"reconnect storm, {label}: all resumed / lost / duplicated",
            f"{seconds} s / {r['lost']} / {r['duplicated']}",
            "< 5 s / 0 / 0",
            seconds < 5 and clean,
        )
    slow = s.get("slow", {})
    for name in ("agentd", "agentd-ssh"):
        if name in slow:
            g = slow[name]["growth_kib"]
            add(
                "5",
                f"slow consumer ({name}), RSS growth over {slow['seconds']:.0f} s",
                f"{g:+,} KiB",
                "flat",
                g < 4096,
            )
    red = s.get("redis", {}).get("end_to_end", {})
    if "added_ms" in red:
        a = red["added_ms"]
        add(
            "6",
            "Redis vs in-memory, prompt to ack p50 / p99",
            f"{a['ack_p50']:+.3f} / {a['ack_p99']:+.3f} ms",
            "—",
            None,
        )
        add(
            "6",
            "Redis vs in-memory, prompt to done p50 / p99",
            f"{a['done_p50']:+.3f} / {a['done_p99']:+.3f} ms",
            "—",
            None,
        )
    return rows


def machine(m: dict[str, Any]) -> list[str]:
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    return [
        f"- {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}, Linux {m['kernel']}",
        f"- Python {m['python']}; {packages}",
        f"- {m['websocketd']}; {m['openssh']}; {m['redis']}",
        f"- load average before {m['load_before']}, after {m.get('load_after', '?')}",
        "",
    ]


def throughput(t: dict[str, Any]) -> list[str]:
    lines = [
        f"Deltas per answer: {t['deltas']['100B']:,} of 100 B, {t['deltas']['4KiB']:,} of 4 KiB. "
        "CPU is the share of one core each process used (the client is the suite itself).",
        "",
    ]
    for label in ("100B", "4KiB"):
        rows = []
        for name, r in t[label].items():
            if name == "ratios":
                continue
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu"].items())
            rows.append(
                [name, _range(r["messages_per_s"]), _range(r["mb_per_s"], "", "{:,.1f}"), cpu]
            )
        lines += [f"**{label} deltas**", ""]
        lines += _table(["target", "messages/s", "MB/s", "CPU (median)"], rows)
    return lines


def latency(lat: dict[str, Any]) -> list[str]:
    rows = []
    for name, r in lat.items():
        if name in ("added_ms", "prompts_per_run"):
            continue
        keys = ("first_p50", "first_p99", "done_p50", "done_p99")
        cpu = f"{r['server_cpu_us_per_prompt']['median']:,.0f}"
        rows.append([name, *(_range(r[k], "", "{:.3f}") for k in keys), cpu])
    header = ["target", "first delta p50", "first delta p99", "done p50", "done p99"]
    header.append("server CPU per prompt, µs")
    return [f"{lat['prompts_per_run']} prompts per run, milliseconds.", "", *_table(header, rows)]


def prompts(p: dict[str, Any]) -> list[str]:
    rows = []
    for name in [n for n, r in p.items() if isinstance(r, dict) and "done_p99" in r]:
        r = p[name]
        rows.append(
            [
                name,
                _range(r["cpu_us_per_prompt"]),
                _range(r["prompts_per_core_s"]),
                *(_range(r[f"done_{q}"], "", "{:.3f}") for q in ("p50", "p90", "p99")),
                _median(r, "wakeups_per_prompt", "{:.1f}"),
                _median(r, "cpu_wait_us_per_prompt", "{:,.0f}"),
                _optional(r, "holder_cpu_us_per_prompt"),
                _optional(r, "redis_cpu_us_per_prompt"),
            ]
        )
    lines = [
        f"{p['prompts_per_run']:,} one-word prompts per target per run, one at a time; CPU is "
        "the gateway process's own (all its threads), latency in milliseconds. Wake-ups and "
        "the wait for a CPU are the gateway's, medians over the runs. "
        f"Load average (1 min) during the runs: {p['load_average_1m']['min']}.."
        f"{p['load_average_1m']['max']}.",
        "",
    ]
    lines += _table(
        [
            "target",
            "CPU per prompt, µs",
            "prompts/s per core",
            "done p50",
            "done p90",
            "done p99",
            "wake-ups per prompt",
            "waiting for a CPU, µs",
            "holder CPU per prompt, µs",
            "redis-server CPU per prompt, µs",
        ],
        rows,
    )
    rows = []
    for label, c in p["compared"].items():
        ratio = c["cpu_ratio"]
        rows.append(
            [
                label.replace("_vs_", " vs "),
                "n/a" if ratio is None else _range(ratio, "x", "{:.2f}"),
                _optional(c, "with_holder_cpu_ratio", "x", "{:.2f}"),
                *(_range(c[f"done_{q}_added_ms"], " ms", "{:+.3f}") for q in ("p50", "p90", "p99")),
                _optional(c, "holder_cpu_ratio", "x", "{:.2f}"),
                _optional(c, "redis_cpu_ratio", "x", "{:.2f}"),
            ]
        )
    lines += ["Side by side, within each run (median over the runs, range):", ""]
    header = [
        "",
        "CPU ratio",
        "with its holder",
        "done p50 added",
        "p90 added",
        "p99 added",
        "holder CPU ratio",
        "redis-server CPU ratio",
    ]
    lines += _table(header, rows)
    for name, profile in p.get("profiles", {}).items():
        owners = ", ".join(f"{owner} {share}%" for owner, share in profile["owners"])
        own = ", ".join(f"`{f}` {share}%" for f, share in profile["self"][:8])
        below = ", ".join(f"`{f}` {share}%" for f, share in profile["agentd_inclusive"][:10])
        lines += [
            f"py-spy, {name} (time while not idle, waits for a CPU included): by owner "
            f"{owners}. Self time: {own}. agentd's functions, inclusive: {below}.",
            "",
        ]
        if "cpu_by_object" in profile:
            split = ", ".join(f"{o} {share}%" for o, share in profile["cpu_by_object"][:6])
            lines += [f"perf, {name} (CPU time only), by binary: {split}.", ""]
    return lines


def idle(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            "connections held",
            f"{r['connected']:,} of {r['wanted']:,} ({r['load_generators']} load generators)",
        ],
        [
            "time to open them",
            f"{r['seconds_to_open']} s; CPU meanwhile: agentd "
            f"{r['cpu_while_opening']['agentd']:.2f}, load generators "
            f"{r['cpu_while_opening']['load_generators']:.2f}",
        ],
        [
            "agentd RSS before / held / after idle",
            f"{r['agentd_rss_baseline_kib']:,} / {r['agentd_rss_held_kib']:,} / "
            f"{r['agentd_rss_after_idle_kib']:,} KiB",
        ],
        ["RSS per connection", f"{r.get('kib_per_connection', r.get('kib_per_session'))} KiB"],
        [
            "agentd CPU while idle",
            f"{r['idle_cpu_share']:.3f} of a core over {r['idle_seconds']:.0f} s",
        ],
    ]
    for key in (
        "ssh_connections",
        "ssh_channels",
        "channel_refusals",
        "ssh_connect_failures",
        "vm_side_rss_kib_added",
    ):
        if key in r:
            rows.append([key.replace("_", " "), f"{r[key]:,}"])
    return _table(["", ""], rows)


def storm(s: dict[str, Any]) -> list[str]:
    rows = []
    for label, r in s.items():
        seconds = r["seconds_to_resume_all"]
        rows.append(
            [
                label,
                f"{seconds['median']} s (runs {seconds['runs']})",
                f"{r['finished']} / {r['expected']}",
                r["lost"],
                r["duplicated"],
                r["incomplete_resumes"],
            ]
        )
    return _table(
        [
            "clients",
            "all resumed after the drop",
            "answers complete",
            "lost",
            "duplicated",
            "incomplete replays",
        ],
        rows,
    )


def slow(s: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("agentd", "agentd-ssh", "websocketd"):
        if name in s:
            r = s[name]
            series = " ".join(f"{kib // 1024}" for _, kib in r["rss_kib"])
            rows.append(
                [
                    name,
                    f"{r['rss_start_kib']:,}",
                    f"{r['rss_end_kib']:,}",
                    f"{r['rss_max_kib']:,}",
                    r["client_kb_per_s"],
                    series,
                ]
            )
    return _table(
        ["server", "RSS start KiB", "end KiB", "max KiB", "client KB/s", "RSS each second (MiB)"],
        rows,
    )


def redis(r: dict[str, Any]) -> list[str]:
    e = r["end_to_end"]
    rows = []
    for side in ("without", "with"):
        rows.append(
            [f"{side} Redis"]
            + [
                _range(e[side][k], "", "{:.3f}")
                for k in ("ack_p50", "ack_p99", "done_p50", "done_p99")
            ]
        )
    lines = [f"{e['prompts_per_run']} prompts per run, milliseconds.", ""]
    lines += _table(["agentd", "ack p50", "ack p99", "done p50", "done p99"], rows)
    rl = r.get("ratelimit", {})
    if "median" in rl:
        m = rl["median"]
        lines.append(
            f"bench_ratelimit.py: one check {m['check_latency_us']['p50']} µs p50 / "
            f"{m['check_latency_us']['p99']} µs p99 "
            f"(a plain GET: {m['get_latency_us']['p50']} / {m['get_latency_us']['p99']} µs), "
            f"{m['checks_per_second']:,} checks/s, "
            f"{m['redis_commands_per_check']} Redis command per check."
        )
    elif "error" in rl:
        lines.append(f"bench_ratelimit.py failed: {rl['error']}")
    ceiling = r.get("ceiling", {})
    if "variants" in ceiling:
        lines += ["", "bench/ratelimit_ceiling.py, checks from one process (median of runs):", ""]
        lines += _table(
            ["variant", "checks/s", "range", "CPU per check, µs", "loaded p99, µs"],
            [
                [
                    name,
                    f"{v['per_second']:,.0f}",
                    "{:,}..{:,}".format(*v["per_second_range"]),
                    f"{v['cpu_us_per_check']:.1f}",
                    f"{v['loaded_p99_us']:,.0f}",
                ]
                for name, v in ceiling["variants"].items()
            ],
        )
    elif "error" in ceiling:
        lines.append(f"ratelimit_ceiling.py failed: {ceiling['error']}")
    usage = r.get("usage", {})
    forwarding = usage.get("forwarding", {}).get("recording_to_redis", {})
    if "added_us" in forwarding:
        added = forwarding["added_us"]
        lines.append(
            f"bench_usage.py: recording a `done` to Redis adds {added['p50']} µs p50 / "
            f"{added['p99']} µs p99 to its relay; the record() call itself takes "
            f"{forwarding['inside_record_call_us']['p50']} µs p50."
        )
    elif "error" in usage:
        lines.append(f"bench_usage.py failed: {usage['error']}")
    return [*lines, ""]


def jsonlibs(j: dict[str, Any]) -> list[str]:
    rows = [[name, *row.values()] for name, row in j["ns_per_call"].items()]
    header = ["library", *next(iter(j["ns_per_call"].values())).keys()]
    lines = [
        "Nanoseconds per call (best of 5)."
        + (f" Not installed: {', '.join(j['not_installed'])}." if j["not_installed"] else ""),
        "",
    ]
    return lines + _table(header, rows)


SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], list[str]]]] = [
    ("throughput", "1. Streaming throughput", throughput),
    ("latency", "2. Round-trip latency", latency),
    ("prompts", "7. What one prompt costs, beside websocketd", prompts),
    ("idle", "3a. Idle WebSocket connections", idle),
    ("sessions", "3b. Live agent sessions over SSH", idle),
    ("storm", "4. Reconnect storm", storm),
    ("slow", "5. Slow consumer", slow),
    ("redis", "6. Rate limiting and usage recording against Redis", redis),
    ("json", "JSON libraries", jsonlibs),
    ("durable", "Durable sessions: the holder against the direct path", durable.render),
]


def render(results: dict[str, Any]) -> str:
    s = results["scenarios"]
    kind = "smoke run" if results["smoke"] else f"median of {results['runs']} runs"
    lines = [
        f"# agentd benchmarks, {results['date']} ({kind})",
        "",
        f"`python -m bench` on {results['machine']['host']}, {results['seconds']} s in all. "
        "Figures are medians with their range over the runs and ± half that range.",
        "",
    ]
    lines += machine(results["machine"])
    lines += ["## Targets", ""]
    lines += _table(["item", "figure", "measured", "target", ""], targets(s))
    for key, title, render_section in SECTIONS:
        if key not in s:
            continue
        lines += [f"## {title}", ""]
        if "error" in s[key]:
            lines += [f"Failed: `{s[key]['error']}`", ""]
            continue
        lines += render_section(s[key])
    return "\n".join(lines)
