"""TLS to Redis and its Sentinels: certificates read once, every server verified by its name.

``rediss://`` turns TLS on for the primary and, in Sentinel mode, for the Sentinels too. Each
server's certificate must be signed by ``[redis] tls_ca`` (the system's CAs when empty) and
valid for the host agentd dials: the URL's host, a configured Sentinel's host, or the address
Sentinel reports for the primary (an IP address unless Sentinel announces host names). A
client certificate is sent when ``tls_cert`` and ``tls_key`` are set.

A wrong CA would otherwise look like a Redis that never answers: ``check_server`` does one
handshake at startup and refuses a certificate that does not verify, in one line naming the
key to fix.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from OpenSSL import crypto
from twisted.internet import ssl as twisted_ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.logger import Logger

from agentd.config import ConfigError, RedisConfig

_log = Logger()

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: the certificate
# is sound but made out to another name, so the address is what to check, not the CA.
_NAME_MISMATCH = (62, 64)


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"[redis] {key}", f"{path}: {e.strerror or 'cannot be read'}") from None


@dataclass(frozen=True)
class RedisTLS:
    """The files of ``[redis] tls_*``, loaded: trust root and optional client certificate."""

    ca_file: str
    cert_file: str
    key_file: str
    trust: IOpenSSLTrustRoot | None
    client: PrivateCertificate | None

    @classmethod
    def from_config(cls, config: RedisConfig) -> RedisTLS:
        """Load the files now; ``ConfigError`` names the key of a file that cannot be used."""
        trust = None
        if config.tls_ca:
            blocks = _PEM_CERTIFICATE.findall(_read("tls_ca", config.tls_ca))
            try:
                certificates = [Certificate.loadPEM(block) for block in blocks]
            except crypto.Error:
                certificates = []
            if not certificates or len(certificates) != len(blocks):
                raise ConfigError("[redis] tls_ca", f"{config.tls_ca}: not PEM certificates")
            trust = twisted_ssl.trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]  # unannotated in Twisted
        client = None
        if config.tls_cert:
            pem = _read("tls_cert", config.tls_cert) + b"\n" + _read("tls_key", config.tls_key)
            try:
                client = PrivateCertificate.loadPEM(pem)  # type: ignore[no-untyped-call]  # unannotated in Twisted
            except (crypto.Error, ValueError):
                raise ConfigError(
                    "[redis] tls_cert",
                    f"{config.tls_cert} and {config.tls_key}: not a PEM certificate and its key",
                ) from None
        return cls(config.tls_ca, config.tls_cert, config.tls_key, trust, client)

    def options_for(self, host: str) -> IOpenSSLClientConnectionCreator:
        """Client TLS that verifies the server's certificate against ``host``."""
        options: IOpenSSLClientConnectionCreator = twisted_ssl.optionsForClientTLS(
            host, trustRoot=self.trust, clientCertificate=self.client
        )
        return options

    def endpoint(
        self, reactor: object, host: str, port: int, timeout: float
    ) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = wrapClientTLS(
            self.options_for(host), HostnameEndpoint(reactor, host, port, timeout=timeout)
        )
        return endpoint

    def check_first(self, servers: Sequence[tuple[str, int]], timeout: float, key: str) -> None:
        """``check_server`` with the first of ``servers`` that answers; none answering is not
        an error (Redis may come later), but is said."""
        for host, port in servers:
            if self.check_server(host, port, timeout, key):
                return
        _log.warn("{key}: no server answered to check TLS with; checked when they do", key=key)

    def check_server(self, host: str, port: int, timeout: float, key: str) -> bool:
        """A handshake and a PING with ``host:port``: True when both pass, False when it cannot
        be reached (Redis may come later); ``ConfigError`` when TLS fails. ``key`` names where
        ``host`` came from."""
        context = ssl.create_default_context(cafile=self.ca_file or None)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        try:
            plain = socket.create_connection((host, port), timeout)
        except OSError:
            return False
        try:
            with context.wrap_socket(plain, server_hostname=host) as secure:
                # With TLS 1.3 a server refuses a missing client certificate only after the
                # handshake: any answer at all (PONG, NOAUTH) shows it accepted this one.
                secure.sendall(b"PING\r\n")
                secure.recv(64)
                return True
        except ssl.SSLCertVerificationError as e:
            reason = e.verify_message or str(e)
            if e.verify_code in _NAME_MISMATCH:
                raise ConfigError(
                    key, f"the certificate of {host}:{port} is not valid for {host}: {reason}"
                ) from None
            raise ConfigError(
                "[redis] tls_ca",
                f"the certificate of {host}:{port} does not verify: {reason}",
            ) from None
        except ssl.SSLError as e:
            raise ConfigError(key, f"TLS with {host}:{port} failed: {e.reason or e}") from None
        except OSError:
            return False
        finally:
            plain.close()
