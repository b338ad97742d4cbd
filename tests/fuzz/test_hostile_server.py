"""A hostile server against the client, on all four transports, over a real loopback socket.

A tiny scripted WebSocket server plays a hypothesis-generated script (any
text or binary frame, invalid JSON, JSON of every wrong type, unknown events
and statuses, statuses out of order, ``sandbox_id`` twice, ``stdin_ack`` with
any number, big frames), then closes with any code or aborts the TCP
connection, at any point. With auto-reconnect on, the client comes back and
the server accepts up to two reconnections, playing a script of their own
(an attach's setup, or none, then anything), and refuses any more with HTTP
404. The client runs every waiting call at once, on asyncio (websockets,
aiohttp) and on trio (websockets, trio-websocket). Whatever the scripts:

* nothing but ``SandboxException`` subclasses comes out of the client;
* every waiter (create, exec, wait, read_all, readline, write_to_stdin, kill,
  process.kill, checkpoint, snapshot_filesystem, wait_closed) wakes when the
  session ends, well before its own timeout (a ``SandboxTimeoutError`` or
  the outer deadline firing would mean it hung);
* the driver never fails internally (nothing logged at ERROR).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from http import HTTPStatus
from typing import Any

import anyio
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

import sandbox_asyncio
import sandbox_trio
from sandbox_asyncio import Sandbox
from sandbox_proto import ReconnectPolicy, SandboxConnectionError, SandboxException, SandboxTimeoutError, Status
from sandbox_proto.testing import server_texts


def examples(default: int) -> int:
    """Socket tests: ``default`` normally, ten times more under a bigger profile."""
    return default if settings.default.max_examples <= 100 else default * 10


#: Per-call timeouts, far above how long any script lasts: hitting one means a hang.
CALL_TIMEOUT = 30.0
#: How long after the scripts end every call must have returned or raised.
SETTLE_DEADLINE = 10.0
LIMIT = 16 * 2**20
#: Reconnects come fast and give up soon: each script is short, and a run must stay bounded.
FAST_RECONNECT = ReconnectPolicy(initial_delay=0.01, max_delay=0.05, deadline=3.0)


def compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def status(value: str, **extra: Any) -> str:
    return compact({"event": "status_update", "status": value, **extra})


GOOD_SETUP = [
    status("SANDBOX_CREATING"),
    '{"event":"sandbox_id","sandbox_id":"sandbox-x","sandbox_token":"tok"}',
    status("SANDBOX_RUNNING", extensions=["exit_code", "seq", "close_stdin"]),
]
#: RUNNING with every extension, stdin_seq included: the client then numbers stdin and waits for acks.
RUNNING_ALL = status("SANDBOX_RUNNING", extensions=["close_stdin", "exec_ref", "exit_code", "seq", "stdin_seq"])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)
any_status = st.sampled_from([s.value for s in Status]) | st.text(max_size=20)
# Every key a server frame has, each with a value of every JSON type.
frame_like = st.fixed_dictionaries(
    {
        "event": st.sampled_from(
            ["status_update", "stdout", "stderr", "sandbox_id", "error", "output_gap", "stdin_ack", "x"]
        )
    },
    optional={
        key: json_values | any_status
        for key in [
            "status",
            "data",
            "seq",
            "exit_code",
            "extensions",
            "sandbox_id",
            "sandbox_token",
            "message",
            "from_seq",
            "to_seq",
        ]
    },
)
# Numbers a server may put in seq fields: small ones that mean something, and anything else.
seqs = st.integers(-2, 6) | st.integers() | json_values
items = st.one_of(
    st.tuples(st.just("text"), st.text(max_size=40)),
    st.tuples(st.just("binary"), st.binary(max_size=40)),
    st.tuples(st.just("text"), json_values.map(json.dumps)),
    st.tuples(st.just("text"), frame_like.map(json.dumps)),
    st.tuples(st.just("text"), any_status.map(status)),
    st.tuples(st.just("text"), any_status.map(status)),
    st.tuples(st.just("text"), st.sampled_from([*GOOD_SETUP, RUNNING_ALL, status("SANDBOX_EXECUTION_RUNNING")])),
    st.tuples(st.just("text"), st.sampled_from([status("SANDBOX_EXECUTION_DONE", exit_code=3), '{"event":"error"}'])),
    st.tuples(st.just("text"), st.text(max_size=20).map(lambda d: json.dumps({"event": "stdout", "data": d}))),
    st.tuples(st.just("text"), seqs.map(lambda n: json.dumps({"event": "stdout", "data": "o", "seq": n}))),
    st.tuples(st.just("text"), seqs.map(lambda n: json.dumps({"event": "stdin_ack", "seq": n}))),
    # Well-formed frames of every kind, extension frames included (sandbox_proto.testing).
    st.tuples(st.just("text"), server_texts()),
    st.tuples(st.just("text"), st.sampled_from(["{", "[]", "null", "NaN", "[" * 5000, "\ud800"])),
    st.tuples(st.just("big"), st.integers(1, 2**20)),
    st.tuples(st.just("recv"), st.just(None)),
)
endings = st.one_of(
    st.tuples(st.just("close"), st.sampled_from([1000, 1001, 1002, 1008, 1011, 1012, 3000, 4000, 4999])),
    st.tuples(st.just("abort"), st.just(None)),
)
#: One connection's script: the setup it starts with, then anything, then its end.
scripts = st.tuples(
    st.sampled_from(["exec", "exec", "good-setup", "good-setup-all", "raw"]),
    st.lists(items, max_size=25),
    endings,
)
#: The reconnections the server accepts (attaches): shorter scripts, mostly with a good setup.
reconnections = st.lists(
    st.tuples(
        st.sampled_from(["exec", "good-setup", "good-setup", "good-setup-all", "raw"]),
        st.lists(items, max_size=10),
        endings,
    ),
    max_size=2,
)

Script = list[tuple[str, Any]]


class ScriptedServer:
    """Plays one script per connection, then ends it as that script says; refuses connections beyond them."""

    def __init__(
        self,
        script: Script,
        ending: tuple[str, Any],
        more: list[tuple[str, Script, tuple[str, Any]]] | None = None,
    ) -> None:
        #: (setup kind, body, ending) of connection 1 onwards: they are attaches.
        self.plays: list[tuple[str | None, Script, tuple[str, Any]]] = [(None, script, ending), *(more or [])]
        #: No script is being played (the client may come back, or not).
        self.finished = asyncio.Event()
        self.url = ""
        self.accepted = 0
        self.played = 0

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.accepted >= len(self.plays):
            return connection.respond(HTTPStatus.NOT_FOUND, "no more connections\n")
        self.accepted += 1
        self.finished.clear()
        return None

    async def handler(self, ws: ServerConnection) -> None:
        setup, body, ending = self.plays[self.played]
        self.played += 1
        script = body if setup is None else with_setup(setup, body, attach=True)
        try:
            if ws.request is not None and ws.request.path.startswith("/create"):
                await asyncio.wait_for(ws.recv(), 5)  # the init message (2.2)
            for kind, arg in script:
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
            kind, code = ending
            if kind == "close":
                await ws.close(code)
            else:
                ws.transport.abort()
        except Exception:  # the client may close first; the script just stops
            pass
        finally:
            self.finished.set()

    @property
    def length(self) -> int:
        return sum(len(body) for _, body, _ in self.plays)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        async with serve(
            self.handler, "127.0.0.1", 0, max_size=None, ping_interval=None, process_request=self.process_request
        ) as server:
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


class Reach:
    """What one example reached, for --hypothesis-show-statistics."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.seen: set[str] = set()
        #: How many connections had been played when stdin was last handed to one.
        self.stdin_on: int | None = None

    async def noting(self, call: Awaitable[Any], what: str) -> Any:
        result = await call
        if what == "stdin":
            self.stdin_on = self.server.played
        elif result:
            self.seen.add(what)
        return result

    def report(self) -> None:
        played = self.server.played
        if played > 1:
            event("reach: reconnect")
        if self.stdin_on is not None and played > self.stdin_on:
            event("reach: stdin across a reconnect")
        for what in sorted(self.seen):
            event(f"reach: {what}")


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


async def drive(
    url: str, ops: frozenset[str], attach: bool, reach: Reach, runtime: Any = sandbox_asyncio, **options: Any
) -> None:
    """Every public waiting call at once, as a user with several tasks would."""
    if options.get("enable_auto_reconnect"):
        options["reconnect_policy"] = FAST_RECONNECT
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
    await exercise(sandbox, ops, reach)


async def gather(calls: list[Awaitable[Any]]) -> list[BaseException | None]:
    """The outcome of every call, run at once (on either runtime)."""
    results: list[BaseException | None] = [None] * len(calls)

    async def run(index: int, call: Awaitable[Any]) -> None:
        results[index] = await outcome(call)

    async with anyio.create_task_group() as group:
        for index, call in enumerate(calls):
            group.start_soon(run, index, call)
    return results


async def exercise(sandbox: Any, ops: frozenset[str], reach: Reach) -> None:
    names: list[str] = []
    calls: list[Awaitable[Any]] = []
    process = None
    try:
        process = await sandbox.exec("python", "print(1)", timeout=CALL_TIMEOUT)
    except Exception as exc:
        check([exc], ["exec"])
    if process is not None:
        reach.seen.add("exec")
        names += ["wait", "read_all", "readline", "stdin", "stdin again"]
        calls += [
            process.wait(timeout=CALL_TIMEOUT),
            reach.noting(process.stdout.read_all(timeout=CALL_TIMEOUT), "output"),
            process.stderr.readline(timeout=CALL_TIMEOUT),
            reach.noting(process.write_to_stdin("hi\n", timeout=CALL_TIMEOUT), "stdin"),
            reach.noting(process.write_to_stdin("more\n", timeout=CALL_TIMEOUT), "stdin"),
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


def budget(server: ScriptedServer) -> float:
    """How long the scripts may take: their length, and the reconnects between them."""
    return SETTLE_DEADLINE + 0.3 * server.length + FAST_RECONNECT.deadline * (len(server.plays) - 1)


async def play(server: ScriptedServer, ops: frozenset[str], attach: bool, **options: Any) -> None:
    reach = Reach(server)
    async with server.running() as url:
        loop = asyncio.get_running_loop()
        with errors_logged() as records:
            task = asyncio.create_task(drive(url, ops, attach, reach, **options))
            # The scripts' own length is bounded; after they end, everything must settle.
            done, _ = await asyncio.wait([task], timeout=budget(server))
            if not done:
                await asyncio.wait_for(server.finished.wait(), 5)
                started = loop.time()
                done, _ = await asyncio.wait([task], timeout=SETTLE_DEADLINE)
                if not done:
                    task.cancel()
                    raise AssertionError(f"the client hung {loop.time() - started:.1f}s after the connection ended")
            task.result()
        assert not records, [r.getMessage() for r in records]
    reach.report()


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


async def play_on_trio(server: ScriptedServer, ops: frozenset[str], attach: bool, **options: Any) -> None:
    reach = Reach(server)
    with on_a_thread(server) as url, errors_logged("sandbox_trio") as records:
        # The scripts' own length is bounded; the connection's tasks must end with the sandbox too.
        with trio.fail_after(budget(server) + 5):
            async with trio.open_nursery() as nursery:
                await drive(url, ops, attach, reach, sandbox_trio, nursery=nursery, **options)
    assert not records, [r.getMessage() for r in records]
    reach.report()


op_sets = st.frozensets(st.sampled_from(["process.kill", "snapshot", "checkpoint"]))


def with_setup(setup: str, body: Script, attach: bool) -> Script:
    """``body`` after the setup ``setup`` asks for."""
    prefix: Script = []
    if setup != "raw":
        running = RUNNING_ALL if setup == "good-setup-all" else GOOD_SETUP[2]
        # Attach: no CREATING, no sandbox_id (7.2).
        prefix = [("text", running)] if attach else [("text", frame) for frame in [*GOOD_SETUP[:2], running]]
    if setup == "exec":
        # The exec request (or, on a reattach, the reconnect) and its RUNNING.
        prefix += [("recv", None), ("text", status("SANDBOX_EXECUTION_RUNNING"))]
    return prefix + body


def scripted(
    script: tuple[str, Script, tuple[str, Any]],
    more: list[tuple[str, Script, tuple[str, Any]]],
    attach: bool,
    auto_reconnect: bool,
) -> ScriptedServer:
    setup, body, ending = script
    return ScriptedServer(with_setup(setup, body, attach), ending, more if auto_reconnect else [])


ASYNCIO_TRANSPORTS = ["websockets", "aiohttp"]
TRIO_TRANSPORTS = ["websockets", "trio-websocket"]


@pytest.mark.parametrize("auto_reconnect", [False, True], ids=["no-reconnect", "reconnect"])
@pytest.mark.parametrize("transport", ASYNCIO_TRANSPORTS)
@settings(
    max_examples=examples(30),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(script=scripts, more=reconnections, ops=op_sets, attach=st.booleans())
def test_hostile_server_never_hangs_or_leaks_foreign_exceptions(
    transport: str,
    auto_reconnect: bool,
    script: tuple[str, Script, tuple[str, Any]],
    more: list[tuple[str, Script, tuple[str, Any]]],
    ops: frozenset[str],
    attach: bool,
) -> None:
    server = scripted(script, more, attach, auto_reconnect)
    options = {"transport": transport, "enable_auto_reconnect": auto_reconnect}
    asyncio.run(play(server, ops, attach, **options))


@pytest.mark.parametrize("auto_reconnect", [False, True], ids=["no-reconnect", "reconnect"])
@pytest.mark.parametrize("transport", TRIO_TRANSPORTS)
@settings(
    max_examples=examples(20),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(script=scripts, more=reconnections, ops=op_sets, attach=st.booleans())
def test_hostile_server_against_trio(
    transport: str,
    auto_reconnect: bool,
    script: tuple[str, Script, tuple[str, Any]],
    more: list[tuple[str, Script, tuple[str, Any]]],
    ops: frozenset[str],
    attach: bool,
) -> None:
    """The same scripts against trio's transports: websockets' trio connection and trio-websocket."""
    server = scripted(script, more, attach, auto_reconnect)
    options = {"transport": transport, "enable_auto_reconnect": auto_reconnect}
    trio.run(functools.partial(play_on_trio, server, ops, attach, **options))


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
