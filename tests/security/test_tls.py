"""TLS end to end: ``LocalServer(ssl=...)`` serves wss://, the client's ``ssl=`` and certifi's default."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from _support import ServerThread

import sandbox_asyncio
import sandbox_trio
from sandbox_proto import SandboxConnectionError

pytestmark = pytest.mark.anyio

FLAVOURS = ["websockets", "aiohttp", "trio", "trio-websocket"]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(ca: trustme.CA) -> Iterator[ServerThread]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    with ServerThread(ssl=context, isolation="none") as running:
        yield running


@pytest.fixture(scope="module")
def cafile(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def anyio_backend(flavour: str) -> str:
    return "trio" if flavour.startswith("trio") else "asyncio"


def create(flavour: str, url: str, **options: Any) -> Any:
    if flavour == "trio-websocket":
        options["transport"] = "trio-websocket"
    if flavour.startswith("trio"):
        return sandbox_trio.Sandbox.create(url, **options)
    if flavour == "aiohttp":
        options["transport"] = "aiohttp"
    return sandbox_asyncio.Sandbox.create(url, **options)


def test_the_url_says_https(tls_server: ServerThread) -> None:
    assert tls_server.url.startswith("https://127.0.0.1:")


async def test_exec_over_wss_with_the_callers_ca(flavour: str, tls_server: ServerThread, cafile: str) -> None:
    context = ssl.create_default_context(cafile=cafile)
    async with create(flavour, tls_server.url, ssl=context) as sandbox:
        process = await sandbox.exec("python", "print('over tls')")
        assert await process.stdout.read_all() == "over tls\n"


async def test_a_wrong_ca_is_refused(flavour: str, tls_server: ServerThread) -> None:
    other = trustme.CA()
    context = ssl.create_default_context()
    other.configure_trust(context)
    with pytest.raises(SandboxConnectionError):
        async with create(flavour, tls_server.url, ssl=context, timeout=5):
            pass


async def test_without_ssl_certifi_is_used_and_refuses_a_private_ca(flavour: str, tls_server: ServerThread) -> None:
    # Our CA is in no store at all; a client using certifi's bundle must refuse it.
    with pytest.raises(SandboxConnectionError):
        async with create(flavour, tls_server.url, timeout=5):
            pass


async def test_cli_serves_tls(ca: trustme.CA, cafile: str, tmp_path: Path, flavour: str) -> None:
    if flavour != "websockets":
        pytest.skip("the transport does not matter for the CLI's options")
    import asyncio
    import subprocess
    import sys

    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandbox_server",
        "--port",
        "0",
        "--isolation",
        "none",
        "--certfile",
        str(certfile),
        "--keyfile",
        str(keyfile),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(15):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("listening on https://127.0.0.1:"), line
        context = ssl.create_default_context(cafile=cafile)
        async with sandbox_asyncio.Sandbox.create(line.split()[-1], ssl=context) as sandbox:
            process = await sandbox.exec("bash", "echo cli tls")
            assert await process.stdout.read_all() == "cli tls\n"
    finally:
        proc.terminate()
        await proc.wait()
