"""The conformance runner (``sandbox conformance``, ``python -m sandbox_conformance``): our server, broken ones.

Every vector against our server, vector by vector, is in tests/server/test_conformance.py;
here is the command line: its report, its exit status, what it skips and why, and that
a server that misbehaves or says nothing gives failures, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
from _support import ServerThread, silent_server
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from sandbox_cli import main as sandbox_main
from sandbox_conformance import VECTORS, main

#: What a server with checkpoint and snapshot storage cannot run, and why.
SKIPPED_WITH_STORAGE = {
    "CV-05": "server has checkpoints enabled",
    "CV-06": "server has snapshots enabled",
    "CV-24": "server has snapshots enabled",
    "CV-28": "needs two instances sharing checkpoint storage and locks",
    "HTTP": "HTTP endpoint, not requested (--http)",
}
#: Our server's idle sweep is 0.25 s; CV-29 may wait this long past the idle timeout.
IDLE_SWEEP = ["--idle-sweep", "2"]


def report(output: str) -> dict[str, tuple[str, str]]:
    """Vector name -> (verdict, reason) from the runner's lines."""
    found: dict[str, tuple[str, str]] = {}
    titles = {vector.name: vector.title for vector in VECTORS}
    for line in output.splitlines():
        verdict, _, rest = line.partition("  ")
        if verdict in ("PASS", "FAIL", "SKIP"):
            name = rest.split()[0]
            reason = rest.partition(titles[name])[2].removeprefix(": ")
            found[name] = (verdict, reason)
    return found


def verdicts(output: str) -> dict[str, str]:
    return {name: verdict for name, (verdict, _) in report(output).items()}


@pytest.fixture(scope="module", params=["extended", "upstream"])
def local_url(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    # Our own server with checkpoint and snapshot storage (the default).
    with ServerThread(protocol=request.param) as server:
        yield server.url, request.param


def test_our_server_passes_every_vector_it_can_reach(
    local_url: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, mode = local_url
    assert main([url, "--protocol", mode, *IDLE_SWEEP]) == 0
    output = capsys.readouterr().out
    found = report(output)
    assert list(found) == [vector.name for vector in VECTORS], output  # one line per vector, in order
    assert {name: found[name] for name in SKIPPED_WITH_STORAGE} == {
        name: ("SKIP", reason) for name, reason in SKIPPED_WITH_STORAGE.items()
    }
    passed = {name for name, (verdict, _) in found.items() if verdict == "PASS"}
    assert passed == set(found) - set(SKIPPED_WITH_STORAGE), output
    assert output.endswith(f"{len(passed)} passed, 0 failed, {len(SKIPPED_WITH_STORAGE)} skipped\n")


def test_a_server_without_storage_runs_the_other_vectors(capsys: pytest.CaptureFixture[str]) -> None:
    with ServerThread(checkpoints=False, snapshots=False) as server:
        names = ["CV-04", "CV-05", "CV-06", "CV-09", "CV-20", "CV-21", "CV-23", "CV-24", "CV-26"]
        assert main([server.url, *(arg for name in names for arg in ("--vector", name))]) == 0
    found = report(capsys.readouterr().out)
    assert found == {
        "CV-04": ("SKIP", "server has checkpoints disabled"),
        "CV-05": ("PASS", ""),
        "CV-06": ("PASS", ""),
        "CV-09": ("SKIP", "server has snapshots disabled"),
        "CV-20": ("SKIP", "server has checkpoints disabled"),
        "CV-21": ("SKIP", "server has checkpoints disabled"),
        "CV-23": ("SKIP", "server has snapshots disabled"),
        "CV-24": ("PASS", ""),
        "CV-26": ("PASS", ""),  # NOT_FOUND without RESTORING, as the server has no storage
    }


def test_auto_follows_what_the_server_advertises(
    local_url: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = local_url
    assert main([url, "--vector", "CV-02", "--vector", "CV-20"]) == 0
    assert verdicts(capsys.readouterr().out) == {"CV-02": "PASS", "CV-20": "PASS"}


def test_claiming_the_other_mode_fails(local_url: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, mode = local_url
    other = "upstream" if mode == "extended" else "extended"
    # CV-02 asks for the extensions: granted where none may be, or not granted where required.
    assert main([url, "--protocol", other, "--vector", "CV-01", "--vector", "CV-02"]) == 1
    output = capsys.readouterr().out
    # CV-01 asks for none, so it gets the upstream frames in either mode: any mode passes it.
    assert verdicts(output) == {"CV-01": "PASS", "CV-02": "FAIL"}
    assert ("extensions" in output) and ("1 failed" in output)


def test_the_sandbox_command_and_python_m_run_it(
    local_url: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = local_url
    assert sandbox_main(["conformance", url, "--vector", "CV-01"]) == 0
    assert verdicts(capsys.readouterr().out) == {"CV-01": "PASS"}
    done = subprocess.run(
        [sys.executable, "-m", "sandbox_conformance", url, "--vector", "CV-03"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, verdicts(done.stdout)) == (0, {"CV-03": "PASS"}), done.stderr


# --------------------------------------------------------------------------
# servers that get things wrong

Handler = Callable[[ServerConnection], Awaitable[None]]


def frame(obj: dict[str, str]) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def _broken_handler(ws: ServerConnection) -> None:
    """Creates sandboxes for any init, answers every exec with "42", refuses everything else."""
    assert ws.request is not None
    if not ws.request.path.startswith("/create"):
        await ws.close(1011)
        return
    await ws.recv()
    for event in (
        {"event": "status_update", "status": "SANDBOX_CREATING"},
        {"event": "sandbox_id", "sandbox_id": "sandbox-b0rk", "sandbox_token": "0" * 32},
        {"event": "status_update", "status": "SANDBOX_RUNNING"},
    ):
        await ws.send(frame(event))
    with contextlib.suppress(ConnectionClosed):  # the runner drops connections on purpose
        async for message in ws:
            if "language" not in json.loads(message):
                await ws.close(1011)
                return
            for event in (
                {"event": "status_update", "status": "SANDBOX_EXECUTION_RUNNING"},
                {"event": "stdout", "data": "42\n"},
                {"event": "status_update", "status": "SANDBOX_EXECUTION_DONE"},
            ):
                await ws.send(frame(event))


async def _mute_handler(ws: ServerConnection) -> None:
    """Accepts the WebSocket and never sends a frame."""
    await ws.wait_closed()


@contextlib.contextmanager
def ws_server(handler: Handler) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Server:
        return await serve(handler, "127.0.0.1", 0)  # made inside its loop

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        asyncio.run_coroutine_threadsafe(server.wait_closed(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def _unasked_extensions_handler(ws: ServerConnection) -> None:
    """Lists extensions on every SANDBOX_RUNNING, asked or not: what our server did before issue 17."""
    await ws.recv()
    for event in (
        {"event": "status_update", "status": "SANDBOX_CREATING"},
        {"event": "sandbox_id", "sandbox_id": "sandbox-b0rk", "sandbox_token": "0" * 32},
    ):
        await ws.send(frame(event))
    await ws.send('{"event":"status_update","status":"SANDBOX_RUNNING","extensions":["exit_code"]}')
    with contextlib.suppress(ConnectionClosed):
        await ws.wait_closed()


def test_extension_fields_nobody_asked_for_fail(capsys: pytest.CaptureFixture[str]) -> None:
    with ws_server(_unasked_extensions_handler) as url:
        assert main([url, "--timeout", "1", "--vector", "CV-01"]) == 1
    output = capsys.readouterr().out
    assert verdicts(output) == {"CV-01": "FAIL"}
    assert '"extensions":["exit_code"]' in output, output


def test_a_broken_server_fails_with_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    with ws_server(_broken_handler) as url:
        assert main([url, "--timeout", "1", "--idle-sweep", "0"]) == 1
    output = capsys.readouterr().out
    found = report(output)
    assert list(found) == [vector.name for vector in VECTORS]
    assert found["CV-02"][0] == "PASS"  # it does print 42
    for name in ("CV-01", "CV-03", "CV-10", "CV-19", "CV-20", "CV-23", "CV-29"):
        assert found[name][0] == "FAIL", name
    # The reasons say what came instead.
    assert found["CV-01"][1] == "create: a follow-up exec gave stdout '42\\n' and frames ['" + (
        '{"event":"status_update","status":"SANDBOX_EXECUTION_DONE"}' + "']"
    )
    assert found["CV-03"][1].startswith("stdout '42\\n', stderr ''")
    assert found["CV-20"][1].startswith("create: setup exec \"printf 'v1\\\\n' > /tmp/note.txt\" gave stdout '42\\n'")
    # It made a sandbox from a snapshot that cannot exist, so it has no "snapshots disabled" to skip on.
    assert "expected SANDBOX_CREATION_ERROR" in found["CV-23"][1]
    assert found["CV-29"][1].startswith("create: nothing within 2s while waiting for")
    # It did create a checkpointable sandbox: that is the server saying it has checkpoints.
    assert found["CV-05"] == ("SKIP", "server has checkpoints enabled")
    assert found["CV-28"][0] == "SKIP"


@pytest.mark.parametrize("make_server", [silent_server, lambda: ws_server(_mute_handler)], ids=["no-handshake", "mute"])
def test_a_server_that_does_not_answer_fails_in_bounded_time(
    make_server: Callable[[], contextlib.AbstractContextManager[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    with make_server() as url:
        assert main([url, "--timeout", "0.5", "--vector", "CV-01", "--vector", "CV-20", "--vector", "CV-26"]) == 1
    # Every wait is bounded by --timeout: a few of them, not a hang.
    assert time.monotonic() - started < 10
    found = report(capsys.readouterr().out)
    assert {name: verdict for name, (verdict, _) in found.items()} == dict.fromkeys(["CV-01", "CV-20", "CV-26"], "FAIL")
    assert all("within 0.5s" in reason for _, reason in found.values()), found


def test_usage_errors_exit_with_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ftp://example.test"])
    assert exited.value.code == 2
    assert "unsupported URL scheme" in capsys.readouterr().err
