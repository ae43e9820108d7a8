"""The one Site: the agent WebSocket route, health, metrics, the HTTP API and static files."""

from __future__ import annotations

from importlib import resources

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.web import http
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from agentd.clientaddr import IPAddress, parse_address
from agentd.edge import ConnectionLimits, GuardedChannel
from agentd.refusal import NOT_FOUND, Refused, RefusedResource
from agentd.webrequest import WebRequest

_log = Logger()


MAX_REQUEST_BODY = 64 * 1024


class BoundedRequest(Request):
    """A request with a bounded body, from the client the trusted proxies name.

    Bodies over ``MAX_REQUEST_BODY`` are refused as they arrive; twisted.web would otherwise
    buffer any size before a resource sees it.
    """

    _body_bytes = 0
    _refused = False
    _resolved: tuple[IAddress, IPAddress | None] | None = None

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse()
        super().gotLength(length)  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._body_bytes > MAX_REQUEST_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def _refuse(self) -> None:
        if not self._refused:
            self._refused = True
            transport = self.channel.transport
            if transport is None:
                return
            transport.write(_TOO_LARGE.response())
            transport.loseConnection()

    def getClientAddress(self) -> IAddress:
        """The client a trusted proxy names, else the TCP peer."""
        return self._client()[0]

    def _client(self) -> tuple[IAddress, IPAddress | None]:
        if self._resolved is None:
            peer: IAddress = super().getClientAddress()  # type: ignore[no-untyped-call]  # unannotated in Twisted
            channel = self.channel
            if not (isinstance(channel, GuardedChannel) and channel.behind_proxy):
                self._resolved = (peer, None)
                return self._resolved
            client = channel.limits.addresses.resolve(peer, self.requestHeaders)
            address = peer
            if client is not None and client != parse_address(getattr(peer, "host", "")):
                kind = IPv4Address if client.version == 4 else IPv6Address
                address = kind("TCP", str(client), 0)
            self._resolved = (address, client)
        return self._resolved

    def process(self) -> None:
        channel = self.channel
        if (
            isinstance(channel, GuardedChannel)
            and channel.behind_proxy
            and not channel.limits.attribute(channel, self._client()[1])
        ):
            # One client behind a trusted proxy holds too many connections: answer this
            # request and close its connection.
            self.site = channel.site
            channel.persistent = False
            answer: WebRequest = self
            answer.setHeader(b"connection", b"close")
            self.render(_TOO_MANY_CONNECTIONS)
            return
        super().process()  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def render(self, resrc: IResource) -> None:
        super().render(_MethodsRefusedAsJSON(resrc))  # type: ignore[no-untyped-call]  # unannotated in Twisted


class _MethodsRefusedAsJSON:
    """A resource whose unsupported methods are refused with 405 in the one shape.

    Twisted would answer with an HTML page, and with 501 for a method other than GET, HEAD
    and POST.
    """

    def __init__(self, resource: IResource) -> None:
        self._resource = resource

    def render(self, request: Request) -> bytes | int:
        try:
            rendered: bytes | int = self._resource.render(request)  # type: ignore[no-untyped-call]  # unannotated in Twisted
        except UnsupportedMethod as e:
            allowed: list[bytes] = list(e.allowedMethods)
            if b"GET" in allowed:
                if request.method == b"HEAD":
                    raise  # Twisted answers HEAD with the headers of a GET.
                allowed.append(b"HEAD")
            methods = b", ".join(dict.fromkeys(allowed))
            refused = Refused(405, f"use {methods.decode('ascii')}", (b"allow", methods))
            answer: WebRequest = request
            return refused.answer(answer)
        return rendered


_TOO_LARGE = Refused(413, f"request bodies are at most {MAX_REQUEST_BODY} bytes")
_TOO_MANY_CONNECTIONS = RefusedResource(
    Refused(429, "too many connections from this address", retry_after=1)
)


class AccessLoggingSite(Site):
    """The Site agentd serves: guarded channels, and an access log that never carries query
    strings (they may hold tokens)."""

    displayTracebacks = False
    requestFactory = BoundedRequest
    # HTTPFactory types ``protocol`` as its wrapper that may switch to HTTP/2; see below.
    protocol = GuardedChannel  # type: ignore[assignment]

    def __init__(self, resource: IResource, limits: ConnectionLimits) -> None:
        super().__init__(resource, reactor=limits.clock)  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self.limits = limits

    # The channel itself rather than Twisted's wrapper that could switch to HTTP/2 after
    # TLS negotiation: agentd offers no HTTP/2, and its WebSocket upgrades are HTTP/1.1.
    # The override narrows the return type from that wrapper to the channel (mypy: override).
    def buildProtocol(self, addr: IAddress | None) -> GuardedChannel | None:  # type: ignore[override]
        # Twisted leaves it unannotated; it builds ``protocol``, a GuardedChannel.
        channel: GuardedChannel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        channel.limits = self.limits
        if not self.limits.open(channel, addr):
            return None
        return channel

    def log(self, request: http.Request) -> None:
        _log.debug(
            "{method} {path} {status}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace")[:200],
            status=request.code,
        )


class _Root(Resource):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def getChild(self, path: bytes, request: Request) -> IResource:
        return NOT_FOUND


class _StaticFile(Resource):
    """One file shipped in agentd/static, held in memory."""

    isLeaf = True

    def __init__(self, body: bytes, content_type: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self._body = body
        self._type = content_type.encode()

    def render_HEAD(self, request: WebRequest) -> bytes:
        self.render_GET(request)
        return b""

    def render_GET(self, request: WebRequest) -> bytes:
        request.setHeader(b"content-type", self._type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
            b"style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        )
        return self._body


def _static(name: str, content_type: str) -> Resource:
    body = resources.files("agentd").joinpath("static", name).read_bytes()
    return _StaticFile(body, content_type)


def _metrics(registry: CollectorRegistry) -> IResource:
    return MetricsResource(registry=registry)  # type: ignore[no-untyped-call]  # unannotated


def metrics_site(registry: CollectorRegistry, limits: ConnectionLimits) -> Site:
    """A Site with only /metrics, for a separate (internal) listen endpoint."""
    root = _Root()
    root.putChild(b"metrics", _metrics(registry))
    return AccessLoggingSite(root, limits)


def build_site(
    *,
    agent_route: Resource,
    health: Resource,
    registry: CollectorRegistry | None,
    api: dict[bytes, Resource],
    demo_page: bool,
    limits: ConnectionLimits,
) -> Site:
    root = _Root()
    root.putChild(b"projects", agent_route)
    root.putChild(b"health", health)
    if registry is not None:
        root.putChild(b"metrics", _metrics(registry))
    api_root = _Root()
    for name, resource in api.items():
        api_root.putChild(name, resource)
    # Public, like agent-client.js: it describes the API, and grants nothing.
    api_root.putChild(b"openapi.json", _static("openapi.json", "application/json"))
    root.putChild(b"api", api_root)
    root.putChild(b"agent-client.js", _static("agent-client.js", "text/javascript"))
    if demo_page:
        index = _static("index.html", "text/html; charset=utf-8")
        root.putChild(b"", index)
        root.putChild(b"index.html", index)
        root.putChild(b"console.js", _static("console.js", "text/javascript"))
    return AccessLoggingSite(root, limits)
