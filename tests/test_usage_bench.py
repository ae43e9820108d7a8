"""The usage benchmark still runs end to end and reports what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agentd.usage.recorder import FLUSH_CHUNK

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_run_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "usage.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_usage.py"), "--smoke", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    report = json.loads(out.read_text())
    assert report["record"]["events_per_second"] > 0
    # The records in flight together share a script call, up to a chunk each.
    chunk = min(report["record"]["window"], FLUSH_CHUNK)
    assert report["record"]["scripts_per_event"] <= 2 / chunk
    assert report["spool"]["spooled"] == report["spool"]["events"]
    assert report["replay"]["events"] == report["spool"]["events"] + 1
    assert report["replay"]["events_per_second"] > 0
    for mode in ("no_recording", "recording_to_redis", "recording_redis_down"):
        latency = report["forwarding"][mode]["latency_us"]
        assert 0 < latency["p50"] <= latency["p99"]
    assert "added_us" in report["forwarding"]["recording_to_redis"]
