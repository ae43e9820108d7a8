"""The session holder through ``agentd-agent attach`` as a subprocess, with the echo agent.

Every holder a test starts is killed (by its process group) when the test ends: holders
outlive their attaches by design.
"""

from __future__ import annotations

import json
import os
import queue
import selectors
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentd.agent.holder import attach as attach_command
from agentd.agent.holder import names, wire
from agentd.agent.holder.child import AgentChild
from agentd.agent.holder.journal import Journal, Position, Syncer
from agentd.agent.log import Log
from tests.fake_providers import REPO, agent_env
from tests.servers import is_holder

AGENT_COMMAND = f"{shlex.quote(sys.executable)} -m agentd.agent.cli --test-options {{agent}}"
SESSION = "s3ss10n-0123456789"


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Attach:
    """``agentd-agent attach`` as a subprocess: JSON lines in, JSON lines out."""

    def __init__(self, argv: list[str], **env: str) -> None:
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=agent_env(**env),
            cwd=REPO,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.holder_pid: int | None = None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = json.loads(raw)
            if line.get("type") == "attached" and line.get("holderPid"):
                self.holder_pid = line["holderPid"]
            self.lines.put(line)
        self.lines.put(None)

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()

    def read(self, timeout: float = 10.0) -> dict[str, Any]:
        line = self.lines.get(timeout=timeout)
        assert line is not None, "attach ended"
        return line

    def read_until(self, stop: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Lines (control lines and agent logs aside) up to and including the first that
        ``stop`` accepts."""
        lines = []
        while True:
            line = self.read()
            if line.get("type") in ("log", "unrecorded"):
                continue
            lines.append(line)
            if stop(line):
                return lines

    def rest(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every line until the attach ends."""
        lines = []
        while (line := self.lines.get(timeout=timeout)) is not None:
            lines.append(line)
        return lines

    def detach(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.process.wait(timeout=10)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


class Sessions:
    """A sessions directory, the attaches run against it, and every holder they started."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.attaches: list[Attach] = []
        self.holders: set[int] = set()

    def attach(
        self,
        session: str = SESSION,
        after: int = 0,
        start: bool = True,
        user: str = "ada",
        project: str = "demo",
        agent: str = "echo",
        options: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Attach:
        argv = [sys.executable, "-m", "agentd.agent.entry", "attach"]
        argv += ["--session", session, "--user", user, "--project", project, "--agent", agent]
        argv += ["--after", str(after), "--sessions-dir", str(self.base)]
        if "--agent-command" not in options:
            argv += ["--agent-command", AGENT_COMMAND]
        argv += options
        if start:
            argv.append("--start")
        attach = Attach(argv, **(env or {}))
        self.attaches.append(attach)
        return attach

    def attached(self, **kwargs: Any) -> tuple[Attach, dict[str, Any]]:
        attach = self.attach(**kwargs)
        hello = attach.read(timeout=15)
        assert hello["type"] == "attached", hello
        if hello["holderPid"]:
            self.holders.add(hello["holderPid"])
        return attach, hello

    def directory(self, session: str = SESSION) -> Path:
        return self.base / session

    def journal_bytes(self, session: str = SESSION) -> int:
        """The journal's size on disk, never more than it was at some instant: a segment the
        holder deleted while its size was read is left out (segments only grow until they
        are deleted), or it would count beside what the holder wrote meanwhile."""
        journal = self.directory(session) / "journal"
        sizes = {}
        for segment in journal.iterdir():
            try:
                sizes[segment.name] = segment.stat().st_size
            except FileNotFoundError:
                pass  # deleted by the holder meanwhile
        still_there = {segment.name for segment in journal.iterdir()}
        return sum(size for name, size in sizes.items() if name in still_there)

    def close(self) -> None:
        for attach in self.attaches:
            if attach.process.poll() is None:
                attach.kill()
        for pid_file in self.base.glob("*/holder.pid"):
            self.holders.add(int(pid_file.read_text()))
        for pid in self.holders:
            if is_holder(pid):
                os.killpg(pid, signal.SIGKILL)
        for pid in self.holders:
            wait_for(lambda pid=pid: not is_holder(pid), what=f"holder {pid} to go")
        for log in self.base.glob("*/holder.log*"):
            assert b"Traceback" not in log.read_bytes(), log.read_text()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[Sessions]:
    s = Sessions(tmp_path / "sessions")
    yield s
    s.close()


def prompt(attach: Attach, prompt_id: str, text: str, **options: Any) -> list[dict[str, Any]]:
    """Send a prompt; the lines up to its done or error."""
    attach.send({"type": "prompt", "id": prompt_id, "text": text, **options})
    return attach.read_until(lambda m: m["type"] in ("done", "error") and m.get("id") == prompt_id)


def kill_and_serve(
    sessions: Sessions, attach: Attach, hello: dict[str, Any], **kwargs: Any
) -> list[dict[str, Any]]:
    """Kill the holder that ``hello`` names at once, then what an attach (``kwargs``, no
    ``--start``) serves of the session it left."""
    os.killpg(hello["holderPid"], signal.SIGKILL)
    assert attach.process.wait(timeout=10) == 0  # the attach goes with its holder
    wait_for(lambda: not is_holder(hello["holderPid"]))
    lost = sessions.attach(start=False, **kwargs)
    served = lost.rest()
    assert lost.process.wait(timeout=10) == 0
    return served


def seqs(lines: list[dict[str, Any]]) -> list[int]:
    return [line["seq"] for line in lines if "seq" in line]


def text_of(lines: list[dict[str, Any]]) -> str:
    return "".join(line["text"] for line in lines if line["type"] == "delta")


# -- the basics ---------------------------------------------------------------------------


def test_attach_starts_a_detached_holder_that_numbers_the_agents_lines(sessions: Sessions):
    attach, hello = sessions.attached()
    assert hello["started"] is True and hello["live"] is True and hello["complete"] is True
    assert hello["lastSeq"] == 0 and hello["session"] == SESSION
    lines = prompt(attach, "p1", "hello big  world")
    assert [m["type"] for m in lines] == ["ack", "start", "delta", "delta", "delta", "done"]
    assert seqs(lines) == [1, 2, 3, 4, 5, 6]
    assert text_of(lines) == "hello big  world"
    # The holder is nobody's child here: its own session and process group, /dev/null in.
    holder, agent = hello["holderPid"], hello["agentPid"]
    assert os.getsid(holder) != os.getsid(0) and os.getpgid(holder) == holder
    assert os.getpgid(agent) == holder
    assert Path(f"/proc/{holder}/status").read_text().count(f"PPid:\t{attach.process.pid}") == 0
    assert os.readlink(f"/proc/{holder}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{holder}/fd/1") == "/dev/null"
    # The attach ends with its stdin; the holder and its agent do not, nor on SIGHUP.
    assert attach.detach() == 0
    os.kill(holder, signal.SIGHUP)
    time.sleep(0.2)
    assert is_holder(holder) and alive(agent)


def test_start_only_starts_the_holder_and_leaves_it_to_a_connection_at_its_socket(
    sessions: Sessions,
):
    first = sessions.attach(start=False, options=("--start-only",))
    assert first.rest() == [{"type": "listening", "started": True}]
    assert first.process.wait(timeout=10) == 0
    again = sessions.attach(start=False, options=("--start-only",))
    assert again.rest() == [{"type": "listening", "started": False}], "one holder"
    # What agentd does next: connect to the socket and say the attach's hello itself.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(sessions.directory() / "sock"))
        hello = {"type": "hello", "v": 1, "session": SESSION, "user": "ada"}
        hello |= {"project": "demo", "agent": "echo", "after": 0, "started": True}
        sock.sendall(json.dumps(hello).encode() + b"\n")
        reader = sock.makefile("rb")
        attached = json.loads(reader.readline())
        sessions.holders.add(attached["holderPid"])
        assert attached["type"] == "attached" and attached["live"] is True
        assert attached["started"] is True and attached["lastSeq"] == 0
        sock.sendall(b'{"type":"prompt","id":"p1","text":"at the socket"}\n')
        lines = []
        while not lines or lines[-1].get("type") != "done":
            line = json.loads(reader.readline())
            if "seq" in line:
                lines.append(line)
        assert text_of(lines) == "at the socket" and seqs(lines)[0] == 1


def test_a_session_id_that_begins_with_a_dash_starts_its_holder(sessions: Sessions):
    # secrets.token_urlsafe draws "-" first for one session in 64.
    session = "-starts-with-a-dash-0123456789"
    attach, hello = sessions.attached(session=session)
    assert hello["started"] is True and hello["session"] == session
    assert text_of(prompt(attach, "p1", "still served")) == "still served"


def test_a_killed_attach_loses_nothing_the_resume_asks_for(sessions: Sessions):
    attach, _ = sessions.attached()
    words = " ".join(f"w{i}" for i in range(400))
    attach.send(
        {"type": "prompt", "id": "p1", "text": words, "options": {"repeat": 3, "delay_ms": 1}}
    )
    seen = [attach.read() for _ in range(60)]
    seen = [m for m in seen if "seq" in m]
    attach.kill()  # SIGKILL, mid-stream
    time.sleep(0.3)
    again, hello = sessions.attached(after=seen[-1]["seq"], start=False)
    assert hello["complete"] is True and hello["started"] is False
    rest = again.read_until(lambda m: m["type"] == "done")
    lines = seen + rest
    assert seqs(lines) == list(range(1, len(lines) + 1))
    assert text_of(lines) == words * 3


def test_two_attaches_starting_at_once_share_one_holder(sessions: Sessions):
    racers = [sessions.attach() for _ in range(4)]
    hellos = []
    for attach in racers:
        line = attach.read(timeout=15)
        assert line["type"] in ("attached", "superseded"), line
        if line["type"] == "attached":
            hellos.append(line)
    assert len({h["holderPid"] for h in hellos}) == 1
    assert [h["started"] for h in hellos].count(True) == 1
    sessions.holders.update(h["holderPid"] for h in hellos)
    holders = [
        p for p in os.listdir("/proc") if p.isdigit() and is_holder(int(p)) and _serves(p, SESSION)
    ]
    assert len(holders) == 1


def _serves(pid: str, session: str) -> bool:
    try:
        return session.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


def test_the_newest_attach_supersedes_the_older(sessions: Sessions):
    old, _ = sessions.attached()
    new, _ = sessions.attached(start=False)
    assert old.read_until(lambda m: True) == [{"type": "superseded"}]
    assert old.rest() == [] and old.process.wait(timeout=10) == 0
    lines = prompt(new, "p1", "still here")
    assert text_of(lines) == "still here"


def test_a_new_session_replaces_the_users_earlier_one_with_the_same_project_and_agent(
    sessions: Sessions,
):
    old, old_hello = sessions.attached(session="old-session-0123456789")
    other_user, _ = sessions.attached(session="bobs-session-0123456789", user="bob")
    other_agent, _ = sessions.attached(session="claude-session-0123456789", agent="claude")
    # A fresh session of ada's for demo/echo, started through any agentd.
    new, _ = sessions.attached(session="new-session-0123456789")
    # The old one's attach is superseded (agentd closes its client with 4001), then it ends.
    assert old.read_until(lambda m: True) == [{"type": "superseded"}]
    wait_for(lambda: not is_holder(old_hello["holderPid"]), what="the old holder to end")
    # It ended, rather than died: with nothing owed, its directory goes with it.
    wait_for(lambda: not sessions.directory("old-session-0123456789").exists(), what="removal")
    for attach in (other_user, other_agent):
        assert attach.process.poll() is None, "another user's or agent's session lives on"
    assert text_of(prompt(new, "p1", "the new one")) == "the new one"


def test_a_superseded_attach_that_fell_behind_still_learns_it_whole(sessions: Sessions):
    argv = sessions.attach().process.args  # the same command line, for a process read later
    sessions.attaches[-1].kill()
    behind = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=agent_env(), cwd=REPO
    )
    assert behind.stdin is not None and behind.stdout is not None
    prompt = {
        "type": "prompt",
        "id": "big",
        "text": "x",
        "options": {"repeat": 20_000, "delta_bytes": 1000},
    }
    behind.stdin.write(json.dumps(prompt).encode() + b"\n")
    behind.stdin.flush()
    time.sleep(1.0)  # nobody reads it: its pipe, its socket and the holder's buffer fill up
    newer, _ = sessions.attached(after=0, start=False)
    lines = [json.loads(raw) for raw in behind.stdout]  # every line whole, to the last
    assert lines[-1] == {"type": "superseded"}
    assert behind.wait(timeout=10) == 0
    assert any(line.get("type") == "delta" for line in lines)
    newer.read_until(lambda m: m["type"] == "done")


@pytest.mark.parametrize("field", ["user", "project", "agent"])
def test_an_attach_for_another_user_project_or_agent_is_refused(sessions: Sessions, field: str):
    owner, _ = sessions.attached()
    prompt(owner, "p1", "secret")
    other = {"user": "eve", "project": "other", "agent": "echo2"}[field]
    intruder = sessions.attach(start=False, **{field: other})
    assert intruder.read() == {
        "type": "error",
        "code": "mismatch",
        "error": "the session belongs to another user, project or agent",
    }
    assert intruder.rest() == [] and intruder.process.wait(timeout=10) == 1
    # The owner was not superseded and still has the agent.
    assert text_of(prompt(owner, "p2", "mine")) == "mine"
    # With the holder gone, the journal is refused to them just the same.
    os.killpg(owner.holder_pid or 0, signal.SIGKILL)
    wait_for(lambda: not is_holder(owner.holder_pid or 0))
    for start in (False, True):
        refused = sessions.attach(start=start, **{field: other})
        assert refused.rest()[0]["code"] == "mismatch"


def test_malformed_arguments_are_refused_before_anything_starts(sessions: Sessions):
    attach = sessions.attach(session="short")
    assert attach.rest() == [
        {"type": "error", "code": "bad_request", "error": "--session is malformed"}
    ]
    assert attach.process.wait(timeout=10) == 2
    assert not sessions.base.exists()


BASE_ARGS = ["--session", SESSION, "--user", "ada", "--project", "demo", "--agent", "echo"]


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--bogus", "1"], "unknown option --bogus"),
        (["--after"], "--after needs a value"),
        (["--after", "1", "--after", "2"], "--after is given twice"),
        (["--after", "-1"], "--after must be a seq"),
        (["--idle-seconds", "soon"], "--idle-seconds must be a number"),
        (["--idle-seconds", "0"], "--idle-seconds must be positive"),
        (["--max-line", "100"], "--max-line must be from 1024"),
        (["--journal-max-bytes", "100000", "--start"], "at least 8 times --max-line"),
        (["--agent-command", "run-agent"], "must contain {agent}"),
        (["--user", "a b"], "--user is malformed"),
    ],
)
def test_attach_arguments_are_checked(extra: list[str], problem: str):
    argv = [*BASE_ARGS, *extra]
    if extra[0] == "--user":
        argv = argv[:2] + argv[4:]
    with pytest.raises(attach_command.UsageError, match=problem):
        attach_command.parse(argv, {})
    with pytest.raises(attach_command.UsageError, match="--project is required"):
        attach_command.parse(["--session", SESSION, "--user", "ada", "--agent", "echo"], {})


def test_a_small_journal_bound_only_matters_to_the_attach_that_starts_the_holder():
    # agentd runs one attach command, with --max-line only when it starts the holder.
    options = attach_command.parse([*BASE_ARGS, "--journal-max-bytes", "262144"], {})
    assert options.journal_max_bytes == 262144 and not options.start


def test_attach_arguments_have_defaults_and_take_either_form():
    options = attach_command.parse(
        [*BASE_ARGS, "--after=42", "--start"], {"AGENTD_AGENT_COMMAND": "run {agent} --fast"}
    )
    assert options.after == 42 and options.start is True
    assert options.identity == (SESSION, "ada", "demo", "echo")
    assert options.agent_command == "run {agent} --fast"
    assert options.idle_seconds == 3600 and options.journal_max_bytes == 64 << 20
    assert options.journal_max_age == 86400 and options.max_line == 1 << 20
    assert attach_command.parse(BASE_ARGS, {}).agent_command == "agentd-agent {agent}"


def test_agentd_agent_runs_the_cli_unless_asked_to_attach(sessions: Sessions):
    setup = (REPO / "setup.py").read_text()
    assert '"agentd-agent = agentd.agent.entry:main"' in setup
    cli = subprocess.run(
        [sys.executable, "-m", "agentd.agent.entry", "echo"],
        input=b'{"type":"prompt","id":"p1","text":"plain"}\n',
        capture_output=True,
        env=agent_env(),
        timeout=30,
    )
    assert json.loads(cli.stdout.splitlines()[-1])["type"] == "done"
    broken = sessions.attach(options=("--agent-command", "'unbalanced {agent}"))
    assert broken.rest()[0]["code"] == "bad_request" and broken.process.wait(timeout=10) == 1


def test_the_patterns_are_agentds_own():
    from agentd import config, route

    assert names.PROJECT_RE.pattern == config.PROJECT_RE.pattern
    assert names.USER_RE.pattern == config.USER_RE.pattern
    assert names.AGENT_NAME_RE.pattern == config.AGENT_NAME_RE.pattern
    assert names.SESSION_ID_RE.pattern == route.SESSION_ID_RE.pattern
    assert names.LAST_SEQ_RE.pattern == route.LAST_SEQ_RE.pattern
    assert names.MAX_SEQ == route.MAX_SEQ


# -- nothing lost, nothing twice ----------------------------------------------------------


def test_a_detached_flood_pauses_the_agent_and_the_resume_gets_every_line(sessions: Sessions):
    bound = 256 * 1024
    options = ("--journal-max-bytes", str(bound), "--max-line", "16384")
    attach, hello = sessions.attached(options=options)
    attach.send({"type": "prompt", "id": "flood", "text": "word ", "options": {"repeat": 50_000}})
    ack = attach.read_until(lambda m: m["type"] == "ack")[-1]
    attach.detach()
    # Nobody confirms: the journal fills to its bound and the agent is paused there.
    sizes: list[int] = []

    def stopped_growing() -> bool:
        sizes.append(sessions.journal_bytes())
        time.sleep(0.05)
        return sizes[-1] > bound // 2 and sessions.journal_bytes() == sizes[-1]

    wait_for(stopped_growing, what="the journal to fill")
    ticks = cpu_ticks(hello["agentPid"])
    for _ in range(30):
        sizes.append(sessions.journal_bytes())
        time.sleep(0.01)
    assert sizes[-1] == sizes[-30], "the journal still grows"
    assert cpu_ticks(hello["agentPid"]) - ticks <= 1, "the agent is still working"
    assert bound - 64 * 1024 < sizes[-1] and max(sizes) <= bound
    assert is_holder(hello["holderPid"])
    # Back, confirming as it reads: every line arrives once, in order, the agent resumed.
    again, resumed = sessions.attached(after=ack["seq"], start=False)
    assert resumed["complete"] is True
    lines = []
    while not lines or lines[-1]["type"] != "done":
        line = again.read()
        if "seq" not in line:
            continue
        lines.append(line)
        if line["seq"] % 500 == 0:
            again.send({"type": "confirm", "seq": line["seq"]})
            sizes.append(sessions.journal_bytes())
    assert seqs(lines) == list(range(ack["seq"] + 1, ack["seq"] + 1 + len(lines)))
    assert text_of(lines) == "word " * 50_000
    assert max(sizes) <= bound


def test_a_client_that_confirms_streams_far_past_the_journals_bound(sessions: Sessions):
    bound = 4 << 20  # segments of 256 KiB: room is made a whole segment at a time
    options = ("--journal-max-bytes", str(bound), "--max-line", "65536")
    attach, _ = sessions.attached(options=options)
    attach.send({"type": "prompt", "id": "long", "text": "word ", "options": {"repeat": 150_000}})
    deltas = 0
    while (line := attach.read())["type"] != "done":
        if line["type"] == "delta":
            deltas += 1
            if deltas % 2000 == 0:
                attach.send({"type": "confirm", "seq": line["seq"]})
                assert sessions.journal_bytes() <= bound
    assert deltas == 150_000


def test_a_resume_from_before_the_trimmed_lines_is_incomplete(sessions: Sessions):
    options = ("--journal-max-bytes", str(128 * 1024), "--max-line", "16384")
    attach, _ = sessions.attached(options=options)
    lines = []
    for turn in range(4):
        lines += prompt(attach, f"p{turn}", "x " * 1000)
        attach.send({"type": "confirm", "seq": lines[-1]["seq"]})
    early, hello = sessions.attached(after=0, start=False)
    assert hello["complete"] is False and hello["lastSeq"] == lines[-1]["seq"]
    replay = early.read_until(lambda m: m["seq"] == lines[-1]["seq"])
    assert replay[0]["seq"] > 1 and seqs(replay) == list(
        range(replay[0]["seq"], hello["lastSeq"] + 1)
    )


# Answers each prompt after two seconds: the first line an agent writes can be that late.
SLOW_AGENT = """
import json, sys, time
for line in sys.stdin:
    prompt_id = json.loads(line)["id"]
    time.sleep(2)
    start = json.dumps({"type": "start", "id": prompt_id})
    done = json.dumps({"type": "done", "id": prompt_id})
    sys.stdout.write(start + "\\n" + done + "\\n")
    sys.stdout.flush()
"""


def test_the_ack_waits_for_the_agents_first_line_only_briefly(sessions: Sessions):
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(SLOW_AGENT)} {{agent}}"
    attach, _ = sessions.attached(options=("--agent-command", command))
    sent = time.monotonic()
    attach.send({"type": "prompt", "id": "p1", "text": "slow"})
    [ack] = attach.read_until(lambda m: m["type"] == "ack")
    acked = time.monotonic() - sent
    lines = attach.read_until(lambda m: m["type"] == "done")
    answered = time.monotonic() - sent
    assert ack == {"seq": 1, "type": "ack", "id": "p1"}
    assert acked < 1.0 <= answered  # well before the answer, which took two seconds
    assert [(m["seq"], m["type"]) for m in lines] == [(2, "start"), (3, "done")]


def test_a_prompt_is_forwarded_once_whoever_sends_it_again(sessions: Sessions):
    first, _ = sessions.attached()
    assert text_of(prompt(first, "p1", "once only")) == "once only"
    first.detach()
    second, _ = sessions.attached(after=0, start=False)
    second.send({"type": "prompt", "id": "p1", "text": "once only"})
    second.send({"type": "prompt", "id": "p2", "text": "then this"})
    lines = second.read_until(lambda m: m["type"] == "done" and m["id"] == "p2")
    duplicate = [m for m in lines if m["type"] == "ack" and m["id"] == "p1" and m.get("duplicate")]
    assert len(duplicate) == 1
    assert [m["id"] for m in lines if m["type"] == "start"] == ["p1", "p2"]  # p1's from the replay
    assert seqs(lines) == list(range(1, len(lines) + 1))


def test_usage_is_reported_on_every_attach_until_recorded(sessions: Sessions):
    attach, _ = sessions.attached()
    done = prompt(attach, "p1", "count me")[-1]
    attach.detach()
    again, _ = sessions.attached(after=done["seq"], start=False)
    pending = again.read()
    assert pending == {
        "type": "unrecorded",
        "id": "p1",
        "event": wire.usage_event_id(SESSION, "p1"),
        "outcome": "done",
        "usage": done["usage"],
        "timestamp": pending["timestamp"],
    }
    assert abs(pending["timestamp"] - time.time()) < 60
    again.send({"type": "recorded", "id": "p1"})
    again.send({"type": "emit", "message": {"type": "pong"}})  # a marker: recorded is handled
    assert again.read_until(lambda m: m["type"] == "pong")[-1]["seq"] == done["seq"] + 1
    again.detach()
    third, _ = sessions.attached(after=done["seq"] + 1, start=False)
    third.send({"type": "emit", "message": {"type": "pong"}})
    assert third.read()["type"] == "pong"  # no unrecorded line came first


def test_a_recorded_that_came_with_a_prompt_is_written_once_that_prompt_is_answered(
    sessions: Sessions,
):
    attach, hello = sessions.attached()
    prompt(attach, "p1", "count me")
    state = sessions.directory() / "state.jsonl"
    # As agentd sends it: with the next prompt, whose answer its write does not delay.
    slow = {"type": "prompt", "id": "p2", "text": "a b c", "options": {"delay_ms": 300}}
    attach.send(slow)
    attach.send({"type": "recorded", "id": "p1"})
    attach.send({"type": "emit", "message": {"type": "pong"}})  # a marker: recorded is handled
    attach.read_until(lambda m: m["type"] == "pong")
    assert b'"recorded"' not in state.read_bytes()
    attach.read_until(lambda m: m["type"] == "done" and m["id"] == "p2")
    wait_for(lambda: b'{"recorded":"p1"}' in state.read_bytes(), what="the recorded record")

    # A holder that dies before writing it offers that usage again (agentd records it once,
    # under the same event id).
    attach.send({**slow, "id": "p3"})
    attach.send({"type": "recorded", "id": "p2"})
    attach.send({"type": "emit", "message": {"type": "pong"}})
    attach.read_until(lambda m: m["type"] == "pong")
    served = kill_and_serve(sessions, attach, hello)
    assert [m["id"] for m in served if m["type"] == "unrecorded"] == ["p2"]


def test_the_usage_event_id_is_derived_from_session_and_query():
    one = wire.usage_event_id("s3ss10n-0123456789", "p1")
    assert one == wire.usage_event_id("s3ss10n-0123456789", "p1")
    assert one != wire.usage_event_id("s3ss10n-0123456789", "p2")
    assert one != wire.usage_event_id("s3ss10n-0123456780", "p1")
    assert one.startswith("h-") and len(one) == 66


def test_agentds_own_lines_are_numbered_and_journaled_with_the_agents(sessions: Sessions):
    attach, _ = sessions.attached()
    attach.send({"type": "emit", "message": {"type": "error", "code": "rate_limit", "seq": 99}})
    emitted = attach.read()
    assert emitted == {"seq": 1, "type": "error", "code": "rate_limit"}
    lines = prompt(attach, "p1", "next")
    assert seqs(lines)[0] == 2
    attach.detach()
    replay, _ = sessions.attached(after=0, start=False)
    assert replay.read_until(lambda m: True) == [emitted]


# -- lifetime -----------------------------------------------------------------------------


def test_a_killed_holder_leaves_its_journal_and_the_resume_learns_it(sessions: Sessions):
    attach, hello = sessions.attached()
    lines = prompt(attach, "p1", "before the crash")
    served = kill_and_serve(sessions, attach, hello, after=2)
    head, *numbered, tail = [m for m in served if m["type"] != "unrecorded"]
    assert head["type"] == "attached" and head["live"] is False and head["complete"] is True
    assert numbered[:-1] == lines[2:]
    assert numbered[-1]["code"] == "agent_exited" and numbered[-1]["seq"] == lines[-1]["seq"] + 1
    assert "session holder lost" in numbered[-1]["error"]
    assert tail == {"type": "ended", "reason": "session holder lost"}
    # Asked to, a new holder carries on: seq goes on, accepted prompts stay accepted.
    fresh, hello2 = sessions.attached(after=numbered[-1]["seq"], start=True)
    assert hello2["started"] is True and hello2["agentPid"] != hello["agentPid"]
    fresh.send({"type": "prompt", "id": "p1", "text": "before the crash"})
    ack = fresh.read_until(lambda m: m["type"] == "ack")[-1]
    assert ack == {"seq": numbered[-1]["seq"] + 1, "type": "ack", "id": "p1", "duplicate": True}


def test_usage_is_kept_before_its_done_is_seen_so_a_holder_killed_then_hands_it_over(
    sessions: Sessions,
):
    for query in ("p1", "p2", "p3"):
        attach, hello = sessions.attached(session=f"killed-{query}-0123456789")
        prompt(attach, query, "then the holder dies")  # killed at once, as the done arrived
        served = kill_and_serve(sessions, attach, hello, session=f"killed-{query}-0123456789")
        assert served[0]["type"] == "attached" and served[0]["live"] is False
        assert [m["id"] for m in served if m["type"] == "unrecorded"] == [query]


def test_a_lost_holders_unrecorded_usage_says_whose_keys_paid(sessions: Sessions):
    attach, hello = sessions.attached(env={"AGENTD_KEY_SOURCE": "user"})
    prompt(attach, "p1", "on my own key")
    # Whatever the agentd that serves the journal was started with.
    served = kill_and_serve(sessions, attach, hello, env={"AGENTD_KEY_SOURCE": "operator"})
    assert served[0]["type"] == "attached" and served[0]["keySource"] is None
    unrecorded = [m for m in served if m["type"] == "unrecorded"]
    assert [(m["id"], m["keySource"]) for m in unrecorded] == [("p1", "user")]


def test_a_holder_told_no_key_source_records_usage_without_one(sessions: Sessions):
    attach, _ = sessions.attached()
    done = prompt(attach, "p1", "whose?")[-1]
    attach.detach()
    again, _ = sessions.attached(after=done["seq"], start=False)
    pending = again.read()
    assert pending["type"] == "unrecorded" and "keySource" not in pending


def test_an_idle_session_ends_but_a_running_query_runs_to_its_end(sessions: Sessions):
    options = ("--idle-seconds", "0.3")
    attach, hello = sessions.attached(options=options)
    attach.send(
        {"type": "prompt", "id": "slow", "text": "a b c d e f", "options": {"delay_ms": 200}}
    )
    attach.read_until(lambda m: m["type"] == "start")
    attach.detach()
    time.sleep(0.6)  # idle time passed, but the query runs
    assert is_holder(hello["holderPid"])
    # Once the query ended and the idle time passed, the session ends; its usage is kept
    # for the next attach, nothing else.
    wait_for(lambda: not is_holder(hello["holderPid"]), what="the idle end")
    left = {p.name for p in sessions.directory().iterdir()}
    assert "sock" not in left and "state.jsonl" in left
    recorder, again = sessions.attached(after=0, start=False)
    assert again["live"] is False
    assert any(m["type"] == "unrecorded" and m["id"] == "slow" for m in recorder.rest())


def test_an_idle_session_with_nothing_owed_removes_its_directory(sessions: Sessions):
    attach, hello = sessions.attached(options=("--idle-seconds", "0.3"))
    prompt(attach, "p1", "quick")
    attach.send({"type": "recorded", "id": "p1"})
    attach.detach()
    wait_for(lambda: not is_holder(hello["holderPid"]), what="the idle end")
    wait_for(lambda: not sessions.directory().exists(), what="the directory to go")
    assert sessions.attach(start=False).rest() == [
        {"type": "error", "code": "no_session", "error": "no such session"}
    ]


def test_end_stops_the_agent_and_ends_the_session(sessions: Sessions):
    attach, hello = sessions.attached()
    attach.send(
        {"type": "prompt", "id": "long", "text": "x ", "options": {"repeat": 100, "delay_ms": 50}}
    )
    attach.read_until(lambda m: m["type"] == "delta")
    attach.send({"type": "end"})
    lines = attach.rest()
    done = next(m for m in lines if m["type"] == "done")
    assert done["aborted"] is True and done["usage"]["outputTokens"] >= 1
    exited = next(m for m in lines if m.get("code") == "agent_exited")
    assert exited["exitStatus"] == 0 and exited["seq"] == done["seq"] + 1
    assert lines[-1] == {"type": "ended", "reason": "ended by request"}
    wait_for(lambda: not is_holder(hello["holderPid"]), what="the holder to end")
    assert not alive(hello["agentPid"])


def test_ended_comes_after_every_line_even_to_an_attach_that_fell_behind(sessions: Sessions):
    argv = sessions.attach().process.args
    sessions.attaches[-1].kill()
    behind = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=agent_env(), cwd=REPO
    )
    assert behind.stdin is not None and behind.stdout is not None
    prompt = {
        "type": "prompt",
        "id": "big",
        "text": "x",
        "options": {"repeat": 20_000, "delta_bytes": 1000},
    }
    behind.stdin.write(json.dumps(prompt).encode() + b"\n")
    behind.stdin.flush()
    time.sleep(1.0)  # unread: megabytes wait in the journal
    behind.stdin.write(b'{"type":"end"}\n')
    behind.stdin.flush()
    lines = [json.loads(raw) for raw in behind.stdout]
    assert lines[-1] == {"type": "ended", "reason": "ended by request"}
    assert lines[-2]["code"] == "agent_exited" and lines[-3]["type"] == "done"
    assert seqs(lines) == list(range(1, len(seqs(lines)) + 1))


def test_an_agent_that_exits_is_reported_and_the_next_prompt_starts_another(sessions: Sessions):
    attach, hello = sessions.attached()
    attach.send({"type": "prompt", "id": "bye", "text": "x", "options": {"exit": 3}})
    exited = attach.read_until(lambda m: m.get("code") == "agent_exited")[-1]
    assert exited["exitStatus"] == 3 and "exited with 3" in exited["error"]
    lines = prompt(attach, "p2", "new agent")
    assert text_of(lines) == "new agent" and seqs(lines)[0] == exited["seq"] + 1
    attach.detach()
    _, hello2 = sessions.attached(after=lines[-1]["seq"], start=False)
    assert hello2["agentPid"] != hello["agentPid"] and hello2["holderPid"] == hello["holderPid"]


def test_an_exited_agent_ends_the_session_once_its_client_confirmed_that(sessions: Sessions):
    attach, hello = sessions.attached()  # the idle time is an hour
    attach.send({"type": "prompt", "id": "bye", "text": "x", "options": {"exit": 0}})
    exited = attach.read_until(lambda m: m.get("code") == "agent_exited")[-1]
    attach.send({"type": "recorded", "id": "bye"})
    time.sleep(0.3)
    assert is_holder(hello["holderPid"])  # still attached: the next prompt would restart it
    attach.send({"type": "confirm", "seq": exited["seq"]})
    attach.detach()
    wait_for(lambda: not is_holder(hello["holderPid"]), what="the holder to end")
    assert not sessions.directory().exists()


def test_a_stopped_holder_leaves_its_session_for_the_next_attach(sessions: Sessions):
    attach, hello = sessions.attached()
    lines = prompt(attach, "p1", "kept")
    os.kill(hello["holderPid"], signal.SIGTERM)  # a VM shutting down
    assert attach.rest()[-1] == {"type": "ended", "reason": "session holder stopped"}
    wait_for(lambda: not is_holder(hello["holderPid"]), what="the holder to stop")
    served = sessions.attach(after=lines[-1]["seq"], start=False).rest()
    exited = [m for m in served if m.get("code") == "agent_exited"]
    assert len(exited) == 1 and exited[0]["exitStatus"] == 0
    assert served[-1] == {"type": "ended", "reason": "session holder stopped"}


def test_a_starting_holder_removes_sessions_abandoned_long_ago(sessions: Sessions):
    sessions.base.mkdir(mode=0o700, parents=True)
    old, recent = sessions.base / "abandoned-0123456789", sessions.base / "recent-0123456789ab"
    for directory in (old, recent):
        (directory / "journal").mkdir(mode=0o700, parents=True)
        (directory / "state.jsonl").write_text('{"confirmed":0}\n')
    week_ago = time.time() - 7 * 86400
    for path in (old, old / "journal", old / "state.jsonl"):
        os.utime(path, (week_ago, week_ago))
    sessions.attached()
    wait_for(lambda: not old.exists(), what="the abandoned session to go")
    assert recent.exists()


# -- the files ----------------------------------------------------------------------------


def test_the_session_directory_and_its_files_are_private(sessions: Sessions):
    attach, _ = sessions.attached()
    prompt(attach, "p1", "private")
    paths = [sessions.base, *sessions.base.rglob("*")]
    assert len(paths) > 8
    for path in paths:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path}: {mode:o}"
        if path.is_dir():
            assert mode == 0o700, path
        elif path.is_file():
            assert mode == 0o600, path


def test_journaled_lines_are_in_the_file_within_100_ms(sessions: Sessions):
    attach, _ = sessions.attached()
    attach.send(
        {"type": "prompt", "id": "p1", "text": "a b c d e f g h", "options": {"delay_ms": 30}}
    )
    journal = sessions.directory() / "journal"
    for _ in range(8):
        line = attach.read_until(lambda m: m["type"] == "delta")[-1]
        marker = json.dumps(line["text"]).encode()

        def on_disk(marker: bytes = marker, seq: int = line["seq"]) -> bool:
            data = b"".join(f.read_bytes() for f in journal.iterdir())
            return b'{"seq":%d,' % seq in data and marker in data

        wait_for(on_disk, timeout=0.1, what="the line in the journal file")


def test_the_syncer_fsyncs_a_write_within_100_ms_and_batches_writes(tmp_path: Path):
    synced: list[tuple[int, float]] = []
    syncer = Syncer(fsync=lambda fd: synced.append((fd, time.monotonic())))
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        started = time.monotonic()
        for _ in range(1000):
            os.write(fd, b"x\n")
            syncer.dirty(fd)
        wait_for(lambda: synced, timeout=0.1, what="an fsync")
        assert synced[0][1] - started < 0.1
        time.sleep(0.1)
        assert len(synced) <= 2  # a thousand writes, one or two fsyncs
    finally:
        syncer.retire(fd)
        syncer.stop()


# -- the agent's pipes on their own -------------------------------------------------------


class _Events:
    """What an AgentChild reports, recorded."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.stderr: list[bytes] = []
        self.dropped: list[tuple[str, int]] = []

    def agent_lines(self, lines: list[bytes]) -> None:
        self.lines += lines

    def agent_stderr(self, lines: list[bytes]) -> None:
        self.stderr += lines

    def agent_changed(self) -> None:
        pass

    def agent_dropped(self, reason: str, size: int) -> None:
        self.dropped.append((reason, size))


def test_the_agents_lines_are_cut_whole_across_reads_and_overlong_ones_dropped(tmp_path: Path):
    # Each write is read on its own (the pauses), so lines and an overlong one span reads.
    script = (
        "import os, sys, time\n"
        "for part in sys.argv[1:]:\n"
        "    fd = 2 if part.startswith('!') else 1\n"
        "    os.write(fd, part.lstrip('!').encode().decode('unicode_escape').encode())\n"
        "    time.sleep(0.05)\n"
    )
    parts = [
        r'{"a":1}\n{"b":',
        r"2}\n",
        "x" * 1500,
        "x" * 600 + r'\n{"c":3}\n',
        r"!warn one\n\nwarn",
        r'{"d":4}',
    ]
    sel = selectors.DefaultSelector()
    events = _Events()
    child = AgentChild.start(
        [sys.executable, "-c", script, *parts], str(tmp_path), sel, 1024, Log("t"), "t", events
    )
    deadline = time.monotonic() + 10
    while not child.ended and time.monotonic() < deadline:
        for key, mask in sel.select(0.1):
            key.data(mask)
    assert child.ended
    child.release()
    assert events.lines == [b'{"a":1}\n', b'{"b":2}\n', b'{"c":3}\n', b'{"d":4}\n']
    assert events.dropped == [("overlong", 2100)]
    assert events.stderr == [b"warn one", b"warn"]
    sel.close()


# -- the journal on its own ---------------------------------------------------------------


def _lines(first: int, last: int) -> bytes:
    return b"".join(
        wire.numbered({"type": "delta", "text": f"t{n}"}, n) for n in range(first, last + 1)
    )


def test_the_journal_finds_any_seq_and_drops_a_torn_tail(tmp_path: Path):
    journal = Journal(str(tmp_path / "j"), 8192, 3600)
    for first in range(1, 600, 50):
        journal.append(_lines(first, first + 49), first, first + 49)
    assert len(journal.segments) > 3
    for after in (0, 1, 49, 50, 51, 333, 598, 599):
        position, complete = journal.locate(after)
        data, _ = journal.read(position, 100)
        assert complete and wire.seq_of(data) == after + 1
    assert journal.at_end(journal.locate(650)[0])
    journal.close()
    last = sorted((tmp_path / "j").iterdir())[-1]
    with open(last, "ab") as f:
        f.write(b'{"seq":601,"type":"del')  # a crash in mid-write
    reopened = Journal(str(tmp_path / "j"), 8192, 3600)
    assert reopened.last_seq == 600 and last.read_bytes().endswith(b"}\n")
    reopened.close()


def test_the_journal_deletes_only_confirmed_segments(tmp_path: Path):
    journal = Journal(str(tmp_path / "j"), 8192, 3600)
    for first in range(1, 600, 50):
        journal.append(_lines(first, first + 49), first, first + 49)
    total = journal.total
    journal.trim(confirmed=0, keep=None, need=1 << 20)
    assert journal.total == total and journal.first_seq == 1
    journal.trim(confirmed=300, keep=None, need=1 << 20)
    assert 1 < journal.first_seq <= 301 and journal.locate(300)[1] is True
    journal.trim(confirmed=600, keep=Position(journal.first_seq, 0), need=1 << 20)
    assert journal.first_seq <= 301  # an attach still reads from there
    journal.close()


def test_the_attach_path_imports_neither_asyncio_nor_the_journal_nor_twisted() -> None:
    # An attach is started for every connection agentd makes: its start-up is latency.
    probe = (
        "import sys\n"
        "sys.argv = ['agentd-agent', 'attach', '--help']\n"
        "from agentd.agent import entry\n"
        "try:\n"
        "    entry.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('asyncio', 'twisted', 'agentd.agent.holder.journal')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, env=agent_env()
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_the_holder_says_whose_keys_its_agent_runs_with_to_every_attach(sessions: Sessions):
    first, hello = sessions.attached(env={"AGENTD_KEY_SOURCE": "user"})
    assert hello["keySource"] == "user"
    first.kill()
    # A later attach, from any agentd, whatever its own environment says.
    _, again = sessions.attached(start=False, env={"AGENTD_KEY_SOURCE": "operator"})
    assert again["keySource"] == "user"
    _, other = sessions.attached(session="other-session-0123456789")
    assert other["keySource"] is None
