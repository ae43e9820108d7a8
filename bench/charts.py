"""Charts of a results file: agentd beside websocketd and OpenSSH, one PNG per scenario.

Each bar is a median over the runs and its whisker the range (lowest to highest run), so a
reader sees how noisy the machine was. Drawn with matplotlib (the ``bench`` extra); the PNGs
go next to the results file, named after it.

    .venv/bin/python -m bench.charts bench/results/2026-11-30-vm.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

# One colour per kind of target, the same in every chart: agentd's shades of blue.
COLOURS = {
    "agentd": "#1f77b4",
    "agentd-memory": "#1f77b4",
    "agentd-redis": "#0b3d6b",
    "agentd-ssh": "#6baed6",
    "websocketd": "#ff7f0e",
    "ssh": "#2ca02c",
}
LABELS = {
    "agentd": "agentd\n(local agent)",
    "agentd-memory": "agentd\n(in-memory store)",
    "agentd-redis": "agentd\n(Redis store)",
    "agentd-ssh": "agentd\n(agent over SSH)",
    "websocketd": "websocketd",
    "ssh": "OpenSSH client\n(pipe, no\nWebSocket)",
}
SIZES = {"100B": "100 B", "4KiB": "4 KiB"}
THOUSANDS = FuncFormatter(lambda value, _: f"{value:,.0f}")
PERCENTILE_SHADES = {"p50": 1.0, "p90": 0.7, "p99": 0.45}
DPI = 110


def _bars(ax: Axes, names: Sequence[str], figures: Sequence[dict[str, Any]], unit: str) -> None:
    """One bar per target: the median, a whisker from the lowest to the highest run."""
    medians = [f["median"] for f in figures]
    low, high = _whiskers(figures)
    ax.bar(
        range(len(names)),
        medians,
        yerr=[low, high],
        capsize=4,
        color=_colours(names),
        error_kw={"elinewidth": 1, "ecolor": "#444"},
    )
    for x, (median, top) in enumerate(zip(medians, high, strict=True)):
        _label(ax, f"{median:,.0f}", (x, median + top), lift=3, fontsize=8)
    _axes(ax, names, unit)
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.margins(y=0.15)


def _percentile_groups(
    ax: Axes,
    names: Sequence[str],
    figures: dict[str, dict[str, Any]],
    keys: dict[str, str],
) -> None:
    """Bars grouped by target, one per percentile, whiskers from the lowest to highest run."""
    width = 0.8 / len(keys)
    # A run on a busy neighbour's minute can put a p99 tens of times over the median; the
    # plot stays scaled to the medians and labels a whisker it cuts with its maximum.
    top = 2.2 * max(figures[n][key]["median"] for n in names for key in keys.values())
    for i, (label, key) in enumerate(keys.items()):
        offsets = [x + (i - (len(keys) - 1) / 2) * width for x in range(len(names))]
        values = [figures[n][key] for n in names]
        percentile = label.split()[0]
        ax.bar(
            offsets,
            [v["median"] for v in values],
            width,
            yerr=_whiskers(values),
            capsize=2,
            color=_colours(names),
            alpha=PERCENTILE_SHADES.get(percentile, 1.0),
            edgecolor="black",
            linewidth=0.5,
            error_kw={"elinewidth": 0.8, "ecolor": "#444"},
        )
        for x, v in zip(offsets, values, strict=True):
            cut = f"\n(max {v['max']:.1f})" if v["max"] > top else ""
            _label(
                ax,
                f"{percentile}\n{v['median']:.2f}{cut}",
                (x, min(v["max"], 0.8 * top) if cut else v["max"]),
                lift=2,
                fontsize=6.5,
            )
    _axes(ax, names, "milliseconds (lower is better)")
    ax.set_ylim(0, top)


def _holders(ax: Axes, names: Sequence[str], figures: dict[str, dict[str, Any]]) -> bool:
    """On each agentd bar, its session holder's CPU per prompt, hatched, with the sum above;
    False when no target has a holder (revisions before durable sessions)."""
    held = [(x, n) for x, n in enumerate(names) if "holder_cpu_us_per_prompt" in figures[n]]
    for x, name in held:
        gateway = figures[name]["cpu_us_per_prompt"]["median"]
        holder = figures[name]["holder_cpu_us_per_prompt"]["median"]
        ax.bar(
            x,
            holder,
            bottom=gateway,
            color=COLOURS.get(name, "grey"),
            alpha=0.35,
            hatch="//",
            edgecolor="#444",
            linewidth=0.5,
            label="its session holder" if x == held[0][0] else None,
        )
        _label(ax, f"with holder {gateway + holder:,.0f}", (x, gateway + holder), 3, 8)
    if held:
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    return bool(held)


def _whiskers(figures: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Error bars from each median down to the lowest run and up to the highest."""
    return [[f["median"] - f["min"] for f in figures], [f["max"] - f["median"] for f in figures]]


def _colours(names: Sequence[str]) -> list[str]:
    return [COLOURS.get(n, "grey") for n in names]


def _label(ax: Axes, text: str, xy: tuple[float, float], lift: float, fontsize: float) -> None:
    """``text`` centred ``lift`` points above ``xy``, the top of a bar or its whisker."""
    ax.annotate(
        text,
        xy,
        xytext=(0, lift),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=fontsize,
    )


def _axes(ax: Axes, names: Sequence[str], unit: str) -> None:
    """One tick per target, named as in every chart; the unit up the side, a light grid."""
    ax.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names], fontsize=8)
    ax.set_ylabel(unit)
    _grid(ax)


def _grid(ax: Axes) -> None:
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _finish(fig: Figure, results: dict[str, Any], per_run: str) -> Figure:
    """``fig`` laid out, with a line under it on how its figures were taken."""
    runs = results["runs"]
    fig.text(
        0.5,
        0.01,
        f"median of {runs} interleaved runs, whiskers: lowest to highest run; {per_run}",
        ha="center",
        fontsize=8,
        color="#555",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def throughput(results: dict[str, Any]) -> Figure:
    t = results["scenarios"]["throughput"]
    names = [n for n in t["100B"] if n != "ratios"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), dpi=DPI)
    for ax, label in zip(axes, ("100B", "4KiB"), strict=True):
        _bars(ax, names, [t[label][n]["messages_per_s"] for n in names], "messages/s")
        ratio = t[label]["ratios"]["agentd_vs_websocketd"]
        ax.set_title(
            f"{SIZES[label]} deltas, {t['deltas'][label]:,} per answer\n"
            f"agentd / websocketd = {ratio}x",
            fontsize=10,
        )
    fig.suptitle("Streaming throughput, agent to browser (messages/s, higher is better)")
    return _finish(fig, results, "one client per target")


def latency(results: dict[str, Any]) -> Figure:
    lat = results["scenarios"]["latency"]
    names = [n for n in lat if isinstance(lat[n], dict) and "done_p50" in lat[n]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), dpi=DPI, width_ratios=(3, 2))
    _percentile_groups(
        axes[0], names, lat, {"p50 prompt to done": "done_p50", "p99 prompt to done": "done_p99"}
    )
    added = lat["added_ms"]["agentd_over_websocketd_done_p99"]
    axes[0].set_title(
        f"Prompt to done, one prompt at a time\nagentd p99 {added:+.2f} ms over websocketd",
        fontsize=10,
    )
    _bars(
        axes[1],
        names,
        [lat[n]["server_cpu_us_per_prompt"] for n in names],
        "µs of CPU per prompt (lower is better)",
    )
    axes[1].set_title("CPU of the server process per prompt\n(ssh: the client)", fontsize=10)
    fig.suptitle("Round-trip latency: echo agent, two-word prompts")
    return _finish(fig, results, f"{lat['prompts_per_run']:,} prompts per run")


def prompts(results: dict[str, Any]) -> Figure:
    p = results["scenarios"]["prompts"]
    names = ["websocketd", "agentd-memory", "agentd-redis"]
    compared = p["compared"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 6), dpi=DPI, width_ratios=(1, 1, 1.4))
    _bars(axes[0], names, [p[n]["cpu_us_per_prompt"] for n in names], "µs of CPU per prompt")
    memory = compared["agentd-memory_vs_websocketd"]["cpu_ratio"]
    redis = compared["agentd-redis_vs_websocketd"]["cpu_ratio"]
    title = (
        "Gateway CPU per prompt (lower is better)\n"
        f"agentd / websocketd, in-memory: {_ratio(memory)}\n"
        f"Redis: {_ratio(redis)} (goal ≤ 4x)"
    )
    if _holders(axes[0], names, p):
        with_holder = compared["agentd-redis_vs_websocketd"]["with_holder_cpu_ratio"]
        title += f"; with its holder: {with_holder['median']:.1f}x"
    axes[0].set_title(title, fontsize=10)
    _bars(axes[1], names, [p[n]["prompts_per_core_s"] for n in names], "prompts/s")
    axes[1].set_title(
        "Prompts per second per core of the gateway\n(1 / CPU per prompt; higher is better)",
        fontsize=10,
    )
    _percentile_groups(
        axes[2],
        names,
        p,
        {"p50": "done_p50", "p90": "done_p90", "p99": "done_p99"},
    )
    over_ws = compared["agentd-redis_vs_websocketd"]["done_p99_added_ms"]["median"]
    over_memory = compared["agentd-redis_vs_agentd-memory"]["done_p99_added_ms"]["median"]
    axes[2].set_title(
        "Prompt to done, p50 / p90 / p99 (lower is better)\n"
        f"agentd on Redis, p99: {over_ws:+.2f} ms over websocketd (goal ≤ +1 ms),\n"
        f"{over_memory:+.2f} ms over in-memory (goal ≤ +0.3 ms)",
        fontsize=10,
    )
    fig.suptitle(
        "What one prompt costs: the same echo agent behind each gateway "
        "(one start, one delta, one done)"
    )
    return _finish(
        fig,
        results,
        f"{p['prompts_per_run']:,} prompts per target per run; "
        "ratios and differences taken within each run",
    )


def _oldest_first(revisions: list[str]) -> list[str]:
    """``revisions`` by commit time when this checkout's git knows them all, else as given."""
    times = []
    for revision in revisions:
        found = subprocess.run(
            ["git", "log", "-1", "--format=%ct", revision, "--"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
        )
        if found.returncode != 0 or not found.stdout.strip().isdigit():
            return revisions
        times.append(int(found.stdout))
    return [r for _, r in sorted(zip(times, revisions, strict=True), key=lambda pair: pair[0])]


def versions(results: dict[str, Any]) -> Figure:
    """This checkout beside the earlier revisions it ran with, oldest first."""
    p = results["scenarios"]["prompts"]
    given = [n.split("@")[1] for n in p if n.startswith("agentd-memory@")]
    labels = [*_oldest_first(given), "now"]

    def target(store: str, label: str) -> str:
        return f"agentd-{store}" if label == "now" else f"agentd-{store}@{label}"

    stores = ("memory", "redis")
    fig, axes = plt.subplots(1, 3, figsize=(18, 6), dpi=DPI)
    panels = (
        ("cpu_us_per_prompt", "µs of CPU per prompt", "Gateway CPU per prompt"),
        ("done_p50", "milliseconds", "Prompt to done, p50"),
        ("done_p99", "milliseconds", "Prompt to done, p99"),
    )
    width = 0.38
    for ax, (key, unit, title) in zip(axes, panels, strict=True):
        cpu = key.startswith("cpu")
        number = "{:,.0f}" if cpu else "{:.2f}"
        # Scaled to the medians, as in the latency charts; a whisker cut is labelled.
        top = 1.6 * max(p[target(s, label)][key]["median"] for s in stores for label in labels)
        for i, store in enumerate(stores):
            values = [p[target(store, label)][key] for label in labels]
            offsets = [x + (i - 0.5) * width for x in range(len(labels))]
            ax.bar(
                offsets,
                [v["median"] for v in values],
                width,
                yerr=_whiskers(values),
                capsize=3,
                color=COLOURS[f"agentd-{store}"],
                label=f"agentd, {'in-memory' if store == 'memory' else 'Redis'} store",
                error_kw={"elinewidth": 0.8, "ecolor": "#444"},
            )
            for x, v in zip(offsets, values, strict=True):
                cut = v["max"] > top
                _label(
                    ax,
                    number.format(v["median"]) + (f"\n(max {v['max']:.0f})" if cut else ""),
                    (x, (0.72 + 0.14 * i) * top if cut else v["max"]),
                    lift=2,
                    fontsize=7,
                )
        peer = p["websocketd"][key]["median"]
        ax.axhline(
            peer,
            color=COLOURS["websocketd"],
            linestyle="--",
            linewidth=1.5,
            label="websocketd, same runs: " + number.format(peer),
        )
        ax.set_xticks(
            range(len(labels)), [_revision(results, label) for label in labels], fontsize=7
        )
        ax.set_xlabel("agentd revision, oldest first")
        ax.set_ylabel(f"{unit} (lower is better)")
        ax.set_title(title if cpu else f"{title}\n(dashed: websocketd, {peer:.2f} ms)", fontsize=10)
        ax.set_ylim(0, top)
        _grid(ax)
        if cpu:
            ax.yaxis.set_major_formatter(THOUSANDS)
            ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(
        "One prompt, revision by revision, in the same runs (echo agent, one-word prompts)"
    )
    return _finish(fig, results, f"{p['prompts_per_run']:,} prompts per target per run")


def _revision(results: dict[str, Any], label: str) -> str:
    """A revision's short name over the first words of its commit's subject."""
    subject = results.get("baselines", {}).get(label, "this checkout" if label == "now" else "")
    return label + "\n" + "\n".join(textwrap.wrap(subject, 17, max_lines=4, placeholder=" …"))


def _ratio(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "n/a"
    return f"{summary['median']:.1f}x ({summary['min']:.1f}..{summary['max']:.1f})"


CHARTS: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "throughput": throughput,
    "latency": latency,
    "prompts": prompts,
}


def draw(results: dict[str, Any], stem: Path) -> list[Path]:
    """A PNG per scenario that ran without error, ``<stem>-<scenario>.png``, and with earlier
    revisions in the prompt scenario, ``<stem>-versions.png``."""
    charts = dict(CHARTS)
    prompts_ran = results["scenarios"].get("prompts", {})
    if any("@" in name for name in prompts_ran):
        charts["versions"] = versions
    written = []
    for name, chart in charts.items():
        scenario = results["scenarios"].get("prompts" if name == "versions" else name)
        if scenario is None or "error" in scenario:
            continue
        figure = chart(results)
        path = stem.with_name(f"{stem.name}-{name}.png")
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    source = Path(argv[0])
    for path in draw(json.loads(source.read_text()), source.with_suffix("")):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
