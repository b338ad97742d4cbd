"""Service URLs, affinity cookies and redaction of secrets (protocol.md 2.1, 2.4)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

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


#: Query parameter of the handshake URL (create and attach) naming the extensions a client asks for.
#: A query parameter rather than a header: proxies and Cloud Run's front end pass it through, and a
#: browser's WebSocket can set it (it cannot set headers). See docs/extensions.md.
EXTENSIONS_PARAM = "extensions"
#: One extension name as it may appear in the parameter.
_EXTENSION_NAME = re.compile(r"[a-z0-9_]{1,64}")
#: More names than this in one request is malformed: nobody needs that many, and it bounds the work.
MAX_REQUESTED_EXTENSIONS = 32


def _extensions_query(names: Iterable[str]) -> str:
    # Sorted: one URL per set, so logs and tests see a stable spelling. Commas need no escaping in a query.
    ordered = sorted(set(names))
    return f"{EXTENSIONS_PARAM}={','.join(ordered)}" if ordered else ""


def create_url(base: str, extensions: Iterable[str] = ()) -> str:
    """``<base>/create``, with ``?extensions=...`` when the client asks for any."""
    query = _extensions_query(extensions)
    return f"{base}/create?{query}" if query else f"{base}/create"


def attach_url(base: str, sandbox_id: str, sandbox_token: str, extensions: Iterable[str] = ()) -> str:
    """``<base>/attach/<id>?sandbox_token=<token>``, then ``&extensions=...`` when the client asks for any."""
    url = f"{base}/attach/{quote(sandbox_id, safe='')}?sandbox_token={quote(sandbox_token, safe='')}"
    query = _extensions_query(extensions)
    return f"{url}&{query}" if query else url


def requested_extensions(query: str) -> frozenset[str] | None:
    """The extension names a handshake's query string asks for; ``None`` when it asks for none.

    The value is a comma-separated list of names (``[a-z0-9_]{1,64}``, at most
    32). A malformed parameter (given twice, empty, an empty or ill-formed
    name, too many) counts as asking for none: the connection then gets the
    upstream protocol, which every client can speak. Unknown but well-formed
    names are returned; the server ignores those it does not support.
    """
    values = parse_qs(query, keep_blank_values=True).get(EXTENSIONS_PARAM)
    if values is None or len(values) != 1:
        return None
    names = values[0].split(",")
    if len(names) > MAX_REQUESTED_EXTENSIONS or not all(_EXTENSION_NAME.fullmatch(name) for name in names):
        return None
    return frozenset(names)


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
