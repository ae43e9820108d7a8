"""Where sealed user keys live: one Redis hash per user, or process memory without Redis.

A record is an opaque string (see ``agentd.keys.sealing``) stored per (user, provider). In Redis
each user has the hash ``agentd:userkeys:<user>`` with one field per provider. A key stored or
deleted there counts as done only once a replica has it too (``RedisStore.confirm``): a
failover must not bring back a key the user deleted, nor lose one the API said it stored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed

from agentd.redisconfirm import Witness
from agentd.redisstore import RedisStore

REDIS_PREFIX = "agentd:userkeys:"

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


class KeyRecords(Protocol):
    """Where sealed records live: one string per (user, provider)."""

    def get_all(self, user: str) -> Awaitable[dict[str, str]]: ...

    def get(self, user: str, provider: str) -> Awaitable[str | None]: ...

    def set(self, user: str, provider: str, record: str) -> Awaitable[None]: ...

    def delete(self, user: str, provider: str) -> Awaitable[bool]: ...

    def replace(self, user: str, provider: str, old: str, new: str) -> Awaitable[bool]:
        """Write ``new`` only if the record is still ``old``."""

    def scan(self, cursor: str) -> Awaitable[tuple[str, list[str]]]:
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

    async def get_all(self, user: str) -> dict[str, str]:
        records: dict[str, str] = await self._call(
            "keys_read", lambda c: c.hgetall(REDIS_PREFIX + user)
        )
        return records

    async def get(self, user: str, provider: str) -> str | None:
        record: str | None = await self._call(
            "keys_read", lambda c: c.hget(REDIS_PREFIX + user, provider)
        )
        return record

    async def set(self, user: str, provider: str, record: str) -> None:
        key = REDIS_PREFIX + user
        await self._call("keys_write", lambda c: c.hset(key, provider, record))
        await self._confirm(Witness.hash_value(key, provider, record))

    async def delete(self, user: str, provider: str) -> bool:
        key = REDIS_PREFIX + user
        deleted = await self._call("keys_delete", lambda c: c.hdel(key, provider))
        await self._confirm(Witness.hash_absent(key, provider))
        return int(deleted) > 0

    async def replace(self, user: str, provider: str, old: str, new: str) -> bool:
        replaced = await self._call(
            "keys_rotate",
            lambda c: c.eval(_REPLACE_IF_UNCHANGED, [REDIS_PREFIX + user], [provider, old, new]),
        )
        return int(replaced) == 1

    async def scan(self, cursor: str) -> tuple[str, list[str]]:
        reply = await self._call(
            "keys_scan",
            lambda c: c.scan(cursor, pattern=REDIS_PREFIX + "*", count=self._scan_count),
        )
        return str(reply[0]), [name[len(REDIS_PREFIX) :] for name in reply[1]]

    async def _confirm(self, witness: Witness) -> None:
        if not await self._store.confirm(witness):
            raise KeyStoreUnavailable("no Redis replica confirmed the change in time")

    async def _call(self, operation: str, command: Callable[[Any], Deferred[Any]]) -> Any:
        try:
            return await self._store.call(operation, command)
        except Exception as e:
            raise KeyStoreUnavailable("the user key store (Redis) failed or timed out") from e
