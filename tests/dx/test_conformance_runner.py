"""The conformance runner (``sandbox conformance``) against our server, and against a broken one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator

import pytest
from _support import ServerThread
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from sandbox_asyncio._conformance import SPECS, main

#: The vectors a plain client can run against any server (protocol.md 12).
RUNNABLE = [spec.name for spec in SPECS if spec.run is not None and not spec.http]
SKIPPED = [spec.name for spec in SPECS if spec.run is None]


def verdicts(output: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in output.splitlines():
        verdict, _, rest = line.partition("  ")
        if verdict in ("PASS", "FAIL", "SKIP"):
            found[rest.split()[0]] = verdict
    return found


@pytest.fixture(scope="module", params=["extended", "upstream"])
def local_url(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    # Our own server, without the session one: the runner kills what it creates, but keep it apart.
    with ServerThread(protocol=request.param) as server:
        yield server.url, request.param


def test_our_server_passes_every_vector_in_its_mode(
    local_url: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, mode = local_url
    assert main([url, "--protocol", mode]) == 0
    output = capsys.readouterr().out
    found = verdicts(output)
    assert {name: found[name] for name in RUNNABLE} == dict.fromkeys(RUNNABLE, "PASS"), output
    assert all(found[name] == "SKIP" for name in SKIPPED), output
    assert "0 failed" in output


def test_auto_follows_what_the_server_advertises(
    local_url: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = local_url
    assert main([url, "--vector", "CV-02", "--vector", "CV-03"]) == 0
    assert verdicts(capsys.readouterr().out) == {"CV-02": "PASS", "CV-03": "PASS"}


def test_claiming_the_other_mode_fails(local_url: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, mode = local_url
    other = "upstream" if mode == "extended" else "extended"
    assert main([url, "--protocol", other, "--vector", "CV-01"]) == 1
    output = capsys.readouterr().out
    assert verdicts(output) == {"CV-01": "FAIL"}
    # Extension fields where upstream has none, or none where they were required.
    assert ("extensions" in output) and ("1 failed" in output)


# --------------------------------------------------------------------------
# a server that gets things wrong


async def _broken_handler(ws: ServerConnection) -> None:
    """Creates sandboxes correctly, then answers every exec with "42" and refuses everything else."""
    assert ws.request is not None
    if not ws.request.path.startswith("/create"):
        await ws.close(1011)
        return
    await ws.recv()
    for frame in (
        {"event": "status_update", "status": "SANDBOX_CREATING"},
        {"event": "sandbox_id", "sandbox_id": "sandbox-b0rk", "sandbox_token": "0" * 32},
        {"event": "status_update", "status": "SANDBOX_RUNNING"},
    ):
        await ws.send(json.dumps(frame, separators=(",", ":")))
    with contextlib.suppress(ConnectionClosed):  # the runner drops connections on purpose
        async for message in ws:
            if "language" not in json.loads(message):
                await ws.close(1011)
                return
            for frame in (
                {"event": "status_update", "status": "SANDBOX_EXECUTION_RUNNING"},
                {"event": "stdout", "data": "42\n"},
                {"event": "status_update", "status": "SANDBOX_EXECUTION_DONE"},
            ):
                await ws.send(json.dumps(frame, separators=(",", ":")))


@contextlib.contextmanager
def broken_server() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Server:
        return await serve(_broken_handler, "127.0.0.1", 0)  # made inside its loop

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        asyncio.run_coroutine_threadsafe(server.wait_closed(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_a_broken_server_fails_with_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    with broken_server() as url:
        assert main([url, "--timeout", "2"]) == 1
    output = capsys.readouterr().out
    found = verdicts(output)
    assert found["CV-02"] == "PASS"  # it does print 42
    assert found["CV-01"] == found["CV-03"] == found["CV-10"] == found["CV-19"] == "FAIL"
    # The reasons say what came instead.
    assert "a follow-up exec gave stdout '42\\n'" in output
    assert "stdout '42\\n', stderr ''" in output
    assert all(found[name] == "SKIP" for name in SKIPPED)


def test_usage_errors_exit_with_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ftp://example.test"])
    assert exited.value.code == 2
    assert "unsupported URL scheme" in capsys.readouterr().err
