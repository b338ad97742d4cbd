"""Service URLs, affinity cookies and redaction of secrets (protocol.md 2.1, 2.4)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import quote, urlsplit, urlunsplit

from ._errors import LocalProtocolError

_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def websocket_base(url: str) -> str:
    """Turn a service URL into the WebSocket base the endpoint paths are appended to."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "http://[::1" (unbalanced IPv6 brackets)
        raise LocalProtocolError(f"invalid service URL: {exc}") from None
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise LocalProtocolError(f"unsupported URL scheme {parts.scheme!r}: use http(s) or ws(s)")
    if not parts.netloc:
        raise LocalProtocolError("the service URL has no host")
    if parts.query or parts.fragment:
        raise LocalProtocolError("the service URL must not carry a query string or fragment")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def create_url(base: str) -> str:
    return f"{base}/create"


def attach_url(base: str, sandbox_id: str, sandbox_token: str) -> str:
    return f"{base}/attach/{quote(sandbox_id, safe='')}?sandbox_token={quote(sandbox_token, safe='')}"


_TOKEN_IN_URL = re.compile(r"(sandbox_token=)[^&\s'\"]*")
_BEARER = re.compile(r"(authorization:\s*\S+\s+)\S+", re.IGNORECASE)


def redact(text: str, *secrets: str | None) -> str:
    """Hide tokens in a URL or message: the query parameter and any literal secret."""
    text = _TOKEN_IN_URL.sub(r"\1***", text)
    text = _BEARER.sub(r"\1***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def merge_set_cookies(jar: dict[str, str], set_cookie_values: Iterable[str]) -> None:
    """Keep the ``name=value`` of every ``Set-Cookie``; later values for a name win."""
    for header in set_cookie_values:
        pair = header.split(";", 1)[0].strip()
        name, sep, value = pair.partition("=")
        if sep and name.strip():
            jar[name.strip()] = value.strip()


def cookie_header(jar: dict[str, str]) -> str | None:
    if not jar:
        return None
    return "; ".join(f"{name}={value}" for name, value in jar.items())


class RedactingFilter(logging.Filter):
    """Hides tokens in every record of the logger it is attached to.

    For the loggers handed to WebSocket libraries, which log request lines and
    frames verbatim: the ``sandbox_token=`` query value, and the whole
    ``sandbox_id`` frame (a library may elide its middle, leaving a token
    fragment with no key in front of it).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if '"sandbox_id"' in message:
            record.msg, record.args = "[sandbox_id frame, redacted]", ()
        elif "sandbox_token" in message or "uthorization" in message:
            record.msg, record.args = redact(message), ()
        return True
