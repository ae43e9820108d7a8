"""Every session this agentd process relays: lookup, resume, takeover, gauges and shutdown."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from agentd import metrics
from agentd.session.services import Client, SessionServices
from agentd.session.session import TRY_AGAIN_LATER, Session, SessionKey


class SessionRegistry:
    """Every session this process relays, by id and by (project, user, agent)."""

    def __init__(self, services: SessionServices) -> None:
        self.services = services
        self.by_id: dict[str, Session] = {}
        self.by_key: dict[SessionKey, Session] = {}
        self._per_user: dict[str, int] = {}
        self.draining = False

    def sessions_of(self, user: str) -> int:
        return self._per_user.get(user, 0)

    def open(
        self, key: SessionKey, client: Client, session_id: str | None, last_seq: int
    ) -> Deferred[Session | None]:
        """The client's session, once its hello is sent: the one it resumes, wherever it was
        started, or a fresh one. None when the client was closed instead."""
        if session_id:
            existing = self.by_id.get(session_id)
            if existing is not None and existing.key == key and not existing.ended:
                metrics.SESSION_EVENTS.labels("resumed").inc()
                served = existing.attach(client, last_seq, resumed=True)
                return served.addCallback(lambda ok: existing if ok else None)
            if existing is None:
                return self._resume_elsewhere(key, client, session_id, last_seq)
        return defer.succeed(self._fresh(key, client))

    def _resume_elsewhere(
        self, key: SessionKey, client: Client, session_id: str, last_seq: int
    ) -> Deferred[Session | None]:
        """A session this instance does not relay: its holder on the VM may have it."""
        session = Session(self, key, self.services, session_id=session_id, after=last_seq)
        self._add(session)

        def resumed(outcome: str) -> Session | None:
            if outcome == "resumed":
                metrics.SESSION_EVENTS.labels("resumed").inc()
                return session
            session.abandon()
            if outcome == "unreachable":
                client.close(TRY_AGAIN_LATER, "the project VM is unavailable; try again")
                return None
            # Unknown to the holder, or someone else's: a fresh session, revealing nothing.
            return self._fresh(key, client)

        return session.resume_remote(client).addCallback(resumed)

    def _fresh(self, key: SessionKey, client: Client) -> Session:
        previous = self.by_key.get(key)
        if previous is not None:
            previous.end("replaced")
        session = Session(self, key, self.services)
        self._add(session)
        metrics.SESSION_EVENTS.labels("created").inc()
        session.attach(client, 0, resumed=False)
        return session

    def _add(self, session: Session) -> None:
        key = session.key
        self.by_id[session.id] = session
        self.by_key[key] = session
        self._per_user[key.user] = self._per_user.get(key.user, 0) + 1

    def forget(self, session: Session) -> None:
        if self.by_id.get(session.id) is not session:
            return
        del self.by_id[session.id]
        if self.by_key.get(session.key) is session:
            del self.by_key[session.key]
        left = self._per_user.get(session.key.user, 1) - 1
        if left:
            self._per_user[session.key.user] = left
        else:
            self._per_user.pop(session.key.user, None)
        self.update_gauges()

    def update_gauges(self) -> None:
        attached = sum(1 for s in self.by_id.values() if s.client is not None)
        metrics.SESSIONS.labels("attached").set(attached)
        metrics.SESSIONS.labels("detached").set(len(self.by_id) - attached)

    def busy(self) -> int:
        """Queries in flight across all sessions."""
        return sum(len(s.queries) for s in self.by_id.values())

    def close_all(self, code: int, reason: str) -> None:
        """Shutdown: close every client; sessions stay until ``leave_all``."""
        self.draining = True
        for session in list(self.by_id.values()):
            if session.client is not None:
                session.client.close(code, reason)

    def leave_all(self) -> Deferred[Any]:
        """Let go of every session; their agents run on, for another instance to resume.
        Fires when every attach has exited."""
        gone = [session.left() for session in list(self.by_id.values())]
        for session in list(self.by_id.values()):
            session.leave("shutdown")
        return defer.DeferredList(gone, consumeErrors=True)
