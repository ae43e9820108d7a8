"""The agent CLI's parts in-process: the agents file, input parsing, error mapping, logs."""

from __future__ import annotations

import email.utils
import json
import os
import time
from pathlib import Path

import pytest

from agentd.agent import agents
from agentd.agent.log import Log
from agentd.agent.protocol import Abort, BadRequest, ErrorCode, Prompt, parse_line
from agentd.agent.providers.echo import filler, words
from agentd.agent.providers.http import retry_after_ms, status_error


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agents.toml"
    path.write_text(text)
    return str(path)


def test_agents_file_defines_agents_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, '[agents.claude]\nprovider = "anthropic"\nmodel = "claude-x"\n')
    assert agents.load(path) == {
        "claude": agents.AgentSpec(
            name="claude",
            provider="anthropic",
            model="claude-x",
            system="",
            max_tokens=4096,
            timeout_seconds=300.0,
            max_retries=None,
        )
    }


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('provider = "gemini"\nmodel = "m"', "agents.a.provider: must be one of"),
        ('provider = "openai"', "agents.a.model: required"),
        ('provider = "openai"\nmodel = "m"\ntemperature = 1', "agents.a.temperature: unknown key"),
        ('provider = "openai"\nmodel = "m"\nmax_tokens = 0', "agents.a.max_tokens"),
        ('provider = "openai"\nmodel = "m"\ntimeout_seconds = 0', "agents.a.timeout_seconds"),
        ('provider = "openai"\nmodel = "m"\nmax_retries = 11', "agents.a.max_retries"),
        ('provider = "openai"\nmodel = "m"\nmax_retries = true', "agents.a.max_retries"),
        ('provider = "openai"\nmodel = "m"\nsystem = 3', "agents.a.system"),
    ],
)
def test_agents_file_errors_name_the_key(tmp_path: Path, body: str, problem: str) -> None:
    path = write(tmp_path, f"[agents.a]\n{body}\n")
    with pytest.raises(agents.AgentsFileError, match=problem.replace(".", r"\.")):
        agents.load(path)


def test_agents_file_that_is_not_toml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(agents.AgentsFileError, match="not valid TOML"):
        agents.load(write(tmp_path, "[agents\n"))


def test_agents_file_with_an_unknown_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(agents.AgentsFileError, match="agent: unknown table"):
        agents.load(write(tmp_path, '[agent.a]\nprovider = "echo"\n'))


def test_echo_is_built_in_next_to_the_files_agents(tmp_path: Path) -> None:
    path = write(tmp_path, '[agents.gpt]\nprovider = "openai"\nmodel = "gpt-5"\n')
    env = {"AGENTD_AGENTS": path}
    assert agents.find("echo", env) == agents.ECHO
    assert agents.find("gpt", env).model == "gpt-5"
    with pytest.raises(agents.UnknownAgent):
        agents.find("claude", env)


def test_the_file_may_redefine_echo(tmp_path: Path) -> None:
    path = write(tmp_path, '[agents.echo]\nprovider = "echo"\ntimeout_seconds = 2\n')
    assert agents.find("echo", {"AGENTD_AGENTS": path}).timeout_seconds == 2


def test_a_named_agents_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(agents.AgentsFileError, match="no such file"):
        agents.find("echo", {"AGENTD_AGENTS": str(tmp_path / "missing.toml")})


def test_test_options_are_parsed_from_the_options_object_under_the_flag() -> None:
    prompt = parse_line(
        b'{"type":"prompt","id":"q","text":"t","options":{"repeat":3,"delay_ms":2.5,'
        b'"delta_bytes":8,"report_keys":true,"exit":4,"extra":"ignored"}}',
        test_options=True,
    )
    assert isinstance(prompt, Prompt)
    assert (prompt.repeat, prompt.delay_ms, prompt.delta_bytes) == (3, 2.5, 8)
    assert (prompt.report_keys, prompt.exit_status) == (True, 4)


def test_test_options_without_the_flag_are_a_bad_request_naming_them() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_line(b'{"type":"prompt","id":"q","text":"t","options":{"exit":4,"repeat":2}}')
    assert caught.value.query_id == "q"
    assert "exit" in caught.value.problem and "repeat" in caught.value.problem
    assert "--test-options" in caught.value.problem


def test_options_without_test_options_and_top_level_test_fields_change_nothing() -> None:
    for test_options in (False, True):
        prompt = parse_line(
            b'{"type":"prompt","id":"q","text":"t","repeat":3,"report_keys":true,"exit":4,'
            b'"options":{"temperature":0.2}}',
            test_options=test_options,
        )
        assert isinstance(prompt, Prompt)
        assert (prompt.repeat, prompt.report_keys, prompt.exit_status) == (1, False, None)


def test_abort_may_name_a_query() -> None:
    abort = parse_line(b'{"type":"abort","id":"q7"}')
    assert isinstance(abort, Abort)
    assert abort.id == "q7"
    assert isinstance(parse_line(b'{"type":"abort"}'), Abort)


def test_bad_request_carries_the_id_when_the_line_had_one() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_line(b'{"type":"prompt","id":"q3","text":5}')
    assert caught.value.query_id == "q3"
    assert "text" in caught.value.problem


@pytest.mark.parametrize(
    "text",
    ["hello big world", "  leading", "trailing  ", "a\n\nb\tc", "   ", "x", "ünïcode wörds"],
)
def test_words_join_back_to_the_text(text: str) -> None:
    pieces = words(text)
    assert "".join(pieces) == text
    assert all(piece for piece in pieces)
    assert len(pieces) == max(1, len(text.split()))


def test_filler_is_exactly_the_size_asked() -> None:
    assert len(filler(1)) == 1
    assert len(filler(1000).encode()) == 1000


def test_retry_after_is_read_in_milliseconds_from_any_of_its_forms() -> None:
    assert retry_after_ms({"retry-after": "17"}) == 17_000
    assert retry_after_ms({"retry-after": "1.5"}) == 1500
    assert retry_after_ms({"retry-after-ms": "250", "retry-after": "9"}) == 250
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28_000 <= (retry_after_ms({"retry-after": date}) or 0) <= 30_000
    assert retry_after_ms({"retry-after": "soon"}) is None
    assert retry_after_ms({}) is None


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (401, "authentication_error", ErrorCode.PROVIDER_AUTH),
        (403, "permission_error", ErrorCode.PROVIDER_AUTH),
        (429, "rate_limit_error", ErrorCode.PROVIDER_RATE_LIMIT),
        (500, "api_error", ErrorCode.PROVIDER_UNAVAILABLE),
        (529, "overloaded_error", ErrorCode.PROVIDER_UNAVAILABLE),
        (200, "overloaded_error", ErrorCode.PROVIDER_UNAVAILABLE),
        (200, "rate_limit_error", ErrorCode.PROVIDER_RATE_LIMIT),
        (400, "invalid_request_error", ErrorCode.PROVIDER_ERROR),
        (404, "not_found_error", ErrorCode.PROVIDER_ERROR),
    ],
)
def test_provider_http_errors_map_to_protocol_codes(
    status: int, kind: str, code: ErrorCode
) -> None:
    assert status_error(status, kind, {}).code is code


def test_logs_redact_the_provider_keys() -> None:
    read_fd, write_fd = os.pipe()
    log = Log("claude", fd=write_fd, secrets=["sk-live-abcdefgh1234", "", "short"])
    log.warn("provider said", query="q1", detail="key sk-live-abcdefgh1234 rejected")
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        record = json.loads(f.read())
    assert record["detail"] == "key [redacted] rejected"
    assert (record["level"], record["agent"], record["query"]) == ("warn", "claude", "q1")
    assert record["time"].endswith("Z")


def test_log_level_filters_lower_levels() -> None:
    read_fd, write_fd = os.pipe()
    log = Log("echo", fd=write_fd, level="warn")
    log.info("quiet")
    log.error("loud")
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        lines = f.read().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["loud"]
