"""The OpenAPI document of agentd's HTTP APIs: valid OpenAPI 3.1, served as kept, and true of
a live agentd with Redis (property-based requests from Schemathesis)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from schemathesis import GenerationMode

from agentd.keys.sealing import generate_kek
from tests.harness import SECRET, base_config, token
from tests.servers import RedisServer, free_port, wait_for_port
from tests.test_twistd import run_twistd

DOCUMENT = Path(__file__).parent.parent / "agentd" / "static" / "openapi.json"


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(json.loads(DOCUMENT.read_text()), cls=OpenAPIV31SpecValidator)


@pytest_twisted.ensureDeferred
async def test_agentd_serves_the_document_it_keeps_without_a_token(tmp_path, agentd) -> None:
    gateway = agentd(base_config(tmp_path))
    response = await gateway.get("/api/openapi.json")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert await response.content() == DOCUMENT.read_bytes()


class LiveAgentd:
    def __init__(self, port: int) -> None:
        self.base_url = f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live_agentd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgentd]:
    """A twistd agentd with Redis, user keys and a monthly budget: Schemathesis sends blocking
    requests, so agentd cannot share the test's reactor."""
    directory = tmp_path_factory.mktemp("openapi")
    redis = RedisServer(directory / "redis")
    redis.start()
    port = free_port()
    config = base_config(directory)
    toml = (
        f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
        f'[auth]\njwt_secret = "{SECRET}"\n'
        f'[redis]\nurl = "{redis.url}"\ntimeout_ms = 500\n'
        f'[usage]\nspool_dir = "{config["usage"]["spool_dir"]}"\nmonthly_budget_usd = 5.0\n'
        f'[keys]\nencryption_keys = ["{generate_kek()}"]\n'
        f'[log]\nfile = "{directory / "agentd.log"}"\n'
    )
    (directory / "agentd.toml").write_text(toml)
    proc = run_twistd(["--config", str(directory / "agentd.toml")], cwd=directory)
    try:
        wait_for_port(port, timeout=20)
        yield LiveAgentd(port)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        redis.stop()
    assert proc.returncode == 0, err


def _takes_input(operation: Any) -> bool:
    return bool(list(operation.iter_parameters())) or bool(operation.body)


# Every operation the document describes; those that take parameters or a body also with
# requests that break the document (which must be refused with a 4xx, never a 5xx).
OPERATIONS = [
    result.ok() for result in schemathesis.openapi.from_path(DOCUMENT).get_all_operations()
]
CASES = [
    pytest.param(operation, mode, id=f"{operation.label}-{mode.value}")
    for operation in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode == GenerationMode.POSITIVE or _takes_input(operation)
]
# Alice, who may read only her own usage, an admin, who may read anyone's, and nobody.
TOKENS = {
    "user": token("alice", ttl=3600),
    "admin": token("root", ttl=3600, role="admin"),
    "none": None,
}
EXAMPLES_PER_OPERATION = 8


@pytest.mark.parametrize("who", sorted(TOKENS))
@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_every_answer_matches_the_document_and_none_is_a_5xx(
    operation: Any, who: str, mode: GenerationMode, live_agentd: LiveAgentd
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def answer_conforms(case: Any) -> None:
        response = case.call(base_url=live_agentd.base_url, headers=_auth(case, TOKENS[who]))
        assert response.status_code < 500, (response.status_code, response.text)
        case.validate_response(response)

    answer_conforms()


def _auth(case: Any, value: str | None) -> dict[str, str]:
    """The token in a header, unless the case already names a token some other way."""
    headers = case.headers or {}
    if value is None or "authorization" in {name.lower() for name in headers}:
        return {}
    return {"Authorization": f"Bearer {value}"}
