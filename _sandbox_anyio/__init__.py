"""The sandbox driver shared by ``sandbox_asyncio`` and ``sandbox_trio`` (private).

Everything here runs on anyio, so both runtimes get the same behaviour from
one implementation; each runtime package adds its transports, its way of
starting a background task, and its :class:`Runtime` (the loop's own
deadlines, events and clock, for the hot path).
"""

from ._auth import TokenProvider, google_id_token_provider
from ._handoff import Handoff, WebsocketsTransportBase
from ._process import DEFAULT_KILL_TIMEOUT, DEFAULT_WAIT_TIMEOUT, SandboxProcess, SandboxStream
from ._runtime import ANYIO, Runtime, deadline
from ._sandbox import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STREAM_BUFFER,
    AttachOptions,
    BaseSandbox,
    CreateOptions,
    attach_protocol,
    create_protocol,
    open_timeout,
)
from ._transport import (
    CLOSE_TIMEOUT,
    MAX_MESSAGE_SIZE,
    PING_INTERVAL,
    PING_TIMEOUT,
    USER_AGENT,
    HandshakeRefused,
    PullTransport,
    Receiver,
    Spawn,
    Transport,
    TransportClosed,
    default_ssl_context,
)

__all__ = [
    "ANYIO",
    "AttachOptions",
    "CreateOptions",
    "CLOSE_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_KILL_TIMEOUT",
    "DEFAULT_STREAM_BUFFER",
    "DEFAULT_WAIT_TIMEOUT",
    "MAX_MESSAGE_SIZE",
    "PING_INTERVAL",
    "PING_TIMEOUT",
    "USER_AGENT",
    "BaseSandbox",
    "Handoff",
    "HandshakeRefused",
    "PullTransport",
    "Receiver",
    "Runtime",
    "SandboxProcess",
    "SandboxStream",
    "Spawn",
    "TokenProvider",
    "Transport",
    "TransportClosed",
    "WebsocketsTransportBase",
    "attach_protocol",
    "create_protocol",
    "deadline",
    "open_timeout",
    "google_id_token_provider",
    "default_ssl_context",
]
