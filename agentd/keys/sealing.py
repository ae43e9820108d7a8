"""How users' provider keys are sealed at rest: AES-256-GCM, bound to the slot they were put in.

Everything an auditor needs to judge the encryption is in this module, which uses only the
``cryptography`` package (no Twisted, no storage).

A key-encryption key (KEK, ``[keys] encryption_keys``) is 32 random bytes. HKDF-SHA256 derives
from it two unrelated keys: the AES-256-GCM key that seals, and a six-byte id that names the
KEK in the records it sealed without revealing anything usable about it. A sealed record is
JSON holding that id, a fresh 96-bit nonce, the ciphertext, the key's last four characters and
the time it was set. The user, provider, last four characters and time are authenticated as
associated data, so a record copied into another user's or provider's slot, or with its visible
fields edited, does not open.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agentd.config import ConfigError

KEK_BYTES = 32

_RECORD_VERSION = 1
_NONCE_BYTES = 12


class UnreadableRecord(ValueError):
    """A record that does not open; the message says why and never contains the key."""


def generate_kek() -> str:
    """A new key-encryption key, as ``[keys] encryption_keys`` expects it."""
    return base64.urlsafe_b64encode(os.urandom(KEK_BYTES)).decode("ascii")


def parse_kek(text: str, key: str) -> bytes:
    """The KEK written as ``text``; raises ``ConfigError`` naming ``key`` unless it is one."""
    try:
        kek = base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True)
    except (UnicodeEncodeError, binascii.Error):
        kek = b""
    if len(kek) != KEK_BYTES:
        raise ConfigError(key, "must be 32 bytes in URL-safe base64 (agentd keys gen-kek)")
    return kek


@dataclass(frozen=True)
class Kek:
    """One key-encryption key, ready to seal: its public id and its AES-256-GCM key."""

    id: str
    aead: AESGCM = field(repr=False)

    @classmethod
    def derive(cls, kek: bytes) -> Kek:
        # Separate derived keys for naming and sealing, so the id reveals nothing usable.
        return cls(
            id=_hkdf(kek, b"agentd user keys: key id", 6).hex(),
            aead=AESGCM(_hkdf(kek, b"agentd user keys: aes-256-gcm", 32)),
        )

    def seal(self, user: str, provider: str, key: str, set_at: str) -> str:
        """The record that stores ``key`` in the slot (``user``, ``provider``)."""
        last4 = key[-4:]
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self.aead.encrypt(
            nonce, key.encode("ascii"), _associated_data(user, provider, last4, set_at)
        )
        return SealedRecord(self.id, nonce, sealed, last4, set_at).dump()


def _hkdf(kek: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=SHA256(), length=length, salt=None, info=info).derive(kek)


@dataclass(frozen=True)
class SealedRecord:
    """A stored record as fields; ``last4`` and ``set_at`` are readable without any KEK."""

    kek: str
    nonce: bytes
    sealed: bytes
    last4: str
    set_at: str

    @classmethod
    def parse(cls, text: str) -> SealedRecord:
        """The record ``text`` holds; raises ``UnreadableRecord`` if it is not one."""
        try:
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
        except (ValueError, KeyError, TypeError):
            raise UnreadableRecord("the record is malformed") from None

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


class KeyRing:
    """The configured KEKs, newest first: new records are sealed with the newest, any opens."""

    def __init__(self, keks: Sequence[bytes]) -> None:
        self._keks = [Kek.derive(kek) for kek in keks]
        self._by_id = {kek.id: kek for kek in self._keks}

    @property
    def newest(self) -> Kek | None:
        return self._keks[0] if self._keks else None

    def open(self, user: str, provider: str, text: str) -> str:
        """The key in the record ``text`` read from slot (``user``, ``provider``).

        Raises ``UnreadableRecord`` if the record is malformed, was sealed with a KEK that is
        not configured, or does not authenticate in this slot.
        """
        record = SealedRecord.parse(text)
        kek = self._by_id.get(record.kek)
        if kek is None:
            raise UnreadableRecord(f"key-encryption key {record.kek} is not configured")
        try:
            plain = kek.aead.decrypt(
                record.nonce,
                record.sealed,
                _associated_data(user, provider, record.last4, record.set_at),
            )
        except InvalidTag:
            raise UnreadableRecord(
                "it does not authenticate (altered, or moved from another slot)"
            ) from None
        return plain.decode("ascii")
