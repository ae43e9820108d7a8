"""The demo console in a real headless Chromium against a real agentd, behind a cuttable proxy.

The proxy stands in for the network and the server's side of it: severing it drops every
connection the way a crashed server or a dead link would (no close frame, code 1006 in the
browser); stopping it makes every new attempt fail before the WebSocket opens.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import jwt
import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, WebSocket, expect, sync_playwright

from tests.harness import SECRET, token
from tests.servers import agent_command, free_port, holder_pids, wait_for_port

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
VENV_BIN = Path(sys.executable).parent
# Answers are this many numbered words, streamed one per delta: a repeated or missing delta
# shows up in the transcript text.
WORDS = 80
DELAY_MS = 30


def wrongly_signed_token() -> str:
    claims = {"sub": "alice", "exp": int(time.time()) + 600, "projects": ["demo"]}
    return jwt.encode(claims, "not-the-server-secret-0123456789abcdef", algorithm="HS256")


class SeverableProxy:
    """A loopback TCP proxy that can cut its connections and stop or resume listening."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def sever(self) -> None:
        """Drop every open connection without a goodbye."""
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            _hang_up(conn)

    def stop(self) -> None:
        """Refuse new connections and drop the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            _hang_up(listener)
        self.sever()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._connections -= {source, sink}
        _hang_up(source)
        _hang_up(sink)


def _hang_up(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@dataclass
class Agentd:
    port: int
    proxy: SeverableProxy
    restart: Callable[[], None]

    def console_url(self, jwt: str, project: str = "demo", agent: str = "echo") -> str:
        return f"http://127.0.0.1:{self.proxy.port}/?token={jwt}&project={project}&agent={agent}"


@contextmanager
def running_agentd(
    tmp_path: Path, config: str, env: dict[str, str] | None = None
) -> Iterator[Agentd]:
    """twistd agentd with ``config`` (TOML) on a loopback port, behind a proxy."""
    port = free_port()
    path = tmp_path / "agentd.toml"
    path.write_text(config)
    env = {
        **os.environ,
        "AGENTD_JWT_SECRET": SECRET,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # Sessions are held under $HOME/.agentd: the test's own, whose holders end with it.
        "HOME": str(tmp_path),
        **(env or {}),
    }
    log = tmp_path / "agentd.log"
    argv = [
        str(VENV_BIN / "twistd"),
        "--nodaemon",
        "--pidfile=",
        f"--logfile={log}",
        "agentd",
        "--config",
        str(path),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
    ]

    def launch() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )

    def stop(process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    processes = [launch()]

    def restart() -> None:
        """SIGTERM, as a deploy does, then the same agentd again on the same port."""
        stop(processes[-1])
        processes.append(launch())
        wait_for_port(port, timeout=30)

    proxy = SeverableProxy(port)
    try:
        wait_for_port(port, timeout=30)
        proxy.start()
        yield Agentd(port, proxy, restart)
    finally:
        proxy.stop()
        stop(processes[-1])


@pytest.fixture
def agentd(tmp_path: Path) -> Iterator[Agentd]:
    """agentd on its defaults (local transport, echo agent), behind a proxy; only the agent
    command differs, so the console can ask the echo agent for a slow answer."""
    with running_agentd(
        tmp_path, f"[agents]\ncommand = {json.dumps(agent_command())}\n"
    ) as running:
        yield running


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture
def browser(playwright: Playwright, tmp_path: Path) -> Iterator[BrowserContext]:
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"),
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS,
        headless=True,
        viewport={"width": 1000, "height": 760},
    )
    context.set_default_timeout(15_000)
    try:
        yield context
    finally:
        context.close()


class Console:
    """The demo page as a user sees it, plus what the browser did on the wire."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.sockets: list[WebSocket] = []
        self.errors: list[str] = []
        page.on("websocket", lambda ws: self.sockets.append(ws))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.pill = page.locator("#status-pill")
        self.detail = page.locator("#status-detail")
        self.transcript = page.locator("#transcript")

    def open(self, url: str) -> Console:
        self.page.goto(url)
        return self

    def expect_status(self, status: str, timeout: float = 15_000) -> None:
        expect(self.pill).to_have_attribute("data-status", status, timeout=timeout)

    def send(self, text: str, options: str = "") -> None:
        if options:
            self.page.get_by_text("Options", exact=True).click()
            self.page.get_by_label("JSON object sent as the prompt's options").fill(options)
        self.page.get_by_label("Prompt", exact=True).fill(text)
        self.page.get_by_role("button", name="Send").click()

    def answer(self, index: int = 0) -> str:
        return self.transcript.locator(".turn .answer .text").nth(index).inner_text()

    def notices(self) -> list[str]:
        return self.transcript.locator(".notice").all_inner_texts()


def numbered_words(count: int) -> str:
    return " ".join(f"w{i:03d}" for i in range(count))


def test_page_resumes_a_long_answer_after_the_server_cuts_the_connection(
    agentd: Agentd, browser: BrowserContext, tmp_path: Path
) -> None:
    console = Console(browser.new_page()).open(agentd.console_url(token()))
    console.expect_status("open")
    text = numbered_words(WORDS)
    console.send(text, options=f'{{"delay_ms": {DELAY_MS}}}')
    turn = console.transcript.locator(".turn").first
    expect(turn.locator(".answer .text")).to_contain_text("w020")

    agentd.proxy.sever()

    console.expect_status("reconnecting", timeout=5_000)
    cut_at = console.answer()
    expect(console.pill).to_have_text(re.compile(r"^Reconnecting"))
    expect(console.detail).to_have_text("attempt 1 of 5; the connection was lost (code 1006)")
    console.page.screenshot(path=tmp_path / "reconnecting.png")
    assert text.startswith(cut_at) and cut_at != text, "the cut should land mid-answer"

    console.expect_status("open", timeout=10_000)
    expect(console.transcript.locator(".notice").last).to_have_text("Reconnected: session resumed")
    expect(turn).to_have_attribute("data-state", "done", timeout=20_000)
    assert console.answer() == text
    expect(turn.locator(".meta")).to_contain_text(f"{WORDS} in, {WORDS} out tokens")
    console.page.screenshot(path=tmp_path / "resumed.png")

    assert len(console.sockets) == 2
    first, second = (socket_url_params(ws) for ws in console.sockets)
    assert "session" not in first
    session = second["session"]
    assert int(second["last_seq"]) >= 20
    assert console.page.locator("#status-detail").inner_text().startswith(f"session {session[:8]}")
    assert not any("lost" in notice for notice in console.notices())
    assert console.errors == []


def test_page_resumes_its_conversation_at_once_when_agentd_restarts_mid_answer(
    agentd: Agentd, browser: BrowserContext, tmp_path: Path
) -> None:
    console = Console(browser.new_page()).open(agentd.console_url(token()))
    console.expect_status("open")
    text = numbered_words(WORDS)
    console.send(text, options=f'{{"delay_ms": {DELAY_MS}}}')
    turn = console.transcript.locator(".turn").first
    expect(turn.locator(".answer .text")).to_contain_text("w010")
    holders = holder_pids(tmp_path)
    assert len(holders) == 1

    agentd.restart()  # 1012 to the page; the agent goes on in its holder meanwhile

    console.expect_status("open", timeout=15_000)
    expect(console.transcript.locator(".notice").last).to_have_text("Reconnected: session resumed")
    expect(turn).to_have_attribute("data-state", "done", timeout=20_000)
    assert console.answer() == text
    first, second = (socket_url_params(ws) for ws in console.sockets[:2])
    assert second["session"] and "session" not in first
    assert (
        console.page.locator("#status-detail")
        .inner_text()
        .startswith(f"session {second['session'][:8]}")
    )
    assert not any("lost" in notice for notice in console.notices())
    assert holder_pids(tmp_path) == holders, "the same agent finished the answer"
    console.send("after the restart")
    expect(console.transcript.locator(".turn").nth(1)).to_have_attribute(
        "data-state", "done", timeout=15_000
    )
    assert console.answer(1) == "after the restart"
    assert console.errors == []


def test_page_shows_disconnected_after_five_failed_attempts_and_retries_by_hand(
    agentd: Agentd, browser: BrowserContext, tmp_path: Path
) -> None:
    page = browser.new_page()
    # The page's timers run on a clock the test can move forward; time still flows.
    page.clock.install()
    console = Console(page).open(agentd.console_url(token()))
    console.expect_status("open")

    agentd.proxy.stop()

    for attempt, base_seconds in enumerate((1, 2, 5, 10, 30), start=1):
        expect(console.detail).to_contain_text(f"attempt {attempt} of 5")
        expect(console.pill).to_have_text(re.compile(r"^Reconnecting in \d+ s$"))
        seconds = int(console.pill.inner_text().split()[2])
        assert base_seconds * 0.8 - 1 <= seconds <= base_seconds * 1.2 + 1, (attempt, seconds)
        expect(console.page.get_by_role("button", name="Retry now")).to_be_visible()
        if attempt == 3:
            console.page.screenshot(path=tmp_path / "countdown.png")
        page.clock.fast_forward(seconds * 1000 + 1000)

    console.expect_status("disconnected")
    expect(console.pill).to_have_text("Disconnected")
    expect(console.detail).to_contain_text("gave up after 5 attempts")
    expect(console.detail).to_contain_text("failed before opening (code 1006)")
    console.page.screenshot(path=tmp_path / "disconnected.png")
    page.clock.fast_forward(120_000)
    assert len(console.sockets) == 6, "the first connection and five attempts, then nothing"

    agentd.proxy.start()
    console.page.get_by_role("button", name="Retry now").click()
    console.expect_status("open")
    expect(console.transcript.locator(".notice").last).to_have_text("Reconnected: session resumed")
    assert console.errors == []


def test_page_reconnects_at_once_when_the_browser_comes_back_online(
    agentd: Agentd, browser: BrowserContext
) -> None:
    page = browser.new_page()
    page.clock.install()
    console = Console(page).open(agentd.console_url(token()))
    console.expect_status("open")
    # From here the page's timers stand still: only the online event can start an attempt.
    page.clock.pause_at(page.evaluate("Date.now()") / 1000 + 1)
    browser.set_offline(True)
    agentd.proxy.sever()
    console.expect_status("reconnecting")
    expect(console.pill).to_have_text(re.compile(r"^Reconnecting in \d+ s$"))
    page.wait_for_timeout(1_500)
    assert len(console.sockets) == 1

    browser.set_offline(False)

    console.expect_status("open")
    expect(console.transcript.locator(".notice").last).to_have_text("Reconnected: session resumed")
    assert len(console.sockets) == 2
    assert console.errors == []


@pytest.mark.parametrize(
    ("refused", "shown"),
    [
        (wrongly_signed_token(), "HTTP 401"),
        (token(projects=["elsewhere"]), "HTTP 403"),
    ],
    ids=["bad-signature", "project-not-granted"],
)
def test_page_stops_at_once_when_the_server_refuses_the_token(
    agentd: Agentd, browser: BrowserContext, refused: str, shown: str
) -> None:
    console = Console(browser.new_page()).open(agentd.console_url(refused))
    console.expect_status("disconnected")
    expect(console.detail).to_contain_text(shown)
    # Longer than the first retry could wait: nothing tries again on its own.
    console.page.wait_for_timeout(2_000)
    assert len(console.sockets) == 1
    expect(console.pill).to_have_attribute("data-status", "disconnected")
    assert console.errors == []


def test_page_does_not_fight_a_newer_connection_for_its_session(
    agentd: Agentd, browser: BrowserContext
) -> None:
    url = agentd.console_url(token())
    older = Console(browser.new_page()).open(url)
    older.expect_status("open")
    newer = Console(browser.new_page()).open(url)
    newer.expect_status("open")

    older.expect_status("disconnected")
    expect(older.detail).to_have_text("another tab or window took over this session")
    older.page.wait_for_timeout(2_000)
    assert len(older.sockets) == 1
    expect(newer.pill).to_have_attribute("data-status", "open")
    assert older.errors == newer.errors == []


def socket_url_params(ws: WebSocket) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(ws.url).query))
