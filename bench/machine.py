"""The machine a run measured on, and the versions of everything compared."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from typing import Any

from bench.procs import Websocketd
from bench.suite import require


def _first(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _output(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout.strip() or out.stderr.strip()).splitlines()[0]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def describe() -> dict[str, Any]:
    memory_kib = int(_first("/proc/meminfo", "MemTotal").split()[0])
    versions = {
        name: importlib.metadata.version(name)
        for name in ("twisted", "autobahn", "orjson", "prometheus-client")
    }
    return {
        "host": socket.gethostname(),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "packages": versions,
        "websocketd": Websocketd.version(),
        "openssh": _output([require("ssh"), "-V"]),
        "redis": _output([require("redis-server"), "--version"]),
        "load_before": load(),
    }


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()
