"""JSON log lines: fields, failures, redaction, level filtering, and installation under twistd."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Application, IServiceCollection
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python import log as legacy_log

from agentd.agent.log import Log as AgentLog
from agentd.config import LogConfig
from agentd.jsonlog import (
    REDACTED,
    JSONLogObserver,
    install_json_logging,
    json_log_observer,
    redact,
)
from agentd.logformat import LEVELS, timestamp

REPO = Path(__file__).resolve().parents[1]

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiJhbGljZSIsInByb2plY3QiOiJwMSJ9"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
ANTHROPIC_KEY = "sk-ant-api03-" + "A1b2C3d4E5f6G7h8" * 5
OPENAI_KEY = "sk-proj-" + "Z9y8X7w6V5u4T3s2" * 3


class Capture:
    """A Logger whose events land as parsed JSON lines."""

    def __init__(self) -> None:
        self.stream = io.BytesIO()
        self.log = Logger(namespace="agentd.test", observer=JSONLogObserver(self.stream))

    def lines(self) -> list[dict[str, Any]]:
        raw = self.stream.getvalue()
        assert raw.endswith(b"\n")
        return [json.loads(line) for line in raw.splitlines()]

    def line(self) -> dict[str, Any]:
        [only] = self.lines()
        return only


def test_line_has_time_level_message_namespace_context_and_plain_extras() -> None:
    capture = Capture()
    capture.log.warn(
        "session {session} for {user} resumed after {gap:.1f} s",
        session="s-1",
        project="p1",
        user="alice",
        agent="claude",
        vm="p1.vms.internal",
        query="q-9",
        gap=2.25,
        replayed=[1, 2, {"seq": 3}],
        handler=object(),
    )
    line = capture.line()
    assert list(line)[:4] == ["time", "level", "message", "namespace"]
    moment = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert moment.tzinfo == UTC
    assert abs((datetime.now(UTC) - moment).total_seconds()) < 5
    assert line["level"] == "warn"
    assert line["message"] == "session s-1 for alice resumed after 2.2 s"
    assert line["namespace"] == "agentd.test"
    for field, value in [
        ("session", "s-1"),
        ("project", "p1"),
        ("user", "alice"),
        ("agent", "claude"),
        ("vm", "p1.vms.internal"),
        ("query", "q-9"),
    ]:
        assert line[field] == value
    assert line["gap"] == 2.25
    assert line["replayed"] == [1, 2, {"seq": 3}]
    assert "handler" not in line
    assert not [key for key in line if key.startswith("log_")]


def agent_cli_lines(emit: Any) -> list[dict[str, Any]]:
    """What the agent CLI's ``Log`` writes while ``emit(log)`` runs, as parsed JSON lines."""
    read_fd, write_fd = os.pipe()
    emit(AgentLog("claude", fd=write_fd, level="debug"))
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines()]


def test_agent_cli_and_agentd_lines_share_time_level_message_and_context_fields() -> None:
    [agent_line] = agent_cli_lines(lambda log: log.warn("provider said no", query="q1"))
    capture = Capture()
    capture.log.warn("provider said no", agent="claude", query="q1")
    agentd_line = capture.line()
    for line in (agent_line, agentd_line):
        assert list(line)[:3] == ["time", "level", "message"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        assert (line["level"], line["message"]) == ("warn", "provider said no")
        assert (line["agent"], line["query"]) == ("claude", "q1")


def test_agent_cli_writes_each_level_under_the_name_agentd_writes_it() -> None:
    names = ["debug", "info", "warn", "error"]
    written = agent_cli_lines(lambda log: [getattr(log, name)("x") for name in names])
    capture = Capture()
    for name in names:
        getattr(capture.log, name)("x")
    assert [line["level"] for line in written] == [line["level"] for line in capture.lines()]
    assert [level.name for level in LogLevel.iterconstants()] == list(LEVELS)


def test_timestamps_are_utc_milliseconds_rounded_like_datetime() -> None:
    assert timestamp(1748779200.123) == "2025-06-01T12:00:00.123Z"
    assert timestamp(1748779200.9999996) == "2025-06-01T12:00:01.000Z"
    assert timestamp(0) == "1970-01-01T00:00:00.000Z"


def test_context_field_that_is_not_plain_json_is_written_as_text() -> None:
    class SessionId:
        def __str__(self) -> str:
            return "s-42"

    capture = Capture()
    capture.log.info("attached", session=SessionId())
    assert capture.line()["session"] == "s-42"


def test_extras_that_json_cannot_represent_faithfully_are_left_out() -> None:
    capture = Capture()
    capture.log.info("x", ratio=float("nan"), keyed={1: "a"}, raw=b"bytes", fine=None)
    line = capture.line()
    assert "ratio" not in line and "keyed" not in line and "raw" not in line
    assert line["fine"] is None


def test_a_multiline_message_stays_on_one_line() -> None:
    capture = Capture()
    capture.log.info("first\nsecond")
    assert capture.stream.getvalue().count(b"\n") == 1
    assert capture.line()["message"] == "first\nsecond"


def test_failure_becomes_a_short_error_and_a_traceback() -> None:
    capture = Capture()
    sessions: dict[str, int] = {}
    try:
        sessions["missing"]
    except KeyError:
        capture.log.failure("relay to {agent} failed", agent="claude", project="p1")
    line = capture.line()
    assert line["level"] == "critical"
    assert line["message"] == "relay to claude failed"
    assert line["error"] == "KeyError: 'missing'"
    assert line["traceback"].startswith("Traceback (most recent call last):")
    assert "test_failure_becomes_a_short_error_and_a_traceback" in line["traceback"]
    assert line["agent"] == "claude"


def test_legacy_err_keeps_the_traceback_out_of_the_message() -> None:
    stream = io.BytesIO()
    publisher = LogPublisher(JSONLogObserver(stream))
    legacy = legacy_log.LogPublisher(observerPublisher=publisher, publishPublisher=publisher)
    try:
        1 / 0
    except ZeroDivisionError:
        legacy.msg(failure=legacy_log.failure.Failure(), why="while flushing", isError=1)
    line = json.loads(stream.getvalue())
    assert line["message"] == "while flushing"
    assert line["namespace"] == "log_legacy"
    assert line["error"] == "ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in line["traceback"]
    assert not {"why", "isError", "failure", "system"} & set(line)


SECRETS = [
    (f"accepted {JWT} for alice", JWT),
    (f"GET /projects/p1/agent/claude?token={JWT}&v=2", JWT),
    ("GET /projects/p1/agent/claude?token=opaque-123&v=2", "opaque-123"),
    ("wss://agentd/x?access_token=abc.def.ghi", "abc.def.ghi"),
    (f"Authorization: Bearer {JWT}", JWT),
    ("authorization: Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy"),
    ("{'Authorization': 'Bearer short'}", "short"),
    ("retrying with bearer abcdefghijklmnopqrstuvwxyz0123", "abcdefghijklmnopqrstuvwxyz0123"),
    (f"provider rejected key {ANTHROPIC_KEY}", ANTHROPIC_KEY),
    (f"OPENAI_API_KEY={OPENAI_KEY}", OPENAI_KEY),
    (f"falling back to {OPENAI_KEY} for gpt-5", OPENAI_KEY),
    ("api_key=plainvalue123 next", "plainvalue123"),
    ("redis://:hunter2@10.0.0.5:6379/0", "hunter2"),
    ("redis://agentd:hunter2@redis.internal/0", "hunter2"),
    ('bad agent line {"type": "x", "token": "opaque-456"}', "opaque-456"),
    ('{"jwt_secret": "s3cr3t-value"}', "s3cr3t-value"),
]


@pytest.mark.parametrize(("text", "secret"), SECRETS)
def test_redact_removes_credentials(text: str, secret: str) -> None:
    redacted = redact(text)
    assert secret not in redacted
    assert REDACTED in redacted
    assert redact(redacted) == redacted


@pytest.mark.parametrize(
    "text",
    [
        "query done: input_tokens=1200 output_tokens=300 max_tokens=4096",
        "missing bearer token",
        "task-runner disk-usage skip-this risk-assessment",
        "agent_errors_total{error_type=rate_limit}",
        "redis://redis.internal:6379/0",
        "eyJ is how a JWT header starts",
        "authorization failed for user alice",
    ],
)
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text


def test_redaction_applies_to_message_extras_error_and_traceback() -> None:
    capture = Capture()
    try:
        raise ValueError(f"upstream said no to {ANTHROPIC_KEY}")
    except ValueError:
        capture.log.failure(
            "connect with {url} failed",
            url=f"wss://agentd.example/projects/p1/agent/claude?token={JWT}",
            headers={"Authorization": f"Bearer {JWT}", "Accept": "text/plain"},
            settings={"redis": {"password": "hunter2", "db": 0}, "api_key": "k-123"},
            tokens_used=[{"input_tokens": 12}],
            user="alice",
        )
    raw = capture.stream.getvalue().decode()
    for secret in (JWT, ANTHROPIC_KEY, "hunter2", "k-123"):
        assert secret not in raw
    line = capture.line()
    assert line["message"].endswith("?token=[redacted] failed")
    assert line["url"].endswith("?token=[redacted]")
    assert line["headers"] == {"Authorization": REDACTED, "Accept": "text/plain"}
    assert line["settings"] == {"redis": {"password": REDACTED, "db": 0}, "api_key": REDACTED}
    assert line["tokens_used"] == [{"input_tokens": 12}]
    assert line["error"] == "ValueError: upstream said no to [redacted]"
    assert ANTHROPIC_KEY not in line["traceback"] and REDACTED in line["traceback"]
    assert line["user"] == "alice"


def emit_every_level(observer: ILogObserver) -> None:
    log = Logger(namespace="agentd.test", observer=observer)
    log.debug("at debug")
    log.info("at info")
    log.warn("at warn")
    log.error("at error")
    log.critical("at critical")


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", ["debug", "info", "warn", "error", "critical"]),
        ("info", ["info", "warn", "error", "critical"]),
        ("warn", ["warn", "error", "critical"]),
        ("error", ["error", "critical"]),
    ],
)
def test_level_filter_drops_lower_levels(tmp_path: Path, level: str, expected: list[str]) -> None:
    path = tmp_path / "agentd.log"
    emit_every_level(json_log_observer(LogConfig(level=level, file=str(path))))
    levels = [json.loads(line)["level"] for line in path.read_text().splitlines()]
    assert levels == expected


def test_file_destination_appends(tmp_path: Path) -> None:
    path = tmp_path / "agentd.log"
    path.write_text('{"message":"from before"}\n')
    log = Logger(observer=json_log_observer(LogConfig(file=str(path))))
    log.info("after restart")
    lines = [json.loads(line)["message"] for line in path.read_text().splitlines()]
    assert lines == ["from before", "after restart"]


def test_an_unwritable_destination_fails_at_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        install_json_logging(LogConfig(file=str(tmp_path / "no" / "such" / "dir.log")))


def test_root_service_becomes_the_applications_log_observer(tmp_path: Path) -> None:
    root = install_json_logging(LogConfig(file=str(tmp_path / "agentd.log")))
    application = Application("agentd")
    assert application.getComponent(ILogObserver) is None
    root.setServiceParent(application)
    assert application.getComponent(ILogObserver) is root.observer
    assert root in list(IServiceCollection(application))


PROBE_PLUGIN = """
    from twisted.application.service import ServiceMaker

    jsonprobe = ServiceMaker("jsonprobe", "jsonprobe_tap", "JSON logging probe", "jsonprobe")
"""

PROBE_TAP = """
    import warnings

    from twisted.application.service import Service
    from twisted.logger import Logger
    from twisted.python import usage

    from agentd.config import LogConfig
    from agentd.jsonlog import install_json_logging

    _log = Logger(namespace="jsonprobe")


    class Options(usage.Options):
        optParameters = [["level", None, "info", ""], ["file", None, "-", ""]]


    class Probe(Service):
        def startService(self):
            from twisted.internet import reactor

            _log.debug("debug is filtered out")
            _log.info(
                "hello {user} with Authorization: Bearer {jwt}",
                user="alice",
                jwt=JWT,
                project="p1",
                session="s-1",
                count=3,
            )
            try:
                raise RuntimeError("key " + KEY)
            except RuntimeError:
                _log.failure("probe failure", project="p1")
            print("printed ?token=opaque-789")
            warnings.warn("a warning", UserWarning, stacklevel=1)
            reactor.callLater(0, reactor.stop)


    def makeService(options):
        _log.info("building services")
        root = install_json_logging(LogConfig(level=options["level"], file=options["file"]))
        Probe().setServiceParent(root)
        return root
"""


def run_twistd(tmp_path: Path, *probe_args: str) -> subprocess.CompletedProcess[str]:
    """``twistd -n jsonprobe`` from a throwaway plugin whose makeService uses jsonlog."""
    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "jsonprobe_plugin.py").write_text(textwrap.dedent(PROBE_PLUGIN))
    secrets = f"JWT = {JWT!r}\nKEY = {OPENAI_KEY!r}\n"
    (tmp_path / "jsonprobe_tap.py").write_text(secrets + textwrap.dedent(PROBE_TAP))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    twistd = Path(sys.executable).parent / "twistd"
    return subprocess.run(
        [str(twistd), "--nodaemon", "--pidfile=", "jsonprobe", *probe_args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_probe_lines(output: str) -> None:
    assert output, "twistd wrote no log lines"
    assert JWT not in output and OPENAI_KEY not in output and "opaque-789" not in output
    lines = [json.loads(line) for line in output.splitlines()]
    messages = [line["message"] for line in lines]
    assert messages[0] == "building services"
    assert messages[1].startswith("twistd ") and messages[1].endswith(" starting up.")
    assert messages[-1] == "Server Shut Down."
    assert "debug is filtered out" not in messages
    [hello] = [line for line in lines if line["namespace"] == "jsonprobe" and "count" in line]
    assert hello["message"] == "hello alice with Authorization: Bearer [redacted]"
    assert (hello["level"], hello["user"], hello["project"], hello["session"]) == (
        "info",
        "alice",
        "p1",
        "s-1",
    )
    assert hello["jwt"] == REDACTED
    [failure] = [line for line in lines if line["message"] == "probe failure"]
    assert failure["error"] == "RuntimeError: key [redacted]"
    assert "Traceback" in failure["traceback"]
    [printed] = [line for line in lines if line["namespace"] == "stdout"]
    assert printed["message"] == "printed ?token=[redacted]"
    assert any("UserWarning: a warning" in message for message in messages)


def test_twistd_plugin_logs_json_to_stdout_without_extra_flags(tmp_path: Path) -> None:
    result = run_twistd(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert_probe_lines(result.stdout)


def test_twistd_plugin_logs_json_to_the_configured_file(tmp_path: Path) -> None:
    path = tmp_path / "agentd.log"
    result = run_twistd(tmp_path, "--file", str(path), "--level", "info")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "twistd.log").exists()
    assert_probe_lines(path.read_text())
