"""Provider API keys for agent processes: the operator's, and users' own keys encrypted at rest.

A session asks ``KeyStore.keys_for(user)`` which environment variables to give its agent: the
user's own key for each provider where they stored one, the operator's key otherwise.

User keys are sealed with AES-256-GCM under a key-encryption key (KEK) from ``[keys]
encryption_keys`` (newest first). Each stored record names the KEK that sealed it, and the
user, provider, last four characters and time of setting are authenticated as associated data,
so a record copied into another user's or provider's slot does not decrypt. ``rotate`` re-seals
every record under the newest KEK; after that, older KEKs can be dropped from the config.

Records live in one Redis hash per user (``agentd:userkeys:<user>``, one field per provider),
or in process memory when agentd runs without Redis.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import builtins
import datetime
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from agentd.config import ConfigError, KeysConfig
from agentd.redisstore import RedisStore, RedisURLError
from agentd.secrets import SecretError, resolve_secret

PROVIDER_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}

KEY_MIN_CHARS = 8
KEY_MAX_CHARS = 512
KEK_BYTES = 32
REDIS_PREFIX = "agentd:userkeys:"

_log = Logger()

_RECORD_VERSION = 1
_NONCE_BYTES = 12
# Written only when the record is still the one rotation read, so a key a user stores while
# rotation runs is never overwritten with their previous one.
_REPLACE_IF_UNCHANGED = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


class KeyStoreUnavailable(Exception):
    """User keys cannot be read or written now; a session must not start without them."""


class StoredKeyUnreadable(KeyStoreUnavailable):
    """A stored record does not decrypt: its KEK is gone, or it was altered or moved."""

    def __init__(self, user: str, provider: str, reason: str) -> None:
        super().__init__(f"the stored {provider} key of user {user} is unreadable: {reason}")
        self.user = user
        self.provider = provider
        self.reason = reason


class UserKeysDisabled(Exception):
    """No key-encryption key is configured, so users cannot store keys."""

    def __init__(self) -> None:
        super().__init__(
            "user API keys are disabled: no key-encryption key is configured "
            "([keys] encryption_keys)"
        )


class UnknownProvider(ValueError):
    def __init__(self, provider: str) -> None:
        super().__init__(f"unknown provider; known: {', '.join(PROVIDER_ENV)}")
        self.provider = provider


class InvalidKey(ValueError):
    """The key is refused; the message never contains it."""

    def __init__(self) -> None:
        super().__init__(
            f"key must be {KEY_MIN_CHARS} to {KEY_MAX_CHARS} printable ASCII characters "
            "without spaces"
        )


class RotationIncomplete(Exception):
    """Some records could not be re-encrypted; the older KEKs are still needed or they are lost."""

    def __init__(self, rotated: int, unreadable: Sequence[StoredKeyUnreadable]) -> None:
        lines = "\n".join(f"  {e.user} {e.provider}: {e.reason}" for e in unreadable)
        super().__init__(
            f"re-encrypted {rotated} stored keys; {len(unreadable)} could not be read:\n{lines}"
        )
        self.rotated = rotated
        self.unreadable = tuple(unreadable)


class SecretEnv(Mapping[str, str]):
    """Environment variables whose values are secrets: its repr names variables, never values."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    def __getitem__(self, name: str) -> str:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"SecretEnv({sorted(self._values)})"


@dataclass(frozen=True)
class AgentKeys:
    """What one agent process gets: its key variables and who pays for its queries.

    ``source`` is ``"user"`` if any of the user's own keys is in ``env``, ``"operator"`` if
    only operator keys are, ``"none"`` if there is no key at all. ``payer(provider)`` answers
    per provider, for a user who stored a key for one provider but not the other.
    """

    env: Mapping[str, str]
    source: str
    user_providers: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", SecretEnv(self.env))

    def payer(self, provider: str) -> str:
        if provider in self.user_providers:
            return "user"
        return "operator" if PROVIDER_ENV.get(provider, "") in self.env else "none"


def normalize_key(key: str) -> str:
    """The key without surrounding whitespace; raises ``InvalidKey`` unless it is plausible."""
    key = key.strip()
    if not KEY_MIN_CHARS <= len(key) <= KEY_MAX_CHARS:
        raise InvalidKey
    if not all("!" <= c <= "~" for c in key):
        raise InvalidKey
    return key


def generate_kek() -> str:
    """A new key-encryption key, as ``[keys] encryption_keys`` expects it."""
    return base64.urlsafe_b64encode(os.urandom(KEK_BYTES)).decode("ascii")


def parse_kek(text: str, key: str) -> bytes:
    try:
        kek = base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True)
    except (UnicodeEncodeError, binascii.Error):
        kek = b""
    if len(kek) != KEK_BYTES:
        raise ConfigError(key, "must be 32 bytes in URL-safe base64 (agentd keys gen-kek)")
    return kek


class KeyRecords(Protocol):
    """Where sealed records live: one string per (user, provider)."""

    def get_all(self, user: str) -> Deferred[dict[str, str]]: ...

    def get(self, user: str, provider: str) -> Deferred[str | None]: ...

    def set(self, user: str, provider: str, record: str) -> Deferred[None]: ...

    def delete(self, user: str, provider: str) -> Deferred[bool]: ...

    def replace(self, user: str, provider: str, old: str, new: str) -> Deferred[bool]:
        """Write ``new`` only if the record is still ``old``."""

    def scan(self, cursor: str) -> Deferred[tuple[str, list[str]]]:
        """Users with records, a batch at a time; the cursor starts and ends at ``"0"``."""


class MemoryKeyRecords:
    """Records in process memory, for agentd without Redis; gone when the process ends."""

    def __init__(self) -> None:
        self._users: dict[str, dict[str, str]] = {}

    def get_all(self, user: str) -> Deferred[dict[str, str]]:
        return succeed(dict(self._users.get(user, {})))

    def get(self, user: str, provider: str) -> Deferred[str | None]:
        return succeed(self._users.get(user, {}).get(provider))

    def set(self, user: str, provider: str, record: str) -> Deferred[None]:
        self._users.setdefault(user, {})[provider] = record
        return succeed(None)

    def delete(self, user: str, provider: str) -> Deferred[bool]:
        records = self._users.get(user, {})
        deleted = records.pop(provider, None) is not None
        if not records:
            self._users.pop(user, None)
        return succeed(deleted)

    def replace(self, user: str, provider: str, old: str, new: str) -> Deferred[bool]:
        records = self._users.get(user, {})
        if records.get(provider) != old:
            return succeed(False)
        records[provider] = new
        return succeed(True)

    def scan(self, cursor: str) -> Deferred[tuple[str, list[str]]]:
        return succeed(("0", sorted(self._users)))


class RedisKeyRecords:
    """Records in Redis; every failure or timeout becomes ``KeyStoreUnavailable``."""

    def __init__(self, store: RedisStore, scan_count: int = 500) -> None:
        self._store = store
        self._scan_count = scan_count

    def get_all(self, user: str) -> Deferred[dict[str, str]]:
        d = self._store.call("keys_read", lambda c: c.hgetall(REDIS_PREFIX + user))
        return d.addErrback(_unavailable)

    def get(self, user: str, provider: str) -> Deferred[str | None]:
        d = self._store.call("keys_read", lambda c: c.hget(REDIS_PREFIX + user, provider))
        return d.addErrback(_unavailable)

    def set(self, user: str, provider: str, record: str) -> Deferred[None]:
        d = self._store.call("keys_write", lambda c: c.hset(REDIS_PREFIX + user, provider, record))
        return d.addCallbacks(lambda _: None, _unavailable)

    def delete(self, user: str, provider: str) -> Deferred[bool]:
        d = self._store.call("keys_delete", lambda c: c.hdel(REDIS_PREFIX + user, provider))
        return d.addCallbacks(lambda deleted: int(deleted) > 0, _unavailable)

    def replace(self, user: str, provider: str, old: str, new: str) -> Deferred[bool]:
        d = self._store.eval(
            "keys_rotate", _REPLACE_IF_UNCHANGED, [REDIS_PREFIX + user], [provider, old, new]
        )
        return d.addCallbacks(lambda replaced: int(replaced) == 1, _unavailable)

    def scan(self, cursor: str) -> Deferred[tuple[str, list[str]]]:
        d = self._store.call(
            "keys_scan",
            lambda c: c.scan(cursor, pattern=REDIS_PREFIX + "*", count=self._scan_count),
        )

        def batch(reply: list[Any]) -> tuple[str, list[str]]:
            return str(reply[0]), [name[len(REDIS_PREFIX) :] for name in reply[1]]

        return d.addCallbacks(batch, _unavailable)


def _unavailable(failure: Failure) -> Failure:
    raise KeyStoreUnavailable("the user key store (Redis) failed or timed out") from failure.value


@dataclass(frozen=True)
class _Kek:
    id: str
    aead: AESGCM = field(repr=False)

    @classmethod
    def derive(cls, kek: bytes) -> _Kek:
        # Separate derived keys for naming and sealing, so the id reveals nothing usable.
        return cls(
            id=_hkdf(kek, b"agentd user keys: key id", 6).hex(),
            aead=AESGCM(_hkdf(kek, b"agentd user keys: aes-256-gcm", 32)),
        )


def _hkdf(kek: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=SHA256(), length=length, salt=None, info=info).derive(kek)


@dataclass(frozen=True)
class _Record:
    kek: str
    nonce: bytes
    sealed: bytes
    last4: str
    set_at: str

    @classmethod
    def parse(cls, text: str) -> _Record:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != _RECORD_VERSION:
            raise ValueError("unknown record version")
        return cls(
            kek=str(data["kek"]),
            nonce=base64.b64decode(data["nonce"], validate=True),
            sealed=base64.b64decode(data["ct"], validate=True),
            last4=str(data["last4"]),
            set_at=str(data["setAt"]),
        )

    def dump(self) -> str:
        return json.dumps(
            {
                "v": _RECORD_VERSION,
                "kek": self.kek,
                "nonce": base64.b64encode(self.nonce).decode("ascii"),
                "ct": base64.b64encode(self.sealed).decode("ascii"),
                "last4": self.last4,
                "setAt": self.set_at,
            },
            separators=(",", ":"),
        )


def _associated_data(user: str, provider: str, last4: str, set_at: str) -> bytes:
    # No part can contain NUL (user names, providers and keys are printable), so the
    # concatenation is unambiguous.
    return "\0".join(("agentd user key v1", user, provider, last4, set_at)).encode("utf-8")


class KeyStore:
    """Operator keys from config, user keys sealed in a ``KeyRecords``; see the module doc."""

    def __init__(
        self,
        records: KeyRecords,
        keks: Sequence[bytes],
        operator_env: Mapping[str, str],
        clock: IReactorTime,
    ) -> None:
        self._records = records
        self._keks = [_Kek.derive(kek) for kek in keks]
        self._by_id = {kek.id: kek for kek in self._keks}
        self._operator_env = SecretEnv(operator_env)
        self._clock = clock

    @classmethod
    def from_config(
        cls,
        config: KeysConfig,
        store: RedisStore | None,
        clock: IReactorTime,
        environ: Mapping[str, str] | None = None,
    ) -> KeyStore:
        """Resolve every reference now; raises ``ConfigError`` naming the key at fault.

        Without Redis and without a configured KEK, a random KEK lives as long as the process,
        exactly like the records it protects.
        """
        operator_env: dict[str, str] = {}
        for provider, variable in PROVIDER_ENV.items():
            reference = getattr(config, provider)
            if reference:
                name = f"[keys] {provider}"
                try:
                    operator_env[variable] = normalize_key(resolve_secret(reference, environ))
                except (SecretError, InvalidKey) as e:
                    raise ConfigError(name, str(e)) from None
        keks: list[bytes] = []
        ids: dict[str, int] = {}
        for index, reference in enumerate(config.encryption_keys):
            name = f"[keys] encryption_keys[{index}]"
            try:
                text = resolve_secret(reference, environ)
            except SecretError as e:
                raise ConfigError(name, str(e)) from None
            kek = parse_kek(text, name)
            kek_id = _Kek.derive(kek).id
            if kek_id in ids:
                raise ConfigError(name, f"is the same key as encryption_keys[{ids[kek_id]}]")
            ids[kek_id] = index
            keks.append(kek)
        records: KeyRecords
        if store is None:
            records = MemoryKeyRecords()
            if not keks:
                keks.append(os.urandom(KEK_BYTES))
                _log.info("user API keys are kept in memory under a key made for this process")
        else:
            records = RedisKeyRecords(store)
            if not keks:
                _log.warn(
                    "user API keys are disabled: [keys] encryption_keys is not set; "
                    "every session uses the operator's keys"
                )
        keystore = cls(records, keks, operator_env, clock)
        if keystore.kek_id:
            _log.info(
                "user API keys are sealed with key-encryption key {kek} ({count} configured)",
                kek=keystore.kek_id,
                count=len(keks),
            )
        return keystore

    @property
    def user_keys_enabled(self) -> bool:
        return bool(self._keks)

    @property
    def kek_id(self) -> str | None:
        """The id of the newest key-encryption key: the one new records are sealed with."""
        return self._keks[0].id if self._keks else None

    def keys_for(self, user: str) -> Deferred[AgentKeys]:
        """The user's own keys where set, the operator's otherwise.

        Fails with ``KeyStoreUnavailable`` rather than fall back to an operator key when a user
        key may exist but cannot be read. With user keys disabled, Redis is not consulted.
        """
        return Deferred.fromCoroutine(self._keys_for(user))

    async def _keys_for(self, user: str) -> AgentKeys:
        env = dict(self._operator_env)
        mine: set[str] = set()
        if self._keks:
            stored = await self._records.get_all(user)
            for provider, variable in PROVIDER_ENV.items():
                if provider in stored:
                    env[variable] = self._open(user, provider, stored[provider])
                    mine.add(provider)
        source = "user" if mine else "operator" if env else "none"
        return AgentKeys(env=env, source=source, user_providers=frozenset(mine))

    def put(self, user: str, provider: str, key: str) -> Deferred[None]:
        """Store or replace the user's key.

        Fails with ``UserKeysDisabled``, ``UnknownProvider``, ``InvalidKey`` or
        ``KeyStoreUnavailable``.
        """
        return Deferred.fromCoroutine(self._put(user, provider, key))

    async def _put(self, user: str, provider: str, key: str) -> None:
        kek = self._newest()
        _check_provider(provider)
        key = normalize_key(key)
        set_at = (
            datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)
            .replace(microsecond=0)
            .strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        await self._records.set(user, provider, self._seal(kek, user, provider, key, set_at))
        _log.info("user {user} stored their {provider} key", user=user, provider=provider)

    def delete(self, user: str, provider: str) -> Deferred[bool]:
        """Forget the user's key; False if there was none."""
        return Deferred.fromCoroutine(self._delete(user, provider))

    async def _delete(self, user: str, provider: str) -> bool:
        self._newest()
        _check_provider(provider)
        existed = await self._records.delete(user, provider)
        if existed:
            _log.info("user {user} deleted their {provider} key", user=user, provider=provider)
        return existed

    def list(self, user: str) -> Deferred[list[dict[str, str]]]:
        """``[{"provider", "last4", "setAt"}]`` for each stored key; never the key."""
        return Deferred.fromCoroutine(self._list(user))

    async def _list(self, user: str) -> builtins.list[dict[str, str]]:
        self._newest()
        stored = await self._records.get_all(user)
        listed = []
        for provider in PROVIDER_ENV:
            if provider in stored:
                record = self._parse(user, provider, stored[provider])
                listed.append({"provider": provider, "last4": record.last4, "setAt": record.set_at})
        return listed

    def rotate(self) -> Deferred[int]:
        """Re-seal every record not sealed with the newest KEK; the count re-sealed.

        Fails with ``RotationIncomplete`` (after re-sealing all others) if a record cannot be
        read, and with ``KeyStoreUnavailable`` if Redis fails; running it again is safe.
        """
        return Deferred.fromCoroutine(self._rotate())

    async def _rotate(self) -> int:
        newest = self._newest()
        rotated = 0
        unreadable: list[StoredKeyUnreadable] = []
        cursor = "0"
        while True:
            cursor, users = await self._records.scan(cursor)
            for user in users:
                for provider, record in (await self._records.get_all(user)).items():
                    try:
                        rotated += await self._rotate_one(newest, user, provider, record)
                    except StoredKeyUnreadable as e:
                        unreadable.append(e)
            if cursor == "0":
                break
        _log.info(
            "re-encrypted {rotated} stored keys with key-encryption key {kek}; "
            "{unreadable} unreadable",
            rotated=rotated,
            kek=newest.id,
            unreadable=len(unreadable),
        )
        if unreadable:
            raise RotationIncomplete(rotated, unreadable)
        return rotated

    async def _rotate_one(self, newest: _Kek, user: str, provider: str, current: str | None) -> int:
        while current is not None:
            record = self._parse(user, provider, current)
            if record.kek == newest.id:
                return 0
            key = self._open(user, provider, current)
            resealed = self._seal(newest, user, provider, key, record.set_at)
            if await self._records.replace(user, provider, current, resealed):
                return 1
            current = await self._records.get(user, provider)
        return 0

    def _newest(self) -> _Kek:
        if not self._keks:
            raise UserKeysDisabled
        return self._keks[0]

    def _seal(self, kek: _Kek, user: str, provider: str, key: str, set_at: str) -> str:
        last4 = key[-4:]
        nonce = os.urandom(_NONCE_BYTES)
        sealed = kek.aead.encrypt(
            nonce, key.encode("ascii"), _associated_data(user, provider, last4, set_at)
        )
        return _Record(kek.id, nonce, sealed, last4, set_at).dump()

    def _parse(self, user: str, provider: str, text: str) -> _Record:
        try:
            return _Record.parse(text)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise StoredKeyUnreadable(user, provider, "the record is malformed") from None

    def _open(self, user: str, provider: str, text: str) -> str:
        record = self._parse(user, provider, text)
        kek = self._by_id.get(record.kek)
        if kek is None:
            raise StoredKeyUnreadable(
                user, provider, f"key-encryption key {record.kek} is not configured"
            )
        try:
            plain = kek.aead.decrypt(
                record.nonce,
                record.sealed,
                _associated_data(user, provider, record.last4, record.set_at),
            )
        except InvalidTag:
            raise StoredKeyUnreadable(
                user, provider, "it does not authenticate (altered, or moved from another slot)"
            ) from None
        return plain.decode("ascii")


def _check_provider(provider: str) -> None:
    if provider not in PROVIDER_ENV:
        raise UnknownProvider(provider)


def keys_main(argv: list[str]) -> int:
    """``agentd keys gen-kek`` / ``agentd keys rotate --config PATH``; argv follows ``keys``."""
    parser = argparse.ArgumentParser(
        prog="agentd keys", description="Manage the keys that protect users' API keys."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("gen-kek", help="print a new key-encryption key")
    rotate = commands.add_parser(
        "rotate", help="re-encrypt every stored user key with the newest key-encryption key"
    )
    rotate.add_argument("--config", required=True, help="agentd's TOML configuration file")
    args = parser.parse_args(argv)
    if args.command == "gen-kek":
        print(generate_kek())
        return 0
    return _rotate_command(args.config)


def _rotate_command(path: str) -> int:
    from twisted.internet import reactor

    from agentd import config as config_module

    try:
        config = config_module.load(path)
        if not config.redis.url:
            raise ConfigError("[redis] url", "rotation needs the Redis store user keys live in")
        if not config.keys.encryption_keys:
            raise ConfigError("[keys] encryption_keys", "no key-encryption key to rotate to")
        store = RedisStore(
            config.redis.url, reactor, timeout=max(config.redis.timeout_ms, 5000) / 1000
        )
        keystore = KeyStore.from_config(config.keys, store, reactor)
    except (ConfigError, RedisURLError) as e:
        print(f"agentd keys rotate: {e}", file=sys.stderr)
        return 2
    codes: list[int] = []

    async def run() -> int:
        try:
            rotated = await keystore.rotate()
        except (RotationIncomplete, KeyStoreUnavailable) as e:
            print(f"agentd keys rotate: {e}", file=sys.stderr)
            return 1
        finally:
            await store.disconnect()
        print(
            f"re-encrypted {rotated} stored keys; every stored key now uses key-encryption "
            f"key {keystore.kek_id}, so older keys can be removed from [keys] encryption_keys"
        )
        return 0

    def finished(code: int) -> None:
        codes.append(code)
        reactor.stop()

    def crashed(failure: Failure) -> int:
        print(failure.getTraceback(), file=sys.stderr)
        return 1

    def start() -> None:
        Deferred.fromCoroutine(run()).addErrback(crashed).addCallback(finished)

    reactor.callWhenRunning(start)
    reactor.run()
    return codes[0]
