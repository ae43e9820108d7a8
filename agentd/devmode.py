"""Development mode: agentd on embedded defaults, with a development JWT secret and a banner
that prints a token and the URLs to try it with."""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
from pathlib import Path

from twisted.application.service import Service

from agentd.auth import Authenticator
from agentd.config import Config, ConfigError
from agentd.endpoints import socket_address

TOKEN_TTL_SECONDS = 7 * 24 * 3600


def dev_secret(config: Config, state_dir: Path | None = None) -> str:
    """A development JWT secret when ``config`` is the embedded defaults and names no key,
    else ""; a configuration file without a key is an error.

    The secret is made once and kept in ``state_dir`` (``~/.agentd``, beside the local
    sessions, mode 0600): a restarted agentd accepts the tokens it printed before, so an
    open demo console resumes its session across the restart.
    """
    if config.auth.jwt_secret or config.auth.jwt_public_key_file:
        return ""
    if config.source != "embedded defaults":
        raise ConfigError(
            "[auth] jwt_secret", "required (or jwt_public_key_file, or AGENTD_JWT_SECRET)"
        )
    directory = state_dir if state_dir is not None else Path.home() / ".agentd"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "dev-jwt-secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        kept = path.read_text().strip()
        if len(kept) >= 43 and path.stat().st_mode & 0o077 == 0:
            return kept
        path.unlink()  # unreadable or readable by others: start over
        return dev_secret(config, directory)
    secret = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


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
    lines = ["agentd is running in development mode (embedded defaults, development JWT secret)."]
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
