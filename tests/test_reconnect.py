"""Reconnection end to end: drops mid-stream, resume by seq, nothing lost or repeated."""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted

from tests.harness import merge, ssh_config, token
from tests.servers import holder_pids
from tests.waiting import eventually
from tests.wsclient import WsClient, connect

# Messages that end a query.
ENDS = ("done", "error")


class ResumingReader:
    """What agent-client.js does: remember session and last seq, skip duplicates."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self.session: str | None = None
        self.last_seq = 0
        self.messages: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self.client: WsClient | None = None

    async def connect(self) -> None:
        params: dict[str, Any] = {"token": token()}
        if self.session:
            params.update(session=self.session, last_seq=self.last_seq)
        self.client = await connect(self.gateway.ws_url(**params))
        hello = await self.client.recv()
        assert hello["type"] == "session"
        if self.session:
            self.resumes.append(hello)
        self.session = hello["session"]

    async def read(self, count: int) -> bool:
        """Read up to ``count`` messages; False if the connection had closed first.

        A live connection that stays silent fails the test: the answer stalled.
        """
        assert self.client is not None
        for _ in range(count):
            if self.client.closed.called and self.client.queue.pending == []:
                return False
            message = await self.client.recv()
            if message["seq"] <= self.last_seq:
                continue
            assert message["seq"] == self.last_seq + 1, "a gap in seq"
            self.last_seq = message["seq"]
            self.messages.append(message)
            if message["type"] == "done":
                return True
        return True

    def done(self) -> bool:
        return bool(self.messages) and self.messages[-1]["type"] == "done"


@pytest_twisted.ensureDeferred
async def test_long_answer_survives_repeated_drops_with_every_seq_exactly_once(
    tmp_path, sshd, agentd
):
    gateway = agentd(merge(ssh_config(tmp_path, sshd), sessions={"grace_seconds": 30.0}))
    reader = ResumingReader(gateway)
    await reader.connect()
    words = [f"w{i}" for i in range(250)]
    text = " ".join(words)
    # 250 words x 48 = 12,000 deltas, paced so the answer is still streaming across drops.
    reader.client.send(
        {
            "type": "prompt",
            "id": "long",
            "text": text,
            "options": {"repeat": 48, "delay_ms": 0.05},
        }
    )
    drops = 0
    while not reader.done():
        await reader.read(1500)
        if reader.done():
            break
        if drops % 2 == 0:
            reader.client.close()  # the browser goes away politely
        else:
            session = gateway.registry.by_id[reader.session]
            session.client.transport.abortConnection()  # the network dies under agentd
        await reader.client.closed
        drops += 1
        await reader.connect()
    assert drops >= 4, "the answer finished before the drops were exercised"
    seqs = [m["seq"] for m in reader.messages]
    assert seqs == list(range(1, len(seqs) + 1))
    deltas = [m["text"] for m in reader.messages if m["type"] == "delta"]
    assert len(deltas) == 250 * 48
    assert "".join(deltas) == text * 48
    assert [m["type"] for m in reader.messages].count("ack") == 1
    assert all(r["resumed"] and r["complete"] for r in reader.resumes)


@pytest_twisted.ensureDeferred
async def test_unacknowledged_prompt_resent_after_resume_is_forwarded_once(tmp_path, sshd, agentd):
    gateway = agentd(merge(ssh_config(tmp_path, sshd), sessions={"grace_seconds": 30.0}))
    reader = ResumingReader(gateway)
    await reader.connect()
    reader.client.send({"type": "prompt", "id": "once", "text": "only once please"})
    reader.client.close()  # gone before the ack was read
    await reader.client.closed
    await reader.connect()
    reader.client.send({"type": "prompt", "id": "once", "text": "only once please"})
    while not reader.done():
        assert await reader.read(50)
    # The agent answers its input in order, so anything a second forward of "once" caused
    # (a second answer, or a busy error) reaches the client before the answer to this.
    reader.client.send({"type": "prompt", "id": "after", "text": "barrier"})
    while not (reader.messages[-1].get("id") == "after" and reader.messages[-1]["type"] in ENDS):
        assert await reader.read(1)
    assert reader.messages[-1]["type"] == "done", reader.messages[-1]
    once = [m for m in reader.messages if m.get("id") == "once"]
    kinds = [m["type"] for m in once]
    assert kinds.count("done") == 1 and kinds.count("start") == 1 and "error" not in kinds
    # The resend either found the prompt still being admitted (one ack) or already
    # accepted (acknowledged again as a duplicate); either way it ran once.
    acks = [m for m in once if m["type"] == "ack"]
    assert all(a["id"] == "once" for a in acks) and 1 <= len(acks) <= 2
    assert all(a.get("duplicate") for a in acks[1:])


@pytest_twisted.ensureDeferred
async def test_the_agent_outlives_the_grace_period_and_a_later_resume_gets_everything(
    tmp_path, sshd, agentd
):
    gateway = agentd(merge(ssh_config(tmp_path, sshd), sessions={"grace_seconds": 1.0}))
    reader = ResumingReader(gateway)
    await reader.connect()
    reader.client.send(
        {
            "type": "prompt",
            "id": "p",
            "text": "a b c d",
            "options": {"repeat": 100, "delay_ms": 5},
        }
    )
    await reader.read(2)
    reader.client.close()
    await reader.client.closed
    session = gateway.registry.by_id[reader.session]
    at_detach = session.seq
    await eventually(lambda: session.seq > at_detach + 5, what="agent output while detached")
    await reader.connect()  # within grace: resumed from memory, the agent went on meanwhile
    assert reader.resumes[-1]["resumed"] is True
    assert reader.resumes[-1]["lastSeq"] > at_detach + 5
    assert await reader.read(5)
    closing = time.monotonic()
    reader.client.close()
    await reader.client.closed
    await eventually(lambda: not gateway.registry.by_id, what="letting go after the grace period")
    # The grace timer starts when agentd sees the close, which is after ``closing``.
    assert time.monotonic() - closing >= 1.0, "agentd let go before the grace period"
    # Let go of, not ended: the holder keeps the agent, which finishes its answer.
    holders = holder_pids(tmp_path / "sessions")
    assert len(holders) == 1
    await reader.connect()
    assert reader.resumes[-1]["resumed"] is True
    while not reader.done():
        assert await reader.read(100)
    text = "".join(m.get("text", "") for m in reader.messages if m["type"] == "delta")
    assert text == "a b c d" * 100
    assert holder_pids(tmp_path / "sessions") == holders


@pytest_twisted.ensureDeferred
async def test_second_connection_to_a_session_supersedes_the_first_with_4001(tmp_path, agentd):
    from tests.harness import base_config

    gateway = agentd(merge(base_config(tmp_path), sessions={"grace_seconds": 30.0}))
    first = ResumingReader(gateway)
    await first.connect()
    second = ResumingReader(gateway)
    second.session = first.session
    await second.connect()
    code, _ = await first.client.closed
    assert code == 4001
    assert second.resumes[-1]["resumed"] is True
