"""The anthropic and openai agents through the real SDKs, against fake provider servers.

One agent process per provider serves every test of this module, which is also the proof
that a provider failure leaves the process serving later prompts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentd.pricing import PriceTable
from tests.fake_providers import REPO, AgentProcess, Answer, Fail, FakeProvider, Hang, agent_env

PRICES = REPO / "etc" / "prices.toml"
AGENTS = """
[agents.claude]
provider = "anthropic"
model = "claude-sonnet-4-5"
system = "You are terse."
max_tokens = 321
timeout_seconds = 3
max_retries = 1

[agents.gpt]
provider = "openai"
model = "gpt-5"
system = "You are terse."
max_tokens = 321
timeout_seconds = 3
max_retries = 1
"""
KEYS = {"anthropic": "sk-ant-fake-0123456789", "openai": "sk-proj-fake-0123456789"}


@dataclass
class Provider:
    kind: str
    model: str
    fake: FakeProvider
    agent: AgentProcess

    # The module's first prompt also waits for the agent's start, whose import of the SDK
    # takes seconds on a machine whose disk cache is cold (7 s measured for anthropic).
    def ask(self, query_id: str, text: str = "hi", timeout: float = 30.0) -> list[dict[str, Any]]:
        self.agent.send({"type": "prompt", "id": query_id, "text": text})
        return self.agent.read_query(query_id, timeout=timeout)


@pytest.fixture(scope="module", params=["anthropic", "openai"])
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Provider]:
    kind = request.param
    agents = tmp_path_factory.mktemp(kind) / "agents.toml"
    agents.write_text(AGENTS)
    fake = FakeProvider(kind)
    fake.start()
    prefix = "ANTHROPIC" if kind == "anthropic" else "OPENAI"
    env = agent_env(
        AGENTD_AGENTS=str(agents),
        AGENTD_PRICES=str(PRICES),
        **{f"{prefix}_API_KEY": KEYS[kind], f"{prefix}_BASE_URL": fake.base_url},
    )
    agent = AgentProcess("claude" if kind == "anthropic" else "gpt", env)
    model = "claude-sonnet-4-5" if kind == "anthropic" else "gpt-5"
    yield Provider(kind, model, fake, agent)
    agent.stop()
    fake.stop()
    assert KEYS[kind].encode() not in b"".join(agent.raw_stdout + agent.stderr)


@pytest.fixture
def provider(running: Provider) -> Provider:
    assert running.agent.process.poll() is None, running.agent.stderr_text()
    running.fake.script.clear()
    running.fake.requests.clear()
    return running


def deltas(lines: list[dict[str, Any]]) -> list[str]:
    return [line["text"] for line in lines if line["type"] == "delta"]


def wait_for(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_streamed_answer_reports_exact_usage_and_cost(provider: Provider) -> None:
    cache_write = 50 if provider.kind == "anthropic" else 0
    provider.fake.expect(
        Answer(
            ["Hel", "lo ", "there"],
            input_tokens=1200,
            output_tokens=37,
            cache_read_tokens=100,
            cache_write_tokens=cache_write,
        )
    )
    lines = provider.ask("q1", "Say hello")
    assert lines[0] == {"type": "start", "id": "q1"}
    assert deltas(lines) == ["Hel", "lo ", "there"]
    done = lines[-1]
    cost = PriceTable.load(PRICES).cost(provider.model, 1200, 37, 100, cache_write)
    assert cost is not None and cost > 0
    assert done == {
        "type": "done",
        "agent": "claude" if provider.kind == "anthropic" else "gpt",
        "id": "q1",
        "usage": {
            "inputTokens": 1200,
            "outputTokens": 37,
            "cacheReadTokens": 100,
            "cacheWriteTokens": cache_write,
            "cost": pytest.approx(cost),
            "model": provider.model,
        },
    }
    [request] = provider.fake.requests
    body = request.body
    assert body["model"] == provider.model
    assert body["stream"] is True
    if provider.kind == "anthropic":
        assert request.path == "/v1/messages"
        assert body["system"] == "You are terse."
        assert body["max_tokens"] == 321
        assert body["messages"][-1] == {"role": "user", "content": "Say hello"}
        credentials = request.headers.get("x-api-key", "") + request.headers.get(
            "authorization", ""
        )
    else:
        assert request.path == "/v1/chat/completions"
        assert body["messages"][0] == {"role": "system", "content": "You are terse."}
        assert body["max_completion_tokens"] == 321
        assert body["stream_options"] == {"include_usage": True}
        credentials = request.headers["authorization"]
    assert KEYS[provider.kind] in credentials


def test_conversation_is_kept_for_the_life_of_the_process(provider: Provider) -> None:
    provider.fake.expect(Answer(["Paris."]), Answer(["About 2 million."]))
    provider.ask("q1", "Capital of France?")
    provider.ask("q2", "Population?")
    assert provider.fake.requests[1].body["messages"][-3:] == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Population?"},
    ]


def test_401_is_provider_auth_and_the_agent_keeps_serving(provider: Provider) -> None:
    error_type = "authentication_error" if provider.kind == "anthropic" else "invalid_request_error"
    provider.fake.expect(Fail(401, error_type), Answer(["ok"]))
    lines = provider.ask("q1")
    assert lines[0]["type"] == "start"
    error = lines[-1]
    assert error["type"] == "error"
    assert error["code"] == "provider_auth"
    assert error["usage"]["inputTokens"] == error["usage"]["outputTokens"] == 0
    assert len(provider.fake.requests) == 1
    assert provider.ask("q2")[-1]["type"] == "done"


def test_429_is_provider_rate_limit_with_the_providers_retry_after(provider: Provider) -> None:
    error_type = "rate_limit_error" if provider.kind == "anthropic" else "rate_limit_exceeded"
    provider.fake.expect(
        Fail(429, error_type, {"retry-after": "1"}),
        Fail(429, error_type, {"retry-after": "17"}),
    )
    error = provider.ask("q1")[-1]
    assert error["code"] == "provider_rate_limit"
    assert error["retryAfter"] == 17_000
    assert len(provider.fake.requests) == 2


def test_500_then_success_is_retried_by_the_sdk(provider: Provider) -> None:
    error_type = "api_error" if provider.kind == "anthropic" else "server_error"
    provider.fake.expect(Fail(500, error_type), Answer(["recovered"]))
    lines = provider.ask("q1")
    assert deltas(lines) == ["recovered"]
    assert lines[-1]["type"] == "done"
    assert len(provider.fake.requests) == 2


def test_overload_that_outlasts_the_retries_is_provider_unavailable(provider: Provider) -> None:
    status, error_type = (
        (529, "overloaded_error") if provider.kind == "anthropic" else (503, "server_error")
    )
    provider.fake.expect(Fail(status, error_type), Fail(status, error_type), Answer(["later"]))
    error = provider.ask("q1")[-1]
    assert error["code"] == "provider_unavailable"
    assert deltas(provider.ask("q2")) == ["later"]


def test_stream_cut_midway_is_provider_unavailable_with_partial_usage(provider: Provider) -> None:
    provider.fake.expect(
        Answer(["one ", "two ", "three ", "four"], input_tokens=400, cut_after=2),
        Answer(["whole"]),
    )
    lines = provider.ask("q1")
    assert deltas(lines) == ["one ", "two "]
    error = lines[-1]
    assert error["code"] == "provider_unavailable"
    usage = error["usage"]
    assert usage["estimated"] is True
    assert usage["outputTokens"] >= 1
    if provider.kind == "anthropic":
        assert usage["inputTokens"] == 400
    assert usage["cost"] > 0
    assert provider.ask("q2")[-1]["type"] == "done"


def test_hanging_provider_times_out_and_the_agent_stays_usable(provider: Provider) -> None:
    provider.fake.expect(Hang(), Answer(["awake"]))
    started = time.monotonic()
    error = provider.ask("q1")[-1]
    assert error["code"] == "timeout"
    assert error["id"] == "q1"
    assert 2.5 <= time.monotonic() - started < 8
    assert wait_for(provider.fake.requests[0].disconnected.is_set)
    assert deltas(provider.ask("q2")) == ["awake"]


def test_abort_mid_stream_cancels_the_provider_stream(provider: Provider) -> None:
    provider.fake.expect(Answer([f"w{i} " for i in range(20)], input_tokens=300, chunk_delay=0.2))
    provider.agent.send({"type": "prompt", "id": "q1", "text": "long story"})
    assert provider.agent.read()["type"] == "start"
    assert provider.agent.read()["type"] == "delta"
    provider.agent.send({"type": "abort", "id": "q1"})
    lines = provider.agent.read_query("q1")
    done = lines[-1]
    assert done["type"] == "done"
    assert done["aborted"] is True
    assert len(deltas(lines)) < 19
    assert done["usage"]["estimated"] is True
    assert done["usage"]["outputTokens"] >= 1
    if provider.kind == "anthropic":
        assert done["usage"]["inputTokens"] == 300
    assert wait_for(provider.fake.requests[0].disconnected.is_set)


def test_missing_api_key_is_provider_auth_without_a_request(tmp_path: Path) -> None:
    agents = tmp_path / "agents.toml"
    agents.write_text(AGENTS)
    fake = FakeProvider("openai")
    fake.start()
    agent = AgentProcess("gpt", agent_env(AGENTD_AGENTS=str(agents), OPENAI_BASE_URL=fake.base_url))
    try:
        agent.send({"type": "prompt", "id": "q1", "text": "hi"})
        error = agent.read_query("q1")[-1]
    finally:
        agent.stop()
        fake.stop()
    assert error["code"] == "provider_auth"
    assert "OPENAI_API_KEY" in error["error"]
    assert fake.requests == []
