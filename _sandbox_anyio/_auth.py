"""Credentials for services behind Cloud Run IAM: a bearer token on every handshake.

A token provider is any callable returning the token, sync or async. It is
called before every connect and reconnect (tokens expire; long sessions
reconnect). Sync providers run in a worker thread, because fetching a
token usually means network I/O that must not block the event loop.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import anyio.to_thread

from sandbox_proto import SandboxConnectionError, SandboxException

from ._extras import install_hint

TokenProvider = Callable[[], str | Awaitable[str]]


async def fetch_token(provider: TokenProvider, *, timeout: float | None = None) -> str:
    """Call ``provider`` for a token, giving up after ``timeout`` seconds (``None``: no limit).

    A sync provider's thread cannot be stopped: when the caller's deadline or
    cancellation comes first, the thread is abandoned (it ends on its own, its
    answer unused) rather than waited for.
    """
    with anyio.move_on_after(math.inf if timeout is None else timeout) as scope:
        try:
            if inspect.iscoroutinefunction(provider):
                token = await provider()
            else:
                result = await anyio.to_thread.run_sync(provider, abandon_on_cancel=True)
                token = await result if inspect.isawaitable(result) else result
        except SandboxException:
            raise
        except Exception as exc:
            raise SandboxConnectionError(f"the token provider failed: {type(exc).__name__}: {exc}") from exc
    if scope.cancelled_caught:
        raise SandboxConnectionError(f"the token provider did not answer within {timeout:g}s")
    if not isinstance(token, str) or not token:
        raise SandboxConnectionError("the token provider returned no token")
    return token


def google_id_token_provider(url: str) -> Callable[[], str]:
    """ID tokens from Application Default Credentials, audience ``https://<host>`` (protocol.md 2.4)."""
    audience = "https://" + urlsplit(url).netloc

    def fetch() -> str:
        try:
            import google.auth
            import google.auth.exceptions
            import google.auth.transport.requests
            import google.oauth2.id_token
        except ImportError as exc:
            # A connection error, as any token failure is, raised by the first connect: the
            # ``await`` that opens the sandbox.
            raise SandboxConnectionError(
                f"use_google_auth needs google-auth ({exc.name or exc} is missing): {install_hint('google')}"
            ) from None
        request = google.auth.transport.requests.Request()
        try:
            token: str = google.oauth2.id_token.fetch_id_token(request, audience)
            return token
        except google.auth.exceptions.DefaultCredentialsError:
            # User credentials (gcloud auth application-default login) carry an ID token instead.
            credentials, _ = google.auth.default()
            credentials.refresh(request)
            id_token = getattr(credentials, "id_token", None)
            if not id_token:
                raise SandboxConnectionError("these Google credentials cannot produce an ID token") from None
            return str(id_token)

    return fetch
