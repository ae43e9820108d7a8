"""Development mode: agentd on embedded defaults, with a throwaway JWT secret and a banner
that prints a token and the URLs to try it with."""

from __future__ import annotations

import ipaddress
import secrets
import sys

from twisted.application.service import Service

from agentd.auth import Authenticator
from agentd.config import Config, ConfigError
from agentd.endpoints import socket_address

TOKEN_TTL_SECONDS = 7 * 24 * 3600


def dev_secret(config: Config) -> str:
    """A throwaway JWT secret when ``config`` is the embedded defaults and names no key,
    else ""; a configuration file without a key is an error."""
    if config.auth.jwt_secret or config.auth.jwt_public_key_file:
        return ""
    if config.source != "embedded defaults":
        raise ConfigError(
            "[auth] jwt_secret", "required (or jwt_public_key_file, or AGENTD_JWT_SECRET)"
        )
    return secrets.token_urlsafe(32)


def endpoint_url(endpoint: str) -> str | None:
    """The http(s) URL a browser on this host reaches ``endpoint`` at; None for endpoints
    without one (a UNIX socket)."""
    address = socket_address(endpoint)
    if address is None or not address.port.isdigit():
        return None
    host = address.interface
    if _every_interface(host):
        # Not an address a browser can connect to; this host's loopback is one of them.
        host = "::1" if address.kind == "tcp6" else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if address.kind == "ssl" else "http"
    return f"{scheme}://{host}:{address.port}"


def _every_interface(host: str) -> bool:
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def banner(authenticator: Authenticator, endpoint: str) -> str:
    """What development mode prints: a fresh token and where to use it."""
    token = authenticator.mint("dev", ["*"], ttl=TOKEN_TTL_SECONDS)
    lines = ["agentd is running in development mode (embedded defaults, throwaway JWT secret)."]
    url = endpoint_url(endpoint)
    if url is None:
        lines.append(f"  listening on {endpoint}: no URL a browser can open")
    else:
        websocket = "ws" + url.removeprefix("http")
        lines.append(f"  demo console: {url}/?token={token}&project=demo&agent=echo")
        lines.append(f"  WebSocket:    {websocket}/projects/demo/agent/echo?token={token}")
    lines.append(f"  token:        {token}")
    return "\n".join(lines)


class BannerService(Service):
    """Prints the development banner once agentd has started."""

    def __init__(self, text: str) -> None:
        self.text = text

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        # The freshly generated token is meant to be copied: straight to the terminal, as
        # twistd routes sys.stderr into the (redacting) log.
        print(self.text, file=sys.__stderr__, flush=True)
