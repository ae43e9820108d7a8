"""Python function calls agentd makes per prompt: a figure the neighbours do not move.

On a shared machine a change worth a few per cent of CPU is under the noise of
``python -m bench --only prompts``; the calls cProfile counts are not. For each store (in
memory, Redis) and each revision, agentd runs under ``twistd --profile`` (cProfile) with the
prompt scenario's configuration, and one client sends one-word prompts one at a time to the
echo agent. It runs twice, for N and for 3N prompts, so that what starting and stopping cost
cancels out: calls per prompt = (calls at 3N - calls at N) / 2N.

    .venv/bin/python -m bench.calls                      # this checkout, N = 1,000
    .venv/bin/python -m bench.calls --baseline 733a886 --prompts 500

cProfile slows agentd several times over, so the time it reports is not agentd's.
"""

from __future__ import annotations

import argparse
import pstats
import sys
import tempfile
from pathlib import Path

from bench.__main__ import with_baselines
from bench.prompts import WARM_UP, agentd_sections
from bench.suite import Context, WebSocketTarget

STORES = ("memory", "redis")


def calls(ctx: Context, store: str, source: Path | None, prompts: int, tag: str) -> int:
    """The function calls of one agentd run that answered ``prompts`` prompts (after the
    warm-up), start to stop."""
    sections = agentd_sections(ctx.redis().url if store == "redis" else None)
    stats = ctx.work / f"calls-{store}-{tag}-{prompts}.stats"
    profile = ["--profile", str(stats), "--profiler", "cprofile", "--savestats"]
    agentd = ctx.agentd(f"calls-{store}-{tag}-{prompts}", None, source, True, profile, **sections)
    client = WebSocketTarget(store, agentd, agentd.port, agentd.path("bench", "echo", "u1"), True)
    client.open()
    try:
        for i in range(WARM_UP + prompts):
            client.answer({"type": "prompt", "id": f"p{i}", "text": "hello"})
    finally:
        client.close()
        agentd.stop()  # twistd writes the profile as it exits
    return int(pstats.Stats(str(stats)).total_calls)  # type: ignore[attr-defined]


def per_prompt(ctx: Context, store: str, source: Path | None, prompts: int, tag: str) -> float:
    with ctx.scope():
        few = calls(ctx, store, source, prompts, tag)
    with ctx.scope():
        many = calls(ctx, store, source, 3 * prompts, tag)
    return (many - few) / (2 * prompts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__)
    parser.add_argument("--prompts", type=int, default=1000, help="N (default 1,000)")
    parser.add_argument("--store", action="append", choices=STORES, help="default: both")
    parser.add_argument(
        "--baseline", action="append", default=[], metavar="REV", help="also this revision"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agentd-calls-") as work:
        ctx = Context(smoke=False, runs=1, work=Path(work), log=print)
        try:
            versions = with_baselines(args.baseline, Path(work))
            print("| agentd | store | Python calls per prompt |")
            print("|---|---|---|")
            for label, source in versions.items():
                tag = "this" if source is None else label
                for store in args.store or STORES:
                    figure = per_prompt(ctx, store, source, args.prompts, tag)
                    print(f"| {label} | {store} | {figure:,.0f} |", flush=True)
        finally:
            ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
