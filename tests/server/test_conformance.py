"""The conformance vectors of protocol.md section 12 on one server, over a real socket.

``any_plain`` is the "plain" profile (no storage); ``any_local`` has checkpoint
and snapshot storage ("ckpt", "snap"). The vectors that need two instances
sharing storage ("ckpt+lock") are in test_stateful_server.py.
"""

from __future__ import annotations

import re
from typing import Literal

import pytest
from server._server_wire import Wire, attach_when_free, err, st
from websockets.exceptions import InvalidStatus

from sandbox_server import LocalServer

pytestmark = pytest.mark.anyio

MSG_FORMAT = "Invalid message format. 'language' and 'code' fields are required. Supported languages are: python, bash"


async def test_cv01_create_with_empty_init(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    assert re.fullmatch(r"sandbox-[0-9a-f]{12}", wire.sandbox_id)
    assert re.fullmatch(r"[0-9a-f]{64}", wire.token)
    assert wire.ws.response is not None
    cookies = wire.ws.response.headers.get_all("Set-Cookie")
    assert cookies == [f"SANDBOX_AFFINITY={any_local.instance_id}; Path=/; HttpOnly"]
    sandbox = any_local.manager.get(wire.sandbox_id)
    assert sandbox is not None and sandbox.options.idle_timeout == 300
    await wire.close()


async def test_cv02_python_stdout(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    await wire.send('{"language": "python", "code": "print(6 * 7)"}')  # Python client spacing
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    result = await wire.collect()
    assert (result.stdout, result.stderr) == ("42\n", "")
    assert result.statuses == [st("SANDBOX_EXECUTION_DONE")]
    assert result.exit_code == (0 if any_local.protocol == "extended" else None)
    if any_local.protocol == "extended":
        assert result.seqs == list(range(1, len(result.seqs) + 1))  # "42" and "\n" may be two reads


async def test_cv03_bash_failure_has_stderr_and_no_exit_code_upstream(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    result = await wire.run("bash", "echo oops >&2; exit 3")
    assert (result.stdout, result.stderr) == ("", "oops\n")
    assert result.statuses == [st("SANDBOX_EXECUTION_DONE")]
    assert result.exit_code == (3 if any_local.protocol == "extended" else None)


#: CV-07 and CV-08 fail the same way whether the server has storage or not.
NEEDS_CHECKPOINT = [
    ('{"enable_sandbox_handoff":true}', "Sandbox handoff requires checkpointing to be enabled."),  # CV-07
    (
        '{"enable_idle_timeout_auto_checkpoint":true}',
        "Idle timeout auto checkpoint requires checkpointing to be enabled.",
    ),  # CV-08
]


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ('{"idle_timeout": 60, "enable_checkpoint": true}', "Checkpointing is not enabled on the server."),  # CV-05
        (
            '{"idle_timeout":60,"filesystem_snapshot_name":"base-env"}',
            "Filesystem snapshot is not enabled on the server.",
        ),  # CV-06
        *NEEDS_CHECKPOINT,
    ],
)
async def test_cv05_to_08_creation_errors(any_plain: LocalServer, init: str, message: str) -> None:
    wire = await Wire.open(any_plain.url, "/create", any_plain.protocol)
    await wire.send(init)
    await wire.expect(st("SANDBOX_CREATING"), st("SANDBOX_CREATION_ERROR"), err(message))
    await wire.expect_close(4000)
    assert not any_plain.manager.sandboxes


@pytest.mark.parametrize(("init", "message"), NEEDS_CHECKPOINT)
async def test_cv07_08_creation_errors_with_storage(any_local: LocalServer, init: str, message: str) -> None:
    wire = await Wire.open(any_local.url, "/create", any_local.protocol)
    await wire.send(init)
    await wire.expect(st("SANDBOX_CREATING"), st("SANDBOX_CREATION_ERROR"), err(message))
    await wire.expect_close(4000)
    assert not any_local.manager.sandboxes


@pytest.mark.parametrize("init", [b"\x00binary", "not json", "[1, 2]", '"text"', "null", '{"idle_timeout": "60"}'])
async def test_malformed_init_is_a_creation_error(local: LocalServer, init: str | bytes) -> None:
    wire = await Wire.open(local.url, "/create", "extended")
    await wire.send(init)
    await wire.expect(st("SANDBOX_CREATING"), st("SANDBOX_CREATION_ERROR"))
    frame = await wire.frame()
    assert frame["event"] == "error" and frame["message"]
    await wire.expect_close(4000)
    assert not local.manager.sandboxes


@pytest.mark.parametrize(
    ("request_text", "status", "message"),
    [
        (
            '{"language":"ruby","code":"puts 1"}',
            "SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR",
            "Unsupported language: 'ruby'. Supported languages are: python, bash",
        ),  # CV-10
        (
            '{"action":"pause"}',
            "SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR",
            "Unsupported language: 'None'. Supported languages are: python, bash",
        ),  # CV-11
        ('{"language":"python"}', "SANDBOX_EXECUTION_ERROR", MSG_FORMAT),  # CV-12
    ],
)
async def test_cv10_to_12_rejected_exec_on_idle_sandbox(
    any_local: LocalServer, request_text: str, status: str, message: str
) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    await wire.send(request_text)
    await wire.expect(st(status), err(message), st("SANDBOX_EXECUTION_DONE"))
    # Still usable.
    assert (await wire.run("bash", "echo ok")).stdout == "ok\n"


async def test_cv13_second_exec_while_first_runs(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    await wire.send({"language": "bash", "code": "sleep 0.5; echo first"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await wire.send({"language": "python", "code": "print(2)"})
    await wire.expect(st("SANDBOX_EXECUTION_ERROR"), err("An execution is already in progress."))
    result = await wire.collect()
    assert result.stdout == "first\n"
    assert result.statuses == [st("SANDBOX_EXECUTION_DONE")]
    # Exactly one DONE: the next exec's frames come straight after.
    assert (await wire.run("python", "print(2)")).stdout == "2\n"


async def test_cv14_stdin_feeds_input(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    await wire.send({"language": "python", "code": "who = input(); print('hi ' + who)"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await wire.send({"event": "stdin", "data": "Ada\n"})
    result = await wire.collect()
    assert result.stdout == "hi Ada\n"
    assert result.statuses == [st("SANDBOX_EXECUTION_DONE")]


async def test_cv15_stdin_without_data(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    await wire.send({"language": "python", "code": "print(input())"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await wire.send({"event": "stdin"})
    await wire.expect(st("SANDBOX_STDIN_ERROR"), err("Invalid stdin message format. 'data' field is required."))
    await wire.send({"event": "stdin", "data": "still here\n"})
    result = await wire.collect()
    assert result.stdout == "still here\n"
    assert result.statuses == [st("SANDBOX_EXECUTION_DONE")]


async def test_cv16_stdin_with_no_process(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    await wire.send({"event": "stdin", "data": "x\n"})
    await wire.expect(st("SANDBOX_EXECUTION_ERROR"), err("No process is running in the sandbox."))
    # Stdin after a finished exec is dropped silently (7.4): the next frame is the exec's.
    await wire.run("bash", "true")
    await wire.send({"event": "stdin", "data": "late\n"})
    assert (await wire.run("bash", "echo next")).stdout == "next\n"


async def test_cv17_kill_process_with_nothing_running(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    await wire.send({"action": "kill_process"})
    await wire.expect(st("SANDBOX_EXECUTION_FORCE_KILLED"))
    assert (await wire.run("bash", "echo after")).stdout == "after\n"


async def test_cv18_kill_running_exec_then_sandbox_usable(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    await wire.send({"language": "bash", "code": "sleep 30"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await wire.send({"action": "kill_process"})
    got = {await wire.text(), await wire.text()}
    assert got == {st("SANDBOX_EXECUTION_FORCE_KILLED"), st("SANDBOX_EXECUTION_DONE")}
    result = await wire.run("bash", "echo again")
    assert result.stdout == "again\n"
    assert result.statuses == [st("SANDBOX_EXECUTION_DONE")]


@pytest.mark.parametrize("init", ["{}", '{"enable_checkpoint":true}'], ids=["ephemeral", "checkpointable"])
async def test_cv19_kill_sandbox_then_id_is_gone(any_local: LocalServer, init: str) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol, init)
    sandbox = any_local.manager.get(wire.sandbox_id)
    assert sandbox is not None and sandbox.directory.is_dir()
    await wire.send({"action": "kill_sandbox"})
    await wire.expect(st("SANDBOX_KILLING"), st("SANDBOX_DELETING"), st("SANDBOX_DELETED"), st("SANDBOX_KILLED"))
    await wire.expect_close(1000)
    assert not sandbox.directory.exists()
    # The metadata went too (7.6): with storage, RESTORING then NOT_FOUND.
    assert not (any_local.state_dir / "metadata" / f"{wire.sandbox_id}.json").exists()
    again = await Wire.attach(any_local.url, any_local.protocol, wire.sandbox_id, wire.token)
    await again.expect(st("SANDBOX_RESTORING"), st("SANDBOX_NOT_FOUND"))
    await again.expect_close(1011)


async def test_cv19_plain(any_plain: LocalServer) -> None:
    wire = await Wire.create(any_plain.url, any_plain.protocol)
    await wire.send({"action": "kill_sandbox"})
    await wire.expect(st("SANDBOX_KILLING"), st("SANDBOX_DELETING"), st("SANDBOX_DELETED"), st("SANDBOX_KILLED"))
    await wire.expect_close(1000)
    again = await Wire.attach(any_plain.url, any_plain.protocol, wire.sandbox_id, wire.token)
    await again.expect(st("SANDBOX_NOT_FOUND"))
    await again.expect_close(1011)


async def test_kill_sandbox_during_exec_sends_done_between_deleting_and_deleted(local: LocalServer) -> None:
    wire = await Wire.create(local.url, "extended")
    await wire.send({"language": "bash", "code": "echo started; sleep 30"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"), '{"event":"stdout","data":"started\\n"}')
    await wire.send({"action": "kill_sandbox"})
    await wire.expect(
        st("SANDBOX_KILLING"),
        st("SANDBOX_DELETING"),
        st("SANDBOX_EXECUTION_DONE"),
        st("SANDBOX_DELETED"),
        st("SANDBOX_KILLED"),
    )
    await wire.expect_close(1000)


@pytest.mark.parametrize("profile", ["plain", "ckpt"])
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "exec-running"])
async def test_cv22_checkpoint_without_checkpointing(
    protocol: Literal["extended", "upstream"], profile: str, busy: bool
) -> None:
    storage = profile == "ckpt"
    async with LocalServer(port=0, protocol=protocol, checkpoints=storage, snapshots=storage) as server:
        wire = await Wire.create(server.url, protocol)
        if busy:
            # Checked before the running exec (7.7): the not-configured error, not the in-progress one.
            await wire.send({"language": "bash", "code": "sleep 0.5; echo done"})
            await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
        await wire.send({"action": "checkpoint"})
        sid = wire.sandbox_id
        await wire.expect(
            st("SANDBOX_CHECKPOINTING"),
            st("SANDBOX_CHECKPOINT_ERROR"),
            err(f"Failed to checkpoint sandbox {sid}: Sandbox {sid} is not configured for checkpointing."),
        )
        await wire.expect_close(4000)
        # Not deleted: attach still works.
        again = await attach_when_free(server.url, protocol, wire)
        await again.expect(st("SANDBOX_RUNNING"))
        await again.close()


async def test_cv24_snapshot_without_storage(any_plain: LocalServer) -> None:
    wire = await Wire.create(any_plain.url, any_plain.protocol)
    await wire.send({"action": "snapshot_filesystem", "name": "env-v1"})
    await wire.expect(
        st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"),
        st("SANDBOX_FILESYSTEM_SNAPSHOT_ERROR"),
        err(
            f"Failed to snapshot filesystem for sandbox {wire.sandbox_id}: "
            "Filesystem snapshot is not enabled on the server."
        ),
    )
    assert (await wire.run("bash", "echo open")).stdout == "open\n"


async def test_cv25_attach_free_sandbox_and_second_attach_refused(any_local: LocalServer) -> None:
    creator = await Wire.create(any_local.url, any_local.protocol)
    await creator.close()
    second = await attach_when_free(any_local.url, any_local.protocol, creator)
    await second.expect(st("SANDBOX_RUNNING"))
    third = await Wire.attach(any_local.url, any_local.protocol, creator.sandbox_id, creator.token)
    await third.expect(st("SANDBOX_IN_USE"))
    await third.expect_close(1011)
    # Connection 2 is unaffected.
    assert (await second.run("bash", "echo two")).stdout == "two\n"


async def test_cv26_attach_unknown_id_plain(any_plain: LocalServer) -> None:
    wire = await Wire.attach(any_plain.url, any_plain.protocol, "sandbox-0000", "0" * 64)
    await wire.expect(st("SANDBOX_NOT_FOUND"))
    await wire.expect_close(1011)


@pytest.mark.parametrize("sandbox_id", ["sandbox-0000", "..%2F..%2Fetc", ".hidden", "x" * 200])
async def test_cv26_attach_unknown_id_ckpt(any_local: LocalServer, sandbox_id: str) -> None:
    # Ids that are not one safe path component never reach the disk: just not found.
    wire = await Wire.attach(any_local.url, any_local.protocol, sandbox_id, "0" * 64)
    await wire.expect(st("SANDBOX_RESTORING"), st("SANDBOX_NOT_FOUND"))
    await wire.expect_close(1011)


async def test_cv27_wrong_empty_and_missing_token(any_local: LocalServer) -> None:
    creator = await Wire.create(any_local.url, any_local.protocol)
    sid = creator.sandbox_id
    wrong = await Wire.attach(any_local.url, any_local.protocol, sid, "0000")
    await wrong.expect(st("SANDBOX_PERMISSION_DENIAL_ERROR"), err("Invalid sandbox token."))
    await wrong.expect_close(4000)
    empty = await Wire.attach(any_local.url, any_local.protocol, sid, "")
    await empty.expect(st("SANDBOX_PERMISSION_DENIAL_ERROR"), err("Sandbox token is missing."))
    await empty.expect_close(4000)
    with pytest.raises(InvalidStatus) as refused:
        await Wire.open(any_local.url, f"/attach/{sid}", any_local.protocol)
    assert refused.value.response.status_code == 403
    # The token is checked before "in use" (7.2), and a refused attach steals nothing (S3).
    assert (await creator.run("bash", "echo mine")).stdout == "mine\n"


async def test_cv29_idle_expiry_while_attached(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol, '{"idle_timeout": 1}')
    # No client frame: expires within about a second and a sweep.
    await wire.expect(st("SANDBOX_DELETING"))
    await wire.expect(st("SANDBOX_DELETED"))
    assert any_local.manager.get(wire.sandbox_id) is None
    await wire.send({"language": "bash", "code": "echo hi"})
    await wire.expect(
        st("SANDBOX_EXECUTION_ERROR"),
        err("Cannot execute code in a sandbox that is not in the RUNNING state (current state: SandboxState.STOPPED)"),
        st("SANDBOX_EXECUTION_DONE"),
    )
    # kill_sandbox on a gone sandbox: just a close 1000.
    await wire.send({"action": "kill_sandbox"})
    await wire.expect_close(1000)


@pytest.mark.parametrize("reconnect_first", [True, False], ids=["reconnect-before-running", "after-running"])
async def test_cv30_drop_and_reconnect_during_exec(any_local: LocalServer, reconnect_first: bool) -> None:
    first = await Wire.create(any_local.url, any_local.protocol)
    await first.send({"language": "bash", "code": "for i in 1 2 3; do echo $i; sleep 0.3; done"})
    await first.expect(st("SANDBOX_EXECUTION_RUNNING"))
    frame = await first.frame()
    assert frame == {"event": "stdout", "data": "1\n"}
    # A TCP reset, which the server notices at once.
    first.ws.transport.abort()
    reconnect = '{"action":"reconnect"}'
    second = await attach_when_free(
        any_local.url, any_local.protocol, first, first_frame=reconnect if reconnect_first else None
    )
    await second.expect(st("SANDBOX_RUNNING"))
    if not reconnect_first:
        await second.send(reconnect)
    await second.expect(st("SANDBOX_EXECUTION_RUNNING"))
    result = await second.collect()
    assert "1\n" + result.stdout == "1\n2\n3\n"
    assert result.statuses == [st("SANDBOX_EXECUTION_DONE")]
    assert result.exit_code == (0 if any_local.protocol == "extended" else None)


async def test_cv30_ref_reconnect_with_no_exec_gets_one_done(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    # Fresh sandbox.
    await wire.send({"action": "reconnect"})
    await wire.expect(st("SANDBOX_EXECUTION_DONE"))
    # After a finished exec whose DONE was delivered.
    await wire.run("bash", "echo x")
    await wire.send({"action": "reconnect"})
    await wire.expect(st("SANDBOX_EXECUTION_DONE"))
    # After kill_process.
    await wire.send({"language": "bash", "code": "sleep 30"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await wire.send({"action": "kill_process"})
    assert {await wire.text(), await wire.text()} == {
        st("SANDBOX_EXECUTION_FORCE_KILLED"),
        st("SANDBOX_EXECUTION_DONE"),
    }
    await wire.send({"action": "reconnect"})
    await wire.expect(st("SANDBOX_EXECUTION_DONE"))
    # Exactly one: the next frame belongs to the next exec.
    assert (await wire.run("bash", "echo y")).stdout == "y\n"
