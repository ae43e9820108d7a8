"""``python -m bench``: agentd side by side with websocketd and OpenSSH, in one run.

Starts everything it measures on loopback (agentd as ``twistd``, websocketd, a real sshd and
redis-server), runs each scenario, and writes ``bench/results/<date>-<machine>.md`` and
``.json``: the machine, each figure's median and spread over the runs, and the ratios to the
targets. See docs/performance.md.

    .venv/bin/python -m bench                    # the whole suite, several minutes
    .venv/bin/python -m bench --only throughput  # one scenario (repeatable)
    .venv/bin/python -m bench --smoke            # everything, tiny, for the test suite
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    connections,
    durable,
    jsonlibs,
    latency,
    machine,
    prompts,
    redis_overhead,
    report,
    slow,
    storm,
    throughput,
)
from bench.procs import raise_file_limit
from bench.suite import Context

SCENARIOS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "throughput": throughput.run,
    "latency": latency.run,
    "prompts": prompts.run,
    "idle": connections.idle,
    "sessions": connections.sessions,
    "storm": storm.run,
    "slow": slow.run,
    "redis": redis_overhead.run,
    "json": jsonlibs.run,
    "durable": durable.run,
}
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="tiny counts, one run: seconds")
    parser.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), help="run only this scenario"
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for results")
    parser.add_argument("--tag", default="", help="appended to the results' file names")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="REV[=TEXT]",
        help="also run agentd at this git revision where a scenario compares versions "
        "(prompts); TEXT describes it in the charts (default: its commit's subject)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after measuring, record agentd with py-spy (pip install py-spy) where supported",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs = 1
    return args


def with_baselines(revisions: list[str], work: Path) -> dict[str, Path | None]:
    """This checkout (as None), then each revision's tree extracted under ``work``, by label."""
    return {"this checkout": None, **dict(checkout(rev, work) for rev in revisions)}


def checkout(revision: str, work: Path) -> tuple[str, Path]:
    """The short name of ``revision`` of this repository and its tree, extracted under
    ``work``."""
    root = Path(__file__).resolve().parent.parent
    label = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", revision],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    tree = work / f"source-{label}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", label],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return label, tree


def subject(revision: str) -> str:
    """The first line of ``revision``'s commit message."""
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(
        ["git", "-C", str(root), "log", "-1", "--format=%s", revision],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def draw_charts(results: dict[str, Any], stem: Path) -> list[Path]:
    """The results as PNG charts next to them, when matplotlib (the bench extra) is there."""
    try:
        from bench import charts
    except ImportError as e:
        print(f"no charts: {e} (make bench installs the bench extra)")
        return []
    return charts.draw(results, stem)


def main(argv: list[str]) -> int:
    args = parse(argv)
    raise_file_limit()
    names = args.only or list(SCENARIOS)
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
        "runs": args.runs,
        "machine": machine.describe(),
        "scenarios": {},
    }
    failed = []

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as work:
        ctx = Context(
            smoke=args.smoke,
            runs=args.runs,
            work=Path(work),
            log=log,
            profile=args.profile,
            baselines=dict(checkout(rev.split("=")[0], Path(work)) for rev in args.baseline),
        )
        results["baselines"] = {
            label: text or subject(label)
            for label, (_, _, text) in zip(
                ctx.baselines, (rev.partition("=") for rev in args.baseline), strict=True
            )
        }
        try:
            for name in names:
                log(f"{name}: starting")
                began = time.monotonic()
                try:
                    with ctx.scope():
                        results["scenarios"][name] = SCENARIOS[name](ctx)
                except Exception as e:
                    failed.append(name)
                    results["scenarios"][name] = {"error": f"{type(e).__name__}: {e}"}
                    traceback.print_exc()
                log(f"{name}: done in {time.monotonic() - began:.1f}s")
        finally:
            ctx.close()
    results["seconds"] = round(time.monotonic() - started, 1)
    results["machine"]["load_after"] = machine.load()
    stem = f"{datetime.now(UTC):%Y-%m-%d}-{socket.gethostname()}" + ("-smoke" if args.smoke else "")
    if args.tag:
        stem += f"-{args.tag}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = report.render(results)
    (args.results / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"results: {args.results / stem}.md and .json")
    for chart in draw_charts(results, args.results / stem):
        print(f"chart: {chart}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
