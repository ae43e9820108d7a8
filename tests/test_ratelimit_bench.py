"""The rate-limit benchmarks still run end to end and report what they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_run_reports_one_redis_command_per_check(tmp_path: Path) -> None:
    out = tmp_path / "ratelimit.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_ratelimit.py"), "--smoke", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    report = json.loads(out.read_text())
    median = report["median"]
    assert median["redis_commands_per_check"] == 1.0
    for rate in ("checks_per_second", "gets_per_second", "exists_per_second"):
        assert median[rate] > 0
    for latency in ("check_latency_us", "get_latency_us", "loaded_check_latency_us"):
        assert 0 < median[latency]["p50"] <= median[latency]["p99"]
    assert 0 < report["redis_bytes_per_active_user"] < 2048
    assert report["in_process_checks_per_second"] > 0


def test_ceiling_smoke_run_measures_every_variant_and_the_floor(tmp_path: Path) -> None:
    out = tmp_path / "ceiling.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "ratelimit_ceiling.py"),
            "--smoke",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    variants = json.loads(out.read_text())["variants"]
    assert set(variants) == {"as-is", "library-fixed", "pipeline", "pipeline+fixed", "get-floor"}
    for figures in variants.values():
        assert figures["per_second"] > 0
        assert figures["cpu_us_per_check"] > 0


def test_library_fix_applies_only_inside_its_block() -> None:
    import txredisapi

    from bench.ratelimit_ceiling import library_fixed

    before = (
        txredisapi.BaseRedisProtocol.eval,
        txredisapi.BaseRedisProtocol.execute_command,
        txredisapi.RedisFactory.getConnection,
    )
    with library_fixed():
        assert txredisapi.BaseRedisProtocol.eval is not before[0]
        assert txredisapi.RedisFactory.getConnection is not before[2]
    after = (
        txredisapi.BaseRedisProtocol.eval,
        txredisapi.BaseRedisProtocol.execute_command,
        txredisapi.RedisFactory.getConnection,
    )
    assert after == before
