"""What the provider SDKs' HTTP failures mean in the protocol's error codes."""

from __future__ import annotations

import email.utils
import math
import sys
import time
from collections.abc import Mapping

from agentd.agent.protocol import ErrorCode
from agentd.agent.providers import ProviderError

# Error types (from the response body) that mean the provider, not the request, failed.
_UNAVAILABLE_KINDS = ("overloaded_error", "api_error", "server_error", "timeout_error")


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's transport errors, which the SDKs let through while a stream is read.

    Current SDKs use ``httpx2``, older ones ``httpx``; whichever the SDK loaded is the one.
    """
    errors: list[type[BaseException]] = []
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None:
            errors.append(module.TransportError)
    return tuple(errors)


def retry_after_ms(headers: Mapping[str, str]) -> int | None:
    """Milliseconds the provider asks us to wait, from ``retry-after-ms`` or ``retry-after``
    (seconds or an HTTP date); None when it says nothing usable."""
    for name, scale in (("retry-after-ms", 1.0), ("retry-after", 1000.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            millis = float(value) * scale
        except ValueError:
            millis = _http_date_ms(value) if name == "retry-after" else math.nan
        if math.isfinite(millis):
            return max(0, round(millis))
    return None


def _http_date_ms(value: str) -> float:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return math.nan
    if when.tzinfo is None:
        return math.nan
    return (when.timestamp() - time.time()) * 1000


def status_error(
    status: int, kind: str | None, headers: Mapping[str, str], request_id: str | None = None
) -> ProviderError:
    """The protocol error for an HTTP error the SDK gave up on (after its own retries).

    ``kind`` is the provider's error type from the body; it is all there is to go on when an
    error arrives inside a stream that began with HTTP 200.
    """
    detail = {"status": status, "providerError": kind, "requestId": request_id}
    if status in (401, 403) or kind in ("authentication_error", "permission_error"):
        return ProviderError(
            ErrorCode.PROVIDER_AUTH, "the provider refused the API key", detail=detail
        )
    if status == 429 or kind == "rate_limit_error":
        return ProviderError(
            ErrorCode.PROVIDER_RATE_LIMIT,
            "the provider's rate limit was reached",
            retry_after_ms=retry_after_ms(headers),
            detail=detail,
        )
    if status >= 500 or status in (408, 409) or kind in _UNAVAILABLE_KINDS:
        return ProviderError(
            ErrorCode.PROVIDER_UNAVAILABLE, "the provider is unavailable", detail=detail
        )
    return ProviderError(
        ErrorCode.PROVIDER_ERROR, f"the provider refused the request (HTTP {status})", detail=detail
    )


def connection_error(error: BaseException, started: bool) -> ProviderError:
    """The protocol error for a network failure the SDK gave up on, or one mid-stream."""
    text = "the provider's stream broke off" if started else "the provider could not be reached"
    return ProviderError(
        ErrorCode.PROVIDER_UNAVAILABLE, text, detail={"exception": type(error).__name__}
    )
