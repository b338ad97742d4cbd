"""Conformance vectors of protocol.md section 12, replayed against both roles.

Client role: the ``S:`` frames are fed to :class:`ClientProtocol` exactly as
written in the spec; what it sends is compared with the ``C:`` frames as JSON
objects (the server accepts any whitespace and key order, 1.2), and the events
it emits are checked.

Server role: the ``C:`` frames are fed to :class:`ServerProtocol`; where the
role owns the reply (dispatch 3.1, validation, DONE-iff-idle, framing) the
exact bytes are asserted. Where the reply comes from the sandbox logic of the
real server, the test makes the calls the server would make and asserts the
bytes the role writes for them.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from sandbox_proto import (
    AttachFacts,
    AttachStep,
    CheckpointDone,
    CheckpointRequested,
    ClientProtocol,
    Close,
    CloseConnection,
    CloseStdinRequest,
    CreateOptions,
    ExecRejected,
    ExecRequested,
    ExecStarted,
    ExecutionView,
    InitRequest,
    KillProcessRequested,
    KillSandboxDone,
    KillSandboxRequested,
    LocalProtocolError,
    Output,
    OutputIncomplete,
    ProcessEnded,
    ProcessPhase,
    ReconnectDone,
    Reconnected,
    ReconnectRequested,
    ReconnectScheduled,
    RestoreResult,
    ResumeStream,
    SandboxCheckpointError,
    SandboxCreationError,
    SandboxDeletedError,
    SandboxExecutionError,
    SandboxFilesystemSnapshotError,
    SandboxState,
    ServerProtocol,
    SessionEnded,
    SetupComplete,
    SetupFailed,
    SnapshotDone,
    SnapshotRequested,
    Status,
    StdinReceived,
)

URL = "https://sandbox.example.run.app"
ID = "sandbox-f126"
TOKEN = "9f1c0e7d4b2a48c6a1e3d5f7b9c0a2e4"
#: What our client asks for on every handshake: every extension it implements, sorted (extensions.md).
EXTENSIONS_QUERY = "extensions=close_stdin,exec_ref,exit_code,seq,stdin_seq"

PYTHON_MSG = "Supported languages are: python, bash"
INVALID_FORMAT = (
    "Invalid message format. 'language' and 'code' fields are required. Supported languages are: python, bash"
)


# --------------------------------------------------------------------------
# helpers: the spec's notation


def ST(status: str) -> str:
    """Exact upstream bytes of a status frame."""
    return '{"event":"status_update","status":"' + status + '"}'


def ERR(message: str) -> str:
    return json.dumps({"event": "error", "message": message}, separators=(",", ":"), ensure_ascii=False)


def OUT(stream: str, data: str) -> str:
    return json.dumps({"event": stream, "data": data}, separators=(",", ":"), ensure_ascii=False)


SANDBOX_ID_FRAME = '{"event":"sandbox_id","sandbox_id":"' + ID + '","sandbox_token":"' + TOKEN + '"}'


def feed(client: ClientProtocol, *frames: str) -> None:
    for frame in frames:
        client.receive(frame)


def sent(client: ClientProtocol) -> list[dict[str, Any]]:
    return [json.loads(text) for text in client.data_to_send()]


def effective_init(obj: dict[str, Any]) -> dict[str, Any]:
    """What the upstream server reads from an init message (3.2: defaults, truthiness)."""
    return {
        "idle_timeout": obj.get("idle_timeout", 300),
        "enable_checkpoint": bool(obj.get("enable_checkpoint")),
        "enable_idle_timeout_auto_checkpoint": bool(obj.get("enable_idle_timeout_auto_checkpoint")),
        "enable_sandbox_handoff": bool(obj.get("enable_sandbox_handoff")),
        "filesystem_snapshot_name": obj.get("filesystem_snapshot_name") or None,
    }


def created(init: InitRequest | None = None, **kwargs: Any) -> ClientProtocol:
    """A client after CV-01's setup, with its outputs drained."""
    client = ClientProtocol(URL, init=init or InitRequest(), **kwargs)
    client.connection_opened()
    feed(client, ST("SANDBOX_CREATING"), SANDBOX_ID_FRAME, ST("SANDBOX_RUNNING"))
    client.data_to_send()
    assert client.events() == [SetupComplete(ID, restored=False)]
    return client


def attached(**kwargs: Any) -> ClientProtocol:
    client = ClientProtocol(URL, sandbox_id=ID, sandbox_token=TOKEN, **kwargs)
    client.connection_opened()
    return client


def session_ends(events: list[Any]) -> list[SessionEnded]:
    return [e for e in events if isinstance(e, SessionEnded)]


def server(*, create: bool = False, upstream: bool = True, **kwargs: Any) -> ServerProtocol:
    """A server role past setup (unless ``create``), in the upstream profile by default."""
    proto = ServerProtocol(create=create, extensions=() if upstream else ("exit_code", "seq", "close_stdin"), **kwargs)
    if not create:
        proto.sandbox_id = ID
        proto.send_running()
        proto.data_to_send()
    return proto


# ==========================================================================
# client role


class TestClientSetup:
    def test_cv01_create_with_empty_init(self) -> None:
        client = ClientProtocol(URL, init=InitRequest(idle_timeout=None))
        assert client.handshake().url == f"wss://sandbox.example.run.app/create?{EXTENSIONS_QUERY}"
        assert client.data_to_send() == []  # nothing before the socket is open
        client.connection_opened()
        assert sent(client) == [{}]
        feed(client, ST("SANDBOX_CREATING"), SANDBOX_ID_FRAME)
        assert client.events() == []
        feed(client, ST("SANDBOX_RUNNING"))
        assert client.events() == [SetupComplete(ID, restored=False)]
        assert client.state is SandboxState.RUNNING
        assert (client.sandbox_id, client.sandbox_token) == (ID, TOKEN)
        assert client.data_to_send() == []

    def test_cv01_default_init_asks_for_60s(self) -> None:
        client = ClientProtocol(URL, init=InitRequest())
        client.connection_opened()
        assert sent(client) == [{"idle_timeout": 60}]

    def test_cv04_create_with_checkpoint_and_handoff(self) -> None:
        init = InitRequest(idle_timeout=60, enable_checkpoint=True, enable_sandbox_handoff=True)
        client = ClientProtocol(URL, init=init)
        client.connection_opened()
        (frame,) = sent(client)
        wire = {
            "idle_timeout": 60,
            "enable_checkpoint": True,
            "enable_sandbox_handoff": True,
            "enable_idle_timeout_auto_checkpoint": False,
        }
        assert effective_init(frame) == effective_init(wire)
        feed(client, ST("SANDBOX_CREATING"), ST("SANDBOX_LOCK_ACQUIRING"), ST("SANDBOX_LOCK_ACQUIRED"))
        assert client.events() == []
        feed(client, SANDBOX_ID_FRAME, ST("SANDBOX_RUNNING"))
        assert client.events() == [SetupComplete(ID, restored=False)]

    @pytest.mark.parametrize(
        ("init", "wire", "message"),
        [
            pytest.param(
                InitRequest(idle_timeout=60, enable_checkpoint=True),
                {"idle_timeout": 60, "enable_checkpoint": True},
                "Checkpointing is not enabled on the server.",
                id="CV-05",
            ),
            pytest.param(
                InitRequest(idle_timeout=60, filesystem_snapshot_name="base-env"),
                {"idle_timeout": 60, "filesystem_snapshot_name": "base-env"},
                "Filesystem snapshot is not enabled on the server.",
                id="CV-06",
            ),
            pytest.param(
                InitRequest(idle_timeout=None, enable_sandbox_handoff=True),
                {"enable_sandbox_handoff": True},
                "Sandbox handoff requires checkpointing to be enabled.",
                id="CV-07",
            ),
            pytest.param(
                InitRequest(idle_timeout=None, enable_idle_timeout_auto_checkpoint=True),
                {"enable_idle_timeout_auto_checkpoint": True},
                "Idle timeout auto checkpoint requires checkpointing to be enabled.",
                id="CV-08",
            ),
            pytest.param(
                InitRequest(idle_timeout=None, filesystem_snapshot_name="no-such-snapshot"),
                {"filesystem_snapshot_name": "no-such-snapshot"},
                "Failed to create gVisor container: Filesystem snapshot not found at /snap/no-such-snapshot.tar",
                id="CV-09",
            ),
        ],
    )
    def test_creation_errors(self, init: InitRequest, wire: dict[str, Any], message: str) -> None:
        client = ClientProtocol(URL, init=init)
        client.connection_opened()
        assert sent(client) == [wire]
        feed(client, ST("SANDBOX_CREATING"), ST("SANDBOX_CREATION_ERROR"))
        assert client.events() == []  # waits for the error frame (6.1)
        feed(client, ERR(message))
        events = client.events()
        assert isinstance(events[0], SetupFailed)
        error = events[0].error
        assert isinstance(error, SandboxCreationError)
        assert error.status is Status.SANDBOX_CREATION_ERROR
        assert error.server_message == message
        assert message in str(error)
        assert CloseConnection(1000) in events
        assert len(session_ends(events)) == 1
        assert client.state is SandboxState.FAILED
        client.connection_closed(4000)
        assert client.events() == []  # the session already ended once

    def test_cv25_attach_to_free_sandbox_then_in_use(self) -> None:
        client = ClientProtocol(URL, sandbox_id=ID, sandbox_token=TOKEN)
        assert (
            client.handshake().url
            == f"wss://sandbox.example.run.app/attach/{ID}?sandbox_token={TOKEN}&{EXTENSIONS_QUERY}"
        )
        client.connection_opened()
        assert client.data_to_send() == []  # the server speaks first on attach (13.1)
        feed(client, ST("SANDBOX_RUNNING"))
        assert client.events() == [SetupComplete(ID, restored=False)]
        assert client.data_to_send() == []

        third = attached()
        feed(third, ST("SANDBOX_IN_USE"))
        events = third.events()
        assert isinstance(events[0], SetupFailed)
        assert isinstance(events[0].error, SandboxCreationError)
        assert events[0].error.status is Status.SANDBOX_IN_USE
        assert events[0].error.server_message is None
        third.connection_closed(1011)
        assert third.events() == []
        assert client.state is SandboxState.RUNNING  # the other session is unaffected

    @pytest.mark.parametrize(
        "frames",
        [
            pytest.param([ST("SANDBOX_NOT_FOUND")], id="plain"),
            pytest.param([ST("SANDBOX_RESTORING"), ST("SANDBOX_NOT_FOUND")], id="ckpt"),
        ],
    )
    def test_cv26_attach_unknown_id(self, frames: list[str]) -> None:
        client = attached()
        feed(client, *frames)
        events = client.events()
        assert isinstance(events[0], SetupFailed)
        assert events[0].error.status is Status.SANDBOX_NOT_FOUND
        assert len(session_ends(events)) == 1
        client.connection_closed(1011)
        assert client.events() == []

    @pytest.mark.parametrize("message", ["Invalid sandbox token.", "Sandbox token is missing."])
    def test_cv27_permission_denial(self, message: str) -> None:
        client = attached()
        feed(client, ST("SANDBOX_PERMISSION_DENIAL_ERROR"), ERR(message))
        events = client.events()
        assert isinstance(events[0], SetupFailed)
        assert isinstance(events[0].error, SandboxCreationError)
        assert events[0].error.status is Status.SANDBOX_PERMISSION_DENIAL_ERROR
        assert events[0].error.server_message == message
        client.connection_closed(4000)
        assert client.events() == []

    def test_cv27_empty_token_is_refused_locally(self) -> None:
        # Our client never produces the empty-token handshake of CV-27.
        with pytest.raises(LocalProtocolError):
            ClientProtocol(URL, sandbox_id=ID, sandbox_token="")


class TestClientExec:
    def test_cv02_python_stdout(self) -> None:
        client = created()
        exec_id = client.exec("python", "print(6 * 7)")
        assert sent(client) == [{"language": "python", "code": "print(6 * 7)"}]
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"), OUT("stdout", "42\n"), ST("SANDBOX_EXECUTION_DONE"))
        assert client.events() == [
            ExecStarted(exec_id),
            Output(exec_id, "stdout", "42\n"),
            ProcessEnded(exec_id, returncode=None, error=None),
        ]

    def test_cv03_bash_stderr_no_exit_code(self) -> None:
        client = created()
        exec_id = client.exec("bash", "echo oops >&2; exit 3")
        assert sent(client) == [{"language": "bash", "code": "echo oops >&2; exit 3"}]
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"), OUT("stderr", "oops\n"), ST("SANDBOX_EXECUTION_DONE"))
        assert client.events() == [
            ExecStarted(exec_id),
            Output(exec_id, "stderr", "oops\n"),
            ProcessEnded(exec_id, returncode=None, error=None),  # 9.2: unknown, not 0
        ]

    @pytest.mark.parametrize(
        ("status", "message"),
        [
            pytest.param(
                "SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR",
                f"Unsupported language: 'ruby'. {PYTHON_MSG}",
                id="CV-10",
            ),
            pytest.param("SANDBOX_EXECUTION_ERROR", INVALID_FORMAT, id="CV-12"),
        ],
    )
    def test_cv10_cv12_start_error_then_trailing_done(self, status: str, message: str) -> None:
        client = created()
        exec_id = client.exec("ruby", "puts 1")
        assert sent(client) == [{"language": "ruby", "code": "puts 1"}]
        feed(client, ST(status))
        assert client.events() == []
        feed(client, ERR(message))
        (event,) = client.events()
        assert isinstance(event, ExecRejected)
        assert event.exec_id == exec_id
        assert isinstance(event.error, SandboxExecutionError)
        assert event.error.status is Status(status)
        assert event.error.server_message == message
        feed(client, ST("SANDBOX_EXECUTION_DONE"))  # DONE-iff-idle: it belongs to the rejected exec
        assert client.events() == []
        assert client.state is SandboxState.RUNNING
        # The sandbox stays usable.
        second = client.exec("python", "print(1)")
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"), ST("SANDBOX_EXECUTION_DONE"))
        assert client.events() == [ExecStarted(second), ProcessEnded(second, None, None)]

    def test_cv13_second_exec_while_first_runs(self) -> None:
        client = created()
        first = client.exec("bash", "sleep 1; echo first")
        client.data_to_send()
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"))
        assert client.events() == [ExecStarted(first)]
        # Our client refuses the concurrent exec locally ...
        with pytest.raises(LocalProtocolError):
            client.exec("python", "print(2)")
        assert client.data_to_send() == []
        # ... and a rejection it did not ask for does not end the running exec.
        feed(client, ST("SANDBOX_EXECUTION_ERROR"), ERR("An execution is already in progress."))
        assert client.events() == []
        feed(client, OUT("stdout", "first\n"), ST("SANDBOX_EXECUTION_DONE"))
        assert client.events() == [Output(first, "stdout", "first\n"), ProcessEnded(first, None, None)]

    def test_cv14_stdin_feeds_input(self) -> None:
        client = created()
        exec_id = client.exec("python", "who = input(); print('hi ' + who)")
        client.data_to_send()
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"))
        client.write_stdin(exec_id, "Ada\n")
        assert sent(client) == [{"event": "stdin", "data": "Ada\n"}]
        feed(client, OUT("stdout", "hi Ada\n"), ST("SANDBOX_EXECUTION_DONE"))
        assert client.events() == [
            ExecStarted(exec_id),
            Output(exec_id, "stdout", "hi Ada\n"),
            ProcessEnded(exec_id, None, None),
        ]

    def test_cv15_stdin_error_leaves_exec_running(self) -> None:
        client = created()
        exec_id = client.exec("python", "print(input())")
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"))
        client.events()
        feed(client, ST("SANDBOX_STDIN_ERROR"), ERR("Invalid stdin message format. 'data' field is required."))
        assert client.events() == []
        client.data_to_send()
        client.write_stdin(exec_id, "still here\n")
        assert sent(client) == [{"event": "stdin", "data": "still here\n"}]
        feed(client, OUT("stdout", "still here\n"), ST("SANDBOX_EXECUTION_DONE"))
        assert client.events() == [Output(exec_id, "stdout", "still here\n"), ProcessEnded(exec_id, None, None)]

    def test_cv16_stdin_with_no_process(self) -> None:
        client = created()
        with pytest.raises(LocalProtocolError):
            client.write_stdin(1, "x\n")
        assert client.data_to_send() == []
        # The server's reply, had it been sent, is ignored without harm.
        feed(client, ST("SANDBOX_EXECUTION_ERROR"), ERR("No process is running in the sandbox."))
        assert client.events() == []
        assert client.state is SandboxState.RUNNING

    def test_cv17_kill_process_with_nothing_running(self) -> None:
        client = created()
        client.kill_process(1)  # nothing to kill: nothing sent
        assert client.data_to_send() == []
        feed(client, ST("SANDBOX_EXECUTION_FORCE_KILLED"))
        assert client.events() == []
        assert client.state is SandboxState.RUNNING

    @pytest.mark.parametrize("order", ["killed-first", "done-first"])
    def test_cv18_kill_process_then_sandbox_usable(self, order: str) -> None:
        client = created()
        exec_id = client.exec("bash", "sleep 30")
        client.data_to_send()
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"))
        client.kill_process(exec_id)
        assert sent(client) == [{"action": "kill_process"}]
        frames = [ST("SANDBOX_EXECUTION_FORCE_KILLED"), ST("SANDBOX_EXECUTION_DONE")]
        if order == "done-first":
            frames.reverse()
        feed(client, *frames)
        assert client.events() == [ExecStarted(exec_id), ProcessEnded(exec_id, None, None)]
        again = client.exec("bash", "echo again")
        assert sent(client) == [{"language": "bash", "code": "echo again"}]
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"), OUT("stdout", "again\n"), ST("SANDBOX_EXECUTION_DONE"))
        assert client.events() == [
            ExecStarted(again),
            Output(again, "stdout", "again\n"),
            ProcessEnded(again, None, None),
        ]


class TestClientLifecycle:
    def test_cv19_kill_sandbox_then_id_gone(self) -> None:
        client = created(auto_reconnect=True)
        client.kill_sandbox()
        assert sent(client) == [{"action": "kill_sandbox"}]
        feed(client, ST("SANDBOX_KILLING"), ST("SANDBOX_DELETING"), ST("SANDBOX_DELETED"))
        assert client.events() == []  # DELETED is part of the kill we asked for
        feed(client, ST("SANDBOX_KILLED"))
        events = client.events()
        assert events[0] == KillSandboxDone(None)
        assert session_ends(events) == [SessionEnded(None)]
        assert CloseConnection(1000) in events
        client.connection_closed(1000)
        assert client.events() == []  # no reconnect after a deliberate kill

        second = attached()
        feed(second, ST("SANDBOX_NOT_FOUND"))
        events = second.events()
        assert isinstance(events[0], SetupFailed)
        assert events[0].error.status is Status.SANDBOX_NOT_FOUND

    def test_cv20_checkpoint_then_restore_on_attach(self) -> None:
        client = created(InitRequest(enable_checkpoint=True), auto_reconnect=True)
        exec_id = client.exec("bash", "printf 'v1\\n' > /tmp/note.txt")
        assert sent(client) == [{"language": "bash", "code": "printf 'v1\\n' > /tmp/note.txt"}]
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"), ST("SANDBOX_EXECUTION_DONE"))
        assert client.events() == [ExecStarted(exec_id), ProcessEnded(exec_id, None, None)]
        client.checkpoint()
        assert sent(client) == [{"action": "checkpoint"}]
        feed(client, ST("SANDBOX_CHECKPOINTING"), ST("SANDBOX_DELETING"), ST("SANDBOX_DELETED"))
        assert client.events() == []  # DELETED precedes CHECKPOINTED (7.7)
        feed(client, ST("SANDBOX_CHECKPOINTED"))
        events = client.events()
        assert events[0] == CheckpointDone(None)
        assert session_ends(events) == [SessionEnded(None)]
        assert CloseConnection(1000) in events
        assert client.state is SandboxState.CHECKPOINTED
        client.connection_closed(1000)
        assert client.events() == []

        second = attached()
        feed(second, ST("SANDBOX_RESTORING"))
        assert second.events() == []
        feed(second, ST("SANDBOX_RUNNING"))
        assert second.events() == [SetupComplete(ID, restored=True)]
        exec_id = second.exec("bash", "cat /tmp/note.txt")
        feed(second, ST("SANDBOX_EXECUTION_RUNNING"), OUT("stdout", "v1\n"), ST("SANDBOX_EXECUTION_DONE"))
        assert second.events() == [
            ExecStarted(exec_id),
            Output(exec_id, "stdout", "v1\n"),
            ProcessEnded(exec_id, None, None),
        ]

    def test_cv21_checkpoint_refused_while_exec_runs(self) -> None:
        client = created(InitRequest(enable_checkpoint=True))
        exec_id = client.exec("bash", "sleep 2; echo finished")
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"))
        client.checkpoint()
        assert sent(client)[-1] == {"action": "checkpoint"}
        message = "Cannot checkpoint while an execution is in progress."
        feed(client, ST("SANDBOX_CHECKPOINTING"), ST("SANDBOX_EXECUTION_IN_PROGRESS_ERROR"), ERR(message))
        events = client.events()
        assert events[0] == ExecStarted(exec_id)
        assert isinstance(events[1], CheckpointDone)
        assert isinstance(events[1].error, SandboxCheckpointError)
        assert events[1].error.status is Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR
        assert events[1].error.server_message == message
        assert len(events) == 2
        assert client.state is SandboxState.RUNNING
        feed(client, OUT("stdout", "finished\n"), ST("SANDBOX_EXECUTION_DONE"))
        assert client.events() == [Output(exec_id, "stdout", "finished\n"), ProcessEnded(exec_id, None, None)]

    def test_cv22_checkpoint_of_non_checkpointable_sandbox(self) -> None:
        client = created(auto_reconnect=True)
        client.checkpoint()
        assert sent(client) == [{"action": "checkpoint"}]
        message = f"Failed to checkpoint sandbox {ID}: Sandbox {ID} is not configured for checkpointing."
        feed(client, ST("SANDBOX_CHECKPOINTING"), ST("SANDBOX_CHECKPOINT_ERROR"), ERR(message))
        events = client.events()
        assert isinstance(events[0], CheckpointDone)
        assert isinstance(events[0].error, SandboxCheckpointError)
        assert events[0].error.status is Status.SANDBOX_CHECKPOINT_ERROR
        assert events[0].error.server_message == message
        client.connection_closed(4000, now=1.0)
        events = client.events()
        assert not any(isinstance(e, ReconnectScheduled) for e in events)  # CHECKPOINT_ERROR is fatal
        assert len(session_ends(events)) == 1
        assert session_ends(events)[0].error is not None

    def test_cv23_snapshot_then_create_from_it(self) -> None:
        client = created()
        exec_id = client.exec("bash", "mkdir -p /opt/env && echo ready > /opt/env/flag")
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"), ST("SANDBOX_EXECUTION_DONE"))
        client.events()
        client.data_to_send()
        client.snapshot_filesystem("env-v1")
        assert sent(client) == [{"action": "snapshot_filesystem", "name": "env-v1"}]
        feed(client, ST("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"))
        assert client.events() == []
        feed(client, ST("SANDBOX_FILESYSTEM_SNAPSHOT_CREATED"))
        assert client.events() == [SnapshotDone(None)]
        assert client.state is SandboxState.RUNNING

        second = ClientProtocol(URL, init=InitRequest(idle_timeout=None, filesystem_snapshot_name="env-v1"))
        second.connection_opened()
        assert sent(second) == [{"filesystem_snapshot_name": "env-v1"}]
        id2_frame = (
            '{"event":"sandbox_id","sandbox_id":"sandbox-00aa","sandbox_token":"0123456789abcdef0123456789abcdef"}'
        )
        feed(second, ST("SANDBOX_CREATING"), id2_frame, ST("SANDBOX_RUNNING"))
        assert second.events() == [SetupComplete("sandbox-00aa", restored=False)]
        exec_id = second.exec("bash", "cat /opt/env/flag")
        feed(second, ST("SANDBOX_EXECUTION_RUNNING"), OUT("stdout", "ready\n"), ST("SANDBOX_EXECUTION_DONE"))
        assert second.events() == [
            ExecStarted(exec_id),
            Output(exec_id, "stdout", "ready\n"),
            ProcessEnded(exec_id, None, None),
        ]

    def test_cv24_snapshot_without_storage(self) -> None:
        client = created()
        client.snapshot_filesystem("env-v1")
        assert sent(client) == [{"action": "snapshot_filesystem", "name": "env-v1"}]
        message = f"Failed to snapshot filesystem for sandbox {ID}: Filesystem snapshot is not enabled on the server."
        feed(client, ST("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"), ST("SANDBOX_FILESYSTEM_SNAPSHOT_ERROR"), ERR(message))
        (event,) = client.events()
        assert isinstance(event, SnapshotDone)
        assert isinstance(event.error, SandboxFilesystemSnapshotError)
        assert event.error.status is Status.SANDBOX_FILESYSTEM_SNAPSHOT_ERROR
        assert event.error.server_message == message
        assert client.state is SandboxState.RUNNING  # connection still open and usable
        client.snapshot_filesystem("env-v2")  # not stuck in "snapshotting" (10.4 item 5)
        assert sent(client) == [{"action": "snapshot_filesystem", "name": "env-v2"}]

    def test_cv28_handoff_old_and_new_connection(self) -> None:
        init = InitRequest(idle_timeout=60, enable_checkpoint=True, enable_sandbox_handoff=True)
        c1 = created(init, auto_reconnect=True)
        exec_id = c1.exec("python", "import time; print('A running', flush=True); time.sleep(30)")
        feed(c1, ST("SANDBOX_EXECUTION_RUNNING"), OUT("stdout", "A running\n"))
        assert c1.events() == [ExecStarted(exec_id), Output(exec_id, "stdout", "A running\n")]

        c2 = attached()
        feed(c2, ST("SANDBOX_RESTORING"), ST("SANDBOX_LOCK_ACQUIRING"))
        assert c2.events() == []

        c1.data_to_send()
        feed(c1, ST("SANDBOX_LOCK_RELEASE_REQUESTED"))
        events = c1.events()
        (ended,) = [e for e in events if isinstance(e, ProcessEnded)]
        assert ended.exec_id == exec_id
        assert ended.error is not None
        (session_end,) = session_ends(events)
        assert isinstance(session_end.error, SandboxDeletedError)
        assert CloseConnection(1000) in events
        rest = [
            "SANDBOX_CHECKPOINTING",
            "SANDBOX_EXECUTION_FORCE_KILLED",
            "SANDBOX_EXECUTION_DONE",
            "SANDBOX_DELETING",
            "SANDBOX_LOCK_RELEASING",
            "SANDBOX_LOCK_RELEASED",
            "SANDBOX_DELETED",
            "SANDBOX_CHECKPOINTED",
        ]
        feed(c1, *(ST(s) for s in rest))
        assert c1.events() == []
        assert c1.data_to_send() == []
        c1.connection_closed(1000, now=5.0)
        assert c1.events() == []  # never auto-reconnects after a handoff

        feed(c2, ST("SANDBOX_LOCK_ACQUIRED"), ST("SANDBOX_RUNNING"))
        assert c2.events() == [SetupComplete(ID, restored=True)]
        exec_id = c2.exec("python", "print('B ok')")
        assert sent(c2) == [{"language": "python", "code": "print('B ok')"}]
        feed(c2, ST("SANDBOX_EXECUTION_RUNNING"), OUT("stdout", "B ok\n"), ST("SANDBOX_EXECUTION_DONE"))
        assert c2.events() == [
            ExecStarted(exec_id),
            Output(exec_id, "stdout", "B ok\n"),
            ProcessEnded(exec_id, None, None),
        ]

    def test_cv29_idle_expiry_while_attached(self) -> None:
        client = created(InitRequest(idle_timeout=5), auto_reconnect=True)
        feed(client, ST("SANDBOX_DELETING"))
        assert client.events() == []
        feed(client, ST("SANDBOX_DELETED"))
        events = client.events()
        (session_end,) = session_ends(events)
        assert isinstance(session_end.error, SandboxDeletedError)
        assert CloseConnection(1000) in events
        with pytest.raises(LocalProtocolError):
            client.exec("bash", "echo hi")
        assert client.data_to_send() == []
        client.connection_closed(1000, now=1.0)
        assert client.events() == []

    def test_cv30_drop_and_reconnect_during_exec(self) -> None:
        client = ClientProtocol(URL, init=InitRequest(), auto_reconnect=True)
        client.connection_opened(["GAESA=Cp123; expires=Mon, 24-Nov-2025 01:17:28 GMT; path=/"])
        feed(client, ST("SANDBOX_CREATING"), SANDBOX_ID_FRAME, ST("SANDBOX_RUNNING"))
        client.events()
        client.data_to_send()
        exec_id = client.exec("bash", "for i in 1 2 3; do echo $i; sleep 1; done")
        assert sent(client) == [{"language": "bash", "code": "for i in 1 2 3; do echo $i; sleep 1; done"}]
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"), OUT("stdout", "1\n"))
        client.connection_closed(1006, now=10.0)
        events = client.events()
        assert [type(e) for e in events] == [ExecStarted, Output, ReconnectScheduled]
        assert client.state is SandboxState.RECONNECTING

        handshake = client.handshake()
        assert handshake.url == f"wss://sandbox.example.run.app/attach/{ID}?sandbox_token={TOKEN}&{EXTENSIONS_QUERY}"
        assert handshake.headers["Cookie"] == "GAESA=Cp123"
        client.connection_opened()
        assert client.data_to_send() == []  # ours sends `reconnect` only after RUNNING (7.12 step 2)
        feed(client, ST("SANDBOX_RUNNING"))
        assert sent(client) == [{"action": "reconnect"}]
        events = client.events()
        assert OutputIncomplete(exec_id) in events  # no seq: loss cannot be ruled out
        assert Reconnected(restored=False) in events
        feed(
            client,
            ST("SANDBOX_EXECUTION_RUNNING"),
            OUT("stdout", "2\n"),
            OUT("stdout", "3\n"),
            ST("SANDBOX_EXECUTION_DONE"),
        )
        events = client.events()
        assert events == [
            Output(exec_id, "stdout", "2\n"),
            Output(exec_id, "stdout", "3\n"),
            ProcessEnded(exec_id, None, None),
        ]

    def test_cv30_variant_no_exec_in_progress_sends_no_reconnect(self) -> None:
        client = created(auto_reconnect=True)
        exec_id = client.exec("bash", "true")
        feed(client, ST("SANDBOX_EXECUTION_RUNNING"), ST("SANDBOX_EXECUTION_DONE"))
        client.events()
        client.data_to_send()
        client.connection_closed(1006, now=0.0)
        assert [type(e) for e in client.events()] == [ReconnectScheduled]
        client.connection_opened()
        feed(client, ST("SANDBOX_RUNNING"))
        assert client.data_to_send() == []  # 13.8: against upstream a bare reconnect kills the session
        assert client.events() == [Reconnected(restored=False)]
        assert exec_id == 1


# ==========================================================================
# server role


class TestServerSetup:
    def test_cv01_empty_init(self) -> None:
        proto = server(create=True, checkpoint_enabled=False, snapshots_enabled=False)
        options = proto.receive_init("{}")
        assert options == CreateOptions(
            idle_timeout=300.0,
            enable_checkpoint=False,
            enable_idle_timeout_auto_checkpoint=False,
            enable_sandbox_handoff=False,
            filesystem_snapshot_name=None,
        )
        proto.send_sandbox_id(ID, TOKEN)
        proto.send_running()
        assert proto.data_to_send() == [ST("SANDBOX_CREATING"), SANDBOX_ID_FRAME, ST("SANDBOX_RUNNING")]
        assert proto.setup_done

    def test_send_running_advertises_extensions_sorted(self) -> None:
        proto = ServerProtocol(create=True, extensions=("seq", "exit_code", "close_stdin"))
        proto.send_running()
        assert proto.data_to_send() == [
            '{"event":"status_update","status":"SANDBOX_RUNNING","extensions":["close_stdin","exit_code","seq"]}'
        ]

    def test_send_running_upstream_profile_has_no_extensions_key(self) -> None:
        proto = ServerProtocol(create=True, extensions=())
        proto.send_running()
        assert proto.data_to_send() == [ST("SANDBOX_RUNNING")]

    def test_cv04_checkpoint_and_handoff(self) -> None:
        proto = server(create=True)
        wire = (
            '{"idle_timeout":60,"enable_checkpoint":true,"enable_sandbox_handoff":true,'
            '"enable_idle_timeout_auto_checkpoint":false}'
        )
        options = proto.receive_init(wire)
        assert options == CreateOptions(60.0, True, False, True, None)
        proto.send_status(Status.SANDBOX_LOCK_ACQUIRING)
        proto.send_status(Status.SANDBOX_LOCK_ACQUIRED)
        proto.send_sandbox_id(ID, TOKEN)
        proto.send_running()
        assert proto.data_to_send() == [
            ST("SANDBOX_CREATING"),
            ST("SANDBOX_LOCK_ACQUIRING"),
            ST("SANDBOX_LOCK_ACQUIRED"),
            SANDBOX_ID_FRAME,
            ST("SANDBOX_RUNNING"),
        ]

    @pytest.mark.parametrize(
        ("wire", "message"),
        [
            pytest.param(
                '{"idle_timeout": 60, "enable_checkpoint": true}',
                "Checkpointing is not enabled on the server.",
                id="CV-05",
            ),
            pytest.param(
                '{"idle_timeout":60,"filesystem_snapshot_name":"base-env"}',
                "Filesystem snapshot is not enabled on the server.",
                id="CV-06",
            ),
            pytest.param(
                '{"enable_sandbox_handoff":true}', "Sandbox handoff requires checkpointing to be enabled.", id="CV-07"
            ),
            pytest.param(
                '{"enable_idle_timeout_auto_checkpoint":true}',
                "Idle timeout auto checkpoint requires checkpointing to be enabled.",
                id="CV-08",
            ),
            # 7.1: rows are checked in order; the first that fails wins.
            pytest.param(
                '{"enable_checkpoint":true,"filesystem_snapshot_name":"x","enable_sandbox_handoff":true}',
                "Checkpointing is not enabled on the server.",
                id="row1-before-row2",
            ),
            pytest.param(
                '{"filesystem_snapshot_name":"x","enable_sandbox_handoff":true,"enable_idle_timeout_auto_checkpoint":1}',
                "Filesystem snapshot is not enabled on the server.",
                id="row2-before-row3",
            ),
            pytest.param(
                '{"enable_sandbox_handoff":"yes","enable_idle_timeout_auto_checkpoint":true}',
                "Sandbox handoff requires checkpointing to be enabled.",
                id="row3-before-row4-truthy",
            ),
        ],
    )
    def test_creation_errors_plain(self, wire: str, message: str) -> None:
        proto = server(create=True, checkpoint_enabled=False, snapshots_enabled=False)
        assert proto.receive_init(wire) is None
        assert proto.data_to_send() == [ST("SANDBOX_CREATING"), ST("SANDBOX_CREATION_ERROR"), ERR(message), Close(4000)]
        assert proto.closed
        proto.send_status(Status.SANDBOX_RUNNING)  # nothing follows a close (8.4)
        assert proto.data_to_send() == []

    def test_rows_3_and_4_apply_with_checkpoint_storage_configured(self) -> None:
        proto = server(create=True)
        assert proto.receive_init('{"enable_idle_timeout_auto_checkpoint":true,"enable_checkpoint":false}') is None
        assert proto.data_to_send()[2] == ERR("Idle timeout auto checkpoint requires checkpointing to be enabled.")

    def test_falsy_flags_are_not_requests(self) -> None:
        proto = server(create=True, checkpoint_enabled=False, snapshots_enabled=False)
        options = proto.receive_init('{"enable_checkpoint":0,"filesystem_snapshot_name":"","idle_timeout":null}')
        assert options == CreateOptions(None, False, False, False, None)
        assert proto.data_to_send() == [ST("SANDBOX_CREATING")]

    def test_cv09_the_server_reports_its_own_creation_error(self) -> None:
        proto = server(create=True)
        assert proto.receive_init('{"filesystem_snapshot_name":"no-such-snapshot"}') is not None
        proto.fail_creation("Failed to create gVisor container: Filesystem snapshot not found at /x")
        assert proto.data_to_send() == [
            ST("SANDBOX_CREATING"),
            ST("SANDBOX_CREATION_ERROR"),
            ERR("Failed to create gVisor container: Filesystem snapshot not found at /x"),
            Close(4000),
        ]

    @pytest.mark.parametrize("wire", ["[]", "not json", b"{}", "null", '"x"'])
    def test_malformed_init_is_a_creation_error(self, wire: str | bytes) -> None:
        proto = server(create=True)
        assert proto.receive_init(wire) is None
        out = proto.data_to_send()
        assert out[:2] == [ST("SANDBOX_CREATING"), ST("SANDBOX_CREATION_ERROR")]
        assert json.loads(out[2])["event"] == "error"
        assert out[3] == Close(4000)

    def test_attach_refusals(self) -> None:
        # CV-25, CV-26, CV-27 as the attach handler writes them.
        in_use = ServerProtocol(create=False)
        in_use.send_status(Status.SANDBOX_IN_USE)
        in_use.close(1011)
        assert in_use.data_to_send() == [ST("SANDBOX_IN_USE"), Close(1011)]

        not_found = ServerProtocol(create=False)
        not_found.send_status(Status.SANDBOX_RESTORING)
        not_found.send_status(Status.SANDBOX_NOT_FOUND)
        not_found.close(1011)
        assert not_found.data_to_send() == [ST("SANDBOX_RESTORING"), ST("SANDBOX_NOT_FOUND"), Close(1011)]

        denied = ServerProtocol(create=False)
        denied.send_error(Status.SANDBOX_PERMISSION_DENIAL_ERROR, "Invalid sandbox token.", close=4000)
        assert denied.data_to_send() == [
            '{"event":"status_update","status":"SANDBOX_PERMISSION_DENIAL_ERROR"}',
            '{"event":"error","message":"Invalid sandbox token."}',
            Close(4000),
        ]


class TestServerDispatch:
    def test_cv02_exec_request(self) -> None:
        proto = server()
        assert proto.receive('{"language": "python", "code": "print(6 * 7)"}') == ExecRequested(
            "python", "print(6 * 7)"
        )
        assert proto.data_to_send() == []
        proto.exec_started()
        proto.send_output("stdout", "42\n", seq=1)
        proto.exec_finished(0)
        assert proto.data_to_send() == [
            ST("SANDBOX_EXECUTION_RUNNING"),
            '{"event":"stdout","data":"42\\n"}',
            ST("SANDBOX_EXECUTION_DONE"),
        ]

    def test_cv02_with_extensions(self) -> None:
        proto = server(upstream=False)
        assert proto.receive('{"language":"bash","code":"echo oops >&2; exit 3"}') == ExecRequested(
            "bash", "echo oops >&2; exit 3"
        )
        proto.exec_started()
        proto.send_output("stderr", "oops\n", seq=7)
        proto.exec_finished(3)
        assert proto.data_to_send() == [
            ST("SANDBOX_EXECUTION_RUNNING"),
            '{"event":"stderr","data":"oops\\n","seq":7}',
            '{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","exit_code":3}',
        ]

    def test_cv10_unsupported_language(self) -> None:
        proto = server()
        assert proto.receive('{"language":"ruby","code":"puts 1"}') is None
        assert proto.data_to_send() == [
            ST("SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR"),
            '{"event":"error","message":"Unsupported language: \'ruby\'. Supported languages are: python, bash"}',
            ST("SANDBOX_EXECUTION_DONE"),
        ]

    @pytest.mark.parametrize(
        "wire",
        [
            '{"action":"pause"}',
            '{"idle_timeout":60}',  # an init message sent on attach (2.3)
            '{"action":"close_stdin"}',  # an extension the upstream profile does not have
            '{"code":"print(1)"}',
            '{"language":null,"code":"print(1)"}',
            '{"action":"reconnect ","code":"x"}',
        ],
    )
    def test_cv11_unknown_action_falls_through_to_exec(self, wire: str) -> None:
        proto = server()
        assert proto.receive(wire) is None
        assert proto.data_to_send() == [
            ST("SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR"),
            ERR("Unsupported language: 'None'. Supported languages are: python, bash"),
            ST("SANDBOX_EXECUTION_DONE"),
        ]

    @pytest.mark.parametrize(("language", "shown"), [("5", "5"), ('"Python"', "Python"), ("true", "True")])
    def test_language_is_shown_with_str(self, language: str, shown: str) -> None:
        proto = server()
        assert proto.receive('{"language":' + language + ',"code":"x"}') is None
        assert proto.data_to_send()[1] == ERR(f"Unsupported language: '{shown}'. Supported languages are: python, bash")

    def test_cv12_exec_without_code(self) -> None:
        proto = server()
        assert proto.receive('{"language":"python"}') is None
        assert proto.data_to_send() == [
            ST("SANDBOX_EXECUTION_ERROR"),
            '{"event":"error","message":"' + INVALID_FORMAT + '"}',
            ST("SANDBOX_EXECUTION_DONE"),
        ]

    def test_cv13_second_exec_while_running_gets_no_done(self) -> None:
        proto = server()
        assert proto.receive('{"language":"bash","code":"sleep 1; echo first"}') == ExecRequested(
            "bash", "sleep 1; echo first"
        )
        proto.exec_started()
        assert proto.receive('{"language":"python","code":"print(2)"}') is None
        proto.send_output("stdout", "first\n")
        proto.exec_finished(0)
        out = proto.data_to_send()
        assert out == [
            ST("SANDBOX_EXECUTION_RUNNING"),
            ST("SANDBOX_EXECUTION_ERROR"),
            ERR("An execution is already in progress."),
            OUT("stdout", "first\n"),
            ST("SANDBOX_EXECUTION_DONE"),
        ]
        assert out.count(ST("SANDBOX_EXECUTION_DONE")) == 1

    @pytest.mark.parametrize(
        "wire",
        ['{"language":"ruby","code":"x"}', '{"action":"pause"}', '{"language":"python"}'],
    )
    def test_start_errors_while_running_get_no_done(self, wire: str) -> None:
        proto = server()
        proto.exec_started()
        proto.data_to_send()
        assert proto.receive(wire) is None
        out = proto.data_to_send()
        assert len(out) == 2
        assert ST("SANDBOX_EXECUTION_DONE") not in out

    def test_start_error_after_exec_exited_gets_done(self) -> None:
        proto = server()
        proto.exec_started()
        proto.exec_finished(0)
        proto.data_to_send()
        assert proto.receive('{"language":"ruby","code":"x"}') is None
        assert proto.data_to_send()[-1] == ST("SANDBOX_EXECUTION_DONE")

    def test_non_string_code_is_an_unexpected_error(self) -> None:
        proto = server()
        assert proto.receive('{"language":"python","code":5}') is None
        out = proto.data_to_send()
        assert out[0] == ST("SANDBOX_ERROR")
        assert json.loads(out[1])["event"] == "error"
        assert out[2:] == [Close(4000)]  # 7.3.6: no DONE

    def test_cv14_stdin(self) -> None:
        proto = server()
        proto.receive('{"language":"python","code":"who = input(); print(\'hi \' + who)"}')
        proto.exec_started()
        proto.data_to_send()
        assert proto.receive('{"event":"stdin","data":"Ada\\n"}') == StdinReceived("Ada\n")
        assert proto.data_to_send() == []

    def test_cv15_stdin_without_data(self) -> None:
        proto = server()
        proto.exec_started()
        proto.data_to_send()
        assert proto.receive('{"event":"stdin"}') is None
        assert proto.data_to_send() == [
            ST("SANDBOX_STDIN_ERROR"),
            '{"event":"error","message":"Invalid stdin message format. \'data\' field is required."}',
        ]
        assert proto.receive('{"event":"stdin","data":"still here\\n"}') == StdinReceived("still here\n")

    def test_stdin_without_data_reported_even_with_no_process(self) -> None:
        proto = server()
        assert proto.receive('{"event":"stdin"}') is None
        assert proto.data_to_send()[0] == ST("SANDBOX_STDIN_ERROR")

    @pytest.mark.parametrize("killed", [None, True], ids=["fresh", "after-kill"])
    def test_cv16_stdin_with_no_process(self, killed: bool | None) -> None:
        proto = server()
        if killed:
            proto.exec_started()
            proto.exec_finished(None, killed=True)
            proto.data_to_send()
        assert proto.receive('{"event":"stdin","data":"x\\n"}') is None
        assert proto.data_to_send() == [ST("SANDBOX_EXECUTION_ERROR"), ERR("No process is running in the sandbox.")]

    def test_stdin_after_exit_is_silently_discarded(self) -> None:
        proto = server()
        proto.exec_started()
        proto.exec_finished(0)
        proto.data_to_send()
        assert proto.receive('{"event":"stdin","data":"late\\n"}') is None
        assert proto.data_to_send() == []

    def test_stdin_with_non_string_data(self) -> None:
        proto = server()
        proto.exec_started()
        proto.data_to_send()
        assert proto.receive('{"event":"stdin","data":null}') is None
        out = proto.data_to_send()
        assert out[0] == ST("SANDBOX_ERROR")
        assert len(out) == 2  # no close for stdin (5, row 34)
        assert not proto.closed

    def test_cv17_kill_process_with_nothing_running(self) -> None:
        proto = server()
        assert proto.receive('{"action":"kill_process"}') == KillProcessRequested()
        proto.send_status(Status.SANDBOX_EXECUTION_FORCE_KILLED)
        assert proto.data_to_send() == [ST("SANDBOX_EXECUTION_FORCE_KILLED")]

    @pytest.mark.parametrize("upstream", [True, False])
    def test_cv18_kill_process_on_running_exec(self, upstream: bool) -> None:
        proto = server(upstream=upstream)
        assert proto.receive('{"language":"bash","code":"sleep 30"}') == ExecRequested("bash", "sleep 30")
        proto.exec_started()
        assert proto.receive('{"action":"kill_process"}') == KillProcessRequested()
        proto.send_status(Status.SANDBOX_EXECUTION_FORCE_KILLED)
        proto.exec_finished(-9, killed=True)
        done = (
            ST("SANDBOX_EXECUTION_DONE")
            if upstream
            else ('{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","exit_code":-9}')
        )
        assert proto.data_to_send() == [ST("SANDBOX_EXECUTION_RUNNING"), ST("SANDBOX_EXECUTION_FORCE_KILLED"), done]
        # After a kill the server holds no process (7.5): stdin hits the "no process" path.
        assert proto.receive('{"event":"stdin","data":"x"}') is None
        assert proto.data_to_send()[1] == ERR("No process is running in the sandbox.")
        assert proto.receive('{"language":"bash","code":"echo again"}') == ExecRequested("bash", "echo again")

    def test_cv19_kill_sandbox(self) -> None:
        proto = server()
        assert proto.receive('{"action":"kill_sandbox"}') == KillSandboxRequested()
        for status in ("SANDBOX_KILLING", "SANDBOX_DELETING", "SANDBOX_DELETED", "SANDBOX_KILLED"):
            proto.send_status(Status(status))
        proto.close(1000)
        proto.close(1011)  # a second close is ignored
        assert proto.data_to_send() == [
            ST("SANDBOX_KILLING"),
            ST("SANDBOX_DELETING"),
            ST("SANDBOX_DELETED"),
            ST("SANDBOX_KILLED"),
            Close(1000),
        ]

    def test_cv20_checkpoint(self) -> None:
        proto = server()
        assert proto.receive('{"action":"checkpoint"}') == CheckpointRequested()

    def test_cv21_checkpoint_refused(self) -> None:
        proto = server()
        proto.exec_started()
        assert proto.receive('{"action":"checkpoint"}') == CheckpointRequested()
        proto.send_status(Status.SANDBOX_CHECKPOINTING)
        proto.send_error(
            Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR, "Cannot checkpoint while an execution is in progress."
        )
        assert proto.data_to_send()[1:] == [
            ST("SANDBOX_CHECKPOINTING"),
            ST("SANDBOX_EXECUTION_IN_PROGRESS_ERROR"),
            ERR("Cannot checkpoint while an execution is in progress."),
        ]
        assert not proto.closed

    def test_cv22_checkpoint_error_closes_4000(self) -> None:
        proto = server()
        message = f"Failed to checkpoint sandbox {ID}: Sandbox {ID} is not configured for checkpointing."
        proto.send_status(Status.SANDBOX_CHECKPOINTING)
        proto.send_error(Status.SANDBOX_CHECKPOINT_ERROR, message, close=4000)
        assert proto.data_to_send() == [
            ST("SANDBOX_CHECKPOINTING"),
            ST("SANDBOX_CHECKPOINT_ERROR"),
            ERR(message),
            Close(4000),
        ]

    @pytest.mark.parametrize(
        ("wire", "name"),
        [
            ('{"action":"snapshot_filesystem","name":"env-v1"}', "env-v1"),
            ('{"action":"snapshot_filesystem"}', None),
            ('{"action":"snapshot_filesystem","name":"../x"}', "../x"),
        ],
    )
    def test_cv23_cv24_snapshot_request_keeps_raw_name(self, wire: str, name: object) -> None:
        proto = server()
        assert proto.receive(wire) == SnapshotRequested(name)
        assert proto.data_to_send() == []

    def test_cv30_reconnect(self) -> None:
        proto = server()
        assert proto.receive('{"action":"reconnect"}') == ReconnectRequested(None)
        # Without the seq extension, last_seq is not read.
        assert proto.receive('{"action":"reconnect","last_seq":4}') == ReconnectRequested(None)

    @pytest.mark.parametrize(("value", "expected"), [("4", 4), ("0", 0), ("-1", None), ('"4"', None), ("true", None)])
    def test_reconnect_last_seq_with_seq_extension(self, value: str, expected: int | None) -> None:
        proto = server(upstream=False)
        assert proto.receive('{"action":"reconnect","last_seq":' + value + "}") == ReconnectRequested(expected)

    def test_close_stdin_only_with_extension(self) -> None:
        from sandbox_proto import CloseStdinRequested, encode_client_frame

        proto = server(upstream=False)
        assert proto.receive(encode_client_frame(CloseStdinRequest())) == CloseStdinRequested()

    @pytest.mark.parametrize(
        ("wire", "expected"),
        [
            # 3.1: the first matching rule wins.
            ('{"action":"checkpoint","language":"python","code":"x"}', CheckpointRequested()),
            ('{"language":"python","code":"x","action":"snapshot_filesystem","name":"n"}', SnapshotRequested("n")),
            ('{"action":"kill_process","event":"stdin","data":"x"}', KillProcessRequested()),
            ('{"event":"stdin","action":"kill_sandbox"}', KillSandboxRequested()),
            ('{"event":"stdin","action":"reconnect","data":"x"}', StdinReceived("x")),
            ('{"action":"reconnect","language":"python","code":"x"}', ReconnectRequested(None)),
            ('{"event":"stdout","language":"bash","code":"ls"}', ExecRequested("bash", "ls")),
            ('{"language":"python","code":"","unknown":[1,2]}', ExecRequested("python", "")),
        ],
    )
    def test_dispatch_precedence(self, wire: str, expected: object) -> None:
        proto = server()
        proto.exec_started()  # so that stdin is accepted
        proto.data_to_send()
        if isinstance(expected, ExecRequested):
            proto.exec_finished(0)
            proto.data_to_send()
        assert proto.receive(wire) == expected
        assert proto.data_to_send() == []

    @pytest.mark.parametrize("wire", ["[1]", "nope", b'{"action":"kill_process"}', "null", "{"])
    def test_malformed_after_setup_keeps_connection_open(self, wire: str | bytes) -> None:
        proto = server()
        assert proto.receive(wire) is None
        out = proto.data_to_send()
        assert out[0] == ST("SANDBOX_ERROR")
        assert json.loads(out[1])["event"] == "error"
        assert len(out) == 2
        assert not proto.closed


class TestServerDecisions:
    """Vectors whose reply the role decides from facts the server gathers (attach, reconnect)."""

    def test_cv25_cv26_cv27_attach_refusals(self) -> None:
        facts = AttachFacts(ID, token_present=True, found=True, token_ok=True)
        in_use = ServerProtocol(create=False, extensions=())  # before setup, as the attach handler has it
        assert in_use.answer_attach(replace(facts, observed=True)) is AttachStep.REFUSED
        assert in_use.data_to_send() == [ST("SANDBOX_IN_USE"), Close(1011)]

        not_found = ServerProtocol(create=False, extensions=())
        assert not_found.answer_attach(replace(facts, found=False)) is AttachStep.RESTORE
        assert not_found.answer_attach(replace(facts, found=False, restore=RestoreResult.NOT_FOUND)) is (
            AttachStep.REFUSED
        )
        assert not_found.data_to_send() == [ST("SANDBOX_RESTORING"), ST("SANDBOX_NOT_FOUND"), Close(1011)]

        denied = ServerProtocol(create=False, extensions=())
        assert denied.answer_attach(replace(facts, token_ok=False)) is AttachStep.REFUSED
        assert denied.data_to_send() == [
            ST("SANDBOX_PERMISSION_DENIAL_ERROR"),
            ERR("Invalid sandbox token."),
            Close(4000),
        ]

    def test_cv30_reconnect_during_exec(self) -> None:
        second = ServerProtocol(create=False, extensions=())
        assert second.answer_attach(AttachFacts(ID, True, True, token_ok=True, phase=ProcessPhase.RUNNING)) is (
            AttachStep.ATTACHED
        )
        request = second.receive('{"action":"reconnect"}')
        assert isinstance(request, ReconnectRequested)
        # "1\n" (seq 1) reached connection 1 before the reset.
        running = ExecutionView(running=True, done_delivered=False, first_seq=1, last_seq=1, delivered=1)
        assert second.answer_reconnect(request, running) == ResumeStream(cursor=1, report_gaps=False)
        second.send_output("stdout", "2\n", seq=2)
        second.send_output("stdout", "3\n", seq=3)
        second.exec_finished(0)
        assert second.data_to_send() == [
            ST("SANDBOX_RUNNING"),
            ST("SANDBOX_EXECUTION_RUNNING"),
            OUT("stdout", "2\n"),
            OUT("stdout", "3\n"),
            ST("SANDBOX_EXECUTION_DONE"),
        ]

    def test_cv30_ref_reconnect_with_no_exec(self) -> None:
        proto = server()
        request = proto.receive('{"action":"reconnect"}')
        assert isinstance(request, ReconnectRequested)
        assert proto.answer_reconnect(request, None) == ReconnectDone(done_delivered=False)
        assert proto.data_to_send() == [ST("SANDBOX_EXECUTION_DONE")]


class TestServerFraming:
    def test_frames_are_compact_raw_utf8_in_upstream_key_order(self) -> None:
        proto = server()
        proto.send_output("stdout", 'é ✓ 日本\n\x1b[0m\t"q"')
        proto.send_output("stderr", "")
        proto.send_error(Status.SANDBOX_ERROR, "ünïcode")
        proto.send_sandbox_id("sandbox-ü", "tök")
        assert proto.data_to_send() == [
            '{"event":"stdout","data":"é ✓ 日本\\n\\u001b[0m\\t\\"q\\""}',
            '{"event":"stderr","data":""}',
            ST("SANDBOX_ERROR"),
            '{"event":"error","message":"ünïcode"}',
            '{"event":"sandbox_id","sandbox_id":"sandbox-ü","sandbox_token":"tök"}',
        ]

    def test_seq_and_gap_only_with_extension(self) -> None:
        up = server()
        up.send_output("stdout", "a", seq=1)
        up.send_output_gap(1, 5)
        assert up.data_to_send() == ['{"event":"stdout","data":"a"}']
        ext = server(upstream=False)
        ext.send_output("stdout", "a", seq=1)
        ext.send_output_gap(1, 5)
        assert ext.data_to_send() == [
            '{"event":"stdout","data":"a","seq":1}',
            '{"event":"output_gap","from_seq":1,"to_seq":5}',
        ]

    def test_done_without_exit_code_when_unknown(self) -> None:
        proto = server(upstream=False)
        proto.exec_started()
        proto.exec_finished(None)
        assert proto.data_to_send()[-1] == ST("SANDBOX_EXECUTION_DONE")


# ==========================================================================
# back to back (style lesson 12): our client against the server role


def pump(client: ClientProtocol, proto: ServerProtocol) -> list[object]:
    """Deliver the client's frames to the server role; return the requests it made."""
    return [proto.receive(text) for text in client.data_to_send()]


def deliver(proto: ServerProtocol, client: ClientProtocol) -> None:
    for item in proto.data_to_send():
        if isinstance(item, Close):
            client.connection_closed(int(item))
        else:
            client.receive(item)


@pytest.mark.parametrize("upstream", [True, False])
def test_back_to_back_create_exec_stdin(upstream: bool) -> None:
    client = ClientProtocol(URL, init=InitRequest())
    proto = server(create=True, upstream=upstream)
    client.connection_opened()
    (init_text,) = client.data_to_send()
    assert proto.receive_init(init_text) == CreateOptions(60.0, False, False, False, None)
    proto.send_sandbox_id(ID, TOKEN)
    proto.send_running()
    deliver(proto, client)
    assert client.events() == [SetupComplete(ID, restored=False)]
    assert client.extensions == (frozenset() if upstream else frozenset({"exit_code", "seq", "close_stdin"}))

    exec_id = client.exec("python", "print(input())")
    client.write_stdin(exec_id, "Ada\n")  # before RUNNING: buffered by the client
    assert pump(client, proto) == [ExecRequested("python", "print(input())")]
    proto.exec_started()
    deliver(proto, client)
    assert pump(client, proto) == [StdinReceived("Ada\n")]
    proto.send_output("stdout", "Ada\n", seq=1)
    proto.exec_finished(0)
    deliver(proto, client)
    assert client.events() == [
        ExecStarted(exec_id),
        Output(exec_id, "stdout", "Ada\n"),
        ProcessEnded(exec_id, returncode=None if upstream else 0, error=None),
    ]

    rejected = client.exec("ruby", "puts 1")
    assert pump(client, proto) == [None]
    deliver(proto, client)
    (event,) = client.events()
    assert isinstance(event, ExecRejected)
    assert event.exec_id == rejected
    assert event.error.server_message == f"Unsupported language: 'ruby'. {PYTHON_MSG}"

    client.kill_sandbox()
    assert pump(client, proto) == [KillSandboxRequested()]
    proto.send_status(Status.SANDBOX_KILLING)
    proto.send_status(Status.SANDBOX_KILLED)
    proto.close(1000)
    deliver(proto, client)
    events = client.events()
    assert events[0] == KillSandboxDone(None)
    assert session_ends(events) == [SessionEnded(None)]


def test_back_to_back_reconnect_with_seq_resumes_without_loss() -> None:
    client = ClientProtocol(URL, init=InitRequest(), auto_reconnect=True)
    first = server(create=True, upstream=False)
    client.connection_opened()
    first.receive_init(client.data_to_send()[0])
    first.send_sandbox_id(ID, TOKEN)
    first.send_running()
    deliver(first, client)
    exec_id = client.exec("bash", "for i in 1 2 3; do echo $i; done")
    pump(client, first)
    first.exec_started()
    first.send_output("stdout", "1\n", seq=1)
    deliver(first, client)
    client.connection_closed(1006, now=0.0)
    assert any(isinstance(e, ReconnectScheduled) for e in client.events())

    second = ServerProtocol(create=False, extensions=("exit_code", "seq", "close_stdin"))  # the reattach
    client.connection_opened()
    assert client.data_to_send() == []  # no init on attach
    second.send_running()
    deliver(second, client)
    (request,) = pump(client, second)
    assert request == ReconnectRequested(1)
    second.send_status(Status.SANDBOX_EXECUTION_RUNNING)
    second.send_output("stdout", "1\n", seq=1)  # a replay the client already has
    second.send_output("stdout", "2\n", seq=2)
    second.send_output("stdout", "3\n", seq=3)
    second.exec_finished(0)
    deliver(second, client)
    events = client.events()
    assert "".join(e.data for e in events if isinstance(e, Output)) == "2\n3\n"
    assert ProcessEnded(exec_id, 0, None) in events
    assert not any(isinstance(e, OutputIncomplete) for e in events)
