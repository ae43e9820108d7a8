"""Fake Anthropic and OpenAI APIs on loopback, and the agent CLI driven as a subprocess.

The fake servers speak the providers' real streaming wire formats over HTTP/1.1 with chunked
transfer encoding, so the official SDKs talk to them exactly as they talk to the real APIs:
Anthropic Messages SSE events (usage in ``message_start`` and ``message_delta``), OpenAI chat
completion chunks (usage in a final chunk when ``stream_options.include_usage`` is set). What
each request gets is scripted by the test; every request is recorded.
"""

from __future__ import annotations

import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Answer:
    """Stream ``chunks`` as the answer text, then the usage. ``cut_after`` closes the
    connection abruptly after that many text chunks, as a dropped connection would."""

    chunks: list[str]
    input_tokens: int = 10
    output_tokens: int = 5
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    chunk_delay: float = 0.0
    cut_after: int | None = None


@dataclass
class Fail:
    """An HTTP error with the provider's error body."""

    status: int
    error_type: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Hang:
    """Read the request, then send nothing until the client goes away."""


Step = Answer | Fail | Hang


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    disconnected: threading.Event = field(default_factory=threading.Event)


class FakeProvider:
    """An HTTP server answering like the ``anthropic`` or ``openai`` API, following a script."""

    def __init__(self, kind: str) -> None:
        assert kind in ("anthropic", "openai")
        self.kind = kind
        self.script: deque[Step] = deque()
        self.requests: list[Request] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        port = self.server.server_address[1]
        return f"http://127.0.0.1:{port}" + ("/v1" if self.kind == "openai" else "")

    def expect(self, *steps: Step) -> None:
        """Answer the next requests with ``steps``, in order."""
        with self.lock:
            self.script.extend(steps)

    def next_step(self, request: Request) -> Step | None:
        with self.lock:
            self.requests.append(request)
            return self.script.popleft() if self.script else None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def _anthropic_events(answer: Answer) -> Iterator[tuple[str, dict[str, Any]]]:
    yield (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "claude-sonnet-4-5-20250929",
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": answer.input_tokens,
                    "cache_creation_input_tokens": answer.cache_write_tokens,
                    "cache_read_input_tokens": answer.cache_read_tokens,
                    "output_tokens": 1,
                },
            },
        },
    )
    yield (
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        },
    )
    yield "ping", {"type": "ping"}
    for chunk in answer.chunks:
        yield (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": chunk},
            },
        )
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": answer.output_tokens},
        },
    )
    yield "message_stop", {"type": "message_stop"}


def _openai_events(answer: Answer) -> Iterator[tuple[str, dict[str, Any]]]:
    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> Any:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1_760_000_000,
            "model": "gpt-5-2025-08-07",
            "choices": choices,
            "usage": usage,
        }

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    yield "", chunk([choice({"role": "assistant", "content": ""})])
    for text in answer.chunks:
        yield "content", chunk([choice({"content": text})])
    yield "", chunk([choice({}, "stop")])
    prompt_tokens = answer.input_tokens + answer.cache_read_tokens
    yield (
        "",
        chunk(
            [],
            {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": answer.output_tokens,
                "total_tokens": prompt_tokens + answer.output_tokens,
                "prompt_tokens_details": {"cached_tokens": answer.cache_read_tokens},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        ),
    )


def _handler(fake: FakeProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            step = fake.next_step(request)
            if step is None:
                self._fail(Fail(500, "api_error", {"x-should-retry": "false"}))
            elif isinstance(step, Fail):
                self._fail(step)
            elif isinstance(step, Hang):
                self._wait(request, None)
                self.close_connection = True
            else:
                self._stream(request, step)

        def _fail(self, fail: Fail) -> None:
            message = f"fake {fail.error_type}"
            if fake.kind == "anthropic":
                error: dict[str, Any] = {
                    "type": "error",
                    "error": {"type": fail.error_type, "message": message},
                }
            else:
                error = {"error": {"message": message, "type": fail.error_type, "code": None}}
            data = json.dumps(error).encode()
            self.send_response(fail.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in fail.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _wait(self, request: Request, seconds: float | None) -> bool:
            """Wait ``seconds`` (None: until stopped); False if the client went away."""
            deadline = None if seconds is None else time.monotonic() + seconds
            while not fake.stopping.is_set():
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    return True
                readable, _, _ = select.select([self.connection], [], [], left)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    request.disconnected.set()
                    return False
            return False

        def _stream(self, request: Request, answer: Answer) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            events = _anthropic_events if fake.kind == "anthropic" else _openai_events
            sent = 0
            try:
                for name, data in events(answer):
                    is_text = name in ("content_block_delta", "content")
                    if is_text and answer.cut_after is not None and sent == answer.cut_after:
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    if is_text and sent and answer.chunk_delay:
                        if not self._wait(request, answer.chunk_delay):
                            self.close_connection = True
                            return
                    if fake.kind == "anthropic":
                        payload = f"event: {name}\ndata: {json.dumps(data)}\n\n"
                    else:
                        payload = f"data: {json.dumps(data)}\n\n"
                    self._chunk(payload.encode())
                    sent += is_text
                if fake.kind == "openai":
                    self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                request.disconnected.set()
                self.close_connection = True

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


# Variables from the host that would change what the agent CLI does under test.
_ISOLATED_PREFIXES = ("ANTHROPIC_", "OPENAI_", "AGENTD_")


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ISOLATED_PREFIXES)}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


class AgentProcess:
    """``agentd-agent`` as a subprocess: write JSON lines to it, read its JSON lines back."""

    def __init__(
        self,
        agent: str,
        env: Mapping[str, str],
        command: list[str] | None = None,
    ) -> None:
        argv = (command or [sys.executable, "-m", "agentd.agent.cli"]) + [agent]
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            cwd=REPO,
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.raw_stdout: list[bytes] = []
        self.stderr: list[bytes] = []
        self._pumps = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    def _pump_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.raw_stdout.append(line)
            self.lines.put(line)

    def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def send(self, message: dict[str, Any] | bytes) -> None:
        assert self.process.stdin is not None
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def read(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next stdout line, which must be a JSON object."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no output line within {timeout}s; stderr: {self.stderr_text()}"
            ) from None
        message = json.loads(line)
        assert isinstance(message, dict), line
        return message

    def read_query(self, query_id: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Lines up to and including the ``done`` or ``error`` line that ends ``query_id``."""
        deadline = time.monotonic() + timeout
        lines = []
        while True:
            message = self.read(max(0.01, deadline - time.monotonic()))
            lines.append(message)
            if message["type"] in ("done", "error") and message.get("id") == query_id:
                return lines

    def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def wait(self, timeout: float = 10.0) -> int:
        status = self.process.wait(timeout=timeout)
        for pump in self._pumps:
            pump.join(timeout=timeout)
        return status

    def remaining(self) -> list[dict[str, Any]]:
        """Every line not read yet; call after the process has exited."""
        lines = []
        while not self.lines.empty():
            lines.append(json.loads(self.lines.get_nowait()))
        return lines

    def stderr_text(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()
