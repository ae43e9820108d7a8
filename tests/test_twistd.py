"""agentd as an operator runs it: a real ``twistd`` process, started from another directory."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted

from bench.procs import cpu_seconds
from tests.harness import SECRET
from tests.servers import free_port, holder_pids, wait_for_port
from tests.wsclient import connect

BIN = Path(sys.executable).parent
TWISTD = [str(BIN / "twistd"), "--nodaemon", "--pidfile="]


def run_twistd(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    # Development mode keeps its secret and its sessions under $HOME: the test's own.
    env["HOME"] = str(cwd)
    return subprocess.Popen(
        [*TWISTD, "agentd", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_twistd_lists_the_plugin_from_any_directory(tmp_path):
    out = subprocess.run([*TWISTD, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert re.search(r"^\s+agentd\s", out.stdout, re.M), out.stdout


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[vms]\nport = 70000\n", "[vms] port: must be between 1 and 65535"),
        ("[vms]\nprot = 22\n", "[vms] prot: unknown key"),
        ('[server]\nmax_message_bytes = "big"\n', "[server] max_message_bytes: must be an integer"),
        ('[agents]\nnames = ["echo; rm -rf /"]\n', "[agents] names:"),
        ('[vms]\ntransport = "ssh"\n', "[vms] private_key: required"),
        ("not toml at all [", "not valid TOML"),
        ('[vms]\ntransport = "local"\n', "[auth] jwt_secret: required"),
        (
            '[auth]\njwt_secret = "a-secret-long-enough-for-hs256-0123456789"\n'
            'jwt_algorithms = ["HS256", "none"]\n',
            '[auth] jwt_algorithms: "none" would accept unsigned tokens',
        ),
    ],
)
def test_invalid_configuration_exits_nonzero_with_one_line_naming_the_key(tmp_path, toml, expected):
    path = tmp_path / "agentd.toml"
    path.write_text(toml)
    proc = run_twistd(["--config", str(path)], cwd=tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert expected in lines[0]


def test_an_address_in_use_stops_agentd_at_startup_instead_of_running_deaf(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_twistd(["--listen", f"tcp:{port}:interface=127.0.0.1"], cwd=tmp_path)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("agentd kept running without its listener") from None
    assert proc.returncode != 0
    refusal = [line for line in (out + err).splitlines() if "cannot listen" in line]
    assert len(refusal) == 1 and f"agentd: cannot listen on 127.0.0.1:{port}" in refusal[0]
    assert "Traceback" not in out + err


@pytest_twisted.ensureDeferred
async def test_dev_mode_prints_a_working_token_and_sigterm_exits_cleanly(tmp_path):
    port = free_port()
    proc = run_twistd(["--listen", f"tcp:{port}:interface=127.0.0.1"], cwd=tmp_path)
    try:
        wait_for_port(port, timeout=20)
        banner = ""
        while "token:" not in banner:
            line = proc.stderr.readline()
            assert line, "twistd ended before printing the development token"
            banner += line
        token = re.search(r"token:\s+(\S+)", banner).group(1)
        client = await connect(f"ws://127.0.0.1:{port}/projects/demo/agent/echo?token={token}")
        hello = await client.recv()
        assert hello["type"] == "session"
        client.send({"type": "prompt", "id": "1", "text": "hello twistd"})
        messages = await client.recv_until("done")
        assert "".join(m["text"] for m in messages if m["type"] == "delta") == "hello twistd"
        holders = holder_pids(tmp_path)
        assert len(holders) == 1
        proc.send_signal(signal.SIGTERM)
        code, _ = await client.closed
        assert code == 1012
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # Started again, development mode accepts the token it printed, and the session (held
    # locally, outside agentd) resumes where it was.
    again = run_twistd(["--listen", f"tcp:{port}:interface=127.0.0.1"], cwd=tmp_path)
    try:
        wait_for_port(port, timeout=20)
        resumed = await connect(
            f"ws://127.0.0.1:{port}/projects/demo/agent/echo?token={token}"
            f"&session={hello['session']}&last_seq={messages[-1]['seq']}"
        )
        back = await resumed.recv()
        assert back["resumed"] is True and back["session"] == hello["session"]
        resumed.send({"type": "prompt", "id": "2", "text": "still here"})
        more = await resumed.recv_until("done")
        assert more[0] == {"type": "ack", "id": "2", "seq": messages[-1]["seq"] + 1}
        assert holder_pids(tmp_path) == holders, "the same agent answered"
        resumed.close()
    finally:
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=30)
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert any("started" in r["message"] for r in records)
    assert all({"time", "level", "message"} <= r.keys() for r in records)
    assert token not in out and token not in err.replace(banner, "")


def test_out_of_descriptors_agentd_pauses_accepting_logs_once_and_recovers(tmp_path):
    port, log = free_port(), tmp_path / "agentd.log"
    config = tmp_path / "agentd.toml"
    config.write_text(
        f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1:backlog=1024"]\n'
        "request_head_timeout_seconds = 60.0\n"
        f'[auth]\njwt_secret = "{SECRET}"\n[log]\nfile = "{log}"\n'
    )

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = run_twistd(["--config", str(config)], cwd=tmp_path, preexec_fn=few_descriptors)
    flood: list[socket.socket] = []
    try:
        wait_for_port(port, timeout=20)
        # About 50 fit in agentd's 64 descriptors; the rest wait in the listen backlog.
        flood = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(120)]
        time.sleep(0.5)
        probe = socket.create_connection(("127.0.0.1", port), timeout=20)
        probe.sendall(b"GET /health/live HTTP/1.1\r\nHost: agentd\r\n\r\n")
        cpu, started = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(3.0)
        cpu, elapsed = cpu_seconds(proc.pid) - cpu, time.monotonic() - started
        assert cpu < 0.25 * elapsed, f"{cpu:.2f} s of CPU in {elapsed:.1f} s: accept is spinning"
        exhausted = [line for line in log.read_text().splitlines() if "EMFILE" in line]
        assert len(exhausted) == 1, exhausted[:5]
        assert json.loads(exhausted[0])["level"] == "warn"
        for client in flood:
            client.close()
        # The health check waited in the backlog instead of being reset, and is answered.
        assert probe.recv(100).startswith(b"HTTP/1.1 200")
        probe.close()
    finally:
        for client in flood:
            client.close()
        proc.terminate()
        proc.communicate(timeout=30)
    assert "accepting connections again" in log.read_text()
