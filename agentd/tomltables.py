"""TOML files and tables read into frozen dataclasses by their type hints; errors name the key.

agentd's configuration, the price table and the VM's agents file are all read this way. The
agent CLI reads the last two and must start fast and without Twisted, so this module imports
only the standard library, and the TOML parser only once a file is read.

A dataclass field's type says what its key holds: ``bool``, ``int``, ``float`` (an integer is
accepted), ``str``, ``datetime.date`` (a TOML date, or the date of a date-time),
``tuple[str, ...]`` (an array of strings) or ``Mapping[str, str]`` (a table of strings). A
field typed ``X | None`` holds an ``X``: TOML has no null, so None can only be the default.
A field without a default is a required key. ``rule`` adds a check of the value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

_RULE = "agentd.tomltables.rule"


class TomlError(ValueError):
    """One line naming the key (or the file) and the problem."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class Rule:
    """A check a key's value must pass, and the problem an error reports when it does not."""

    # A plain class: a NamedTuple costs the agent CLI's start a third of a millisecond.
    __slots__ = ("check", "problem")

    def __init__(self, check: Callable[[Any], bool], problem: str) -> None:
        self.check = check
        self.problem = problem


def rule(check: Callable[[Any], bool], problem: str) -> dict[str, Rule]:
    """Field metadata: a value given for the key must also pass ``check``.

    ``problem`` is the error for a value that fails it and for one of the wrong type, so a key
    has one wording for every value it refuses. Defaults are not checked.
    """
    return {_RULE: Rule(check, problem)}


class _WrongType(Exception):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _coerce(hint: Any, value: Any) -> Any:
    """``value`` as the type ``hint`` names, or ``_WrongType`` saying what it must be."""
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        [hint] = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise _WrongType("must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _WrongType("must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _WrongType("must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _WrongType("must be a string")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _WrongType("must be a list of strings")
        return tuple(value)
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _WrongType("must be a table of strings")
        return types.MappingProxyType(dict(value))
    # Imported here: the agent CLI's echo path reads no dates and starts without it.
    import datetime

    if hint is datetime.date:
        if isinstance(value, datetime.datetime):
            return value.date()
        if not isinstance(value, datetime.date):
            raise _WrongType("must be a date (YYYY-MM-DD)")
        return value
    raise TypeError(f"{hint!r} is not a type a TOML key can hold")


def read_table(
    cls: type[T],
    raw: object,
    name: str,
    error: type[TomlError] = TomlError,
    separator: str = ".",
    fixed: Mapping[str, Any] | None = None,
) -> T:
    """``raw``, one parsed TOML table, as a ``cls`` built from its keys and from ``fixed``.

    ``name`` names the table in errors and ``separator`` joins a key to it: ``"[server]"``
    with ``" "`` names ``[server] listen``, ``"models.gpt-5"`` with ``"."`` names
    ``models.gpt-5.input``. Each problem raises ``error(key, problem)``: a table that is not
    one, an unknown key, a value of the wrong type or refused by its rule, a required key left
    out. ``fixed`` gives the fields that are not keys of the table, such as its own name.
    """
    if not isinstance(raw, dict):
        raise error(name, "must be a table")
    values = dict(fixed or {})
    keys = {f.name: f for f in dataclasses.fields(cls) if f.name not in values}
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        where = f"{name}{separator}{key}"
        if key not in keys:
            raise error(where, "unknown key")
        check = keys[key].metadata.get(_RULE)
        try:
            values[key] = _coerce(hints[key], value)
        except _WrongType as e:
            raise error(where, check.problem if check else e.problem) from None
        if check is not None and not check.check(values[key]):
            raise error(where, check.problem)
    for key, spec in keys.items():
        required = spec.default is dataclasses.MISSING
        if required and spec.default_factory is dataclasses.MISSING and key not in values:
            raise error(f"{name}{separator}{key}", "required")
    return cls(**values)


def load_file(path: str, error: type[TomlError] = TomlError) -> dict[str, Any]:
    """The TOML document in the file at ``path``; ``error(path, problem)`` when the file is
    missing, unreadable or not valid TOML."""
    # Imported here: without an agents file, the echo agent starts without a TOML parser.
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(path, "no such file") from None
    except OSError as e:
        raise error(path, e.strerror or "cannot be read") from None
    except tomllib.TOMLDecodeError as e:
        raise error(path, f"not valid TOML: {e}") from None
