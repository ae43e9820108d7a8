"""Every live session of this agentd process: lookup, takeover, gauges and shutdown."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from agentd import metrics
from agentd.session.services import Client, SessionServices
from agentd.session.session import Session, SessionKey


class SessionRegistry:
    """Every live session of this agentd process, by id and by (project, user, agent)."""

    def __init__(self, services: SessionServices) -> None:
        self.services = services
        self.by_id: dict[str, Session] = {}
        self.by_key: dict[SessionKey, Session] = {}
        self._per_user: dict[str, int] = {}
        self._ending: dict[Session, Deferred[None]] = {}
        self.draining = False

    def sessions_of(self, user: str) -> int:
        return self._per_user.get(user, 0)

    def open(
        self, key: SessionKey, client: Client, session_id: str | None, last_seq: int
    ) -> Session:
        if session_id:
            existing = self.by_id.get(session_id)
            if existing is not None and existing.key == key and not existing.ended:
                metrics.SESSION_EVENTS.labels("resumed").inc()
                existing.attach(client, last_seq, resumed=True)
                return existing
        previous = self.by_key.get(key)
        if previous is not None:
            previous.end("replaced")
        session = Session(self, key, self.services)
        self.by_id[session.id] = session
        self.by_key[key] = session
        self._per_user[key.user] = self._per_user.get(key.user, 0) + 1
        metrics.SESSION_EVENTS.labels("created").inc()
        session.attach(client, 0, resumed=False)
        return session

    def forget(self, session: Session) -> None:
        if self.by_id.pop(session.id, None) is None:
            return
        if self.by_key.get(session.key) is session:
            del self.by_key[session.key]
        left = self._per_user.get(session.key.user, 1) - 1
        if left:
            self._per_user[session.key.user] = left
        else:
            self._per_user.pop(session.key.user, None)
        if session.process is not None:
            self._ending[session] = Deferred()
        self.update_gauges()

    def process_ended(self, session: Session) -> None:
        waiting = self._ending.pop(session, None)
        if waiting is not None:
            waiting.callback(None)

    def update_gauges(self) -> None:
        attached = sum(1 for s in self.by_id.values() if s.client is not None)
        metrics.SESSIONS.labels("attached").set(attached)
        metrics.SESSIONS.labels("detached").set(len(self.by_id) - attached)

    def busy(self) -> int:
        """Queries in flight across all sessions."""
        return sum(len(s.queries) for s in self.by_id.values())

    def close_all(self, code: int, reason: str) -> None:
        """Shutdown: close every client; sessions stay until ``end_all``."""
        self.draining = True
        for session in list(self.by_id.values()):
            if session.client is not None:
                session.client.close(code, reason)

    def end_all(self) -> Deferred[Any]:
        """End every session; fires when their agent processes have exited."""
        for session in list(self.by_id.values()):
            session.end("shutdown")
        return defer.DeferredList(list(self._ending.values()))
