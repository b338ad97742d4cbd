"""A hostile client against ``sandbox_server``, over a real socket.

Raw WebSocket frames (no client library on the hostile side): random JSON
objects with wrong types in every field, binary frames, invalid JSON and
UTF-8, huge code, stdin floods, thousands of tiny frames, unknown actions,
snapshot names with ``../``, attach paths of every shape, attach storms.
Each gets the replies of protocol.md 11.2 S6/S7 (or the documented ones), the
server never crashes, and after every case a *second* sandbox on the same
server still runs an exec (the bystander check).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from _support import ServerThread
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from sandbox_asyncio import Sandbox
from sandbox_proto import ALL_EXTENSIONS

LIMIT = 16 * 2**20
TIMEOUT = 20.0


def examples(default: int) -> int:
    """Socket tests: ``default`` normally, ten times more under a bigger profile."""
    return default if settings.default.max_examples <= 100 else default * 10


def ST(status: str) -> str:
    return json.dumps({"event": "status_update", "status": status}, separators=(",", ":"))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread() as running:
        yield running


def ws_url(url: str, path: str) -> str:
    return "ws" + url.removeprefix("http") + path


#: Asked for on every connection, so that the extensions' code paths are attacked too.
REQUEST_ALL = "extensions=" + ",".join(sorted(ALL_EXTENSIONS))


async def open_ws(url: str, path: str) -> ClientConnection:
    path += f"{'&' if '?' in path else '?'}{REQUEST_ALL}"
    return await connect(ws_url(url, path), max_size=None, open_timeout=TIMEOUT, ping_interval=None)


async def created(url: str, init: str = "{}") -> tuple[ClientConnection, str, str]:
    ws = await open_ws(url, "/create")
    await ws.send(init)
    assert await recv(ws) == ST("SANDBOX_CREATING")
    frame = json.loads(await recv(ws))
    assert frame["event"] == "sandbox_id", frame
    running = json.loads(await recv(ws))
    assert running["status"] == "SANDBOX_RUNNING", running
    return ws, frame["sandbox_id"], frame["sandbox_token"]


async def recv(ws: ClientConnection) -> str:
    message = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(message, str), message
    return message


async def replies_until_probe(ws: ClientConnection) -> list[dict[str, Any]]:
    """Send a probe whose reply is known (kill_process when idle: FORCE_KILLED, 7.5), return what came before.

    The server handles one frame at a time (S8), so everything before the
    probe's reply answers the frames sent before it.
    """
    await ws.send('{"action":"kill_process"}')
    out = []
    while (text := await recv(ws)) != ST("SANDBOX_EXECUTION_FORCE_KILLED"):
        out.append(json.loads(text))
    return out


async def bystander_runs_an_exec(url: str) -> None:
    """Another sandbox on the same server still works (checked after every hostile case)."""
    async with asyncio.timeout(TIMEOUT):
        sandbox = await Sandbox.create(url)
        try:
            process = await sandbox.exec("bash", "echo bystander ok")
            assert await process.stdout.read_all() == "bystander ok\n"
            await process.wait()
        finally:
            await sandbox.kill()


def assert_error_pair(frames: list[dict[str, Any]], status: str) -> None:
    assert frames[0] == {"event": "status_update", "status": status}, frames
    assert frames[1]["event"] == "error" and isinstance(frames[1]["message"], str), frames


# --------------------------------------------------------------------------
# property: random frames after create

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=6,
)
# Requests that end the session are covered by their own tests.
SAFE_ACTIONS = ["snapshot_filesystem", "kill_process", "reconnect", "close_stdin", "pause", ""]
client_objects = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(SAFE_ACTIONS) | json_values.filter(lambda v: v not in ("kill_sandbox", "checkpoint")),
        "event": st.sampled_from(["stdin", "stdout"]) | json_values,
        "language": st.sampled_from(["python", "bash", "ruby"]) | json_values,
        "code": json_values,
        "data": json_values,
        "name": json_values | st.sampled_from(["../x", "a/b", ".hidden", "ok-name"]),
        "last_seq": json_values,
    },
)
# Not JSON objects at all: S6.
malformed = st.one_of(
    st.binary(max_size=30).map(lambda b: ("binary", b)),
    st.sampled_from(["", "{", "nul", "[1,2]", '"str"', "null", "42", "{]", "[" * 5000]).map(lambda t: ("text", t)),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: ("text", json.dumps(v))),
)


def expected_for_object(obj: dict[str, Any]) -> str:
    """The dispatch rule (3.1), restricted to what this property sends."""
    action = obj.get("action")
    if action == "snapshot_filesystem":
        return "snapshot"
    if action == "kill_process":
        return "kill_process"
    if obj.get("event") == "stdin":
        return "stdin"
    if action == "reconnect":
        return "reconnect"
    if action == "close_stdin":
        return "close_stdin"
    return "exec"


async def check_object(ws: ClientConnection, obj: dict[str, Any]) -> bool:
    """Send one object; check the reply; ``False`` when the server (legitimately) closed."""
    await ws.send(json.dumps(obj))
    kind = expected_for_object(obj)
    try:
        frames = await replies_until_probe(ws)
    except ConnectionClosed:
        # The one closing reply: an exec whose 'code' is not a string (7.3.6), SANDBOX_ERROR + 4000.
        assert kind == "exec" and obj.get("language") in ("python", "bash") and not isinstance(obj.get("code"), str)
        assert ws.close_code == 4000, ws.close_code
        return False
    statuses = [f["status"] for f in frames if f["event"] == "status_update"]
    if kind == "kill_process":
        # Two FORCE_KILLED: the probe stops at the first, the second is left for the next read.
        assert frames == [], frames
        assert await recv(ws) == ST("SANDBOX_EXECUTION_FORCE_KILLED")
    elif kind == "snapshot":
        assert statuses[0] == "SANDBOX_FILESYSTEM_SNAPSHOT_CREATING", frames
        assert statuses[1] in ("SANDBOX_FILESYSTEM_SNAPSHOT_CREATED", "SANDBOX_FILESYSTEM_SNAPSHOT_ERROR"), frames
        if statuses[1].endswith("ERROR"):
            assert frames[2]["event"] == "error", frames
        if not isinstance(obj.get("name"), str) or "/" in obj["name"] or obj["name"].startswith("."):
            assert statuses[1] == "SANDBOX_FILESYSTEM_SNAPSHOT_ERROR", frames  # S7
    elif kind == "stdin":
        if "data" not in obj:
            assert_error_pair(frames, "SANDBOX_STDIN_ERROR")
        else:
            assert_error_pair(frames, "SANDBOX_EXECUTION_ERROR")  # nothing ran yet: "No process" (7.4)
    elif kind == "reconnect":
        event("reach: reconnect action (no second socket)")
        assert frames == [{"event": "status_update", "status": "SANDBOX_EXECUTION_DONE"}], frames  # S1
    elif kind == "close_stdin":
        assert frames == [], frames  # ignored when no process runs (15)
    else:  # exec
        language = obj.get("language")
        if language not in ("python", "bash"):
            assert_error_pair(frames, "SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR")
            assert frames[2:] == [{"event": "status_update", "status": "SANDBOX_EXECUTION_DONE"}], frames
        elif "code" not in obj:
            assert_error_pair(frames, "SANDBOX_EXECUTION_ERROR")
            assert frames[2:] == [{"event": "status_update", "status": "SANDBOX_EXECUTION_DONE"}], frames
        else:
            # A real exec of random code: RUNNING, output, DONE, possibly killed by the probe.
            assert statuses[0] == "SANDBOX_EXECUTION_RUNNING", frames
            event("reach: exec")
            if any(f["event"] in ("stdout", "stderr") for f in frames):
                event("reach: output")
            # The probe may have killed it: its DONE can come after the probe's FORCE_KILLED (7.5).
            if "SANDBOX_EXECUTION_DONE" not in statuses:
                while json.loads(await recv(ws)).get("status") != "SANDBOX_EXECUTION_DONE":
                    pass
    return True


async def still_runs_an_exec_with_stdin(ws: ClientConnection) -> None:
    """After the hostile frames, the same connection runs an exec that reads its stdin."""
    await ws.send(json.dumps({"language": "bash", "code": "echo ok; read line; echo got $line"}))
    assert await recv(ws) == ST("SANDBOX_EXECUTION_RUNNING")
    assert json.loads(await recv(ws))["data"] == "ok\n"
    await ws.send(json.dumps({"event": "stdin", "data": "y\n"}))
    assert json.loads(await recv(ws))["data"] == "got y\n"
    assert json.loads(await recv(ws))["status"] == "SANDBOX_EXECUTION_DONE"
    event("reach: exec")
    event("reach: output")
    event("reach: stdin")


@settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(st.one_of(client_objects.map(lambda o: ("object", o)), malformed), min_size=1, max_size=8),
    then_exec=st.booleans(),
)
def test_random_frames_after_create_get_documented_replies(
    server: ServerThread, frames: list[tuple[str, Any]], then_exec: bool
) -> None:
    async def main() -> None:
        ws, _, _ = await created(server.url)
        try:
            for kind, payload in frames:
                if kind == "object":
                    if not await check_object(ws, payload):
                        break
                    continue
                # S6: SANDBOX_ERROR + error, the connection stays open.
                await ws.send(payload)
                assert_error_pair(await replies_until_probe(ws), "SANDBOX_ERROR")
            else:
                if then_exec:
                    await still_runs_an_exec_with_stdin(ws)
        finally:
            await ws.close()
        await bystander_runs_an_exec(server.url)

    asyncio.run(main())


# --------------------------------------------------------------------------
# handwritten cases


def run(coro: Any) -> None:
    asyncio.run(coro)


def test_invalid_utf8_text_frame_closes_only_that_connection(server: ServerThread) -> None:
    async def main() -> None:
        ws, _, _ = await created(server.url)
        await ws.send(b"\xff\xfe{}", text=True)
        with pytest.raises(ConnectionClosed):
            await replies_until_probe(ws)
        assert ws.close_code == 1007  # invalid frame payload data, transport level
        await bystander_runs_an_exec(server.url)

    run(main())


@pytest.mark.parametrize(
    "init",
    [
        b"\x00\x01",
        "not json",
        "[]",
        '{"idle_timeout":"soon"}',
        '{"idle_timeout":[]}',
        '{"idle_timeout":true}',
        '{"idle_timeout":NaN}',
        '{"filesystem_snapshot_name":"../../etc"}',
        '{"filesystem_snapshot_name":"a/b"}',
    ],
)
def test_bad_init_message_is_a_creation_error(server: ServerThread, init: str | bytes) -> None:
    """S6 before setup and S7: CREATING, CREATION_ERROR, error, close 4000."""

    async def main() -> None:
        ws = await open_ws(server.url, "/create")
        await ws.send(init)
        assert await recv(ws) == ST("SANDBOX_CREATING")
        assert await recv(ws) == ST("SANDBOX_CREATION_ERROR")
        assert json.loads(await recv(ws))["event"] == "error"
        with pytest.raises(ConnectionClosed):
            await recv(ws)
        assert ws.close_code == 4000
        await bystander_runs_an_exec(server.url)

    run(main())


def test_code_close_to_the_limit_runs_or_is_refused_as_an_exec_error(server: ServerThread) -> None:
    """Within the 16 MiB frame limit: it runs, or (a server code limit) the exec-start error of 7.3.5."""

    async def main() -> None:
        ws, _, _ = await created(server.url)
        head = '{"language":"bash","code":"'
        tail = '\\necho big"}'
        message = head + "#" + "x" * (LIMIT - len(head) - len(tail) - 1 - 64) + tail
        assert LIMIT - 100 < len(message) <= LIMIT
        await ws.send(message)
        first = await recv(ws)
        if first == ST("SANDBOX_EXECUTION_RUNNING"):
            assert json.loads(await recv(ws))["data"] == "big\n"
        else:
            assert first == ST("SANDBOX_EXECUTION_ERROR")
            assert json.loads(await recv(ws))["event"] == "error"
        assert json.loads(await recv(ws))["status"] == "SANDBOX_EXECUTION_DONE"
        assert await replies_until_probe(ws) == []  # still open and answering
        await ws.close()
        await bystander_runs_an_exec(server.url)

    run(main())


def test_code_over_the_limit_is_refused_with_1009(server: ServerThread) -> None:
    async def main() -> None:
        ws, _, _ = await created(server.url)
        await ws.send('{"language":"bash","code":"' + "x" * LIMIT + '"}')
        with pytest.raises(ConnectionClosed):
            await recv(ws)
        assert ws.close_code == 1009
        await bystander_runs_an_exec(server.url)

    run(main())


def test_stdin_flood_of_ten_thousand_frames_arrives_in_order(server: ServerThread) -> None:
    program = (
        "import sys\n"
        "n = 0\n"
        "for line in sys.stdin:\n"
        "    assert int(line) == n\n"
        "    n += 1\n"
        "    if n == 10000:\n"
        "        break\n"
        "print(n)"
    )

    async def main() -> None:
        ws, _, _ = await created(server.url)
        await ws.send(json.dumps({"language": "python", "code": program}))
        assert await recv(ws) == ST("SANDBOX_EXECUTION_RUNNING")
        for i in range(10000):
            await ws.send(json.dumps({"event": "stdin", "data": f"{i}\n"}))
        out = ""
        while (frame := json.loads(await recv(ws))).get("status") != "SANDBOX_EXECUTION_DONE":
            assert frame["event"] == "stdout", frame
            out += frame["data"]
        assert out == "10000\n"
        assert frame.get("exit_code") == 0
        await ws.close()
        await bystander_runs_an_exec(server.url)

    run(main())


def test_thousands_of_tiny_frames_each_answered(server: ServerThread) -> None:
    async def main() -> None:
        ws, _, _ = await created(server.url)
        for _ in range(3000):
            await ws.send('{"action":"kill_process"}')
        for _ in range(3000):
            assert await recv(ws) == ST("SANDBOX_EXECUTION_FORCE_KILLED")
        assert await replies_until_probe(ws) == []
        await ws.close()
        await bystander_runs_an_exec(server.url)

    run(main())


@pytest.mark.parametrize("action", ["pause", "PAUSE", "kill", "", "checkpoint ", "reconnect\u0000"])
def test_unknown_action_is_an_exec_request_without_language(server: ServerThread, action: str) -> None:
    """CV-11: falls through to exec, 'None' language, DONE since nothing runs."""

    async def main() -> None:
        ws, _, _ = await created(server.url)
        await ws.send(json.dumps({"action": action}))
        frames = await replies_until_probe(ws)
        assert_error_pair(frames, "SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR")
        assert "'None'" in frames[1]["message"]
        assert frames[2:] == [{"event": "status_update", "status": "SANDBOX_EXECUTION_DONE"}]
        await ws.close()
        await bystander_runs_an_exec(server.url)

    run(main())


@pytest.mark.parametrize("name", ["../escape", "../../etc/passwd", "a/../b", "..", ".", "/abs", "x" * 129, "", "név"])
def test_snapshot_name_outside_the_safe_set_is_refused_without_close(server: ServerThread, name: str) -> None:
    """S7: SNAPSHOT_CREATING, SNAPSHOT_ERROR, error; the connection stays open."""

    async def main() -> None:
        ws, _, _ = await created(server.url)
        await ws.send(json.dumps({"action": "snapshot_filesystem", "name": name}))
        frames = await replies_until_probe(ws)
        assert frames[0] == {"event": "status_update", "status": "SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"}
        assert_error_pair(frames[1:], "SANDBOX_FILESYSTEM_SNAPSHOT_ERROR")
        assert len(frames) == 3
        await ws.close()
        await bystander_runs_an_exec(server.url)

    run(main())


ATTACH_IDS = [
    "sandbox-0000",
    "a%2Fb",
    "%2F..%2F..%2Fetc",
    "..",
    "%2e%2e",
    quote("sandbox-ü☃"),
    quote("\u0000"),
    "x" * 200,
    "x" * 10_000,
    quote("'; DROP TABLE sandboxes; --", safe=""),
]


@pytest.mark.parametrize("sandbox_id", ATTACH_IDS, ids=lambda s: s[:20])
def test_attach_path_of_any_shape_is_refused_cleanly(server: ServerThread, sandbox_id: str) -> None:
    """Unknown ids: NOT_FOUND + 1011 (or a refused handshake for paths no route matches)."""

    async def main() -> None:
        try:
            ws = await open_ws(server.url, f"/attach/{sandbox_id}?sandbox_token=t")
        except InvalidHandshake:
            pass  # e.g. a request line too long for the HTTP parser; refused before any frame
        else:
            frames = []
            with contextlib.suppress(ConnectionClosed):
                while True:
                    frames.append(await recv(ws))
            assert frames in ([ST("SANDBOX_NOT_FOUND")], [ST("SANDBOX_RESTORING"), ST("SANDBOX_NOT_FOUND")]), frames
            assert ws.close_code == 1011
        await bystander_runs_an_exec(server.url)

    run(main())


def test_attach_storm_lets_exactly_one_in(server: ServerThread) -> None:
    """200 concurrent attaches to one free sandbox: one RUNNING, the rest IN_USE + 1011."""

    async def attach(sandbox_id: str, token: str) -> tuple[str, ClientConnection]:
        ws = await open_ws(server.url, f"/attach/{sandbox_id}?sandbox_token={token}")
        return await recv(ws), ws

    async def main() -> None:
        ws, sandbox_id, token = await created(server.url)
        await ws.close()
        await ws.wait_closed()
        # The server detaches the creator when it sees the close; retry until it has.
        async with asyncio.timeout(TIMEOUT):
            while True:
                first, probe = await attach(sandbox_id, token)
                await probe.close()
                await probe.wait_closed()
                if json.loads(first)["status"] == "SANDBOX_RUNNING":
                    break
        results = await asyncio.gather(*(attach(sandbox_id, token) for _ in range(200)))
        firsts = [json.loads(first)["status"] for first, _ in results]
        assert firsts.count("SANDBOX_RUNNING") == 1, firsts
        assert firsts.count("SANDBOX_IN_USE") == 199, firsts
        for first, conn in results:
            if "SANDBOX_IN_USE" in first:
                with pytest.raises(ConnectionClosed):
                    await recv(conn)
                assert conn.close_code == 1011
        (winner,) = [conn for first, conn in results if "SANDBOX_RUNNING" in first]
        await winner.send('{"language":"bash","code":"echo still mine"}')
        assert await recv(winner) == ST("SANDBOX_EXECUTION_RUNNING")
        assert json.loads(await recv(winner))["data"] == "still mine\n"
        await winner.close()
        await bystander_runs_an_exec(server.url)

    run(main())
