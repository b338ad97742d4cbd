"""A hostile server against the client on asyncio and on trio, over a real loopback socket.

A tiny scripted WebSocket server plays a hypothesis-generated script (any
text or binary frame, invalid JSON, JSON of every wrong type, unknown events
and statuses, statuses out of order, ``sandbox_id`` twice, big frames), then
closes with any code or aborts the TCP connection, at any point. The client
under test runs every waiting call at once. Whatever the script:

* nothing but ``SandboxException`` subclasses comes out of the client;
* every waiter (create, exec, wait, read_all, readline, write_to_stdin, kill,
  process.kill, checkpoint, snapshot_filesystem, wait_closed) wakes when the
  connection ends, well before its own timeout (a ``SandboxTimeoutError`` or
  the outer deadline firing would mean it hung);
* the driver never fails internally (nothing logged at ERROR).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import anyio
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection, serve

import sandbox_asyncio
import sandbox_trio
from sandbox_asyncio import Sandbox
from sandbox_proto import SandboxConnectionError, SandboxException, SandboxTimeoutError, Status


def examples(default: int) -> int:
    """Socket tests: ``default`` normally, ten times more under a bigger profile."""
    return default if settings.default.max_examples <= 100 else default * 10


#: Per-call timeouts, far above how long any script lasts: hitting one means a hang.
CALL_TIMEOUT = 30.0
#: How long after the script ends every call must have returned or raised.
SETTLE_DEADLINE = 10.0
LIMIT = 16 * 2**20


def compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def status(value: str, **extra: Any) -> str:
    return compact({"event": "status_update", "status": value, **extra})


GOOD_SETUP = [
    status("SANDBOX_CREATING"),
    '{"event":"sandbox_id","sandbox_id":"sandbox-x","sandbox_token":"tok"}',
    status("SANDBOX_RUNNING", extensions=["exit_code", "seq", "close_stdin"]),
]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)
any_status = st.sampled_from([s.value for s in Status]) | st.text(max_size=20)
# Every key a server frame has, each with a value of every JSON type.
frame_like = st.fixed_dictionaries(
    {"event": st.sampled_from(["status_update", "stdout", "stderr", "sandbox_id", "error", "output_gap", "x"])},
    optional={
        key: json_values | any_status
        for key in ["status", "data", "seq", "exit_code", "extensions", "sandbox_id", "sandbox_token", "message"]
    },
)
items = st.one_of(
    st.tuples(st.just("text"), st.text(max_size=40)),
    st.tuples(st.just("binary"), st.binary(max_size=40)),
    st.tuples(st.just("text"), json_values.map(json.dumps)),
    st.tuples(st.just("text"), frame_like.map(json.dumps)),
    st.tuples(st.just("text"), any_status.map(status)),
    st.tuples(st.just("text"), any_status.map(status)),
    st.tuples(st.just("text"), st.sampled_from([*GOOD_SETUP, status("SANDBOX_EXECUTION_RUNNING")])),
    st.tuples(st.just("text"), st.sampled_from([status("SANDBOX_EXECUTION_DONE", exit_code=3), '{"event":"error"}'])),
    st.tuples(st.just("text"), st.text(max_size=20).map(lambda d: json.dumps({"event": "stdout", "data": d}))),
    st.tuples(st.just("text"), st.sampled_from(["{", "[]", "null", "NaN", "[" * 5000, "\ud800"])),
    st.tuples(st.just("big"), st.integers(1, 2**20)),
    st.tuples(st.just("recv"), st.just(None)),
)
endings = st.one_of(
    st.tuples(st.just("close"), st.sampled_from([1000, 1001, 1002, 1008, 1011, 1012, 3000, 4000, 4999])),
    st.tuples(st.just("abort"), st.just(None)),
)
scripts = st.tuples(
    st.sampled_from(["exec", "exec", "good-setup", "raw"]),
    st.lists(items, max_size=25),
    endings,
)


class ScriptedServer:
    """Plays one script to every connection, then ends it as the script says."""

    def __init__(self, script: list[tuple[str, Any]], ending: tuple[str, Any]) -> None:
        self.script = script
        self.ending = ending
        self.finished = asyncio.Event()
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        try:
            if ws.request is not None and ws.request.path.startswith("/create"):
                await asyncio.wait_for(ws.recv(), 5)  # the init message (2.2)
            for kind, arg in self.script:
                if kind == "text":
                    with contextlib.suppress(UnicodeEncodeError):
                        await ws.send(arg)
                elif kind == "binary":
                    await ws.send(arg)
                elif kind == "big":
                    await ws.send(json.dumps({"event": "stdout", "data": "x" * arg}))
                elif kind == "recv":
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ws.recv(), 0.2)
            kind, code = self.ending
            if kind == "close":
                await ws.close(code)
            else:
                ws.transport.abort()
        except Exception:  # the client may close first; the script just stops
            pass
        finally:
            self.finished.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        async with serve(self.handler, "127.0.0.1", 0, max_size=None, ping_interval=None) as server:
            port = server.sockets[0].getsockname()[1]
            yield f"http://127.0.0.1:{port}"


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def errors_logged(runtime: str = "sandbox_asyncio") -> Any:
    handler = ErrorLog()
    # The driver's own log ("sandbox driver failed") and the transport's (websockets' included).
    logs = [logging.getLogger("sandbox"), logging.getLogger(runtime)]
    for log in logs:
        log.addHandler(handler)
    try:
        yield handler.records
    finally:
        for log in logs:
            log.removeHandler(handler)


async def outcome(call: Awaitable[Any]) -> BaseException | None:
    try:
        await call
    except Exception as exc:
        return exc
    return None


def check(results: list[BaseException | None], what: list[str]) -> None:
    for name, result in zip(what, results, strict=True):
        if result is None:
            continue
        assert isinstance(result, SandboxException), f"{name} raised {result!r}"
        assert not isinstance(result, SandboxTimeoutError), f"{name} hung until its timeout: {result!r}"


async def drive(url: str, ops: frozenset[str], attach: bool, runtime: Any = sandbox_asyncio, **options: Any) -> None:
    """Every public waiting call at once, as a user with several tasks would."""
    if attach:
        opening = runtime.Sandbox.attach(url, "sandbox-x", "tok", timeout=CALL_TIMEOUT, **options)
    else:
        opening = runtime.Sandbox.create(url, timeout=CALL_TIMEOUT, **options)
    try:
        sandbox = await opening
    except Exception as exc:
        check([exc], ["create/attach"])
        event(f"open failed: {type(exc).__name__}")
        return
    event("opened")
    await exercise(sandbox, ops)


async def gather(calls: list[Awaitable[Any]]) -> list[BaseException | None]:
    """The outcome of every call, run at once (on either runtime)."""
    results: list[BaseException | None] = [None] * len(calls)

    async def run(index: int, call: Awaitable[Any]) -> None:
        results[index] = await outcome(call)

    async with anyio.create_task_group() as group:
        for index, call in enumerate(calls):
            group.start_soon(run, index, call)
    return results


async def exercise(sandbox: Any, ops: frozenset[str]) -> None:
    names: list[str] = []
    calls: list[Awaitable[Any]] = []
    process = None
    try:
        process = await sandbox.exec("python", "print(1)", timeout=CALL_TIMEOUT)
    except Exception as exc:
        check([exc], ["exec"])
    event(f"exec started: {process is not None}")
    if process is not None:
        names += ["wait", "read_all", "readline", "stdin"]
        calls += [
            process.wait(timeout=CALL_TIMEOUT),
            process.stdout.read_all(timeout=CALL_TIMEOUT),
            process.stderr.readline(timeout=CALL_TIMEOUT),
            process.write_to_stdin("hi\n", timeout=CALL_TIMEOUT),
        ]
        if "process.kill" in ops:
            names.append("process.kill")
            calls.append(process.kill(timeout=CALL_TIMEOUT))
    if "snapshot" in ops:
        names.append("snapshot")
        calls.append(sandbox.snapshot_filesystem("snap", timeout=CALL_TIMEOUT))
    if "checkpoint" in ops:
        names.append("checkpoint")
        calls.append(sandbox.checkpoint(timeout=CALL_TIMEOUT))
    names.append("wait_closed")
    calls.append(sandbox.wait_closed(timeout=CALL_TIMEOUT))
    check(await gather(calls), names)
    check([await outcome(sandbox.kill(timeout=CALL_TIMEOUT))], ["kill"])
    assert sandbox.state in ("closed", "failed", "killed", "checkpointed"), sandbox.state


async def play(script: list[tuple[str, Any]], ending: tuple[str, Any], ops: frozenset[str], attach: bool) -> None:
    server = ScriptedServer(script, ending)
    async with server.running() as url:
        loop = asyncio.get_running_loop()
        with errors_logged() as records:
            task = asyncio.create_task(drive(url, ops, attach))
            # The script's own length is bounded; after it ends, everything must settle.
            done, _ = await asyncio.wait([task], timeout=SETTLE_DEADLINE + 0.3 * len(script))
            if not done:
                await asyncio.wait_for(server.finished.wait(), 5)
                started = loop.time()
                done, _ = await asyncio.wait([task], timeout=SETTLE_DEADLINE)
                if not done:
                    task.cancel()
                    raise AssertionError(f"the client hung {loop.time() - started:.1f}s after the connection ended")
            task.result()
        assert not records, [r.getMessage() for r in records]


@contextlib.contextmanager
def on_a_thread(server: ScriptedServer) -> Iterator[str]:
    """``server`` on its own asyncio loop and thread, for a client on trio."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stop = asyncio.Event()
    ready: concurrent.futures.Future[str] = concurrent.futures.Future()

    async def serve_until_stopped() -> None:
        async with server.running() as url:
            ready.set_result(url)
            await stop.wait()

    served = asyncio.run_coroutine_threadsafe(serve_until_stopped(), loop)
    try:
        yield ready.result(timeout=10)
    finally:
        loop.call_soon_threadsafe(stop.set)
        served.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def play_on_trio(
    script: list[tuple[str, Any]], ending: tuple[str, Any], ops: frozenset[str], attach: bool
) -> None:
    with on_a_thread(ScriptedServer(script, ending)) as url, errors_logged("sandbox_trio") as records:
        # The script's own length is bounded; the connection's tasks must end with the sandbox too.
        with trio.fail_after(SETTLE_DEADLINE + 5 + 0.3 * len(script)):
            async with trio.open_nursery() as nursery:
                await drive(url, ops, attach, sandbox_trio, nursery=nursery)
    assert not records, [r.getMessage() for r in records]


op_sets = st.frozensets(st.sampled_from(["process.kill", "snapshot", "checkpoint"]))


def with_setup(script: tuple[str, list[tuple[str, Any]], tuple[str, Any]], attach: bool) -> list[tuple[str, Any]]:
    """The script's body after the setup it asks for."""
    setup, body, _ = script
    prefix: list[tuple[str, Any]] = []
    if setup != "raw":
        # Attach: no CREATING, no sandbox_id (7.2).
        prefix = [("text", status("SANDBOX_RUNNING"))] if attach else [("text", frame) for frame in GOOD_SETUP]
    if setup == "exec":
        prefix += [("recv", None), ("text", status("SANDBOX_EXECUTION_RUNNING"))]
    return prefix + body


@settings(
    max_examples=examples(30),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(script=scripts, ops=op_sets, attach=st.booleans())
def test_hostile_server_never_hangs_or_leaks_foreign_exceptions(
    script: tuple[str, list[tuple[str, Any]], tuple[str, Any]], ops: frozenset[str], attach: bool
) -> None:
    asyncio.run(play(with_setup(script, attach), script[2], ops, attach))


@settings(
    max_examples=examples(20),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(script=scripts, ops=op_sets, attach=st.booleans())
def test_hostile_server_against_trio(
    script: tuple[str, list[tuple[str, Any]], tuple[str, Any]], ops: frozenset[str], attach: bool
) -> None:
    """The same scripts against trio's transport: websockets' trio connection under our hand-off."""
    trio.run(play_on_trio, with_setup(script, attach), script[2], ops, attach)


# --------------------------------------------------------------------------
# handwritten cases


def test_frame_at_the_size_limit_is_delivered() -> None:
    """16 MiB exactly is within the limit (1.1): the output arrives intact."""
    data_size = LIMIT - len('{"event":"stdout","data":""}')
    big = compact({"event": "stdout", "data": "y" * data_size})
    assert len(big) == LIMIT
    script = [("text", f) for f in GOOD_SETUP]
    script += [("recv", None), ("text", status("SANDBOX_EXECUTION_RUNNING")), ("text", big)]
    script += [("text", status("SANDBOX_EXECUTION_DONE"))]

    async def main() -> None:
        server = ScriptedServer(script, ("close", 1000))
        async with server.running() as url:
            sandbox = await Sandbox.create(url, timeout=CALL_TIMEOUT)
            process = await sandbox.exec("python", "x", timeout=CALL_TIMEOUT)
            out = await process.stdout.read_all(timeout=CALL_TIMEOUT)
            assert len(out) == data_size
            await process.wait(timeout=CALL_TIMEOUT)
            await sandbox.close()

    asyncio.run(main())


def test_frame_over_the_size_limit_ends_the_session_with_1009() -> None:
    """One byte over 16 MiB: the client refuses the frame (1009), every waiter wakes."""
    big = compact({"event": "stdout", "data": "y" * (LIMIT - len('{"event":"stdout","data":""}') + 1)})
    script = [("text", f) for f in GOOD_SETUP]
    script += [("recv", None), ("text", status("SANDBOX_EXECUTION_RUNNING")), ("recv", None), ("text", big)]

    async def main() -> None:
        server = ScriptedServer(script, ("close", 1000))
        async with server.running() as url:
            sandbox = await Sandbox.create(url, timeout=CALL_TIMEOUT)
            process = await sandbox.exec("python", "x", timeout=CALL_TIMEOUT)
            async with asyncio.timeout(SETTLE_DEADLINE):
                with pytest.raises(SandboxConnectionError, match="1009"):
                    await process.wait(timeout=CALL_TIMEOUT)
                error = await sandbox.wait_closed(timeout=CALL_TIMEOUT)
            assert isinstance(error, SandboxConnectionError)
            assert sandbox.state == "failed"

    asyncio.run(main())


def test_sandbox_id_twice_keeps_the_first() -> None:
    script = [("text", f) for f in GOOD_SETUP[:2]]
    script += [("text", '{"event":"sandbox_id","sandbox_id":"sandbox-other","sandbox_token":"other"}')]
    script += [("text", GOOD_SETUP[2]), ("recv", None)]

    async def main() -> None:
        server = ScriptedServer(script, ("close", 1000))
        async with server.running() as url:
            sandbox = await Sandbox.create(url, timeout=CALL_TIMEOUT)
            assert (sandbox.sandbox_id, sandbox.sandbox_token) == ("sandbox-x", "tok")
            await sandbox.close()

    asyncio.run(main())
