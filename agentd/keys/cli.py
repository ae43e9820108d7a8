"""``agentd keys``: make a key-encryption key, and re-seal every stored key under the newest."""

from __future__ import annotations

import argparse
import sys

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import react

from agentd.config import ConfigError, load
from agentd.keys.records import KeyStoreUnavailable
from agentd.keys.sealing import generate_kek
from agentd.keys.store import KeyStore, RotationIncomplete
from agentd.redisstore import RedisStore


def keys_main(argv: list[str]) -> int:
    """``agentd keys gen-kek`` / ``agentd keys rotate --config PATH``; argv follows ``keys``.

    ``rotate`` runs the reactor and ends the process with its exit status: 0 when every record
    uses the newest KEK, 1 when some could not be read or Redis failed, 2 for a configuration
    it cannot work with.
    """
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
    react(_rotate, (args.config,))


async def _rotate(reactor: IReactorTime, path: str) -> None:
    try:
        config = load(path)
        if not config.redis.configured:
            raise ConfigError("[redis] url", "rotation needs the Redis store user keys live in")
        if not config.keys.encryption_keys:
            raise ConfigError("[keys] encryption_keys", "no key-encryption key to rotate to")
        store = RedisStore.from_config(
            config.redis, reactor, timeout=max(config.redis.timeout_ms, 5000) / 1000
        )
        keystore = KeyStore.from_config(config.keys, store, reactor)
    except ConfigError as e:
        print(f"agentd keys rotate: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        rotated = await keystore.rotate()
    except (RotationIncomplete, KeyStoreUnavailable) as e:
        print(f"agentd keys rotate: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        await store.disconnect()
    print(
        f"re-encrypted {rotated} stored keys; every stored key now uses key-encryption "
        f"key {keystore.kek_id}, so older keys can be removed from [keys] encryption_keys"
    )
