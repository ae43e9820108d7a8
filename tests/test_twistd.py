"""agentd as an operator runs it: a real ``twistd`` process, started from another directory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted

from tests.servers import free_port, wait_for_port
from tests.wsclient import connect

BIN = Path(sys.executable).parent
TWISTD = [str(BIN / "twistd"), "--nodaemon", "--pidfile="]


def run_twistd(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
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
        assert (await client.recv())["type"] == "session"
        client.send({"type": "prompt", "id": "1", "text": "hello twistd"})
        messages = await client.recv_until("done")
        assert "".join(m["text"] for m in messages if m["type"] == "delta") == "hello twistd"
        proc.send_signal(signal.SIGTERM)
        code, _ = await client.closed
        assert code == 1001
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert any("started" in r["message"] for r in records)
    assert all({"time", "level", "message"} <= r.keys() for r in records)
    assert token not in out and token not in err.replace(banner, "")
