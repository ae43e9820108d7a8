"""The agent CLI as a subprocess: the echo agent, the protocol's edges, exits and signals."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentd.agent import cli
from tests.fake_providers import REPO, AgentProcess, agent_env
from tests.waiting import wait_until

# The agent CLI, and the same with the test options that drive the echo agent in tests.
CLI = [sys.executable, "-m", "agentd.agent.cli"]
TEST_CLI = [*CLI, "--test-options"]


@pytest.fixture
def echo() -> Iterator[AgentProcess]:
    agent = AgentProcess("echo", agent_env(), command=TEST_CLI)
    yield agent
    agent.stop()


def echo_cli(stdout: Any) -> subprocess.Popen[bytes]:
    """The echo agent with the test options as a child: stdin a pipe, stdout ``stdout``."""
    return subprocess.Popen(
        [*TEST_CLI, "echo"],
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=subprocess.DEVNULL,
        env=agent_env(),
        cwd=REPO,
    )


def deltas(lines: list[dict]) -> list[str]:
    return [line["text"] for line in lines if line["type"] == "delta"]


def unread_bytes(fd: int) -> int:
    """Bytes written into a pipe that its reader has not read yet."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


def catches(pid: int, signum: int) -> bool:
    """Whether the process has installed a handler for ``signum`` (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    raise AssertionError("no SigCgt line in /proc/PID/status")


def test_echo_streams_the_prompt_back_one_word_a_delta(echo: AgentProcess) -> None:
    echo.send({"type": "prompt", "id": "q1", "text": "hello big  world\n"})
    lines = echo.read_query("q1")
    assert lines[0] == {"type": "start", "id": "q1"}
    assert deltas(lines) == ["hello ", "big  ", "world\n"]
    assert all(line["id"] == "q1" for line in lines)
    assert lines[-1] == {
        "type": "done",
        "agent": "echo",
        "id": "q1",
        "usage": {
            "inputTokens": 3,
            "outputTokens": 3,
            "cacheReadTokens": 0,
            "cacheWriteTokens": 0,
            "cost": 0.0,
            "model": "echo",
        },
    }


def test_echo_repeat_streams_ten_thousand_deltas_that_join_back(echo: AgentProcess) -> None:
    echo.send({"type": "prompt", "id": "q1", "text": "one two ", "options": {"repeat": 5000}})
    lines = echo.read_query("q1")
    assert len(deltas(lines)) == 10_000
    assert "".join(deltas(lines)) == "one two " * 5000
    assert lines[-1]["usage"]["outputTokens"] == 10_000


def test_echo_delta_bytes_sends_deltas_of_exactly_that_size(echo: AgentProcess) -> None:
    echo.send(
        {"type": "prompt", "id": "q1", "text": "x", "options": {"delta_bytes": 100, "repeat": 7}}
    )
    texts = deltas(echo.read_query("q1"))
    assert len(texts) == 7
    assert {len(t.encode()) for t in texts} == {100}


def test_echo_pushes_well_over_100k_lines_a_second() -> None:
    process = echo_cli(subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(b'{"type":"prompt","id":"w","text":"warm up"}\n')
        process.stdin.flush()
        while b'"done"' not in process.stdout.readline():
            pass
        started = time.monotonic()
        process.stdin.write(
            b'{"type":"prompt","id":"q1","text":"x","options":{"delta_bytes":16,"repeat":1000000}}\n'
        )
        process.stdin.flush()
        # Read in bulk, so that what is measured is the agent, not this reader.
        lines, tail = 0, b""
        while not tail.endswith(b"\n") or b'"done"' not in tail:
            chunk = os.read(process.stdout.fileno(), 1 << 20)
            assert chunk, "the agent closed stdout early"
            lines += chunk.count(b"\n")
            tail = (tail + chunk)[-300:]
        elapsed = time.monotonic() - started
    finally:
        process.kill()
        process.wait()
        process.stdin.close()
        process.stdout.close()
    assert lines == 1_000_002
    assert lines / elapsed > 100_000


def test_delay_ms_paces_the_deltas(echo: AgentProcess) -> None:
    started = time.monotonic()
    echo.send({"type": "prompt", "id": "q1", "text": "a b c d e", "options": {"delay_ms": 50}})
    assert len(deltas(echo.read_query("q1"))) == 5
    assert time.monotonic() - started >= 0.2


def test_report_keys_proves_the_keys_arrived_without_revealing_them() -> None:
    agent = AgentProcess("echo", agent_env(ANTHROPIC_API_KEY="sk-ant-test-key-123"), TEST_CLI)
    try:
        agent.send({"type": "prompt", "id": "q1", "text": "hi", "options": {"report_keys": True}})
        done = agent.read_query("q1")[-1]
    finally:
        agent.stop()
    assert done["keys"] == {
        "ANTHROPIC_API_KEY": hashlib.sha256(b"sk-ant-test-key-123").hexdigest(),
        "OPENAI_API_KEY": None,
    }
    assert b"sk-ant-test-key-123" not in b"".join(agent.raw_stdout + agent.stderr)


def test_turn_counts_the_prompts_this_agent_process_answered(echo: AgentProcess) -> None:
    echo.send({"type": "prompt", "id": "q1", "text": "one"})
    assert "turn" not in echo.read_query("q1")[-1]
    echo.send({"type": "prompt", "id": "q2", "text": "two", "options": {"turn": True}})
    assert echo.read_query("q2")[-1]["turn"] == 2
    echo.send({"type": "prompt", "id": "q3", "text": "three", "options": {"turn": True}})
    assert echo.read_query("q3")[-1]["turn"] == 3


@pytest.mark.parametrize(
    ("line", "query_id"),
    [
        (b"not json\n", None),
        (b"[1, 2]\n", None),
        (b"\xff\xfe\n", None),
        (b'{"type": "launch", "id": "q9"}\n', "q9"),
        (b'{"type": "prompt", "text": "no id"}\n', None),
        (b'{"type": "prompt", "id": "q9", "text": ""}\n', "q9"),
        (b'{"type": "prompt", "id": "q9", "text": "x", "options": []}\n', "q9"),
        (b'{"type": "prompt", "id": "q9", "text": "x", "options": {"repeat": 0}}\n', "q9"),
        (b'{"type": "prompt", "id": "q9", "text": "x", "options": {"repeat": true}}\n', "q9"),
        (b'{"type": "prompt", "id": "q9", "text": "x", "options": {"delay_ms": 5000}}\n', "q9"),
        (b'{"type": "prompt", "id": "q9", "text": "x", "options": {"delta_bytes": "8"}}\n', "q9"),
        (b'{"type": "prompt", "id": "q9", "text": "x", "options": {"report_keys": 1}}\n', "q9"),
        (b'{"type": "prompt", "id": "q9", "text": "x", "options": {"exit": 300}}\n', "q9"),
        (b'{"type": "prompt", "id": "q9", "text": "x", "options": {"turn": 1}}\n', "q9"),
    ],
)
def test_malformed_line_gets_bad_request_and_the_agent_keeps_serving(
    echo: AgentProcess, line: bytes, query_id: str | None
) -> None:
    echo.send(line)
    error = echo.read()
    assert error["type"] == "error"
    assert error["code"] == "bad_request"
    assert error.get("id") == query_id
    echo.send({"type": "prompt", "id": "after", "text": "still here"})
    assert deltas(echo.read_query("after")) == ["still ", "here"]


@pytest.mark.parametrize(
    "options",
    [
        {"exit": 7},
        {"report_keys": True},
        {"repeat": 3, "delay_ms": 1},
        {"delta_bytes": 8},
        {"turn": True},
    ],
)
def test_test_options_are_refused_without_the_flag_and_the_agent_keeps_serving(
    options: dict[str, object],
) -> None:
    agent = AgentProcess("echo", agent_env(ANTHROPIC_API_KEY="sk-ant-test-key-123"), CLI)
    try:
        agent.send({"type": "prompt", "id": "q1", "text": "a b", "options": options})
        error = agent.read()
        agent.send({"type": "prompt", "id": "q2", "text": "still here", "options": {"x": 1}})
        lines = agent.read_query("q2")
    finally:
        agent.stop()
    assert error["type"] == "error" and error["code"] == "bad_request"
    assert error["id"] == "q1"
    assert "--test-options" in error["error"] and all(name in error["error"] for name in options)
    assert deltas(lines) == ["still ", "here"]
    assert "keys" not in lines[-1]


def test_test_options_outside_the_options_object_are_ignored(echo: AgentProcess) -> None:
    echo.send(
        {"type": "prompt", "id": "q1", "text": "a b", "exit": 7, "repeat": 3, "report_keys": True}
    )
    lines = echo.read_query("q1")
    assert deltas(lines) == ["a ", "b"]
    assert "keys" not in lines[-1]
    assert echo.process.poll() is None


def test_blank_lines_are_ignored(echo: AgentProcess) -> None:
    echo.send(b"\n  \n")
    echo.send({"type": "prompt", "id": "q1", "text": "x"})
    assert echo.read()["type"] == "start"


def test_prompt_while_a_query_runs_is_refused_as_busy(echo: AgentProcess) -> None:
    echo.send({"type": "prompt", "id": "slow", "text": "a b c d", "options": {"delay_ms": 100}})
    assert echo.read() == {"type": "start", "id": "slow"}
    echo.send({"type": "prompt", "id": "second", "text": "x"})
    lines = echo.read_query("second")
    assert lines[-1]["code"] == "busy"
    assert lines[-1]["type"] == "error"
    rest = echo.read_query("slow")
    assert rest[-1]["type"] == "done"
    assert "aborted" not in rest[-1]
    assert "".join(deltas(lines + rest)) == "a b c d"


def test_abort_ends_the_running_query_with_partial_usage(echo: AgentProcess) -> None:
    echo.send(
        {"type": "prompt", "id": "q1", "text": "a b c d e f g h", "options": {"delay_ms": 200}}
    )
    assert echo.read()["type"] == "start"
    assert echo.read()["type"] == "delta"
    echo.send({"type": "abort"})
    lines = echo.read_query("q1")
    done = lines[-1]
    assert done["type"] == "done"
    assert done["aborted"] is True
    assert done["usage"]["outputTokens"] == 1 + len(deltas(lines)) < 8
    echo.send({"type": "prompt", "id": "q2", "text": "next"})
    assert echo.read_query("q2")[-1]["type"] == "done"


def test_abort_naming_another_query_is_ignored(echo: AgentProcess) -> None:
    echo.send({"type": "prompt", "id": "q1", "text": "a b c", "options": {"delay_ms": 50}})
    echo.send({"type": "abort", "id": "other"})
    done = echo.read_query("q1")[-1]
    assert done["type"] == "done"
    assert "aborted" not in done
    assert done["usage"]["outputTokens"] == 3


def test_sigterm_mid_query_reports_partial_usage_and_exits_0(echo: AgentProcess) -> None:
    echo.send({"type": "prompt", "id": "q1", "text": "a b c d e f", "options": {"delay_ms": 300}})
    assert echo.read()["type"] == "start"
    assert echo.read()["type"] == "delta"
    echo.process.send_signal(signal.SIGTERM)
    assert echo.wait() == 0
    done = echo.remaining()[-1]
    assert done["type"] == "done"
    assert done["aborted"] is True
    assert 1 <= done["usage"]["outputTokens"] < 6


def test_stdin_eof_mid_query_reports_partial_usage_and_exits_0(echo: AgentProcess) -> None:
    echo.send({"type": "prompt", "id": "q1", "text": "a b c d e f", "options": {"delay_ms": 300}})
    assert echo.read()["type"] == "start"
    echo.close_stdin()
    assert echo.wait() == 0
    lines = echo.remaining()
    assert lines[-1]["type"] == "done"
    assert lines[-1]["aborted"] is True
    assert lines[-1]["usage"]["inputTokens"] == 6


def test_stdin_eof_when_idle_exits_0_without_output() -> None:
    result = subprocess.run(
        [*CLI, "echo"],
        input=b"",
        capture_output=True,
        env=agent_env(),
        cwd=REPO,
        timeout=10,
    )
    assert result.returncode == 0
    assert result.stdout == b""


def test_sigterm_while_an_agent_starts_exits_0_quietly(tmp_path: Path) -> None:
    agents = tmp_path / "agents.toml"
    agents.write_text('[agents.claude]\nprovider = "anthropic"\nmodel = "claude-sonnet-4-5"\n')
    env = agent_env(AGENTD_AGENTS=str(agents), ANTHROPIC_API_KEY="sk-ant-unused-key")
    agent = AgentProcess("claude", env)
    # The CLI's first act is to take over SIGTERM; loading the SDK comes after and takes
    # far longer than this wait's polling interval, so the signal lands during it.
    wait_until(lambda: catches(agent.process.pid, signal.SIGTERM), what="a SIGTERM handler")
    agent.process.send_signal(signal.SIGTERM)
    assert agent.wait() == 0, agent.stderr_text()
    assert agent.remaining() == []
    assert "agent ready" not in agent.stderr_text(), "the signal came after start-up"


def test_stdout_may_be_a_regular_file(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with out.open("wb") as stdout:
        process = echo_cli(stdout)
        assert process.stdin is not None
        process.stdin.write(
            b'{"type":"prompt","id":"q1","text":"to a file","options":{"repeat":2}}\n'
        )
        process.stdin.flush()
        wait_until(lambda: b'"done"' in out.read_bytes(), what="the done line in the file")
        process.stdin.close()
        assert process.wait(timeout=10) == 0
    lines = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert "".join(deltas(lines)) == "to a fileto a file"
    assert lines[-1]["type"] == "done"


def test_sigterm_exits_even_when_the_peer_stopped_reading() -> None:
    process = echo_cli(subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    # Far more output than the pipe holds, and nobody reads it.
    process.stdin.write(
        b'{"type":"prompt","id":"q1","text":"x","options":{"delta_bytes":1000,"repeat":100000}}\n'
    )
    process.stdin.flush()
    stdout = process.stdout.fileno()
    # Within one atomic write of full: the agent is left holding output it cannot write.
    full = fcntl.fcntl(stdout, fcntl.F_GETPIPE_SZ) - select.PIPE_BUF
    wait_until(lambda: unread_bytes(stdout) >= full, what="a full stdout pipe")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=cli.FLUSH_SECONDS + 5) == 0
    finally:
        process.kill()
        process.stdout.close()
        process.stdin.close()
    assert time.monotonic() - started < cli.FLUSH_SECONDS + 5


def test_the_lines_of_one_step_reach_stdout_in_one_write() -> None:
    # On a SEQPACKET socket each write is one message, so the messages are the writes.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = echo_cli(theirs)
    theirs.close()
    assert process.stdin is not None
    try:
        ours.settimeout(10)
        # The echo agent answers a one-word prompt in one step: start, delta and done.
        process.stdin.write(b'{"type":"prompt","id":"q1","text":"hello"}\n')
        process.stdin.flush()
        first = [json.loads(line) for line in ours.recv(65536).splitlines()]
        assert [line["type"] for line in first] == ["start", "delta", "done"]
        # A paced answer waits between its deltas: each wait ends a write.
        process.stdin.write(b'{"type":"prompt","id":"q2","text":"a b","options":{"delay_ms":50}}\n')
        process.stdin.flush()
        writes = []
        while not writes or b'"done"' not in writes[-1]:
            writes.append(ours.recv(65536))
        assert [[json.loads(line)["type"] for line in w.splitlines()] for w in writes] == [
            ["start", "delta"],
            ["delta", "done"],
        ]
        process.stdin.close()
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        ours.close()


def test_reader_closing_stdout_ends_the_agent_with_status_0() -> None:
    process = echo_cli(subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(
        b'{"type":"prompt","id":"q1","text":"a b c d e f g","options":{"delay_ms":100}}\n'
    )
    process.stdin.flush()
    assert json.loads(process.stdout.readline())["type"] == "start"
    process.stdout.close()
    try:
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.stdin.close()


def test_exit_option_ends_the_process_with_that_status(echo: AgentProcess) -> None:
    echo.send({"type": "prompt", "id": "q1", "text": "x", "options": {"exit": 7}})
    assert echo.wait() == 7
    assert echo.remaining() == []


def test_unknown_agent_writes_one_error_and_exits_2() -> None:
    agent = AgentProcess("nosuch", agent_env())
    assert agent.wait() == 2
    lines = agent.remaining()
    assert len(lines) == 1
    assert lines[0]["type"] == "error"
    assert lines[0]["code"] == "unknown_agent"
    assert "nosuch" in lines[0]["error"]


def test_unusable_agents_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    agents = tmp_path / "agents.toml"
    agents.write_text('[agents.claude]\nprovider = "anthropic"\nmodel = "m"\nmax_tokens = -1\n')
    agent = AgentProcess("claude", agent_env(AGENTD_AGENTS=str(agents)))
    assert agent.wait() == 2
    [line] = agent.remaining()
    assert line["code"] == "bad_config"
    assert "agents.claude.max_tokens" in line["error"]


@pytest.mark.parametrize("arguments", [[], ["--test-options"], ["--verbose", "echo"]])
def test_wrong_arguments_exit_2_with_usage(arguments: list[str]) -> None:
    result = subprocess.run(
        [*CLI, *arguments],
        capture_output=True,
        env=agent_env(),
        cwd=REPO,
        timeout=10,
    )
    assert result.returncode == 2
    assert json.loads(result.stdout)["code"] == "bad_request"


def test_unhandled_exception_writes_one_internal_error_and_exits_1(tmp_path: Path) -> None:
    # The echo provider is replaced by one that fails the way a bug would.
    wrapper = tmp_path / "broken_agent.py"
    wrapper.write_text(
        textwrap.dedent(
            """
            import sys

            from agentd.agent import cli
            from agentd.agent.providers import echo


            async def broken(self, prompt, reply):
                await reply.delta("partial ")
                raise KeyError("secret-detail-0042")


            echo.EchoProvider.answer = broken
            sys.exit(cli.main())
            """
        )
    )
    agent = AgentProcess("echo", agent_env(), command=[sys.executable, str(wrapper)])
    agent.send({"type": "prompt", "id": "q1", "text": "hello"})
    assert agent.wait() == 1
    lines = agent.remaining()
    errors = [line for line in lines if line["type"] == "error"]
    assert errors == [{"type": "error", "code": "internal", "error": "internal error", "id": "q1"}]
    stdout = b"".join(agent.raw_stdout)
    assert b"secret-detail-0042" not in stdout
    assert b"Traceback" not in stdout
    assert any(r["message"] == "internal error" for r in agent.log_records())


def test_logs_are_json_lines_on_stderr_with_agent_and_query() -> None:
    agent = AgentProcess("echo", agent_env(AGENTD_AGENT_LOG_LEVEL="debug"), command=TEST_CLI)
    try:
        agent.send({"type": "prompt", "id": "q1", "text": "x"})
        agent.read_query("q1")
        agent.close_stdin()
        agent.wait()
        records = agent.log_records()
    finally:
        agent.stop()
    assert records
    for record in records:
        assert {"time", "level", "message", "agent"} <= set(record)
        assert record["agent"] == "echo"
    per_query = [(r["level"], r["message"]) for r in records if r.get("query") == "q1"]
    assert per_query == [("debug", "query started"), ("debug", "query done")]


def test_at_the_default_level_a_prompt_writes_no_log_line(echo: AgentProcess) -> None:
    for n in range(3):
        echo.send({"type": "prompt", "id": f"q{n}", "text": "hello world"})
        echo.read_query(f"q{n}")
    echo.close_stdin()
    echo.wait()
    # What remains is once per process, not per prompt.
    assert [r["message"] for r in echo.log_records()] == ["agent ready", "stopping"]


def test_the_echo_path_loads_no_provider_sdk(tmp_path: Path) -> None:
    wrapper = tmp_path / "imports.py"
    wrapper.write_text(
        textwrap.dedent(
            """
            import json, sys
            from agentd.agent import cli

            status = cli.main()
            heavy = ("anthropic", "openai", "httpx", "httpx2", "pydantic")
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
            sys.stderr.write(json.dumps({"loaded": loaded}) + "\\n")
            sys.exit(status)
            """
        )
    )
    agent = AgentProcess("echo", agent_env(), command=[sys.executable, str(wrapper)])
    agent.send({"type": "prompt", "id": "q1", "text": "x"})
    agent.read_query("q1")
    agent.close_stdin()
    assert agent.wait() == 0
    assert agent.log_records()[-1] == {"loaded": []}


def test_console_script_serves_echo() -> None:
    script = Path(sys.executable).parent / "agentd-agent"
    if not script.exists():
        pytest.skip("agentd is not installed into this interpreter's environment")
    agent = AgentProcess("echo", agent_env(), command=[str(script)])
    try:
        agent.send({"type": "prompt", "id": "q1", "text": "via script"})
        assert deltas(agent.read_query("q1")) == ["via ", "script"]
    finally:
        agent.stop()


def test_read_lines_drops_an_overlong_line_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "MAX_LINE_BYTES", 10)
    read_fd, write_fd = os.pipe()
    events: list[object] = []
    reader = threading.Thread(target=cli.read_lines, args=(read_fd, events.append))
    reader.start()
    os.write(write_fd, b"short\n" + b"x" * 25)
    os.write(write_fd, b"y" * 25 + b"\nlast")
    os.close(write_fd)
    reader.join(timeout=5)
    os.close(read_fd)
    assert events[0] == b"short"
    assert isinstance(events[1], cli.Overlong)
    assert events[2] == b"last"
    assert isinstance(events[3], cli.Stop)
    assert len(events) == 4


def test_read_lines_joins_a_line_that_arrives_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "MAX_LINE_BYTES", 10)
    read_fd, write_fd = os.pipe()
    events: list[object] = []
    reader = threading.Thread(target=cli.read_lines, args=(read_fd, events.append))
    reader.start()
    for piece in (b"ab", b"cd\nef", b"g" * 20, b"h\n", b"ij"):
        os.write(write_fd, piece)
        # Once the reader has taken this piece, the next one needs a read of its own.
        wait_until(lambda: unread_bytes(read_fd) == 0, what="the reader taking the piece")
    os.close(write_fd)
    reader.join(timeout=5)
    os.close(read_fd)
    assert events[0] == b"abcd"
    assert isinstance(events[1], cli.Overlong)
    assert events[2] == b"ij"
    assert isinstance(events[3], cli.Stop)
    assert len(events) == 4


def test_a_writer_that_never_yields_still_waits_for_a_reader_that_does_not_read() -> None:
    """Lines wait for the end of the event loop's step, but ``drain()`` hands a step over
    the high-water mark to the pipe, so the memory a writer holds stays bounded."""
    from agentd.agent.output import HIGH_WATER_BYTES, PipeOutput, open_stdout

    read_end, write_end = os.pipe()
    line = b"x" * 8191 + b"\n"
    total = 4 * HIGH_WATER_BYTES

    async def scenario() -> None:
        output = await open_stdout(lambda: None, fd=write_end)
        assert isinstance(output, PipeOutput)

        async def write_all() -> None:
            for _ in range(total // len(line)):
                output.write(line)
                await output.drain()  # never yields while the reader keeps up

        writer = asyncio.get_running_loop().create_task(write_all())
        await asyncio.sleep(0.2)
        held = output.transport.get_write_buffer_size() + output._step_bytes
        assert not writer.done() and held <= 2 * HIGH_WATER_BYTES
        received = 0
        while received < total:
            await asyncio.sleep(0)
            try:
                received += len(os.read(read_end, 1 << 20))
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await writer
        assert received == total

    os.set_blocking(read_end, False)
    try:
        asyncio.run(scenario())
    finally:
        os.close(read_end)
        os.close(write_end)
