"""The JSON library for agentd's hot path, picked by measurement.

agentd parses every agent line (to validate it and read its type) and encodes its own
messages. Each library installed here parses a 100 B and a 4 KiB delta line and encodes an
``ack``; the fastest parse decides. Libraries that are not installed are listed as such.
"""

from __future__ import annotations

import importlib
import json
import timeit
from collections.abc import Callable
from typing import Any

LINES = {
    "100B": b'{"type":"delta","id":"q1","text":"' + b"a" * 68 + b'"}',
    "4KiB": b'{"type":"delta","id":"q1","text":"' + b"a" * 4060 + b'"}',
}
ACK = {"type": "ack", "id": "p1", "seq": 12345}


def codecs() -> tuple[dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]], list[str]]:
    found: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = {
        "json (stdlib)": (json.loads, lambda o: json.dumps(o).encode())
    }
    missing = []
    for name in ("ujson", "orjson", "msgspec"):
        try:
            module: Any = importlib.import_module(name)
        except ImportError:
            missing.append(name)
            continue
        if name == "msgspec":
            found[name] = (module.json.Decoder().decode, module.json.Encoder().encode)
        elif name == "orjson":
            found[name] = (module.loads, module.dumps)
        else:
            found[name] = (module.loads, lambda o, m=module: m.dumps(o).encode())
    return found, missing


def best_ns(call: Callable[[], Any], number: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e9


def run(ctx: Any) -> dict[str, Any]:
    number = 2_000 if ctx.smoke else 100_000
    found, missing = codecs()
    results: dict[str, Any] = {"ns_per_call": {}, "not_installed": missing}
    for name, (loads, dumps) in found.items():
        row = {
            f"parse {label}": best_ns(lambda s=line, f=loads: f(s), number)
            for label, line in LINES.items()
        }
        row["encode ack"] = best_ns(lambda f=dumps: f(ACK), number)
        results["ns_per_call"][name] = {k: round(v) for k, v in row.items()}
    results["fastest_parse"] = min(
        results["ns_per_call"], key=lambda n: results["ns_per_call"][n]["parse 100B"]
    )
    return results
