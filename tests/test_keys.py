"""KeyStore: operator keys from config, user keys sealed at rest and bound to their slot."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from agentd.config import ConfigError, KeysConfig, from_dict
from agentd.keys.records import (
    REDIS_PREFIX,
    KeyStoreUnavailable,
    MemoryKeyRecords,
    RedisKeyRecords,
)
from agentd.keys.sealing import generate_kek, parse_kek
from agentd.keys.source import PROVIDER_ENV, AgentKeys
from agentd.keys.store import (
    InvalidKey,
    KeyStore,
    RotationIncomplete,
    StoredKeyUnreadable,
    UnknownProvider,
    UserKeysDisabled,
)
from agentd.redisstore import RedisStore
from tests.servers import RedisServer, free_port

T = TypeVar("T")

ALICE_KEY = "sk-ant-api03-alice-secret-0123456789-ABCD"
ALICE_OPENAI = "sk-proj-alice-openai-secret-5678-EFGH"
BOB_KEY = "sk-ant-api03-bob-secret-9876543210-WXYZ"
OPERATOR_ANTHROPIC = "sk-ant-operator-anthropic-0000-OPAN"
OPERATOR_OPENAI = "sk-operator-openai-1111-OPOA"
OLD_KEK = base64.urlsafe_b64decode(generate_kek())
NEW_KEK = base64.urlsafe_b64decode(generate_kek())
# 2025-01-02T03:04:05Z
START = 1735787045.0


def result(d: Deferred[T]) -> T:
    """What ``d`` already holds; fails the test if ``d`` is pending, raises if it failed."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]  # type: ignore[no-any-return]


def failure(d: Deferred[Any]) -> BaseException:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    assert isinstance(box[0], Failure), f"expected a failure, got {box[0]!r}"
    return box[0].value


def operator_env() -> dict[str, str]:
    return {"ANTHROPIC_API_KEY": OPERATOR_ANTHROPIC, "OPENAI_API_KEY": OPERATOR_OPENAI}


def memory_store(
    records: MemoryKeyRecords | None = None,
    keks: tuple[bytes, ...] = (NEW_KEK,),
    env: dict[str, str] | None = None,
    clock: Clock | None = None,
) -> KeyStore:
    if clock is None:
        clock = Clock()
        clock.advance(START)
    return KeyStore(
        records or MemoryKeyRecords(), keks, operator_env() if env is None else env, clock
    )


def stored_record(records: MemoryKeyRecords, user: str, provider: str) -> str:
    value = result(records.get(user, provider))
    assert value is not None
    return value


# Configuration.


def test_every_provider_has_an_operator_key_setting() -> None:
    assert set(PROVIDER_ENV) <= {f for f in KeysConfig.__dataclass_fields__}


def test_operator_keys_come_from_environment_files_and_literal_values(tmp_path: Path) -> None:
    secret = tmp_path / "openai"
    secret.write_text(OPERATOR_OPENAI + "\n")
    kek_file = tmp_path / "kek"
    kek_file.write_text(base64.urlsafe_b64encode(NEW_KEK).decode() + "\n")
    config = KeysConfig(
        anthropic="env:OPERATOR_ANTHROPIC",
        openai=f"file:{secret}",
        encryption_keys=(f"file:{kek_file}", base64.urlsafe_b64encode(OLD_KEK).decode()),
    )
    keystore = KeyStore.from_config(
        config, None, Clock(), environ={"OPERATOR_ANTHROPIC": OPERATOR_ANTHROPIC}
    )
    keys = result(keystore.keys_for("alice"))
    assert dict(keys.env) == operator_env()
    assert keys.source == "operator"
    assert keystore.kek_id == memory_store(keks=(NEW_KEK,)).kek_id


def test_a_literal_operator_key_is_used_as_it_is() -> None:
    keystore = KeyStore.from_config(KeysConfig(anthropic=OPERATOR_ANTHROPIC), None, Clock())
    assert dict(result(keystore.keys_for("alice")).env) == {"ANTHROPIC_API_KEY": OPERATOR_ANTHROPIC}


NEW_KEK_TEXT = base64.urlsafe_b64encode(NEW_KEK).decode()
ENVIRON = {
    "SHORT": "sk-1",
    "NEW": NEW_KEK_TEXT,
    "NEW_AGAIN": NEW_KEK_TEXT,
    "WRONG_LENGTH": base64.urlsafe_b64encode(os.urandom(16)).decode(),
    "NOT_BASE64": "this is not base64 at all, it has spaces!!",
}


@pytest.mark.parametrize(
    ("anthropic", "openai", "encryption_keys", "key", "problem"),
    [
        ("env:MISSING", "", (), "[keys] anthropic", "MISSING is not set"),
        ("", "file:/nonexistent/openai", (), "[keys] openai", "no such file"),
        ("", "file:{tmp}/empty", (), "[keys] openai", "is empty"),
        ("env:SHORT", "", (), "[keys] anthropic", "printable ASCII"),
        ("", "", ("env:NEW", "env:WRONG_LENGTH"), "[keys] encryption_keys[1]", "32 bytes"),
        ("", "", ("env:NEW", "env:NOT_BASE64"), "[keys] encryption_keys[1]", "32 bytes"),
        ("", "", ("env:NEW", "env:NEW_AGAIN"), "[keys] encryption_keys[1]", "encryption_keys[0]"),
    ],
)
def test_unusable_references_are_config_errors_that_never_show_the_value(
    tmp_path: Path,
    anthropic: str,
    openai: str,
    encryption_keys: tuple[str, ...],
    key: str,
    problem: str,
) -> None:
    (tmp_path / "empty").write_text("\n")
    config = KeysConfig(
        anthropic=anthropic, openai=openai.format(tmp=tmp_path), encryption_keys=encryption_keys
    )
    with pytest.raises(ConfigError) as caught:
        KeyStore.from_config(config, None, Clock(), environ=ENVIRON)
    assert caught.value.key == key
    assert problem in caught.value.problem
    for value in ENVIRON.values():
        assert value not in str(caught.value)


@pytest.mark.parametrize(
    "reference",
    ["env:", "env:1NOT_A_NAME", "env:WITH SPACE", "file:relative/path", "file:", "evn:TYPO"],
)
def test_config_refuses_malformed_references_naming_the_key(reference: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"keys": {"encryption_keys": ["env:GOOD", reference]}}, env={})
    assert caught.value.key == "[keys] encryption_keys[1]"
    assert "env:NAME" in caught.value.problem


@pytest.mark.parametrize(
    "reference", ["env:ANTHROPIC_API_KEY", "file:/run/secrets/anthropic", OPERATOR_ANTHROPIC]
)
def test_config_accepts_references_and_literal_keys(reference: str) -> None:
    config = from_dict({"keys": {"anthropic": reference}}, env={})
    assert config.keys.anthropic == reference
    assert reference not in repr(config)


def test_generated_keks_are_distinct_and_parse() -> None:
    first, second = generate_kek(), generate_kek()
    assert first != second
    assert len(parse_kek(first, "k")) == 32


# What each room pulls in.


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("agentd.keys.sealing", ("twisted", "txredisapi")),
        ("agentd.keys.source", ("twisted", "txredisapi", "cryptography")),
    ],
)
def test_sealing_and_the_session_seam_import_without_twisted_or_redis(
    module: str, absent: tuple[str, ...]
) -> None:
    probe = (
        f"import sys, {module}; "
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert not set(imported.stdout.split()) & set(absent)


# What a session gets.


def test_agent_keys_never_show_values_in_repr_or_str() -> None:
    keys = AgentKeys(env={"ANTHROPIC_API_KEY": ALICE_KEY}, source="user")
    for text in (repr(keys), str(keys), repr(keys.env), f"{keys}", f"{keys.env!s}"):
        assert ALICE_KEY not in text
        assert "ANTHROPIC_API_KEY" in text
    assert keys.env["ANTHROPIC_API_KEY"] == ALICE_KEY


def test_user_key_replaces_the_operator_key_for_its_provider_only() -> None:
    keystore = memory_store()
    result(keystore.put("alice", "anthropic", ALICE_KEY))
    keys = result(keystore.keys_for("alice"))
    assert dict(keys.env) == {"ANTHROPIC_API_KEY": ALICE_KEY, "OPENAI_API_KEY": OPERATOR_OPENAI}
    assert keys.source == "user"
    assert keys.payer("anthropic") == "user"
    assert keys.payer("openai") == "operator"


def test_source_is_operator_without_user_keys_and_none_without_any_key() -> None:
    assert result(memory_store().keys_for("alice")).source == "operator"
    nothing = result(memory_store(env={}).keys_for("alice"))
    assert nothing.source == "none"
    assert dict(nothing.env) == {}
    assert nothing.payer("anthropic") == "none"


def test_put_replace_list_and_delete() -> None:
    clock = Clock()
    clock.advance(START)
    keystore = memory_store(clock=clock)
    result(keystore.put("alice", "anthropic", ALICE_KEY))
    result(keystore.put("alice", "openai", ALICE_OPENAI))
    assert result(keystore.list("alice")) == [
        {"provider": "anthropic", "last4": "ABCD", "setAt": "2025-01-02T03:04:05Z"},
        {"provider": "openai", "last4": "EFGH", "setAt": "2025-01-02T03:04:05Z"},
    ]
    clock.advance(60)
    result(keystore.put("alice", "anthropic", BOB_KEY))
    assert result(keystore.list("alice"))[0] == {
        "provider": "anthropic",
        "last4": "WXYZ",
        "setAt": "2025-01-02T03:05:05Z",
    }
    assert result(keystore.keys_for("alice")).env["ANTHROPIC_API_KEY"] == BOB_KEY
    assert result(keystore.delete("alice", "anthropic")) is True
    assert result(keystore.delete("alice", "anthropic")) is False
    assert [k["provider"] for k in result(keystore.list("alice"))] == ["openai"]
    assert result(keystore.keys_for("alice")).env["ANTHROPIC_API_KEY"] == OPERATOR_ANTHROPIC


def test_surrounding_whitespace_of_a_pasted_key_is_dropped() -> None:
    keystore = memory_store()
    result(keystore.put("alice", "anthropic", f"  {ALICE_KEY}\n"))
    assert result(keystore.keys_for("alice")).env["ANTHROPIC_API_KEY"] == ALICE_KEY


@pytest.mark.parametrize(
    "key",
    ["sk-1234", "x" * 513, "sk-has a-space-inside", "sk-tab\tinside-1234", "sk-ключ-12345678"],
)
def test_implausible_keys_are_refused_without_echoing_them(key: str) -> None:
    error = failure(memory_store().put("alice", "anthropic", key))
    assert isinstance(error, InvalidKey)
    assert key not in str(error)


def test_unknown_providers_are_refused() -> None:
    assert isinstance(failure(memory_store().put("alice", "gemini", ALICE_KEY)), UnknownProvider)
    assert isinstance(failure(memory_store().delete("alice", "gemini")), UnknownProvider)


def test_another_user_gets_operator_keys_and_cannot_delete_the_key() -> None:
    keystore = memory_store()
    result(keystore.put("alice", "anthropic", ALICE_KEY))
    assert result(keystore.keys_for("bob")).env["ANTHROPIC_API_KEY"] == OPERATOR_ANTHROPIC
    assert result(keystore.list("bob")) == []
    assert result(keystore.delete("bob", "anthropic")) is False
    assert result(keystore.keys_for("alice")).env["ANTHROPIC_API_KEY"] == ALICE_KEY


def test_records_are_not_the_plaintext() -> None:
    records = MemoryKeyRecords()
    result(memory_store(records).put("alice", "anthropic", ALICE_KEY))
    record = stored_record(records, "alice", "anthropic")
    assert ALICE_KEY not in record
    assert ALICE_KEY[:-4] not in record
    assert json.loads(record)["last4"] == "ABCD"


def test_a_record_copied_into_another_users_slot_does_not_decrypt() -> None:
    records = MemoryKeyRecords()
    keystore = memory_store(records)
    result(keystore.put("alice", "anthropic", ALICE_KEY))
    result(records.set("bob", "anthropic", stored_record(records, "alice", "anthropic")))
    error = failure(keystore.keys_for("bob"))
    assert isinstance(error, StoredKeyUnreadable)
    assert isinstance(error, KeyStoreUnavailable)
    assert (error.user, error.provider) == ("bob", "anthropic")
    assert ALICE_KEY not in str(error)


def test_a_record_copied_into_another_providers_slot_does_not_decrypt() -> None:
    records = MemoryKeyRecords()
    keystore = memory_store(records)
    result(keystore.put("alice", "anthropic", ALICE_KEY))
    result(records.set("alice", "openai", stored_record(records, "alice", "anthropic")))
    assert isinstance(failure(keystore.keys_for("alice")), StoredKeyUnreadable)


@pytest.mark.parametrize("field", ["last4", "setAt", "ct"])
def test_an_altered_record_does_not_decrypt(field: str) -> None:
    records = MemoryKeyRecords()
    keystore = memory_store(records)
    result(keystore.put("alice", "anthropic", ALICE_KEY))
    data = json.loads(stored_record(records, "alice", "anthropic"))
    if field == "ct":
        sealed = bytearray(base64.b64decode(data["ct"]))
        sealed[0] ^= 1
        data["ct"] = base64.b64encode(bytes(sealed)).decode()
    else:
        data[field] = "0000"
    result(records.set("alice", "anthropic", json.dumps(data)))
    error = failure(keystore.keys_for("alice"))
    assert isinstance(error, StoredKeyUnreadable)
    assert "does not authenticate" in error.reason


def test_a_malformed_record_is_unreadable_not_skipped() -> None:
    records = MemoryKeyRecords()
    result(records.set("alice", "anthropic", "not json"))
    error = failure(memory_store(records).keys_for("alice"))
    assert isinstance(error, StoredKeyUnreadable)
    assert error.reason == "the record is malformed"


def test_without_redis_or_kek_a_key_made_for_the_process_protects_user_keys() -> None:
    first = KeyStore.from_config(KeysConfig(), None, Clock())
    second = KeyStore.from_config(KeysConfig(), None, Clock())
    assert first.user_keys_enabled
    assert first.kek_id != second.kek_id
    result(first.put("alice", "anthropic", ALICE_KEY))
    assert result(first.keys_for("alice")).env == {"ANTHROPIC_API_KEY": ALICE_KEY}


@pytest_twisted.ensureDeferred
async def test_with_redis_and_no_kek_user_keys_are_off_and_redis_is_not_consulted() -> None:
    # Nothing listens on this port: any Redis call would stay pending.
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", reactor, timeout=5)
    try:
        keystore = KeyStore.from_config(
            KeysConfig(anthropic="env:KEY"), store, Clock(), environ={"KEY": OPERATOR_ANTHROPIC}
        )
        assert not keystore.user_keys_enabled
        keys = result(keystore.keys_for("alice"))
        assert keys.source == "operator"
        for d in (
            keystore.put("alice", "anthropic", ALICE_KEY),
            keystore.list("alice"),
            keystore.delete("alice", "anthropic"),
            keystore.rotate(),
        ):
            assert isinstance(failure(d), UserKeysDisabled)
    finally:
        await store.disconnect()


# Rotation.


def test_rotation_reseals_every_record_with_the_newest_kek() -> None:
    records = MemoryKeyRecords()
    old = memory_store(records, keks=(OLD_KEK,))
    result(old.put("alice", "anthropic", ALICE_KEY))
    result(old.put("alice", "openai", ALICE_OPENAI))
    result(old.put("bob", "anthropic", BOB_KEY))
    listed_before = result(old.list("alice"))

    both = memory_store(records, keks=(NEW_KEK, OLD_KEK))
    assert result(both.rotate()) == 3
    assert result(both.rotate()) == 0

    new_only = memory_store(records, keks=(NEW_KEK,))
    assert result(new_only.keys_for("alice")).env == {
        "ANTHROPIC_API_KEY": ALICE_KEY,
        "OPENAI_API_KEY": ALICE_OPENAI,
    }
    assert result(new_only.keys_for("bob")).env["ANTHROPIC_API_KEY"] == BOB_KEY
    assert result(new_only.list("alice")) == listed_before
    assert isinstance(failure(old.keys_for("alice")), StoredKeyUnreadable)


def test_before_rotation_both_keks_are_needed_and_new_keys_use_the_newest() -> None:
    records = MemoryKeyRecords()
    result(memory_store(records, keks=(OLD_KEK,)).put("alice", "anthropic", ALICE_KEY))
    both = memory_store(records, keks=(NEW_KEK, OLD_KEK))
    result(both.put("bob", "anthropic", BOB_KEY))
    assert result(both.keys_for("alice")).env["ANTHROPIC_API_KEY"] == ALICE_KEY
    new_only = memory_store(records, keks=(NEW_KEK,))
    assert result(new_only.keys_for("bob")).env["ANTHROPIC_API_KEY"] == BOB_KEY
    error = failure(new_only.keys_for("alice"))
    assert isinstance(error, StoredKeyUnreadable)
    assert "is not configured" in error.reason


def test_rotation_reseals_what_it_can_and_reports_what_it_cannot() -> None:
    records = MemoryKeyRecords()
    result(memory_store(records, keks=(OLD_KEK,)).put("alice", "anthropic", ALICE_KEY))
    result(memory_store(records, keks=(OLD_KEK,)).put("bob", "anthropic", BOB_KEY))
    result(records.set("carol", "openai", "garbage"))
    error = failure(memory_store(records, keks=(NEW_KEK, OLD_KEK)).rotate())
    assert isinstance(error, RotationIncomplete)
    assert error.rotated == 2
    assert [(e.user, e.provider) for e in error.unreadable] == [("carol", "openai")]
    assert "carol openai" in str(error)
    new_only = memory_store(records, keks=(NEW_KEK,))
    assert result(new_only.keys_for("bob")).env["ANTHROPIC_API_KEY"] == BOB_KEY


class RacingRecords(MemoryKeyRecords):
    """Lets a user store a new key between rotation's read and its write."""

    def __init__(self) -> None:
        super().__init__()
        self.meanwhile: KeyStore | None = None

    def replace(self, user: str, provider: str, old: str, new: str) -> Deferred[bool]:
        if self.meanwhile is not None:
            racer, self.meanwhile = self.meanwhile, None
            result(racer.put(user, provider, BOB_KEY))
        return super().replace(user, provider, old, new)


def test_rotation_never_overwrites_a_key_stored_while_it_runs() -> None:
    records = RacingRecords()
    result(memory_store(records, keks=(OLD_KEK,)).put("alice", "anthropic", ALICE_KEY))
    rotating = memory_store(records, keks=(NEW_KEK, OLD_KEK))
    records.meanwhile = memory_store(records, keks=(NEW_KEK, OLD_KEK))
    assert result(rotating.rotate()) == 0
    assert records.meanwhile is None
    new_only = memory_store(records, keks=(NEW_KEK,))
    assert result(new_only.keys_for("alice")).env["ANTHROPIC_API_KEY"] == BOB_KEY


# Redis.


@pytest.fixture
def redis_store(redis_server: RedisServer) -> Iterator[RedisStore]:
    store = RedisStore(redis_server.url, reactor, timeout=0.5)
    yield store
    pytest_twisted.blockon(store.disconnect())


def redis_keystore(store: RedisStore, *keks: bytes, scan_count: int = 500) -> KeyStore:
    clock = Clock()
    clock.advance(START)
    return KeyStore(RedisKeyRecords(store, scan_count), keks, operator_env(), clock)


@pytest_twisted.ensureDeferred
async def test_redis_holds_no_plaintext_and_keys_come_back(
    redis_server: RedisServer, redis_store: RedisStore
) -> None:
    keystore = redis_keystore(redis_store, NEW_KEK)
    await keystore.put("alice", "anthropic", ALICE_KEY)
    await keystore.put("alice", "openai", ALICE_OPENAI)
    dump = redis_server.cli("HGETALL", REDIS_PREFIX + "alice")
    assert "anthropic" in dump and "openai" in dump
    for key in (ALICE_KEY, ALICE_OPENAI):
        assert key not in dump
        assert key[:-4] not in dump
    assert redis_server.cli("KEYS", "*").split() == ["1)", '"agentd:userkeys:alice"']
    keys = await keystore.keys_for("alice")
    assert dict(keys.env) == {"ANTHROPIC_API_KEY": ALICE_KEY, "OPENAI_API_KEY": ALICE_OPENAI}
    assert await keystore.delete("alice", "anthropic") is True
    assert await keystore.delete("alice", "openai") is True
    assert redis_server.cli("KEYS", "*").strip() == "(empty array)"


@pytest_twisted.ensureDeferred
async def test_redis_record_copied_to_another_user_does_not_decrypt(
    redis_server: RedisServer, redis_store: RedisStore
) -> None:
    keystore = redis_keystore(redis_store, NEW_KEK)
    await keystore.put("alice", "anthropic", ALICE_KEY)
    alice_record = await redis_store.call(
        "test", lambda c: c.hget(REDIS_PREFIX + "alice", "anthropic")
    )
    redis_server.cli("HSET", REDIS_PREFIX + "bob", "anthropic", alice_record)
    with pytest.raises(StoredKeyUnreadable):
        await keystore.keys_for("bob")
    assert (await keystore.keys_for("alice")).env["ANTHROPIC_API_KEY"] == ALICE_KEY


@pytest_twisted.ensureDeferred
async def test_redis_rotation_walks_every_user_in_batches(redis_store: RedisStore) -> None:
    old = redis_keystore(redis_store, OLD_KEK)
    users = [f"user{i}" for i in range(23)]
    for user in users:
        await old.put(user, "anthropic", f"sk-ant-{user}-secret")
    await old.put("user0", "openai", ALICE_OPENAI)
    assert await redis_keystore(redis_store, NEW_KEK, OLD_KEK, scan_count=4).rotate() == 24
    new_only = redis_keystore(redis_store, NEW_KEK)
    for user in users:
        keys = await new_only.keys_for(user)
        assert keys.env["ANTHROPIC_API_KEY"] == f"sk-ant-{user}-secret"
    assert (await new_only.keys_for("user0")).env["OPENAI_API_KEY"] == ALICE_OPENAI


@pytest_twisted.ensureDeferred
async def test_redis_replace_writes_only_over_the_record_it_was_given(
    redis_store: RedisStore,
) -> None:
    records = RedisKeyRecords(redis_store)
    await records.set("alice", "anthropic", "first")
    assert await records.replace("alice", "anthropic", "first", "second") is True
    assert await records.replace("alice", "anthropic", "first", "third") is False
    assert await records.get("alice", "anthropic") == "second"
    assert await records.replace("alice", "openai", "first", "third") is False
    assert await records.get("alice", "openai") is None


@pytest_twisted.ensureDeferred
async def test_redis_failure_is_key_store_unavailable_never_operator_keys(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, reactor, timeout=0.2)
    try:
        keystore = redis_keystore(store, NEW_KEK)
        await keystore.put("alice", "anthropic", ALICE_KEY)
        redis_server.stop()
        with pytest.raises(KeyStoreUnavailable):
            await keystore.keys_for("alice")
        with pytest.raises(KeyStoreUnavailable):
            await keystore.put("alice", "anthropic", ALICE_KEY)
        with pytest.raises(KeyStoreUnavailable):
            await keystore.list("alice")
    finally:
        await store.disconnect()
