"""The key store: which provider keys an agent process gets, and users' own keys kept sealed.

A session asks ``KeyStore.keys_for(user)`` which environment variables to give its agent: the
user's own key for each provider where they stored one, the operator's key otherwise. Users
store, list and delete their keys through ``agentd.keys.api``; ``rotate`` re-seals every record
under the newest key-encryption key (KEK), after which older KEKs can be dropped from the
config. How a record is sealed is ``agentd.keys.sealing``; where records live is
``agentd.keys.records``.
"""

from __future__ import annotations

import builtins
import datetime
import os
from collections.abc import Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from agentd.config import ConfigError, KeysConfig
from agentd.keys.records import KeyRecords, KeyStoreUnavailable, MemoryKeyRecords, RedisKeyRecords
from agentd.keys.sealing import KEK_BYTES, Kek, KeyRing, SealedRecord, UnreadableRecord, parse_kek
from agentd.keys.source import PROVIDER_ENV, AgentKeys, SecretEnv
from agentd.redisstore import RedisStore
from agentd.secrets import SecretError, resolve_secret

KEY_MIN_CHARS = 8
KEY_MAX_CHARS = 512

_log = Logger()


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


def normalize_key(key: str) -> str:
    """The key without surrounding whitespace; raises ``InvalidKey`` unless it is plausible."""
    key = key.strip()
    if not KEY_MIN_CHARS <= len(key) <= KEY_MAX_CHARS:
        raise InvalidKey
    if not all("!" <= c <= "~" for c in key):
        raise InvalidKey
    return key


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
        self._ring = KeyRing(keks)
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
            kek_id = Kek.derive(kek).id
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
        return self._ring.newest is not None

    @property
    def kek_id(self) -> str | None:
        """The id of the newest key-encryption key: the one new records are sealed with."""
        newest = self._ring.newest
        return newest.id if newest else None

    def keys_for(self, user: str) -> Deferred[AgentKeys]:
        """The user's own keys where set, the operator's otherwise.

        Fails with ``KeyStoreUnavailable`` rather than fall back to an operator key when a user
        key may exist but cannot be read. With user keys disabled, Redis is not consulted.
        """
        return Deferred.fromCoroutine(self._keys_for(user))

    async def _keys_for(self, user: str) -> AgentKeys:
        env = dict(self._operator_env)
        mine: set[str] = set()
        if self.user_keys_enabled:
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
        await self._records.set(user, provider, kek.seal(user, provider, key, set_at))
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

    async def _rotate_one(self, newest: Kek, user: str, provider: str, current: str | None) -> int:
        while current is not None:
            record = self._parse(user, provider, current)
            if record.kek == newest.id:
                return 0
            key = self._open(user, provider, current)
            resealed = newest.seal(user, provider, key, record.set_at)
            if await self._records.replace(user, provider, current, resealed):
                return 1
            current = await self._records.get(user, provider)
        return 0

    def _newest(self) -> Kek:
        newest = self._ring.newest
        if newest is None:
            raise UserKeysDisabled
        return newest

    def _parse(self, user: str, provider: str, text: str) -> SealedRecord:
        try:
            return SealedRecord.parse(text)
        except UnreadableRecord as e:
            raise StoredKeyUnreadable(user, provider, str(e)) from None

    def _open(self, user: str, provider: str, text: str) -> str:
        try:
            return self._ring.open(user, provider, text)
        except UnreadableRecord as e:
            raise StoredKeyUnreadable(user, provider, str(e)) from None


def _check_provider(provider: str) -> None:
    if provider not in PROVIDER_ENV:
        raise UnknownProvider(provider)
