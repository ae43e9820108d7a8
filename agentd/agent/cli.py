"""``agentd-agent AGENT``: serve one agent conversation over JSON lines on stdin and stdout.

``--test-options`` lets prompts use the test options (see ``protocol.parse_line``); agentd
never passes it, only tests and benchmarks configure a command that does.

Exit status: 0 after stdin EOF or SIGTERM, 1 after an internal error, 2 when the agent is
unknown or unusable as configured, or whatever a test prompt's ``exit`` asks for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from types import FrameType

from agentd.agent import agents
from agentd.agent.log import Log
from agentd.agent.output import Output, open_stdout
from agentd.agent.protocol import (
    MAX_LINE_BYTES,
    Abort,
    BadRequest,
    ErrorCode,
    Prompt,
    Usage,
    error_line,
    parse_line,
)
from agentd.agent.providers import (
    Provider,
    ProviderError,
    ProviderSetupError,
    Reply,
    make_provider,
)

USAGE = "usage: agentd-agent [--test-options] AGENT"
TEST_OPTIONS_FLAG = "--test-options"
# On the way out, output the peer has not read within this long is dropped: agentd may have
# stopped reading (a paused session) and must not keep a stopping agent alive by it.
FLUSH_SECONDS = 5.0
SECRET_VARIABLES = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")


class Overlong:
    """An input line longer than MAX_LINE_BYTES, dropped unread."""


class Stop:
    """End the conversation with exit ``status``. An internal error is reported on the way
    out, with the ``query`` it hit."""

    def __init__(
        self, status: int, reason: str, internal_error: bool = False, query: str | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.internal_error = internal_error
        self.query = query


Event = bytes | Overlong | Stop


def read_lines(fd: int, deliver: Callable[[Event], None]) -> None:
    """Read ``fd`` to its end in a thread of its own, delivering each line, then Stop.

    A thread works for every kind of stdin (pipe, socket, terminal, regular file) and lets the
    event loop keep streaming while the peer is silent.
    """
    pending: list[bytes] = []  # the current line's bytes so far, joined once it ends
    size = 0
    dropping = False  # inside an overlong line, until its newline
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            # stdin shares its open file with a non-blocking stdout (a socketpair, a terminal).
            select.select([fd], [], [])
            continue
        except OSError:
            chunk = b""
        if not chunk:
            break
        *ended, rest = chunk.split(b"\n")
        for i, line in enumerate(ended):
            if i == 0:
                if dropping:
                    dropping = False
                    continue
                line = b"".join([*pending, line])
            deliver(Overlong() if len(line) > MAX_LINE_BYTES else line)
        if ended:
            pending, size = [rest], len(rest)
        elif not dropping:
            pending.append(rest)
            size += len(rest)
        if size > MAX_LINE_BYTES and not dropping:
            deliver(Overlong())
            dropping = True
            pending, size = [], 0
    if size and not dropping:
        deliver(b"".join(pending))
    deliver(Stop(0, "stdin closed"))


class PromptServer:
    """Answers prompts one at a time; a prompt while one runs is refused with ``busy``."""

    def __init__(
        self,
        spec: agents.AgentSpec,
        provider: Provider,
        output: Output,
        log: Log,
        test_options: bool = False,
    ) -> None:
        self.spec = spec
        self.provider = provider
        self.output = output
        self.log = log
        self.test_options = test_options
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.query: asyncio.Task[None] | None = None
        self.query_id: str | None = None
        self.cancelling = False
        self.crash: Stop | None = None

    def deliver(self, event: Event) -> None:
        self.events.put_nowait(event)

    async def serve(self) -> int:
        while True:
            event = await self.events.get()
            if self.crash is not None:
                # A query hit a bug: nothing queued behind it is worth starting.
                return await self._stop(self.crash)
            if isinstance(event, Stop):
                return await self._stop(event)
            if isinstance(event, Overlong):
                self._error(ErrorCode.BAD_REQUEST, f"line longer than {MAX_LINE_BYTES} bytes")
                continue
            if not event.strip():
                continue
            try:
                message = parse_line(event, self.test_options)
            except BadRequest as e:
                extra = {} if e.query_id is None else {"id": e.query_id}
                self._error(ErrorCode.BAD_REQUEST, e.problem, **extra)
                self.log.warn("bad request", query=e.query_id, problem=e.problem)
                continue
            if isinstance(message, Abort):
                self._abort(message)
            elif message.exit_status is not None:
                self.log.info("exit requested", query=message.id, status=message.exit_status)
                await self._flush()
                return message.exit_status
            elif self.query is not None:
                self._error(ErrorCode.BUSY, f"query {self.query_id} is running", id=message.id)
                self.log.warn("prompt refused: busy", query=message.id, running=self.query_id)
            else:
                self.query_id = message.id
                self.query = asyncio.create_task(self._answer(message))
                # Let the query start (and write its start line) before the next line, so a
                # cancel always finds it inside its own error handling.
                await asyncio.sleep(0)

    def _error(self, code: ErrorCode, text: str, **extra: object) -> None:
        self.output.write(error_line(code, text, **extra))

    def _abort(self, abort: Abort) -> None:
        if self.query is None or abort.id not in (None, self.query_id):
            self.log.info("abort ignored: no such query running", query=abort.id)
            return
        self.log.info("abort requested", query=self.query_id)
        self.cancelling = True
        self.query.cancel()

    async def _stop(self, stop: Stop) -> int:
        self.log.info("stopping", reason=stop.reason)
        if self.query is not None:
            self.cancelling = True
            self.query.cancel()
            await asyncio.wait([self.query])
        if stop.internal_error:
            extra = {} if stop.query is None else {"id": stop.query}
            self._error(ErrorCode.INTERNAL, "internal error", **extra)
        await self._flush()
        return stop.status

    async def _flush(self) -> None:
        try:
            async with asyncio.timeout(FLUSH_SECONDS):
                await self.output.flush()
        except TimeoutError:
            self.log.warn("output left unread at exit was dropped")

    def _done(self, reply: Reply, aborted: bool) -> None:
        reply.usage.cost = self.provider.cost(reply.usage)
        message: dict[str, object] = {
            "type": "done",
            "agent": self.spec.name,
            "id": reply.query_id,
            "usage": reply.usage.to_json(),
        }
        if aborted:
            message["aborted"] = True
        message.update(reply.extra)
        self.output.line(message)

    async def _answer(self, prompt: Prompt) -> None:
        output = self.output
        qid = prompt.id
        usage = Usage(self.spec.model)
        reply = Reply(output, qid, usage)
        output.line({"type": "start", "id": qid})
        # Routine per-query lines are debug: agentd relays every stderr line through its
        # redacting log, which at info cost a quarter of its CPU per prompt.
        self.log.debug("query started", query=qid)
        try:
            async with asyncio.timeout(self.spec.timeout_seconds):
                await self.provider.answer(prompt, reply)
        except TimeoutError:
            usage.cost = self.provider.cost(usage)
            self._error(
                ErrorCode.TIMEOUT,
                f"no answer within {self.spec.timeout_seconds:g} seconds",
                id=qid,
                usage=usage.to_json(),
            )
            self.log.warn("query timed out", query=qid)
        except ProviderError as e:
            usage.cost = self.provider.cost(usage)
            extra: dict[str, object] = {"id": qid, "usage": usage.to_json()}
            if e.retry_after_ms is not None:
                extra["retryAfter"] = e.retry_after_ms
            self._error(e.code, e.text, **extra)
            self.log.warn("provider error", query=qid, code=e.code.value, **e.detail)
        except asyncio.CancelledError:
            if not self.cancelling:
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            self._done(reply, aborted=True)
            self.log.info("query aborted", query=qid)
        except Exception as e:
            self.log.error(
                "internal error",
                query=qid,
                exception=type(e).__name__,
                traceback=traceback.format_exc(),
            )
            self.crash = Stop(1, "internal error", internal_error=True, query=qid)
            self.deliver(self.crash)
        else:
            self._done(reply, aborted=False)
            self.log.debug(
                "query done", query=qid, input=usage.input_tokens, output=usage.output_tokens
            )
        finally:
            self.query = None
            self.query_id = None
            self.cancelling = False


class LogBridge(logging.Handler):
    """Routes warnings from asyncio and the SDKs into the JSON log instead of plain text."""

    def __init__(self, log: Log) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else "warn"
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        self.log.emit(level, message, logger=record.name)


async def run(
    spec: agents.AgentSpec, provider: Provider, log: Log, test_options: bool = False
) -> int:
    loop = asyncio.get_running_loop()

    def on_exception(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        error = context.get("exception")
        log.error(
            "event loop error",
            detail=str(context.get("message")),
            exception=None if error is None else type(error).__name__,
        )

    loop.set_exception_handler(on_exception)
    output = await open_stdout(lambda: server.deliver(Stop(0, "stdout closed")))
    server = PromptServer(spec, provider, output, log, test_options)

    def deliver(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(server.deliver, event)
        except RuntimeError:
            # The loop has finished: the process is exiting and the event is moot.
            pass

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.deliver, Stop(0, signal.Signals(signum).name))
    threading.Thread(target=read_lines, args=(0, deliver), name="stdin", daemon=True).start()
    log.info("agent ready", provider=spec.provider, model=spec.model, testOptions=test_options)
    return await server.serve()


def _fatal(code: ErrorCode, text: str) -> None:
    os.write(1, error_line(code, text))


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    # At once, not by raising SystemExit: raised wherever start-up happens to be, inside a
    # finalizer or a library's ``except BaseException``, that can be swallowed, and the agent
    # then starts as if no signal had come.
    os._exit(0)


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    # Until the event loop takes over SIGTERM, nothing runs that could report usage: just go.
    signal.signal(signal.SIGTERM, _exit_quietly)
    args = sys.argv[1:] if argv is None else argv
    environ = os.environ if env is None else env
    test_options = args[:1] == [TEST_OPTIONS_FLAG]
    if test_options:
        args = args[1:]
    if len(args) != 1 or args[0].startswith("-"):
        os.write(2, (USAGE + "\n").encode())
        _fatal(ErrorCode.BAD_REQUEST, USAGE)
        return 2
    name = args[0]
    log = Log(
        name,
        level=environ.get("AGENTD_AGENT_LOG_LEVEL", "info"),
        secrets=[environ.get(v, "") for v in SECRET_VARIABLES],
    )
    try:
        spec = agents.find(name, environ)
    except agents.UnknownAgent:
        log.error("unknown agent")
        _fatal(ErrorCode.UNKNOWN_AGENT, f"no agent named {name!r} on this VM")
        return 2
    except agents.AgentsFileError as e:
        log.error("unusable agents file", problem=str(e))
        _fatal(ErrorCode.BAD_CONFIG, str(e))
        return 2
    try:
        provider = make_provider(spec, environ)
    except ProviderSetupError as e:
        log.error("provider unusable", problem=str(e))
        _fatal(ErrorCode.BAD_CONFIG, str(e))
        return 2
    logging.getLogger().addHandler(LogBridge(log))
    # The SDKs warn through the warnings module (deprecated models); log those as JSON too.
    logging.captureWarnings(True)
    try:
        return asyncio.run(run(spec, provider, log, test_options))
    except Exception as e:
        log.error("internal error", exception=type(e).__name__, traceback=traceback.format_exc())
        os.set_blocking(1, True)
        _fatal(ErrorCode.INTERNAL, "internal error")
        return 1
    finally:
        # The write transport made stdout non-blocking; leave it as the caller gave it.
        os.set_blocking(1, True)


if __name__ == "__main__":
    sys.exit(main())
