"""Lua scripts through txredisapi's pool, with less work per call than its ``eval``.

Every prompt runs two scripts (the gate's, and the record of its usage), and txredisapi's
``eval`` costs more Python than Redis takes to run either: it encodes the script's text and
hashes it with SHA-1 on every call, reaches a connection through a generator that waits for one
(``getConnection``), and encodes each argument through a chain of type checks. Here each script
is encoded and hashed once, the pool's first ready connection is used at once (only when none is
does the call wait the pool's own way), and commands are encoded with one format per argument
and written at once when nothing waits before them on the connection; a plain command's reply
reaches its caller through one Deferred, not two.

What reaches Redis is what txredisapi's ``eval`` sends: ``EVALSHA`` on a connection that has run
the script, else ``EVAL``, and ``EVAL`` again after a ``NOSCRIPT`` reply (a restarted or flushed
server). Replies are read, queued and converted by txredisapi.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import txredisapi
from hiredis import pack_command
from twisted.internet.defer import Deferred, DeferredQueue, fail
from twisted.python.failure import Failure

from agentd.directwrite import write_now


class _WritesNow:
    """A connection's transport whose ``write`` writes at once when nothing waits before
    (``agentd.directwrite``); everything else is the transport's own."""

    __slots__ = ("__weakref__", "_transport")

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        write_now(self._transport, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# The argument types hiredis encodes exactly as txredisapi does (not floats: txredisapi
# writes them with six decimals, hiredis as short as they go).
_PACKED = frozenset((bytes, str, int))
_UTF8 = frozenset(("utf-8", "utf8", "UTF-8"))

# A prompt's gate call is one command for all of a user's prompts in a project in a month (its
# script reads Redis's clock, not agentd's): its encoding is looked up, not made again. Only
# short commands are kept; a chunk of usage records is long, and never the same twice.
_REPEATED_ARGS = 16
_pack_repeated = functools.lru_cache(maxsize=1024)(pack_command)


class _Leaner:
    """txredisapi's protocol with its commands encoded by hiredis's ``pack_command`` (in C),
    and written at once when nothing waits before them.

    The encoding is byte for byte what ``BaseRedisProtocol._build_command`` makes. hiredis
    encodes strings as UTF-8, so it is used on a connection whose charset is UTF-8 with
    strict errors, for arguments all of them bytes, strings or integers; any other command,
    and a string UTF-8 cannot encode, is encoded one argument at a time here, any other type
    through txredisapi's ``_encode_value``.
    """

    # txredisapi's protocol has them.
    charset: str | None
    errors: str
    _encode_value: Callable[[Any], bytes]
    connected: int
    pipelining: bool
    inMulti: bool
    replyTimeout: float | None
    replyQueue: DeferredQueue[Any]
    transport: Any

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        # txredisapi's, for a plain command (no pipeline, transaction, reply timeout or
        # options): the reply's Deferred relays to the caller's with one callback, where
        # txredisapi's takes two and makes a closure per command. What it leaves out is for
        # the cases that go to it.
        if kwargs or self.pipelining or self.inMulti or self.replyTimeout or not self.connected:
            return super().execute_command(*args, **kwargs)  # type: ignore[misc, no-any-return]
        self.transport.write(self._build_command(*args))
        result: Deferred[Any] = Deferred()
        self.replyQueue.get().addBoth(_relay_reply, result)
        return result

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(_WritesNow(transport))  # type: ignore[misc]  # the protocol's

    def tryConvertData(self, data: Any) -> Any:
        # txredisapi's, which returns integers as they are: a script's reply is a list of
        # them, and each took a call here.
        if type(data) is list:
            convert = self.tryConvertData
            return [x if type(x) is int else convert(x) for x in data]
        return super().tryConvertData(data)  # type: ignore[misc]  # the protocol's

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        if self.charset in _UTF8 and self.errors == "strict":
            for arg in args:
                if type(arg) not in _PACKED:
                    break
            else:
                try:
                    if len(args) <= _REPEATED_ARGS:
                        packed: bytes = _pack_repeated(args)
                    else:
                        packed = pack_command(args)
                except UnicodeError:
                    pass  # a lone surrogate: txredisapi's own error, below
                else:
                    return packed
        return self._build_slowly(args)

    def _build_slowly(self, args: tuple[Any, ...]) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            kind = type(arg)
            if kind is bytes:
                value = arg
            elif kind is str:
                try:
                    value = arg.encode(self.charset, self.errors)
                except (TypeError, UnicodeError):
                    value = self._encode_value(arg)  # no charset, or txredisapi's own error
            elif kind is int:
                value = b"%d" % arg
            else:
                value = self._encode_value(arg)
            parts.append(b"$%d\r\n%s\r\n" % (len(value), value))
        return b"".join(parts)


def _relay_reply(reply: Any, result: Deferred[Any]) -> None:
    """Fire ``result`` with a command's reply (an error reply as a failure), unless it fired
    already: cancelled at its deadline, the late reply is dropped as txredisapi drops it."""
    if not result.called:
        if isinstance(reply, Exception):
            result.errback(reply)
        else:
            result.callback(reply)


@functools.cache
def leaner(protocol: type) -> type:
    """``protocol`` (a txredisapi protocol class) encoding and writing its commands as
    ``_Leaner`` does."""
    return type(protocol.__name__, (_Leaner, protocol), {})


@functools.cache
def _encoded(script: str) -> tuple[bytes, str]:
    """The script's text as ``EVAL`` sends it, and its SHA-1 as ``EVALSHA`` names it."""
    text = script.encode()
    return text, hashlib.sha1(text, usedforsecurity=False).hexdigest()


class Scripts:
    """Runs scripts on the connections of one txredisapi pool (a ``RedisFactory``)."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory

    def run(self, script: str, keys: Sequence[Any], args: Sequence[Any]) -> Deferred[Any]:
        """The script's reply; fails as txredisapi's ``eval`` would."""
        text, sha = _encoded(script)
        connection = self._ready()
        if connection is None:
            # None ready (connecting, or every one lost): the pool's own way waits for one.
            waiting: Deferred[Any] = self._factory.handler.eval(text, list(keys), list(args))
            return waiting
        try:
            if sha not in connection.script_hashes:
                loaded: Deferred[Any] = connection.eval(text, keys, args)
                return loaded
            # txredisapi's evalsha, without its copies of the arguments and second errback.
            called: Deferred[Any] = connection.execute_command(
                "EVALSHA", sha, len(keys), *keys, *args
            )
        except Exception:
            return fail()
        return called.addErrback(self._flushed, connection, sha, text, keys, args)

    def _ready(self) -> Any | None:
        """The pool's first connected connection.

        Always the same one while it lasts, not one at random: the calls of one reactor turn
        (a prompt's gate and the previous prompt's usage record) then reach Redis together,
        which answers them in one write, and agentd wakes once for both replies.
        """
        for connection in self._factory.connectionQueue.pending:
            if connection.connected:
                return connection
        return None

    def _flushed(
        self,
        failure: Failure,
        connection: Any,
        sha: str,
        text: bytes,
        keys: Sequence[Any],
        args: Sequence[Any],
    ) -> Deferred[Any] | Failure:
        # NOSCRIPT: the server lost its scripts (a restart, SCRIPT FLUSH); EVAL loads this one
        # again, as txredisapi's eval does.
        error = failure.value
        if isinstance(error, txredisapi.ResponseError) and str(error).startswith("NOSCRIPT"):
            connection.script_hashes.discard(sha)
            reloaded: Deferred[Any] = connection.eval(text, keys, args)
            return reloaded
        return failure
