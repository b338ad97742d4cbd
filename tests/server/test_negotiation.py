"""Extensions only on request (issue 17, extensions.md): the default server is a drop-in for upstream clients.

A connection whose handshake URL has no ``extensions`` parameter must get the
upstream frames byte for byte, so here whole frames are compared as text
(``_server_wire.Wire.frame`` would strip extension keys and hide them). Real
sockets to a :class:`LocalServer` in its default ("extended") mode.
"""

from __future__ import annotations

import json

import pytest
from server._server_wire import Wire, err, st

import sandbox
from sandbox_asyncio import Sandbox
from sandbox_proto import ALL_EXTENSIONS, requested_extensions
from sandbox_server import LocalServer

pytestmark = pytest.mark.anyio

RUNNING = st("SANDBOX_RUNNING")
EXEC_RUNNING = st("SANDBOX_EXECUTION_RUNNING")
DONE = st("SANDBOX_EXECUTION_DONE")


def out(stream: str, data: str) -> str:
    return json.dumps({"event": stream, "data": data}, separators=(",", ":"))


async def expect_raw(wire: Wire, *frames: str) -> None:
    """The next frames are exactly these texts: no key added, none reordered."""
    for want in frames:
        got = await wire.recv_raw()
        assert got == want, f"expected {want}, got {got}"


async def create_raw(url: str, init: str = "{}", query: str = "") -> tuple[Wire, str]:
    """Create over a connection asking for ``query`` (nothing by default); returns the RUNNING frame's text."""
    wire = await Wire.open(url, f"/create{query}", "upstream")
    await wire.send(init)
    await expect_raw(wire, st("SANDBOX_CREATING"))
    raw = await wire.recv_raw()
    frame = json.loads(raw)
    wire.sandbox_id, wire.token = frame["sandbox_id"], frame["sandbox_token"]
    assert raw == json.dumps(
        {"event": "sandbox_id", "sandbox_id": wire.sandbox_id, "sandbox_token": wire.token}, separators=(",", ":")
    )
    return wire, await wire.recv_raw()


# --------------------------------------------------------------------------
# (1) no request: the upstream frames, whole


async def test_create_exec_stdin_and_error_exit_are_upstream_frames(local: LocalServer) -> None:
    assert local.protocol == "extended"
    wire, running = await create_raw(local.url)
    assert running == RUNNING
    await wire.send({"language": "bash", "code": "echo hi"})
    await expect_raw(wire, EXEC_RUNNING, out("stdout", "hi\n"), DONE)
    await wire.send({"language": "python", "code": "print('hi ' + input())"})
    await expect_raw(wire, EXEC_RUNNING)
    await wire.send({"event": "stdin", "data": "Ada\n"})
    await expect_raw(wire, out("stdout", "hi Ada\n"), DONE)
    await wire.send({"language": "bash", "code": "echo oops >&2; exit 3"})
    await expect_raw(wire, EXEC_RUNNING, out("stderr", "oops\n"), DONE)  # no exit_code
    # reconnect with no exec running: one plain DONE (CV-30(ref)), no exit_code, no stdin_ack.
    await wire.send({"action": "reconnect"})
    await expect_raw(wire, DONE)
    await wire.close()


async def test_kill_process_and_kill_sandbox_are_upstream_frames(local: LocalServer) -> None:
    wire, running = await create_raw(local.url)
    assert running == RUNNING
    await wire.send({"language": "bash", "code": "sleep 30"})
    await expect_raw(wire, EXEC_RUNNING)
    await wire.send({"action": "kill_process"})
    assert {await wire.recv_raw(), await wire.recv_raw()} == {st("SANDBOX_EXECUTION_FORCE_KILLED"), DONE}
    await wire.send({"action": "kill_sandbox"})
    await expect_raw(wire, st("SANDBOX_KILLING"), st("SANDBOX_DELETING"), st("SANDBOX_DELETED"), st("SANDBOX_KILLED"))
    await wire.expect_close(1000)


async def test_checkpoint_and_attach_are_upstream_frames(local: LocalServer) -> None:
    wire, running = await create_raw(local.url, '{"enable_checkpoint":true}')
    assert running == RUNNING
    await wire.send({"action": "checkpoint"})
    await expect_raw(
        wire,
        st("SANDBOX_CHECKPOINTING"),
        st("SANDBOX_DELETING"),
        st("SANDBOX_DELETED"),
        st("SANDBOX_CHECKPOINTED"),
    )
    await wire.expect_close(1000)
    again = await Wire.attach(local.url, "upstream", wire.sandbox_id, wire.token)
    await expect_raw(again, st("SANDBOX_RESTORING"), RUNNING)
    await again.send({"language": "bash", "code": "echo back"})
    await expect_raw(again, EXEC_RUNNING, out("stdout", "back\n"), DONE)
    await again.close()


async def test_snapshot_and_create_from_it_are_upstream_frames(local: LocalServer) -> None:
    wire, _ = await create_raw(local.url)
    await wire.send({"language": "bash", "code": "echo kept > kept.txt"})
    await expect_raw(wire, EXEC_RUNNING, DONE)
    await wire.send({"action": "snapshot_filesystem", "name": "negotiation"})
    await expect_raw(wire, st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"), st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATED"))
    copy, running = await create_raw(local.url, '{"filesystem_snapshot_name":"negotiation"}')
    assert running == RUNNING
    await copy.send({"language": "bash", "code": "cat kept.txt"})
    await expect_raw(copy, EXEC_RUNNING, out("stdout", "kept\n"), DONE)
    await wire.close()
    await copy.close()


async def test_errors_are_upstream_frames(local: LocalServer) -> None:
    wire, _ = await create_raw(local.url)
    await wire.send({"event": "stdin", "data": "x"})
    await expect_raw(wire, st("SANDBOX_EXECUTION_ERROR"), err("No process is running in the sandbox."))
    await wire.close()
    wrong = await Wire.attach(local.url, "upstream", wire.sandbox_id, "0000")
    await expect_raw(wrong, st("SANDBOX_PERMISSION_DENIAL_ERROR"), err("Invalid sandbox token."))
    await wrong.expect_close(4000)


# --------------------------------------------------------------------------
# what is granted


ALL = ",".join(sorted(ALL_EXTENSIONS))


@pytest.mark.parametrize(
    ("query", "running"),
    [
        ("?extensions=exit_code", '"extensions":["exit_code"]'),
        ("?extensions=seq,exit_code", '"extensions":["exit_code","seq"]'),
        (f"?extensions={ALL}", '"extensions":' + json.dumps(sorted(ALL_EXTENSIONS), separators=(",", ":"))),
        ("?extensions=exit_code,time_travel", '"extensions":["exit_code"]'),  # unknown names ignored
        ("?extensions=time_travel", '"extensions":[]'),  # asked, nothing matched: an empty grant
        ("?extensions=exit_code%2Cseq", '"extensions":["exit_code","seq"]'),  # percent-encoded comma
        ("?extensions=", ""),  # malformed (empty): asked for nothing
        ("?extensions=exit_code,,seq", ""),  # malformed (empty name)
        ("?extensions=Exit-Code", ""),  # malformed (not a name)
        ("?extensions=exit_code&extensions=seq", ""),  # malformed (given twice)
        ("?other=1", ""),
    ],
)
async def test_running_lists_exactly_what_was_granted(local: LocalServer, query: str, running: str) -> None:
    wire, raw = await create_raw(local.url, query=query)
    expected = RUNNING if not running else RUNNING[:-1] + "," + running + "}"
    assert raw == expected
    await wire.close()


async def test_a_subset_gets_exactly_that_subset(local: LocalServer) -> None:
    # exit_code without seq: DONE carries the status, output carries no numbers.
    wire, running = await create_raw(local.url, query="?extensions=exit_code")
    assert json.loads(running)["extensions"] == ["exit_code"]
    await wire.send({"language": "bash", "code": "echo hi; exit 4"})
    await expect_raw(wire, EXEC_RUNNING, out("stdout", "hi\n"), DONE[:-1] + ',"exit_code":4}')
    # close_stdin was not granted: the action is an upstream exec request (3.1), refused as one.
    await wire.send({"language": "python", "code": "print(input())"})
    await expect_raw(wire, EXEC_RUNNING)
    await wire.send({"action": "close_stdin"})
    await expect_raw(
        wire,
        st("SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR"),
        err("Unsupported language: 'None'. Supported languages are: python, bash"),
    )
    await wire.send({"action": "kill_process"})
    assert {await wire.recv_raw(), await wire.recv_raw()} == {
        st("SANDBOX_EXECUTION_FORCE_KILLED"),
        DONE[:-1] + ',"exit_code":-9}',
    }
    await wire.close()

    # seq without exit_code: numbered output, a plain DONE.
    wire, running = await create_raw(local.url, query="?extensions=seq")
    assert json.loads(running)["extensions"] == ["seq"]
    await wire.send({"language": "bash", "code": "echo hi; exit 4"})
    await expect_raw(wire, EXEC_RUNNING, '{"event":"stdout","data":"hi\\n","seq":1}', DONE)
    await wire.close()


async def test_each_connection_negotiates_for_itself(local: LocalServer) -> None:
    # Create asking for everything, attach asking for nothing, then attach asking again.
    first, running = await create_raw(local.url, query=f"?extensions={ALL}")
    assert "extensions" in json.loads(running)
    await first.close()
    plain = await Wire.attach(local.url, "upstream", first.sandbox_id, first.token)
    await expect_raw(plain, RUNNING)
    await plain.send({"language": "bash", "code": "exit 2"})
    await expect_raw(plain, EXEC_RUNNING, DONE)
    await plain.close()
    asking = await Wire.open(
        local.url, f"/attach/{first.sandbox_id}?sandbox_token={first.token}&extensions=exit_code", "upstream"
    )
    await expect_raw(asking, RUNNING[:-1] + ',"extensions":["exit_code"]}')
    await asking.send({"language": "bash", "code": "exit 2"})
    await expect_raw(asking, EXEC_RUNNING, DONE[:-1] + ',"exit_code":2}')
    await asking.close()


async def test_upstream_mode_grants_nothing_even_when_asked() -> None:
    async with LocalServer(port=0, protocol="upstream") as server:
        wire, running = await create_raw(server.url, query=f"?extensions={ALL}")
        assert running == RUNNING  # as the upstream server, which ignores the parameter
        await wire.send({"language": "bash", "code": "echo hi; exit 1"})
        await expect_raw(wire, EXEC_RUNNING, out("stdout", "hi\n"), DONE)
        await wire.close()


def test_requested_extensions_parses_the_parameter() -> None:
    assert requested_extensions("") is None
    assert requested_extensions("sandbox_token=x") is None
    assert requested_extensions("sandbox_token=x&extensions=seq,exit_code") == {"seq", "exit_code"}
    assert requested_extensions("extensions=a%2Cb") == {"a", "b"}
    assert requested_extensions("extensions=" + ",".join(f"e{i}" for i in range(33))) is None  # too many
    assert requested_extensions("extensions=" + "x" * 65) is None


# --------------------------------------------------------------------------
# (2) our client, a raw upstream-style client and the `sandbox` alias, side by side


async def test_our_client_a_raw_client_and_the_alias_share_one_server(local: LocalServer) -> None:
    ours = await Sandbox.create(local.url)
    raw, running = await create_raw(local.url)
    alias = await sandbox.Sandbox.create(local.url)
    try:
        assert ours.extensions == frozenset(ALL_EXTENSIONS)  # asked for all, granted all
        process = await ours.exec("bash", "wc -l")
        await process.write_to_stdin("one\ntwo\n")
        await process.close_stdin()
        assert (await process.stdout.read_all()).strip() == "2"
        assert await process.wait() == 0

        assert running == RUNNING
        await raw.send({"language": "bash", "code": "echo raw; exit 5"})
        await expect_raw(raw, EXEC_RUNNING, out("stdout", "raw\n"), DONE)

        # Upstream-style code, unchanged: it never looks at extensions, and works.
        process = await alias.exec("python", "print('alias')")
        assert await process.stdout.read_all() == "alias\n"
        await process.wait()
    finally:
        await ours.kill()
        await alias.kill()
        await raw.close()


async def test_our_client_asking_for_a_subset_or_none(local: LocalServer) -> None:
    subset = await Sandbox.create(local.url, extensions=("exit_code",))
    none = await Sandbox.create(local.url, extensions=())
    try:
        assert subset.extensions == {"exit_code"}
        process = await subset.exec("bash", "exit 3")
        assert await process.wait() == 3
        assert none.extensions == frozenset()
        process = await none.exec("bash", "exit 3")
        assert await process.wait() is None  # no exit status in the upstream protocol
    finally:
        await subset.kill()
        await none.kill()
