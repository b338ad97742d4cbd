"""A token provider feeds `Authorization: Bearer` on every handshake, reconnects included."""

from __future__ import annotations

import logging
import threading

import anyio
import pytest
from _support import Client, CuttingProxy, ServerThread, wait_until

from _sandbox_anyio._auth import fetch_token
from sandbox_proto import SandboxConnectionError, SandboxTimeoutError

pytestmark = pytest.mark.anyio


class RecordingProvider:
    """Hands out a new token per call, as a real provider would after expiry."""

    def __init__(self) -> None:
        self.issued: list[str] = []

    def __call__(self) -> str:
        self.issued.append(f"secret-token-{len(self.issued)}")
        return self.issued[-1]


async def test_provider_called_on_connect_and_reconnect_and_never_logged(
    client: Client, server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = RecordingProvider()
    seen: list[str | None] = []
    with CuttingProxy(server.url, on_request=seen.append) as proxy:
        sandbox = await client.create(proxy.url, enable_auto_reconnect=True, token_provider=provider, enable_debug=True)
        try:
            process = await sandbox.exec("bash", "read line; echo got $line")
            proxy.cut()
            await wait_until(lambda: sandbox.reconnects == 1, 20, "the reconnect")
            await process.write_to_stdin("x\n")
            assert await process.stdout.read_all(timeout=20) == "got x\n"
        finally:
            await sandbox.kill()
    assert provider.issued == ["secret-token-0", "secret-token-1"]
    assert seen[:2] == ["Bearer secret-token-0", "Bearer secret-token-1"]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "secret-token" not in logged


async def test_async_provider_and_its_failure(client: Client, url: str) -> None:
    async def provider() -> str:
        return "async-token"

    async with client.create(url, token_provider=provider) as sandbox:
        process = await sandbox.exec("bash", "echo ok")
        assert await process.stdout.read_all() == "ok\n"

    def broken() -> str:
        raise RuntimeError("no credentials here")

    with pytest.raises(SandboxConnectionError, match="token provider failed"):
        await client.create(url, token_provider=broken)


class StuckProvider:
    """A sync provider whose thread blocks (as on a hung metadata server) until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        self.release.wait(30)
        return "late-token"


async def test_a_stuck_sync_provider_is_bounded_by_the_create_timeout(client: Client, url: str) -> None:
    provider = StuckProvider()
    try:
        started = anyio.current_time()
        with pytest.raises((SandboxTimeoutError, SandboxConnectionError)):
            await client.create(url, timeout=0.5, token_provider=provider)
        assert anyio.current_time() - started < 2
        assert provider.calls == 1
    finally:
        provider.release.set()  # the abandoned thread ends now


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_fetch_token_gives_up_after_its_timeout(anyio_backend: str) -> None:
    provider = StuckProvider()
    try:
        started = anyio.current_time()
        with pytest.raises(SandboxConnectionError, match=r"did not answer within 0\.3s"):
            await fetch_token(provider, timeout=0.3)
        assert anyio.current_time() - started < 2
    finally:
        provider.release.set()

    async def never() -> str:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    with pytest.raises(SandboxConnectionError, match="did not answer"):
        await fetch_token(never, timeout=0.1)
    assert await fetch_token(lambda: "token", timeout=None) == "token"
