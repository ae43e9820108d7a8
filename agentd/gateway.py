"""The WebSocket protocol: parse and dispatch each client message, and apply backpressure.

A connection arrives here admitted, with its ``ConnectionContext`` (agentd/route.py). The
protocol stays thin: it validates each client message and hands it to the session, and it
turns the WebSocket transport's backpressure into pauses of both the agent and the client, so
that what agentd queues for one client stays bounded.
"""

from __future__ import annotations

from typing import Any

import orjson
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from agentd import metrics
from agentd.api import JSONTooDeep, parse_json
from agentd.directwrite import write_now
from agentd.errors import ErrorCode
from agentd.route import MAX_SEQ, ConnectionContext
from agentd.session.registry import SessionRegistry
from agentd.session.session import Session, SessionKey

_log = Logger()

_OPEN = WebSocketServerProtocol.STATE_OPEN
# A server's frame for one whole text message, unmasked and uncompressed (agentd refuses
# compression): two header bytes below 126 bytes of payload, then 16- or 64-bit lengths.
# Written straight to the transport, it costs a fraction of autobahn's general sendMessage.
_SHORT_TEXT_HEADERS = [bytes((0x81, size)) for size in range(126)]
# Ids the client chooses and agentd echoes: bounded, so an echo costs what its request did.
PROMPT_ID_MAX = 256  # the agent CLI's limit too (agentd/agent/protocol.py)
PING_ID_MAX = 256
# Prompts one connection may have waiting for their rate-limit and budget decisions and the
# agent's start; past it agentd reads no more of that client until they are settled.
PROMPTS_WAITING_MAX = 8
# A prompt's ``options``, the one object agentd passes on to the agent, as encoded JSON.
PROMPT_OPTIONS_MAX_BYTES = 4096


@implementer(IPushProducer)
class _Backpressure:
    """The WebSocket transport's producer: it tells the connection when the bytes queued for
    the client pass the transport's buffer size, and when they have all reached the kernel."""

    def __init__(self, protocol: AgentWebSocket) -> None:
        self._protocol: AgentWebSocket | None = protocol

    def pauseProducing(self) -> None:
        if self._protocol is not None:
            self._protocol.hold()

    def resumeProducing(self) -> None:
        if self._protocol is not None:
            self._protocol.release()

    def stopProducing(self) -> None:
        # The transport is gone; a TLS transport keeps its producer, which must not keep us.
        self._protocol = None


class AgentWebSocket(WebSocketServerProtocol):
    context: ConnectionContext
    factory: AgentWebSocketFactory
    # autobahn's, from the factory's options (0: no limit).
    maxMessagePayloadSize: int
    session: Session | None = None
    # The twisted.web request this connection was upgraded from; see connectionLost.
    upgraded_from: Request | None = None
    # True while the bytes queued for the client are over the transport's buffer size:
    # then neither the agent nor the client may add to them.
    held = False
    # True while PROMPTS_WAITING_MAX prompts wait: the client's input waits with them.
    input_held = False
    _reading_stopped = False
    _counted = False

    def onOpen(self) -> None:
        ctx = self.context
        transport: Any = self.transport
        # twisted.web registered its HTTP channel as the producer; the socket is ours now.
        transport.unregisterProducer()
        transport.registerProducer(_Backpressure(self), True)
        key = SessionKey(ctx.project, ctx.principal.user, ctx.agent)
        metrics.ACTIVE_CONNECTIONS.labels(ctx.agent).inc()
        self._counted = True
        # A resume may first attach to the session's holder: the client's messages wait
        # for the hello, which is always the first message it gets.
        opened = self.factory.registry.open(key, self, ctx.session_id, ctx.last_seq)
        opened.addCallbacks(self._opened, self._not_opened)
        if not opened.called:
            settled: Deferred[None] = Deferred()
            opened.addBoth(lambda _: settled.callback(None))
            self._hold_input(settled)

    def _opened(self, session: Session | None) -> None:
        if session is None:
            return  # the registry closed this connection instead
        if self.state != _OPEN:
            session.detach(self)  # the client left while its session was found
            return
        self.session = session
        if self.held:  # the hello and the replay filled the queue already
            session.pause_output()

    def _not_opened(self, failure: Failure) -> None:
        _log.failure("cannot open session", failure, project=self.context.project)
        self.close(1011, "internal error")

    def hold(self) -> None:
        """Stop adding to the client's queue: pause the agent, answer the client no more."""
        if self.held:
            return  # the transport asks again on every write past its limit
        self.held = True
        if self.session is not None:
            self.session.pause_output()

    def release(self) -> None:
        """The client's queue has drained: answer what it sent meanwhile, then read on."""
        if not self.held:
            return
        self.held = False
        if self.session is not None:
            self.session.resume_output()
        self._read_on()

    def _hold_input(self, until: Deferred[None]) -> None:
        """Handle none of the client's messages until ``until`` fires."""
        self.input_held = True
        until.addCallback(self._release_input)

    def _release_input(self, _: object = None) -> None:
        self.input_held = False
        if self.state == _OPEN:
            self._read_on()

    def _read_on(self) -> None:
        """Handle what the client sent while held, then read its socket again."""
        if self.held or self.input_held:
            return
        self.consumeData()
        if not (self.held or self.input_held) and self._reading_stopped:
            self._reading_stopped = False
            transport: Any = self.transport
            transport.resumeProducing()

    def processData(self) -> bool:
        # autobahn parses every frame of a read before it returns to the reactor; while the
        # client's queue is full, the rest of the read waits in autobahn's buffer instead of
        # being answered (a read of small requests would otherwise queue many times its size).
        return not (self.held or self.input_held) and super().processData()

    def dataReceived(self, data: bytes) -> None:
        if (
            self.state == _OPEN
            and not self.data
            and self.current_frame is None
            and not self.inside_message
        ):
            data = self._whole_text_messages(data)
            if not data:
                return
        # autobahn's Twisted adapter only logs the read at debug level and hands it on, but
        # formats that line's arguments on every read, debug or not: hand it on directly.
        self._dataReceived(data)
        # Reading stops when the client sends while its queue is full rather than in hold():
        # a streaming answer, during which the client sends nothing, then pauses without
        # the two system calls of stopping and restarting the read.
        if (self.held or self.input_held) and not self._reading_stopped:
            self._reading_stopped = True
            transport: Any = self.transport
            transport.pauseProducing()

    def _whole_text_messages(self, data: bytes) -> bytes:
        """Hand on each message at the start of ``data`` that is one whole masked text frame
        of valid UTF-8 (every prompt and ping a browser sends), and return the rest for
        autobahn's parser.

        For such a frame this is what autobahn does, at a fraction of its cost per frame.
        Whatever else comes (a control frame, a fragment, a frame cut by the read, a 64-bit
        length, bad UTF-8, an oversized or unmasked frame), from there on, goes through
        autobahn, which handles or refuses it as always. It stops, too, when the connection
        stops taking messages (held, or closing), leaving the rest in autobahn's buffer. The
        caller only calls it with autobahn between frames and messages: nothing buffered, no
        frame begun, no fragmented message open.
        """
        at, size_limit = 0, self.maxMessagePayloadSize
        while len(data) - at > 5 and data[at] == 0x81 and self.state == _OPEN:
            if self.held or self.input_held:
                break
            size = data[at + 1] ^ 0x80  # 128 and up: the mask bit is not set
            start = at + 6
            if size == 126:
                size = int.from_bytes(data[at + 2 : at + 4])
                start = at + 8
                if size < 126:
                    break  # a length not in its shortest form: autobahn refuses it
            elif size > 125:
                break
            end = start + size
            if end > len(data) or (size_limit and size > size_limit):
                break
            payload = data[start:end]
            if size:
                mask = data[start - 4 : start] * (size // 4 + 1)
                payload = (int.from_bytes(payload) ^ int.from_bytes(mask[:size])).to_bytes(size)
            try:
                payload.decode()
            except UnicodeDecodeError:
                break
            at = end
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            self.onMessage(payload, False)
        return data[at:] if at else data

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None:
            return
        try:
            self._dispatch(session, payload, isBinary)
        except Exception:
            _log.failure("failed to handle a client message", session=session.id[:8])
            session.error(ErrorCode.INTERNAL, "internal error")

    def _dispatch(self, session: Session, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            session.error(ErrorCode.BAD_REQUEST, "messages must be JSON text")
            return
        try:
            message = parse_json(payload)
        except JSONTooDeep as e:
            session.error(ErrorCode.BAD_REQUEST, f"message {e}")
            return
        except ValueError:
            session.error(ErrorCode.BAD_REQUEST, "message is not valid JSON")
            return
        if type(message) is not dict:
            session.error(ErrorCode.BAD_REQUEST, "message must be a JSON object")
            return
        kind = message.get("type")
        if kind == "prompt":
            prompt_id, text = message.get("id"), message.get("text")
            options = message.get("options")
            if not isinstance(prompt_id, str) or not 0 < len(prompt_id) <= PROMPT_ID_MAX:
                session.error(
                    ErrorCode.BAD_REQUEST, f"prompt needs an id: a string of 1 to {PROMPT_ID_MAX}"
                )
            elif not isinstance(text, str):
                session.error(ErrorCode.BAD_REQUEST, "prompt needs a text string", id=prompt_id)
            elif options is not None and type(options) is not dict:
                session.error(ErrorCode.BAD_REQUEST, "options must be an object", id=prompt_id)
            elif options and len(orjson.dumps(options)) > PROMPT_OPTIONS_MAX_BYTES:
                session.error(
                    ErrorCode.BAD_REQUEST,
                    f"options must be at most {PROMPT_OPTIONS_MAX_BYTES} bytes of JSON",
                    id=prompt_id,
                )
            else:
                # Only the documented fields reach the agent; anything else a client adds stays.
                session.prompt(prompt_id, text, options or None)
                if session.prompts_waiting >= PROMPTS_WAITING_MAX:
                    self._hold_input(session.prompts_settled())
        elif kind == "abort":
            session.abort()
        elif kind == "ping":
            pong: dict[str, Any] = {"type": "pong"}
            if "id" in message:
                ping_id = message["id"]
                if not _echoable_ping_id(ping_id):
                    session.error(
                        ErrorCode.BAD_REQUEST,
                        f"a ping id is a string of at most {PING_ID_MAX} characters or an integer",
                    )
                    return
                pong["id"] = ping_id
            session.notify(pong)
        elif kind == "confirm":
            seq = message.get("seq")
            if type(seq) is not int or not 0 <= seq <= session.sent:
                session.error(ErrorCode.BAD_REQUEST, "confirm needs the seq of a message it got")
            else:
                session.confirm(seq)
        elif isinstance(kind, str):
            session.error(ErrorCode.BAD_REQUEST, "unknown message type")
        else:
            session.error(ErrorCode.BAD_REQUEST, "message needs a string type")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._uncount()
        session, self.session = self.session, None
        if session is not None:
            session.detach(self)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            metrics.ACTIVE_CONNECTIONS.labels(self.context.agent).dec()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        # Let go of what would keep this connection, its transport and the bytes the client
        # never read alive once it is closed, until a full garbage collection or a timer:
        # autobahn resolves is_closed with the protocol itself, a cycle;
        self.is_closed.addCallback(lambda _: None)
        # a closing handshake the client never answered leaves its timeout in the reactor;
        call, self.closeHandshakeTimeoutCall = self.closeHandshakeTimeoutCall, None
        if call is not None:
            call.cancel()
        # and twisted.web's request and channel hold each other and the transport; its
        # channel would have told the request of the lost connection had it kept the socket.
        request, self.upgraded_from = self.upgraded_from, None
        if request is not None and request.channel is not None:
            request.channel.connectionLost(reason)  # type: ignore[no-untyped-call]  # Twisted's

    # The session's view of this connection.
    def send_frame(self, frame: bytes) -> None:
        if self.state == _OPEN:
            write_now(self.transport, _framed(frame))

    def send_frames(self, frames: list[bytes]) -> None:
        """Several frames in one write: a read of the agent's output costs one system call
        to the client, not one a line."""
        if self.state == _OPEN:
            write_now(self.transport, b"".join(map(_framed, frames)))

    def close(self, code: int, reason: str) -> None:
        self._uncount()
        session, self.session = self.session, None
        if session is not None:
            session.detach(self)
        # sendClose only allows 1000 and 3000-4999; 1001 (going away) and 1011 (server
        # error) are the standard codes for what agentd means.
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:120], isReply=False)


def _framed(frame: bytes) -> bytes:
    """``frame`` as one unmasked text frame. Written directly (and at once when nothing waits
    before it): autobahn's sendMessage costs more than the relay itself, and would refuse a
    line that fills max_message_bytes once its seq is added (its payload limit applies to
    what it sends too). While the connection is closing nothing is sent: the session's
    replay log keeps the frames for a resume."""
    size = len(frame)
    if size < 126:
        return _SHORT_TEXT_HEADERS[size] + frame
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + frame
    return b"\x81\x7f" + size.to_bytes(8, "big") + frame


class AgentWebSocketFactory(WebSocketServerFactory):
    # Twisted's Factory types ``protocol`` and ``buildProtocol`` for any protocol with a
    # factory attribute; this factory builds AgentWebSocket only.
    protocol = AgentWebSocket  # type: ignore[assignment]

    def __init__(
        self, registry: SessionRegistry, max_message_bytes: int, auto_ping_seconds: float
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in autobahn
        self.registry = registry
        self._next: tuple[ConnectionContext, Request] | None = None
        self._websocket = WebSocketResource(self)  # type: ignore[no-untyped-call]  # unannotated in autobahn
        self.setProtocolOptions(  # type: ignore[no-untyped-call]  # unannotated in autobahn
            maxFramePayloadSize=max_message_bytes,
            maxMessagePayloadSize=max_message_bytes,
            autoPingInterval=auto_ping_seconds,
            autoPingTimeout=max(auto_ping_seconds, 5.0) if auto_ping_seconds else 0,
            openHandshakeTimeout=10,
            failByDrop=False,
            closeHandshakeTimeout=5,
            perMessageCompressionAccept=lambda offers: None,
        )

    def buildProtocol(self, addr: Any) -> AgentWebSocket:  # type: ignore[override]
        protocol: AgentWebSocket = super().buildProtocol(addr)  # type: ignore[assignment]
        assert self._next is not None
        (protocol.context, protocol.upgraded_from), self._next = self._next, None
        return protocol

    def upgrade(self, request: Request, ctx: ConnectionContext) -> None:
        """Upgrade an admitted request to this factory's protocol, with its context."""
        # WebSocketResource.render builds the protocol synchronously, through buildProtocol.
        self._next = (ctx, request)
        self._websocket.render(request)  # type: ignore[no-untyped-call]  # unannotated in autobahn


def _echoable_ping_id(value: Any) -> bool:
    if type(value) is str:
        return len(value) <= PING_ID_MAX
    return type(value) is int and -MAX_SEQ <= value <= MAX_SEQ
