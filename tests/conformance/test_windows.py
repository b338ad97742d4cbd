"""Regression tests for the windows where the client's two promises used to break.

The promises: nothing is lost across a reconnect (output and stdin, exactly
once, in order), and no call waits forever. Each test drives the client into
one window through a proxy (a drop, a black hole, a held reconnect
handshake), on every transport and against the server in both protocol modes.
Every test body runs under ``anyio.fail_after``: a hang is a failure. On trio
the sandboxes live in a nursery of the test's own, so that a driver task that
crashes or never ends fails that test rather than the fixture's teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import trio
from _support import Client, CuttingProxy, ServerThread, wait_until
from anyio.abc import TaskGroup

from sandbox_proto import (
    ReconnectPolicy,
    SandboxCheckpointError,
    SandboxConnectionError,
    SandboxCreationError,
    SandboxTimeoutError,
)

pytestmark = pytest.mark.anyio


# ----------------------------------------------------------------------------
# Proxy variants. They wrap what CuttingProxy does rather than redo it, so they
# keep working (cut, freeze, ...) whatever the base proxy learns meanwhile.


class TrackingProxy(CuttingProxy):
    """Also counts the connections that have ended, so a test can tell that none is left open.

    A connection held at the gate counts as open: it is one the client may
    still complete once the gate opens.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finished = 0

    @property
    def open_connections(self) -> int:
        return self.connections - self.finished

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await super()._handle(reader, writer)
        finally:
            self.finished += 1


class _ClientSide:
    """The writer towards the client, which can hold back everything written to it.

    The base proxy writes what the server sends through this object; while
    frozen the bytes stay here (counted) instead of reaching the client.
    """

    def __init__(self, inner: asyncio.StreamWriter, *, frozen: bool) -> None:
        self._inner = inner
        self.frozen = frozen
        self.held: list[bytes] = []

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self._inner.transport  # type: ignore[return-value]

    def write(self, data: bytes) -> None:
        if self.frozen:
            self.held.append(data)
        else:
            self._inner.write(data)

    async def drain(self) -> None:
        await self._inner.drain()

    def thaw(self) -> None:
        self.frozen = False
        for data in self.held:
            self._inner.write(data)  # a no-op if the client has gone meanwhile
        self.held.clear()


class OneWayProxy(TrackingProxy):
    """Can stop the server-to-client direction alone: requests arrive, replies do not.

    ``freeze_to_client`` stops the connections open now; ``hold_replies`` the
    ones opened from now on (a reconnect whose handshake reaches the server,
    which attaches, while its answer waits here). ``thaw`` lets everything through.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_sides: set[_ClientSide] = set()
        self._hold_new = False

    @property
    def held_to_client(self) -> int:
        """Bytes the server sent that are kept from the client."""
        return sum(len(data) for side in list(self._client_sides) for data in list(side.held))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        side = _ClientSide(writer, frozen=self._hold_new)
        self._client_sides.add(side)
        try:
            await super()._handle(reader, side)  # type: ignore[arg-type]
        finally:
            self._client_sides.discard(side)

    def freeze_to_client(self) -> None:
        self._on_loop(lambda: [setattr(side, "frozen", True) for side in self._client_sides])

    def hold_replies(self) -> None:
        self._on_loop(lambda: setattr(self, "_hold_new", True))

    def thaw(self) -> None:
        def thaw_all() -> None:
            self._hold_new = False
            for side in self._client_sides:
                side.thaw()

        self._on_loop(thaw_all)

    def _on_loop(self, function: Callable[[], object]) -> None:
        async def run() -> None:
            function()

        # Done on the proxy's loop, and waited for: the change is in force when this returns.
        asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)


#: Echoes each stdin line as "got <line>" until it reads "end".
ECHO = """
import sys
while (line := sys.stdin.readline()) and line != "end\\n":
    print("got " + line, end="", flush=True)
"""

#: Numbered lines all the time, each stdin line echoed as "got ..." and logged to a
#: file (so what reached the process can be told apart from output lost on the way).
TICKER_AND_ECHO = """
import sys, threading, time
lock = threading.Lock()
def out(text):
    with lock:
        sys.stdout.write(text + "\\n")
        sys.stdout.flush()
stop = threading.Event()
def tick():
    i = 0
    while not stop.is_set():
        out(f"line {i}")
        i += 1
        time.sleep(0.005)
ticker = threading.Thread(target=tick)
ticker.start()
with open("stdin.log", "w") as log:
    while (line := sys.stdin.readline()) and line != "end\\n":
        log.write(line)
        log.flush()
        out("got " + line.rstrip("\\n"))
stop.set()
ticker.join()
out("bye")
"""

#: Counts the intact copies of each big stdin line "<i>iiii...i" until "END".
DIGEST = """
import json, sys
counts, bad = {}, 0
while (line := sys.stdin.readline()) and line != "END\\n":
    key, body = line[:3], line[3:-1]
    if len(key) == 3 and len(body) == SIZE and body == key[1] * SIZE:
        counts[key] = counts.get(key, 0) + 1
    else:
        bad += 1
print(json.dumps({"counts": counts, "bad": bad}), flush=True)
"""
BIG = 4 * 2**20


def is_upstream(server: ServerThread) -> bool:
    return server.protocol == "upstream"  # type: ignore[attr-defined,no-any-return]


class Call:
    """An API call run in its own task; how it ended is kept for assertions afterwards."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.finished = anyio.Event()
        self.result: Any = None
        self.error: Exception | None = None

    async def _run(self, function: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> None:
        self.entered.set()
        try:
            self.result = await function(*args, **kwargs)
        except Exception as exc:
            self.error = exc
        finally:
            self.finished.set()


async def start(group: TaskGroup, function: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> Call:
    """Start ``function`` in ``group``; returns once it runs (it has reached its first wait)."""
    call = Call()
    group.start_soon(functools.partial(call._run, function, *args, **kwargs))
    # Waking up here means the call ran until it had to wait: its request is made.
    await call.entered.wait()
    return call


class Lines:
    """Collects a process's stdout, line by line, in a task."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self.lines: list[str] = []
        self.error: Exception | None = None
        self.ended = anyio.Event()

    async def collect(self) -> None:
        try:
            async for line in self.process.stdout:
                self.lines.append(line)
        except Exception as exc:  # kept for the assertions, so that a failure says what happened
            self.error = exc
        finally:
            self.ended.set()

    async def wait_for(self, line: str, timeout: float) -> None:
        await wait_until(lambda: line in self.lines or self.ended.is_set(), timeout, repr(line))
        assert line in self.lines, f"{line!r} never arrived; got {self.lines[-5:]} (error: {self.error!r})"


async def attach_when_free(client: Client, url: str, sandbox_id: str, token: str, within: float = 5.0) -> Any:
    """Attach directly to the server, retrying while the sandbox is still in use."""
    deadline = anyio.current_time() + within
    while True:
        try:
            return await client.attach(url, sandbox_id, token)
        except SandboxCreationError as exc:
            if exc.status != "SANDBOX_IN_USE" or anyio.current_time() > deadline:
                raise
        await anyio.sleep(0.05)


async def kill_left_over(client: Client, url: str, sandbox_id: str | None, token: str | None) -> None:
    """Delete a sandbox a failed test may have left on the shared server."""
    if not sandbox_id or not token:
        return
    with anyio.move_on_after(15), contextlib.suppress(SandboxCreationError, SandboxConnectionError):
        attached = await attach_when_free(client, url, sandbox_id, token, within=10)
        await attached.kill()


async def assert_no_socket_left(proxy: OneWayProxy, client: Client, server: ServerThread, sandbox: Any) -> None:
    """Nothing of the client stays attached: every proxied connection ends, and a direct attach works."""
    await wait_until(lambda: proxy.open_connections == 0, 5, "every proxied connection to end")
    # Only SANDBOX_IN_USE is retried: a socket still attached after 5 s is the bug this looks for.
    attached = await attach_when_free(client, server.url, sandbox.sandbox_id, sandbox.sandbox_token)
    await attached.kill()


@contextlib.asynccontextmanager
async def own_client(client: Client) -> AsyncIterator[Client]:
    """The fixture's client, but on trio in a nursery of the test's, so what escapes it fails the test."""
    if not client.transport.startswith("trio"):
        yield client
        return
    async with trio.open_nursery() as nursery:
        yield Client(client.transport, nursery)
        nursery.cancel_scope.cancel()


#: Where a reconnect's handshake is held: at the proxy, before it reaches the server ("gate"),
#: or past the server, which has attached the sandbox, while its answer waits at the proxy ("reply").
HOLDS = ["gate", "reply"]


async def cut_and_hold(proxy: OneWayProxy, sandbox: Any, hold: str = "gate") -> None:
    """Drop the connection and hold the reconnect's handshake."""
    before = proxy.connections
    if hold == "gate":
        proxy.cut(hold=True)
    else:
        proxy.hold_replies()
        proxy.cut()
    await wait_until(lambda: sandbox.state == "reconnecting", 10, "the client to notice the cut")
    await wait_until(lambda: proxy.connections > before, 10, "the reconnect handshake to reach the proxy")
    if hold == "reply":
        await wait_until(lambda: proxy.held_to_client > 0, 10, "the server's answer to the handshake")


def release(proxy: OneWayProxy, hold: str) -> None:
    """Let the held handshake complete."""
    if hold == "gate":
        proxy.release()
    else:
        proxy.thaw()


# ----------------------------------------------------------------------------
# 1. stdin in the lossy window


async def test_stdin_written_into_a_black_hole_arrives_after_the_reconnect(
    client: Client, server: ServerThread
) -> None:
    with anyio.fail_after(60), TrackingProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url, enable_auto_reconnect=True)
            try:
                process = await sandbox.exec("python", ECHO)
                output = Lines(process)
                async with anyio.create_task_group() as group:
                    group.start_soon(output.collect)
                    await process.write_to_stdin("ready\n")
                    await output.wait_for("got ready\n", 10)  # the connection works end to end
                    proxy.freeze()
                    await process.write_to_stdin("a\n")  # accepted: it only sits in a socket buffer
                    proxy.cut()
                    proxy.unfreeze()  # the cut connection is gone: this only lets the reconnect through
                    await wait_until(lambda: sandbox.reconnects > 0, 20, "the reconnect")
                    if is_upstream(server):
                        # No acknowledgements upstream: a loss may be unavoidable, but it must be flagged.
                        await wait_until(
                            lambda: "got a\n" in output.lines or process.stdin_may_be_incomplete,
                            10,
                            "'got a' or the flag",
                        )
                    else:
                        await output.wait_for("got a\n", 10)
                    await process.write_to_stdin("end\n")
                    await process.wait(timeout=20)
                    await output.ended.wait()
            finally:
                await sandbox.kill()
    assert output.lines.count("got a\n") <= 1, output.lines
    assert output.error is None
    if is_upstream(server):
        assert "got a\n" in output.lines or process.stdin_may_be_incomplete
    else:
        assert output.lines == ["got ready\n", "got a\n"]
        assert process.stdin_may_be_incomplete is False


async def test_twenty_black_holes_lose_and_duplicate_no_output_and_no_stdin(
    client: Client, server: ServerThread
) -> None:
    upstream = is_upstream(server)
    # The stdin of each round: one line written into the black hole, one right after the cut.
    sent = [f"{kind}{k}\n" for k in range(20) for kind in "ab"]
    with anyio.fail_after(60), TrackingProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url, enable_auto_reconnect=True)
            try:
                process = await sandbox.exec("python", TICKER_AND_ECHO)
                output = Lines(process)
                async with anyio.create_task_group() as group:
                    group.start_soon(output.collect)
                    for k in range(20):
                        seen = len(output.lines)
                        await wait_until(lambda seen=seen: len(output.lines) > seen + 10, 20, "output to flow")
                        proxy.freeze()
                        await process.write_to_stdin(f"a{k}\n")
                        proxy.cut()
                        proxy.unfreeze()  # for the reconnect: what was held died with the cut
                        await process.write_to_stdin(f"b{k}\n")
                        await wait_until(lambda k=k: sandbox.reconnects > k, 20, f"reconnect {k + 1}")
                    await process.write_to_stdin("end\n")
                    await process.wait(timeout=30)
                    await output.ended.wait()
                # What reached the process, read over a connection that is not cut.
                logged = await sandbox.exec("bash", "cat stdin.log")
                received = (await logged.stdout.read_all(timeout=20)).splitlines(keepends=True)
            finally:
                await sandbox.kill()
    lines = output.lines
    assert output.error is None
    numbers = [int(match[1]) for line in lines if (match := re.fullmatch(r"line (\d+)\n", line))]
    got = [line for line in lines if line.startswith("got ")]
    if upstream:
        # Without acknowledgements a loss cannot always be avoided, but never duplicated, reordered or unflagged.
        assert numbers == sorted(set(numbers))
        if numbers != list(range(len(numbers))) or lines[-1:] != ["bye\n"]:
            assert process.output_may_be_incomplete
        assert received == [line for line in sent if line in received], "stdin reordered or duplicated"
        if received != sent:
            assert process.stdin_may_be_incomplete, f"stdin lost silently: {sorted(set(sent) - set(received))}"
        assert len(got) == len(set(got))
        return
    assert received == sent, f"missing {[line for line in sent if line not in received]}"
    assert got == [f"got {line}" for line in sent]
    # Output flowed through every round: each waited for 11 new lines, at most 2 of them echoes.
    assert numbers == list(range(len(numbers))) and len(numbers) >= 20 * 9
    assert lines[-1] == "bye\n"
    assert sandbox.reconnects == 20
    assert not process.output_may_be_incomplete
    assert process.stdin_may_be_incomplete is False


# ----------------------------------------------------------------------------
# 2, 3. killing the sandbox while reconnecting


@pytest.mark.parametrize("hold", HOLDS)
async def test_kill_while_reconnecting_deletes_the_sandbox(client: Client, server: ServerThread, hold: str) -> None:
    with anyio.fail_after(60), OneWayProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url, enable_auto_reconnect=True)
            sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
            assert sandbox_id and token
            try:
                await cut_and_hold(proxy, sandbox, hold)
                async with anyio.create_task_group() as group:
                    kill = await start(group, sandbox.kill, timeout=20)
                    release(proxy, hold)
                assert kill.error is None
                try:
                    survivor = await attach_when_free(client, server.url, sandbox_id, token)
                except SandboxCreationError as exc:
                    assert exc.status == "SANDBOX_NOT_FOUND"
                else:
                    await survivor.kill()
                    pytest.fail("sandbox.kill() returned but the sandbox still exists on the server")
            finally:
                await kill_left_over(client, server.url, sandbox_id, token)


async def test_kill_while_the_server_is_gone_for_good_raises_in_bounded_time(
    client: Client, server: ServerThread
) -> None:
    with anyio.fail_after(60), TrackingProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(
                proxy.url,
                enable_auto_reconnect=True,
                reconnect_policy=ReconnectPolicy(initial_delay=0.05, max_delay=0.2, deadline=2),
            )
            sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
            try:
                proxy.stop_accepting()
                proxy.cut()
                await wait_until(lambda: sandbox.state == "reconnecting", 10, "the client to notice the cut")
                with anyio.fail_after(10), pytest.raises(SandboxConnectionError) as caught:
                    await sandbox.kill(timeout=None)
                assert "kill" in str(caught.value).lower(), f"the error does not say the kill failed: {caught.value}"
            finally:
                # The sandbox is still on the server (only the proxy is gone): delete it directly.
                await kill_left_over(client, server.url, sandbox_id, token)


@pytest.mark.parametrize("hold", HOLDS)
async def test_kill_timing_out_during_a_held_handshake_leaves_no_socket_attached(
    client: Client, server: ServerThread, hold: str
) -> None:
    with anyio.fail_after(60), OneWayProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url, enable_auto_reconnect=True)
            sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
            try:
                await cut_and_hold(proxy, sandbox, hold)
                with contextlib.suppress(SandboxConnectionError):  # "could not be delivered" is a fair answer
                    await sandbox.kill(timeout=0.5)
                release(proxy, hold)
                await assert_no_socket_left(proxy, client, server, sandbox)
            finally:
                await kill_left_over(client, server.url, sandbox_id, token)


@pytest.mark.parametrize("hold", HOLDS)
@pytest.mark.parametrize("when", ["released-during-kill", "released-after-kill"])
async def test_kill_during_a_reconnect_handshake_logs_no_error_and_raises_no_group(
    client: Client, server: ServerThread, hold: str, when: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    with anyio.fail_after(60), OneWayProxy(server.url) as proxy:
        # On trio the driver's tasks run in the test's nursery: an exception of theirs fails the test here.
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url, enable_auto_reconnect=True)
            try:
                await cut_and_hold(proxy, sandbox, hold)
                if when == "released-during-kill":
                    async with anyio.create_task_group() as group:
                        kill = await start(group, sandbox.kill, timeout=20)
                        release(proxy, hold)
                    assert kill.error is None
                else:
                    with contextlib.suppress(SandboxConnectionError):
                        await sandbox.kill(timeout=0.5)
                    release(proxy, hold)
                await wait_until(lambda: proxy.open_connections == 0, 5, "every proxied connection to end")
                await sandbox.wait_closed(timeout=5)
            finally:
                await kill_left_over(client, server.url, sandbox.sandbox_id, sandbox.sandbox_token)
    errors = [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.levelno >= logging.ERROR and record.name.split(".")[0] in ("sandbox", "sandbox_proto")
    ]
    assert not errors


# ----------------------------------------------------------------------------
# 4. killing a process while reconnecting


async def test_process_kill_during_a_reconnect_kills_it_on_the_server(client: Client, server: ServerThread) -> None:
    with anyio.fail_after(60), OneWayProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url, enable_auto_reconnect=True)
            try:
                process = await sandbox.exec("bash", "sleep 1000")
                await cut_and_hold(proxy, sandbox)
                async with anyio.create_task_group() as group:
                    kill = await start(group, process.kill, timeout=20)
                    proxy.release()
                assert kill.error is None
                assert process.done
                # Fails with "an execution is already in progress" if the sleep still runs on the server.
                again = await sandbox.exec("bash", "echo ok")
                assert await again.stdout.read_all(timeout=20) == "ok\n"
            finally:
                await sandbox.kill()


# ----------------------------------------------------------------------------
# 5. stdin and kill while a checkpoint is pending (and refused: an exec runs)


async def test_stdin_written_while_a_refused_checkpoint_is_pending_is_delivered(
    client: Client, server: ServerThread
) -> None:
    with anyio.fail_after(60), OneWayProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url, enable_sandbox_checkpoint=True)
            try:
                process = await sandbox.exec("python", ECHO)
                output = Lines(process)
                async with anyio.create_task_group() as group:
                    group.start_soon(output.collect)
                    # The server's answers wait at the proxy: the checkpoint stays pending while stdin is written.
                    proxy.freeze_to_client()
                    checkpoint = await start(group, sandbox.checkpoint)
                    write = await start(group, process.write_to_stdin, "x\n")
                    proxy.thaw()
                    await checkpoint.finished.wait()
                    assert isinstance(checkpoint.error, SandboxCheckpointError), repr(checkpoint.error)
                    await write.finished.wait()
                    assert write.error is None
                    await output.wait_for("got x\n", 10)
                    await process.write_to_stdin("y\n")
                    await output.wait_for("got y\n", 10)
                    if is_upstream(server):
                        await process.write_to_stdin("end\n")  # no close_stdin extension upstream
                    else:
                        await process.close_stdin()
                    await process.wait(timeout=20)
                    await output.ended.wait()
                assert output.lines == ["got x\n", "got y\n"]
                assert sandbox.state == "running"
            finally:
                await sandbox.kill()


async def test_process_kill_while_a_refused_checkpoint_is_pending_kills_it(
    client: Client, server: ServerThread
) -> None:
    with anyio.fail_after(60), OneWayProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url, enable_sandbox_checkpoint=True)
            try:
                process = await sandbox.exec("python", ECHO)
                async with anyio.create_task_group() as group:
                    proxy.freeze_to_client()  # the checkpoint stays pending while the kill is asked for
                    checkpoint = await start(group, sandbox.checkpoint)
                    kill = await start(group, process.kill)
                    proxy.thaw()
                assert isinstance(checkpoint.error, SandboxCheckpointError), repr(checkpoint.error)
                assert kill.error is None
                await process.wait(timeout=10)
                # The kill timing out locally would also end the wait: only a free sandbox proves the kill.
                again = await sandbox.exec("bash", "echo ok")
                assert await again.stdout.read_all(timeout=20) == "ok\n"
            finally:
                await sandbox.kill()


# ----------------------------------------------------------------------------
# 6. concurrent stdin writes under back-pressure


@pytest.mark.parametrize("timeouts", [(0.5, 0.5, 0.5), (0.5, 0.5, 20.0)], ids=["all-impatient", "last-patient"])
async def test_concurrent_stdin_writes_that_time_out_lose_or_duplicate_nothing(
    client: Client, server: ServerThread, timeouts: tuple[float, float, float]
) -> None:
    with anyio.fail_after(90), TrackingProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url, enable_auto_reconnect=True)
            try:
                process = await sandbox.exec("python", f"SIZE = {BIG - 4}\n" + DIGEST)
                proxy.freeze()  # the sends back up: 12 MiB do not fit in the socket buffers
                async with anyio.create_task_group() as group:
                    calls = [
                        await start(
                            group, process.write_to_stdin, f"<{i}>" + str(i) * (BIG - 4) + "\n", timeout=timeout
                        )
                        for i, timeout in enumerate(timeouts)
                    ]
                    await calls[0].finished.wait()
                    proxy.unfreeze()
                await process.write_to_stdin("END\n")
                report = json.loads(await process.stdout.read_all(timeout=60))
                await process.wait(timeout=20)
            finally:
                await sandbox.kill()
    assert report["bad"] == 0, f"{report['bad']} stdin lines arrived torn or mixed"
    for i, call in enumerate(calls):
        copies = report["counts"].get(f"<{i}>", 0)
        if call.error is None:
            assert copies == 1, f"write {i} returned, and its data arrived {copies} times"
        else:
            assert isinstance(call.error, SandboxTimeoutError), f"write {i} raised {call.error!r}"
            assert copies <= 1, f"write {i} timed out, and its data arrived {copies} times"


# ----------------------------------------------------------------------------
# 7. the connection drops while an exec is starting


async def test_drop_while_an_exec_is_starting_leaves_no_orphan(client: Client, server: ServerThread) -> None:
    # Long enough that an orphan still runs when the next exec comes.
    program = "import time\nfor i in range(15):\n    print(i, flush=True)\n    time.sleep(0.2)"
    with anyio.fail_after(60), OneWayProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url, enable_auto_reconnect=True)
            try:
                proxy.freeze_to_client()
                async with anyio.create_task_group() as group:
                    starting = await start(group, sandbox.exec, "python", program)
                    # The server answered (its RUNNING is held at the proxy): the process has started.
                    await wait_until(lambda: proxy.held_to_client > 0, 10, "the server's reply to the exec")
                    proxy.cut()
                if starting.error is None:
                    process = starting.result
                    output = await process.stdout.read_all(timeout=30)
                    await process.wait(timeout=30)
                    if not process.output_may_be_incomplete:
                        assert output == "".join(f"{i}\n" for i in range(15))
                else:
                    assert isinstance(starting.error, SandboxConnectionError), repr(starting.error)
                # Exec is refused while reconnecting (documented): the orphan is what this looks for.
                await wait_until(lambda: sandbox.reconnects > 0 and sandbox.state == "running", 20, "the reconnect")
                again = await sandbox.exec("bash", "echo ok")
                assert await again.stdout.read_all(timeout=20) == "ok\n"
            finally:
                await sandbox.kill()


# ----------------------------------------------------------------------------
# 8. close while reconnecting


@pytest.mark.parametrize("hold", HOLDS)
async def test_close_during_a_held_reconnect_leaves_no_socket_attached(
    client: Client, server: ServerThread, hold: str
) -> None:
    with anyio.fail_after(60), OneWayProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url, enable_auto_reconnect=True)
            try:
                await cut_and_hold(proxy, sandbox, hold)
                async with anyio.create_task_group() as group:
                    close = await start(group, sandbox.close)
                    release(proxy, hold)
                assert close.error is None
                await wait_until(lambda: proxy.open_connections == 0, 5, "every proxied connection to end")
                assert sandbox.state == "closed"
                await sandbox.wait_closed(timeout=5)
                await assert_no_socket_left(proxy, client, server, sandbox)
            finally:
                await kill_left_over(client, server.url, sandbox.sandbox_id, sandbox.sandbox_token)


# ----------------------------------------------------------------------------
# 9. a timed-out exec


async def test_exec_timing_out_leaves_the_sandbox_usable(client: Client, server: ServerThread) -> None:
    with anyio.fail_after(60), TrackingProxy(server.url) as proxy:
        async with own_client(client) as client:
            sandbox = await client.create(proxy.url)
            try:
                proxy.freeze()
                with pytest.raises(SandboxTimeoutError):
                    await sandbox.exec("bash", "echo late", timeout=0.5)
                proxy.unfreeze()
                assert sandbox.state == "running"
                process = await sandbox.exec("bash", "echo ok")  # may first wait for the late one to be killed
                assert await process.stdout.read_all(timeout=20) == "ok\n"
            finally:
                await sandbox.kill()


# ----------------------------------------------------------------------------
# 10. bounded waits


async def test_wait_closed_has_a_finite_default_timeout(client: Client, server: ServerThread) -> None:
    default = inspect.signature(client.module.Sandbox.wait_closed).parameters["timeout"].default
    assert isinstance(default, int | float) and 0 < default < float("inf"), default
    with anyio.fail_after(30):
        async with own_client(client) as client, client.create(server.url) as sandbox:
            with pytest.raises(SandboxTimeoutError):
                await sandbox.wait_closed(timeout=0.2)


async def test_stream_read_timeout_defaults_to_ten_minutes_and_is_settable(
    client: Client, server: ServerThread
) -> None:
    with anyio.fail_after(30):
        async with own_client(client) as client, client.create(server.url) as sandbox:
            process = await sandbox.exec("bash", "sleep 1000")
            assert process.stdout.read_timeout == 600
            assert process.stderr.read_timeout == 600
            process.stdout.read_timeout = 0.3
            assert process.stdout.read_timeout == 0.3
            assert process.stderr.read_timeout == 600  # per stream
            await process.kill()


async def test_async_for_on_a_silent_process_times_out(client: Client, server: ServerThread) -> None:
    with anyio.fail_after(30):
        async with own_client(client) as client, client.create(server.url) as sandbox:
            process = await sandbox.exec("bash", "sleep 1000")
            process.stdout.read_timeout = 0.3
            with anyio.fail_after(2), pytest.raises(SandboxTimeoutError):
                async for line in process.stdout:
                    pytest.fail(f"a silent process printed {line!r}")
            await process.kill()
