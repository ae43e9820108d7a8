"""Secret references in the configuration: ``env:NAME``, ``file:/absolute/path`` or the value.

``check_reference`` judges a reference's form without reading anything, so a configuration can
be validated where its secrets are not present; ``resolve_secret`` reads the value when agentd
needs it. Errors name the variable or the path, never the value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

FORMS = '"env:NAME", "file:/absolute/path" or the secret itself'

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SecretError(ValueError):
    """A reference that is malformed or names nothing usable; the message says which."""


def check_reference(reference: str) -> None:
    """Raise ``SecretError`` unless ``reference`` has one of the three forms.

    A value whose text before its first colon is not a plain word (``sk-ant-...``) is the secret
    itself; a plain word other than ``env`` or ``file`` is a typo, which must not silently
    become the secret.
    """
    kind, colon, target = reference.partition(":")
    if not (colon and kind.isascii() and kind.isalpha()):
        return
    if kind == "env" and _ENV_NAME.fullmatch(target):
        return
    if kind == "file" and Path(target).is_absolute():
        return
    raise SecretError(f"must be {FORMS}")


def resolve_secret(reference: str, environ: Mapping[str, str] | None = None) -> str:
    """The value ``reference`` stands for, without surrounding whitespace.

    ``environ`` defaults to the process environment. A file's trailing newline is dropped; an
    unset variable, an unreadable or empty file, and a malformed reference raise ``SecretError``.
    """
    check_reference(reference)
    kind, colon, target = reference.partition(":")
    if colon and kind == "env":
        value = (os.environ if environ is None else environ).get(target, "").strip()
        if not value:
            raise SecretError(f"environment variable {target} is not set")
        return value
    if colon and kind == "file":
        try:
            value = Path(target).read_bytes().decode("ascii").strip()
        except FileNotFoundError:
            raise SecretError(f"{target}: no such file") from None
        except OSError as e:
            raise SecretError(f"{target}: {e.strerror or 'cannot be read'}") from None
        except UnicodeDecodeError:
            raise SecretError(f"{target}: not ASCII text") from None
        if not value:
            raise SecretError(f"{target} is empty")
        return value
    return reference.strip()
