"""The benchmark suite still runs end to end: every scenario, tiny, against the real servers.

The prompt-cost scenario also runs alone, in seconds, outside the slow marker. Figures are
not judged here (a shared CI machine is too noisy for that); what is checked is
that each scenario ran, measured something, and that the correctness checks the full suite
relies on (nothing lost or duplicated in the storm, every session live) hold.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentd.usage.recorder import FLUSH_CHUNK
from tests.servers import is_holder

ROOT = Path(__file__).resolve().parent.parent


def smoke(results: Path, *options: str, timeout: float) -> dict[str, Any]:
    """``python -m bench --smoke`` with more options: the results file."""
    argv = [sys.executable, "-m", "bench", "--smoke", "--results", str(results), *options]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [result_file] = results.glob("*-smoke.json")
    loaded: dict[str, Any] = json.loads(result_file.read_text())
    return loaded


def test_prompt_cost_scenario_compares_websocketd_and_both_stores(tmp_path: Path) -> None:
    scenario = smoke(tmp_path, "--only", "prompts", timeout=60)["scenarios"]["prompts"]
    assert "error" not in scenario, scenario
    for target in ("websocketd", "agentd-memory", "agentd-redis"):
        figures = scenario[target]
        assert figures["cpu_us_per_prompt"]["median"] > 0
        assert figures["prompts_per_core_s"]["median"] > 0
        assert 0 < figures["done_p50"]["median"] <= figures["done_p99"]["median"]
        # Each prompt wakes the gateway at least once: for the prompt, and for the answer.
        assert figures["wakeups_per_prompt"]["median"] >= 1
        assert "cpu_wait_us_per_prompt" in figures
    # agentd holds its sessions in holders of their own; websocketd has none.
    assert "holder_cpu_us_per_prompt" not in scenario["websocketd"]
    for target in ("agentd-memory", "agentd-redis"):
        assert scenario[target]["holder_cpu_us_per_prompt"]["median"] > 0
    beside = scenario["compared"]["agentd-redis_vs_websocketd"]
    assert beside["with_holder_cpu_ratio"]["median"] > beside["cpu_ratio"]["median"]
    for pair in (
        "agentd-memory_vs_websocketd",
        "agentd-redis_vs_websocketd",
        "agentd-redis_vs_agentd-memory",
    ):
        assert scenario["compared"][pair]["cpu_ratio"]["median"] > 0
    markdown = next(tmp_path.glob("*-smoke.md")).read_text()
    assert "## 7. What one prompt costs, beside websocketd" in markdown
    assert "agentd (Redis) / websocketd, CPU per prompt" in markdown
    assert "| holder CPU per prompt, µs |" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        [chart] = tmp_path.glob("*-smoke-prompts.png")
        assert chart.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_benchmark_suite_smoke_run_measures_every_scenario(tmp_path: Path) -> None:
    results = smoke(tmp_path, "--baseline", "HEAD", timeout=180)
    scenarios = results["scenarios"]
    assert set(scenarios) == {
        "throughput",
        "latency",
        "prompts",
        "idle",
        "sessions",
        "storm",
        "slow",
        "redis",
        "json",
        "durable",
    }
    assert not [name for name, r in scenarios.items() if "error" in r]
    for size in ("100B", "4KiB"):
        for target in ("agentd", "websocketd", "agentd-ssh", "ssh"):
            assert scenarios["throughput"][size][target]["messages_per_s"]["median"] > 0
    assert scenarios["latency"]["agentd"]["done_p99"]["median"] > 0
    [baseline] = results["baselines"]  # the prompt scenario ran HEAD's agentd beside this one
    assert scenarios["prompts"][f"agentd-redis@{baseline}"]["cpu_us_per_prompt"]["median"] > 0
    assert scenarios["prompts"]["compared"][f"agentd-memory_vs_agentd-memory@{baseline}"]
    assert scenarios["idle"]["connected"] == scenarios["idle"]["wanted"]
    sessions = scenarios["sessions"]
    assert sessions["connected"] == sessions["wanted"]
    assert sessions["ssh_connections"] >= 2  # sshd's MaxSessions 10 made the pool spill over
    for storm in scenarios["storm"].values():
        assert storm["finished"] == storm["expected"]
        assert storm["lost"] == storm["duplicated"] == storm["incomplete_resumes"] == 0
    assert scenarios["slow"]["agentd"]["rss_kib"]
    assert "error" not in scenarios["redis"]["ratelimit"]
    assert "error" not in scenarios["redis"]["ceiling"]
    assert "error" not in scenarios["redis"]["usage"]
    assert scenarios["json"]["fastest_parse"]
    durable = scenarios["durable"]
    for size in ("100B", "4KiB"):
        for path in ("holder-local", "direct-local", "holder-ssh", "direct-ssh"):
            assert durable["stream"][size][path]["messages_per_s"]["median"] > 0
            assert durable["stream"][size][path]["agentd_cpu_us_per_line"]["median"] > 0
        assert durable["stream"][size]["holder-ssh"]["holder_cpu_us_per_line"]["median"] > 0
    for case in durable["resume"].values():
        assert case["resumes"] >= 5
        assert 0 < case["first_replayed_ms"]["p50"] <= case["first_replayed_ms"]["p99"]
    assert not durable_holders_left_behind()
    markdown = next(tmp_path.glob("*-smoke.md")).read_text()
    assert "## Targets" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        charts = {p.name.rsplit("-", 1)[1] for p in tmp_path.glob("*.png")}
        assert charts == {"throughput.png", "latency.png", "prompts.png", "versions.png"}
    assert "## Durable sessions" in markdown


def durable_holders_left_behind() -> list[int]:
    """Live session holders of a finished durable scenario: their sessions directory, in
    the run's temporary directory, is gone."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not is_holder(int(entry.name)):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        for arg in argv:
            name, _, value = arg.partition("=")
            sessions = Path(value)
            if name == "--sessions-dir" and sessions.name == "durable-sessions":
                if not sessions.exists():
                    found.append(int(entry.name))
    return found


def test_calls_per_prompt_are_counted_for_each_store(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.calls", "--prompts", "20"]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split("|") for line in run.stdout.splitlines() if line.startswith("| this")]
    figures = {row[2].strip(): float(row[3].replace(",", "")) for row in rows}
    assert set(figures) == {"memory", "redis"}
    # A prompt costs agentd hundreds of Python calls; Redis adds the gate's and the usage
    # record's script calls.
    assert 100 < figures["memory"] < figures["redis"] < 10_000


def test_prompt_latency_is_given_for_each_place_among_a_usage_chunk(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.phases", "--prompts", "16", "--store", "memory"]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [row] = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| this")]
    assert [cell.strip() for cell in row[:2]] == ["this checkout", "memory"]
    medians = [float(cell) for cell in row[2:-1]]
    assert len(medians) == FLUSH_CHUNK and all(0 < m < 1000 for m in medians)
    excess = float(row[-1].strip().removeprefix("+").removesuffix(" ms"))
    assert excess == pytest.approx(max(medians) - statistics.median(medians), abs=0.002)


def test_agentd_runs_this_checkouts_code_whatever_the_virtualenv_was_installed_from(
    tmp_path: Path,
) -> None:
    from bench.procs import agentd_environment

    env = agentd_environment(None, {"PYTHONPATH": "/elsewhere", "AGENTD_CONFIG": "x", "A": "b"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    assert "AGENTD_CONFIG" not in env and env["A"] == "b"
    assert agentd_environment(Path("/src/old"), {"PYTHONPATH": "/x"})["PYTHONPATH"] == "/src/old"
    # The path comes before the virtualenv's own (an editable install of another work tree).
    argv = [sys.executable, "-c", "import agentd; print(agentd.__file__)"]
    environment = agentd_environment(None, os.environ)
    found = subprocess.run(argv, cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert Path(found.stdout.strip()) == ROOT / "agentd" / "__init__.py", found.stderr
