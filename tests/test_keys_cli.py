"""``agentd keys gen-kek`` and ``agentd keys rotate``, run as their own process as operators do."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from agentd.keys.records import RedisKeyRecords
from agentd.keys.sealing import parse_kek
from agentd.keys.store import KeyStore
from agentd.redisstore import RedisStore
from tests.servers import RedisServer
from tests.test_keys import ALICE_KEY, BOB_KEY, NEW_KEK, OLD_KEK, operator_env

RUN = "import sys; from agentd.keys.cli import keys_main; sys.exit(keys_main(sys.argv[1:]))"
OLD_KEK_TEXT = base64.urlsafe_b64encode(OLD_KEK).decode()
NEW_KEK_TEXT = base64.urlsafe_b64encode(NEW_KEK).decode()


def agentd_keys(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    env["TEST_OLD_KEK"] = OLD_KEK_TEXT
    return subprocess.run(
        [sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=60, env=env
    )


def write_config(tmp_path: Path, text: str) -> str:
    (tmp_path / "new-kek").write_text(NEW_KEK_TEXT + "\n")
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    return str(path)


def rotation_config(tmp_path: Path, redis_url: str) -> str:
    return write_config(
        tmp_path,
        f'[redis]\nurl = "{redis_url}"\n\n'
        f'[keys]\nencryption_keys = ["file:{tmp_path}/new-kek", "env:TEST_OLD_KEK"]\n',
    )


def keystore(store: RedisStore, *keks: bytes) -> KeyStore:
    return KeyStore(RedisKeyRecords(store), keks, operator_env(), Clock())


def test_gen_kek_prints_one_new_key_per_run() -> None:
    first, second = agentd_keys("gen-kek"), agentd_keys("gen-kek")
    assert first.returncode == 0
    assert len(parse_kek(first.stdout.strip(), "stdout")) == 32
    assert first.stdout.count("\n") == 1
    assert first.stdout != second.stdout


@pytest_twisted.ensureDeferred
async def test_rotate_reencrypts_every_stored_key_so_the_old_kek_can_go(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    store = RedisStore(redis_server.url, reactor, timeout=1)
    try:
        old = keystore(store, OLD_KEK)
        await old.put("alice", "anthropic", ALICE_KEY)
        await old.put("bob", "openai", BOB_KEY)
        config = rotation_config(tmp_path, redis_server.url)

        rotated = agentd_keys("rotate", "--config", config)
        assert rotated.returncode == 0, rotated.stderr
        assert "re-encrypted 2 stored keys" in rotated.stdout
        again = agentd_keys("rotate", "--config", config)
        assert "re-encrypted 0 stored keys" in again.stdout

        new_only = keystore(store, NEW_KEK)
        assert (await new_only.keys_for("alice")).env["ANTHROPIC_API_KEY"] == ALICE_KEY
        assert (await new_only.keys_for("bob")).env["OPENAI_API_KEY"] == BOB_KEY
        for output in (rotated.stdout, rotated.stderr):
            assert NEW_KEK_TEXT not in output and OLD_KEK_TEXT not in output
    finally:
        await store.disconnect()


@pytest_twisted.ensureDeferred
async def test_rotate_fails_naming_records_it_cannot_read(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    store = RedisStore(redis_server.url, reactor, timeout=1)
    try:
        await keystore(store, OLD_KEK).put("alice", "anthropic", ALICE_KEY)
        redis_server.cli("HSET", "agentd:userkeys:carol", "openai", "garbage")
        result = agentd_keys("rotate", "--config", rotation_config(tmp_path, redis_server.url))
        assert result.returncode == 1
        assert "re-encrypted 1 stored keys; 1 could not be read" in result.stderr
        assert "carol openai: the record is malformed" in result.stderr
        new_only = keystore(store, NEW_KEK)
        assert (await new_only.keys_for("alice")).env["ANTHROPIC_API_KEY"] == ALICE_KEY
    finally:
        await store.disconnect()


def test_rotate_refuses_configs_it_cannot_work_with(tmp_path: Path) -> None:
    cases = {
        '[keys]\nencryption_keys = ["env:TEST_OLD_KEK"]\n': "[redis] url",
        '[redis]\nurl = "redis://127.0.0.1:1/0"\n': "[keys] encryption_keys: no key",
        '[redis]\nurl = "redis://127.0.0.1:1/0"\n[keys]\nencryption_keys = ["env:UNSET_KEK"]\n': (
            "[keys] encryption_keys[0]: environment variable UNSET_KEK is not set"
        ),
    }
    for text, problem in cases.items():
        result = agentd_keys("rotate", "--config", write_config(tmp_path, text))
        assert result.returncode == 2, text
        assert problem in result.stderr, result.stderr
    missing = agentd_keys("rotate", "--config", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2
    assert "no such file" in missing.stderr
