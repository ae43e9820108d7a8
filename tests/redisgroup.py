"""One Redis primary, one replica and three Sentinels on loopback: a failover in seconds."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

from tests.servers import RedisSentinel, RedisServer, ServerTLS
from tests.waiting import wait_until

MASTER = "mymaster"


class SentinelGroup:
    """``primary`` replicated to ``replica``, watched by three Sentinels (quorum 2) that call
    a server down after one second. The names stay with the servers: after a failover,
    ``replica`` is the primary."""

    def __init__(self, directory: Path, tls: ServerTLS | None = None) -> None:
        # Replicas sync at once rather than after the default five seconds.
        debug = ["--enable-debug-command", "yes", "--repl-diskless-sync-delay", "0"]
        self.tls = tls
        self.primary = RedisServer(directory / "primary", debug, tls=tls)
        self.replica = RedisServer(
            directory / "replica",
            [*debug, "--replicaof", "127.0.0.1", str(self.primary.port)],
            tls=tls,
        )
        self.sentinels = [
            RedisSentinel(directory / f"sentinel-{i}", self.primary.port, MASTER, tls=tls)
            for i in range(3)
        ]

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        wait_until(
            lambda: "master_link_status:up" in self.replica.cli("INFO", "replication"),
            what="the replica in sync",
        )
        for sentinel in self.sentinels:
            sentinel.start()
        # A failover needs a majority of Sentinels that know each other: they meet through
        # the primary every two seconds.
        wait_until(
            lambda: all(self._knows_the_others(s) for s in self.sentinels),
            timeout=15,
            what="the Sentinels meeting",
        )

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in (self.primary, self.replica):
            if server.process is not None:
                server.process.send_signal(signal.SIGKILL)
                server.process.wait(timeout=10)
                server.process = None

    def redis_config(self, **extra: Any) -> dict[str, Any]:
        """The ``[redis]`` section that reaches this group through its Sentinels."""
        config: dict[str, Any] = {
            "sentinels": [s.address for s in self.sentinels],
            "master_name": MASTER,
        }
        if self.tls is not None:
            config.update(
                url="rediss:///0",
                tls_ca=str(self.tls.ca_file),
                tls_cert=str(self.tls.cert_file),
                tls_key=str(self.tls.key_file),
            )
        return {**config, **extra}

    def master_port(self) -> int:
        """The primary's port as the first Sentinel sees it."""
        out = self.sentinels[0].cli("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        return int(re.findall(r'"(\d+)"', out)[-1])

    def switched_at(self) -> float:
        """When the first Sentinel announced the switch (UNIX time)."""
        times = [t for s in self.sentinels for t in s.switch_times()]
        assert times, "no Sentinel switched the master"
        return min(times)

    def _knows_the_others(self, sentinel: RedisSentinel) -> bool:
        out = sentinel.cli("SENTINEL", "MASTER", MASTER)
        values = re.findall(r'"([^"]*)"', out)
        state = dict(zip(values[::2], values[1::2], strict=False))
        return state.get("num-other-sentinels") == "2" and state.get("num-slaves") == "1"
