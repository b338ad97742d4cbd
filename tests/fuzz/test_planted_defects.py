"""``sandbox fuzz`` catches planted defects, shrinks them, and reports a transcript and a failing reproduction.

Each defect is a small WebSocket proxy in front of our real server that
misbehaves in one way only a sequence of actions reveals:

* it drops one status: ``SANDBOX_KILLED`` for a sandbox after someone was
  refused an attach to it (the symptom of upstream's defect S3);
* it answers one request twice: every ``SANDBOX_EXECUTION_FORCE_KILLED``;
* it never answers a kill: ``SANDBOX_EXECUTION_FORCE_KILLED`` never comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _support import ServerThread
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from sandbox_conformance._fuzz import FuzzOptions, FuzzResult, run_fuzz


class Link:
    """One client connection through the proxy: what it is about, for the defect's rules."""

    def __init__(self, path: str) -> None:
        self.path = path
        match = re.match(r"/attach/([^/?]+)", path)
        self.sandbox_id = match[1] if match else ""
        self.refused = False


#: Decides what the client gets for each server frame: the proxy's state, the link, the frame.
Defect = Callable[["DefectProxy", Link, str], list[str]]


class DefectProxy:
    """A WebSocket proxy on its own thread and loop, in front of ``target``, misbehaving as ``defect`` says."""

    def __init__(self, target: str, defect: Defect) -> None:
        self.target = target.replace("http://", "ws://")
        self.defect = defect
        #: Sandboxes someone was refused an attach to.
        self.refused: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="defect-proxy", daemon=True)
        self._server: Server | None = None
        self.url = ""

    def __enter__(self) -> DefectProxy:
        self._thread.start()

        async def start() -> Server:
            return await serve(self._handle, "127.0.0.1", 0, max_size=None, compression=None)

        self._server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=10)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None

        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _handle(self, client: ServerConnection) -> None:
        assert client.request is not None
        link = Link(client.request.path)
        async with connect(self.target + link.path, max_size=None, compression=None) as server:
            await asyncio.gather(self._up(client, server), self._down(client, server, link))

    async def _up(self, client: ServerConnection, server: ClientConnection) -> None:
        try:
            async for message in client:
                await server.send(message)
        except ConnectionClosed:
            pass
        # The client went (a drop cuts it without a close): the server must see it go the same way.
        server.transport.abort()

    async def _down(self, client: ServerConnection, server: ClientConnection, link: Link) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in server:
                assert isinstance(message, str)
                obj = json.loads(message)
                if obj.get("event") == "sandbox_id":
                    link.sandbox_id = obj["sandbox_id"]
                if obj.get("status") in ("SANDBOX_PERMISSION_DENIAL_ERROR", "SANDBOX_IN_USE"):
                    self.refused.add(link.sandbox_id)
                for frame in self.defect(self, link, message):
                    await client.send(frame)
        code = server.close_code if server.close_code is not None else 1006
        if code == 1006:
            client.transport.abort()
        else:
            await client.close(code)


def drops_killed_after_refused_attach(proxy: DefectProxy, link: Link, frame: str) -> list[str]:
    if '"SANDBOX_KILLED"' in frame and link.sandbox_id in proxy.refused:
        return []
    return [frame]


def answers_kill_twice(proxy: DefectProxy, link: Link, frame: str) -> list[str]:
    return [frame, frame] if '"SANDBOX_EXECUTION_FORCE_KILLED"' in frame else [frame]


def never_answers_kill(proxy: DefectProxy, link: Link, frame: str) -> list[str]:
    return [] if '"SANDBOX_EXECUTION_FORCE_KILLED"' in frame else [frame]


def never_says_running(proxy: DefectProxy, link: Link, frame: str) -> list[str]:
    return [] if '"SANDBOX_RUNNING"' in frame else [frame]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with ServerThread() as thread:
        yield thread.url


def fuzz(url: str, *, timeout: float = 5.0, storage: bool | None = None) -> FuzzResult:
    # A fixed seed: the same search every run (the defect is found within the first examples).
    # A short shrink budget: the pruning of single actions that follows finishes the job.
    # storage=None asks the server whether it has checkpoints and snapshots.
    options = FuzzOptions(
        url=url,
        max_examples=60,
        steps=6,
        seed=20240616,
        timeout=timeout,
        shrink_budget=1.0,
        checkpoints=storage,
        snapshots=storage,
    )
    return run_fuzz(options)


def check_reported(result: FuzzResult, problem: str, tmp_path: Path, max_actions: int) -> None:
    """Found, shrunk, told as a transcript, and reproduced by a script that fails against the same server."""
    finding = result.finding
    assert finding is not None, "the planted defect was not found"
    assert not result.flaky, "a deterministic defect must be reported as one that happens again"
    assert re.search(problem, finding.problem), finding.report()
    assert len(finding.calls) <= max_actions, finding.report()
    report = finding.report()
    assert "Transcript (→ sent, ← received)" in report
    assert re.search(r"c\d+ ← \{", report)
    assert re.search(r"c\d+ → \{", report)
    # Tokens never appear: the sandbox_id frame and attach URLs show an ellipsis.
    assert re.search(r'"sandbox_token":"…"', report)
    assert not re.search(r'"sandbox_token":"[0-9a-f]{16,}"', report)
    assert not re.search(r"sandbox_token=[0-9a-f]{16,}", report)
    script = tmp_path / "repro.py"
    script.write_text(result.reproduction, encoding="utf-8")
    replay = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert replay.returncode != 0, replay.stdout + replay.stderr
    assert "Finding" in replay.stderr and re.search(problem, replay.stderr), replay.stderr


def test_a_dropped_status_is_caught(server: str, tmp_path: Path) -> None:
    with DefectProxy(server, drops_killed_after_refused_attach) as proxy:
        result = fuzz(proxy.url)
        # create, a refused attach, then the owner's kill (in finish) misses SANDBOX_KILLED.
        check_reported(result, r"connection closed \(1000\) while expecting .*SANDBOX_KILLED", tmp_path, 6)
        assert result.finding is not None
        assert any(call.startswith("session.attach(") for call in result.finding.calls)


def test_a_reply_sent_twice_is_caught(server: str, tmp_path: Path) -> None:
    with DefectProxy(server, answers_kill_twice) as proxy:
        result = fuzz(proxy.url)
        check_reported(result, r"got .*SANDBOX_EXECUTION_FORCE_KILLED", tmp_path, 3)
        assert result.finding is not None
        assert any(call.startswith("session.kill_process(") for call in result.finding.calls)


def test_a_kill_never_answered_is_caught(server: str, tmp_path: Path) -> None:
    with DefectProxy(server, never_answers_kill) as proxy:
        # A short wait per frame: the local server answers a kill in milliseconds.
        result = fuzz(proxy.url, timeout=1.0)
        check_reported(result, r"nothing within 1s; still expected: .*SANDBOX_EXECUTION_FORCE_KILLED", tmp_path, 2)


def test_a_defect_in_the_first_action_is_shrunk_to_it(server: str, tmp_path: Path) -> None:
    # Nothing is left to remove once the sequence is the one create: pruning must stop there.
    # (The storage probe would meet the defect first: the server's storage is given.)
    with DefectProxy(server, never_says_running) as proxy:
        result = fuzz(proxy.url, timeout=1.0, storage=True)
        check_reported(result, r"nothing within 1s; still expected: .*SANDBOX_RUNNING", tmp_path, 1)
