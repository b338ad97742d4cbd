"""Every ordering of protocol.md section 8 (and the races of 7) against the client role.

The server sends from several concurrent tasks, so frames of different
origins interleave in any order; each test feeds one legal ordering to
:class:`ClientProtocol` and checks what it emits and sends.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import pytest

from sandbox_proto import (
    FATAL_STATUSES,
    CheckpointDone,
    ClientProtocol,
    CloseConnection,
    ExecRejected,
    ExecStarted,
    InitRequest,
    KillProcessFailed,
    KillSandboxDone,
    LocalProtocolError,
    Output,
    OutputIncomplete,
    ProcessEnded,
    ProcessState,
    Reconnected,
    ReconnectPolicy,
    ReconnectScheduled,
    SandboxConnectionError,
    SandboxCreationError,
    SandboxDeletedError,
    SandboxExecutionError,
    SandboxIdFrame,
    SandboxState,
    SessionEnded,
    SetupComplete,
    SetupFailed,
    SnapshotDone,
    Status,
    decode_server_frame,
)

URL = "https://sandbox.example.run.app/"
ID = "sandbox-f126"
TOKEN = "9f1c0e7d4b2a48c6a1e3d5f7b9c0a2e4"
#: What our client asks for on every handshake: every extension it implements, sorted (extensions.md).
EXTENSIONS_QUERY = "extensions=close_stdin,exec_ref,exit_code,seq,stdin_seq"


def ST(status: str, **extra: Any) -> str:
    return json.dumps({"event": "status_update", "status": status, **extra}, separators=(",", ":"))


def ERR(message: str) -> str:
    return json.dumps({"event": "error", "message": message}, separators=(",", ":"))


def OUT(stream: str, data: str, seq: int | None = None) -> str:
    obj: dict[str, Any] = {"event": stream, "data": data}
    if seq is not None:
        obj["seq"] = seq
    return json.dumps(obj, separators=(",", ":"))


SANDBOX_ID_FRAME = json.dumps({"event": "sandbox_id", "sandbox_id": ID, "sandbox_token": TOKEN})
RUNNING = ST("SANDBOX_EXECUTION_RUNNING")
DONE = ST("SANDBOX_EXECUTION_DONE")
FORCE_KILLED = ST("SANDBOX_EXECUTION_FORCE_KILLED")


def feed(client: ClientProtocol, *frames: str) -> None:
    for frame in frames:
        client.receive(frame)


def sent(client: ClientProtocol) -> list[dict[str, Any]]:
    return [json.loads(text) for text in client.data_to_send()]


def of_type(events: list[Any], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def created(*, extensions: list[str] | None = None, set_cookies: tuple[str, ...] = (), **kwargs: Any) -> ClientProtocol:
    client = ClientProtocol(URL, init=InitRequest(), rng=random.Random(7), **kwargs)
    client.connection_opened(set_cookies)
    running = ST("SANDBOX_RUNNING", extensions=extensions) if extensions is not None else ST("SANDBOX_RUNNING")
    feed(client, ST("SANDBOX_CREATING"), SANDBOX_ID_FRAME, running)
    assert client.events() == [SetupComplete(ID, restored=False)]
    client.data_to_send()
    return client


def running_exec(client: ClientProtocol, code: str = "x") -> int:
    exec_id = client.exec("python", code)
    feed(client, RUNNING)
    assert client.events() == [ExecStarted(exec_id)]
    client.data_to_send()
    return exec_id


def dropped(client: ClientProtocol, *, now: float = 0.0, code: int = 1006) -> list[Any]:
    client.connection_closed(code, now=now)
    return client.events()


# --------------------------------------------------------------------------
# exec races (7.3.5, 7.5)


class TestStrayFrames:
    @pytest.mark.parametrize("status", ["SANDBOX_EXECUTION_ERROR", "SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR"])
    def test_stray_done_after_start_error_hits_next_exec(self, status: str) -> None:
        client = created()
        first = client.exec("ruby", "x")
        feed(client, ST(status), ERR("nope"))
        (rejected,) = client.events()
        assert isinstance(rejected, ExecRejected)
        assert rejected.exec_id == first
        # The user starts the next exec before the trailing DONE arrives.
        second = client.exec("python", "print(1)")
        assert second != first
        feed(client, DONE)
        assert client.events() == []
        assert client.process_state is ProcessState.STARTING
        feed(client, RUNNING, OUT("stdout", "1\n"), DONE)
        assert client.events() == [
            ExecStarted(second),
            Output(second, "stdout", "1\n"),
            ProcessEnded(second, None, None),
        ]

    def test_no_done_after_start_error_is_fine_too(self) -> None:
        # Rejected while another exec ran on the server: no DONE follows (7.3.5).
        client = created()
        client.exec("python", "x")
        feed(client, ST("SANDBOX_EXECUTION_ERROR"), ERR("An execution is already in progress."))
        client.events()
        second = client.exec("python", "y")
        feed(client, RUNNING, DONE)
        assert client.events() == [ExecStarted(second), ProcessEnded(second, None, None)]

    def test_force_killed_before_first_status_is_ignored(self) -> None:
        client = created()
        exec_id = client.exec("python", "x")
        feed(client, FORCE_KILLED, DONE)
        assert client.events() == []
        feed(client, RUNNING, DONE)
        assert client.events() == [ExecStarted(exec_id), ProcessEnded(exec_id, None, None)]

    def test_output_before_running_is_not_delivered_to_the_new_exec(self) -> None:
        client = created()
        exec_id = client.exec("python", "x")
        feed(client, OUT("stdout", "stale"))
        assert client.events() == []
        feed(client, RUNNING, OUT("stdout", "fresh"), DONE)
        assert client.events() == [
            ExecStarted(exec_id),
            Output(exec_id, "stdout", "fresh"),
            ProcessEnded(exec_id, None, None),
        ]

    def test_frames_after_done_are_dropped(self) -> None:
        client = created()
        exec_id = running_exec(client)
        feed(client, DONE, OUT("stdout", "late"), DONE, RUNNING)
        assert client.events() == [ProcessEnded(exec_id, None, None)]


class TestKillProcess:
    @pytest.mark.parametrize("order", [(FORCE_KILLED, DONE), (DONE, FORCE_KILLED)], ids=["killed-done", "done-killed"])
    def test_either_order_ends_once(self, order: tuple[str, str]) -> None:
        client = created()
        exec_id = running_exec(client)
        client.kill_process(exec_id)
        client.kill_process(exec_id)  # idempotent
        assert sent(client) == [{"action": "kill_process"}]
        feed(client, order[0])
        first = client.events()
        feed(client, order[1])
        second = client.events()
        assert of_type(first + second, ProcessEnded) == [ProcessEnded(exec_id, None, None)]
        assert order[0] == DONE or first == []  # FORCE_KILLED alone does not end it (DONE still due)

    def test_late_force_killed_does_not_touch_next_exec(self) -> None:
        client = created()
        exec_id = running_exec(client)
        client.kill_process(exec_id)
        feed(client, DONE)
        assert client.events() == [ProcessEnded(exec_id, None, None)]
        nxt = client.exec("python", "y")
        feed(client, FORCE_KILLED)  # belongs to the killed exec
        feed(client, RUNNING, OUT("stdout", "ok"))
        assert client.events() == [ExecStarted(nxt), Output(nxt, "stdout", "ok")]
        assert client.process_state is ProcessState.RUNNING

    def test_kill_before_running_is_deferred_until_running(self) -> None:
        client = created()
        exec_id = client.exec("python", "x")
        client.data_to_send()
        client.kill_process(exec_id)
        assert client.data_to_send() == []
        feed(client, RUNNING)
        assert sent(client) == [{"action": "kill_process"}]
        feed(client, FORCE_KILLED, DONE)
        assert client.events() == [ExecStarted(exec_id), ProcessEnded(exec_id, None, None)]

    def test_kill_before_start_error_sends_nothing(self) -> None:
        client = created()
        exec_id = client.exec("ruby", "x")
        client.data_to_send()
        client.kill_process(exec_id)
        feed(client, ST("SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR"), ERR("Unsupported language: 'ruby'."), DONE)
        (event,) = client.events()
        assert isinstance(event, ExecRejected)
        assert client.data_to_send() == []

    def test_force_kill_error_reports_and_process_keeps_running(self) -> None:
        client = created()
        exec_id = running_exec(client)
        client.kill_process(exec_id)
        client.data_to_send()
        feed(client, ST("SANDBOX_EXECUTION_FORCE_KILL_ERROR"))
        (event,) = client.events()
        assert isinstance(event, KillProcessFailed)
        assert event.exec_id == exec_id
        feed(client, OUT("stdout", "still"), DONE)
        assert client.events() == [Output(exec_id, "stdout", "still"), ProcessEnded(exec_id, None, None)]

    def test_kill_timeout_then_stray_frames_ignored(self) -> None:
        client = created()
        exec_id = running_exec(client)
        client.kill_process(exec_id)
        client.kill_process_timed_out(exec_id)
        assert client.events() == [ProcessEnded(exec_id, None, None)]
        nxt = client.exec("python", "y")
        feed(client, FORCE_KILLED, DONE, RUNNING, DONE)
        assert client.events() == [ExecStarted(nxt), ProcessEnded(nxt, None, None)]


class TestStdin:
    def test_stdin_before_running_is_buffered_in_order(self) -> None:
        client = created()
        exec_id = client.exec("python", "x")
        assert sent(client) == [{"language": "python", "code": "x"}]
        client.write_stdin(exec_id, "a\n")
        client.write_stdin(exec_id, "b\n")
        assert client.data_to_send() == []
        feed(client, RUNNING)
        client.write_stdin(exec_id, "c\n")
        assert sent(client) == [
            {"event": "stdin", "data": "a\n"},
            {"event": "stdin", "data": "b\n"},
            {"event": "stdin", "data": "c\n"},
        ]

    def test_buffered_stdin_of_a_rejected_exec_is_dropped(self) -> None:
        client = created()
        exec_id = client.exec("ruby", "x")
        client.data_to_send()
        client.write_stdin(exec_id, "lost\n")
        feed(client, ST("SANDBOX_EXECUTION_ERROR"), ERR("no"))
        assert client.data_to_send() == []
        with pytest.raises(LocalProtocolError):
            client.write_stdin(exec_id, "more")

    def test_stdin_and_kill_before_running_keep_their_order(self) -> None:
        client = created()
        exec_id = client.exec("python", "x")
        client.data_to_send()
        client.write_stdin(exec_id, "a\n")
        client.kill_process(exec_id)
        feed(client, RUNNING)
        assert sent(client) == [{"event": "stdin", "data": "a\n"}, {"action": "kill_process"}]

    def test_stdin_after_done_raises(self) -> None:
        client = created()
        exec_id = running_exec(client)
        feed(client, DONE)
        with pytest.raises(LocalProtocolError):
            client.write_stdin(exec_id, "x")

    def test_close_stdin_needs_the_extension(self) -> None:
        plain = created()
        exec_id = running_exec(plain)
        with pytest.raises(LocalProtocolError):
            plain.close_stdin(exec_id)
        assert plain.data_to_send() == []
        ext = created(extensions=["close_stdin"])
        exec_id = running_exec(ext)
        ext.close_stdin(exec_id)
        assert sent(ext) == [{"action": "close_stdin"}]


# --------------------------------------------------------------------------
# error pairs (6.1, 8.2)


class TestErrorPairs:
    @pytest.mark.parametrize(
        "between",
        [
            ST("SANDBOX_DELETING"),
            ST("SANDBOX_LOCK_ACQUIRING"),
            ST("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"),
            OUT("stdout", "x"),
            DONE,
            '{"event":"future_event","x":1}',
        ],
    )
    def test_frame_between_status_and_error(self, between: str) -> None:
        client = created()
        exec_id = client.exec("ruby", "x")
        feed(client, ST("SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR"), between, ERR("Unsupported language: 'ruby'."))
        (event,) = client.events()
        assert isinstance(event, ExecRejected)
        assert event.exec_id == exec_id
        assert event.error.server_message == "Unsupported language: 'ruby'."

    def test_setup_error_then_other_frame_then_error(self) -> None:
        client = ClientProtocol(URL, sandbox_id=ID, sandbox_token=TOKEN)
        client.connection_opened()
        feed(client, ST("SANDBOX_RESTORING"), ST("SANDBOX_LOCK_RELEASING"), ST("SANDBOX_LOCK_RELEASED"))
        feed(client, ST("SANDBOX_RESTORE_ERROR"), ST("SANDBOX_LOCK_RELEASED"), ERR("Failed to restore sandbox x: y"))
        events = client.events()
        (failed,) = of_type(events, SetupFailed)
        assert failed.error.status is Status.SANDBOX_RESTORE_ERROR
        assert failed.error.server_message == "Failed to restore sandbox x: y"

    def test_error_status_without_error_frame_resolves_at_close(self) -> None:
        client = ClientProtocol(URL, init=InitRequest())
        client.connection_opened()
        feed(client, ST("SANDBOX_CREATING"), ST("SANDBOX_CREATION_ERROR"))
        assert client.events() == []
        client.connection_closed(4000)
        events = client.events()
        (failed,) = of_type(events, SetupFailed)
        assert isinstance(failed.error, SandboxCreationError)
        assert failed.error.status is Status.SANDBOX_CREATION_ERROR
        assert failed.error.server_message is None
        assert len(of_type(events, SessionEnded)) == 1

    def test_error_frame_without_status_is_ignored(self) -> None:
        client = created()
        exec_id = running_exec(client)
        feed(client, ERR("orphan"))
        assert client.events() == []
        feed(client, DONE)
        assert client.events() == [ProcessEnded(exec_id, None, None)]

    def test_two_pending_errors_each_get_a_message(self) -> None:
        # A snapshot error and an exec start error race: each error frame goes to
        # the most recent status still lacking one (6.1).
        client = created()
        client.snapshot_filesystem("snap")
        exec_id = client.exec("ruby", "x")
        feed(
            client,
            ST("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"),
            ST("SANDBOX_FILESYSTEM_SNAPSHOT_ERROR"),
            ST("SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR"),
            ERR("lang"),
            ERR("snap"),
        )
        events = client.events()
        (rejected,) = of_type(events, ExecRejected)
        (snapshot,) = of_type(events, SnapshotDone)
        assert rejected.exec_id == exec_id
        assert rejected.error.server_message == "lang"
        assert snapshot.error is not None
        assert snapshot.error.server_message == "snap"

    def test_stdin_error_does_not_end_the_process(self) -> None:
        client = created()
        exec_id = running_exec(client)
        feed(client, ST("SANDBOX_STDIN_ERROR"), OUT("stdout", "a"), ERR("Invalid stdin message format."))
        feed(client, ST("SANDBOX_ERROR"), ERR("Broken pipe"))  # stdin write failure: no close (7.4)
        assert client.events() == [Output(exec_id, "stdout", "a")]
        assert client.process_state is ProcessState.RUNNING
        assert client.state is SandboxState.RUNNING


# --------------------------------------------------------------------------
# endings without a close (7.9, 7.10, 7.13)


class TestServerSideEndings:
    @pytest.mark.parametrize("with_exec", [False, True])
    def test_idle_deletion_ends_session(self, with_exec: bool) -> None:
        client = created(auto_reconnect=True)
        exec_id = running_exec(client) if with_exec else None
        feed(client, ST("SANDBOX_DELETING"), ST("SANDBOX_LOCK_RELEASING"), ST("SANDBOX_LOCK_RELEASED"))
        assert client.events() == []
        feed(client, ST("SANDBOX_DELETED"))
        events = client.events()
        (ended,) = of_type(events, SessionEnded)
        assert isinstance(ended.error, SandboxDeletedError)
        assert CloseConnection(1000) in events
        if exec_id is not None:
            (proc,) = of_type(events, ProcessEnded)
            assert proc.exec_id == exec_id
            assert isinstance(proc.error, SandboxDeletedError)
        assert events.index(ended) < len(events)
        assert dropped(client, code=1000) == []
        assert client.is_ended
        with pytest.raises(LocalProtocolError):
            client.exec("python", "x")

    def test_lock_renewal_error_then_deletion(self) -> None:
        client = created(auto_reconnect=True)
        exec_id = running_exec(client)
        feed(client, ST("SANDBOX_LOCK_RENEWAL_ERROR"), ST("SANDBOX_DELETING"), DONE)
        assert client.events() == [ProcessEnded(exec_id, None, None)]
        feed(client, ST("SANDBOX_LOCK_RELEASING"), ST("SANDBOX_LOCK_RELEASED"), ST("SANDBOX_DELETED"))
        events = client.events()
        (ended,) = of_type(events, SessionEnded)
        assert isinstance(ended.error, SandboxDeletedError)
        assert "lock" in str(ended.error)
        assert dropped(client) == []

    def test_handoff_sequence_on_old_connection(self) -> None:
        client = created(auto_reconnect=True)
        exec_id = running_exec(client)
        feed(client, ST("SANDBOX_LOCK_RELEASE_REQUESTED"))
        events = client.events()
        (proc,) = of_type(events, ProcessEnded)
        assert proc.exec_id == exec_id
        assert proc.error is not None
        (ended,) = of_type(events, SessionEnded)
        assert isinstance(ended.error, SandboxDeletedError)
        assert CloseConnection(1000) in events
        for status in (
            "SANDBOX_CHECKPOINTING",
            "SANDBOX_EXECUTION_FORCE_KILLED",
            "SANDBOX_EXECUTION_DONE",
            "SANDBOX_DELETING",
            "SANDBOX_LOCK_RELEASING",
            "SANDBOX_LOCK_RELEASED",
            "SANDBOX_DELETED",
            "SANDBOX_CHECKPOINT_ERROR",  # failed handoff checkpoint: no error frame
            "SANDBOX_CHECKPOINTED",
        ):
            feed(client, ST(status))
        assert client.events() == []
        assert client.data_to_send() == []
        assert dropped(client, now=3.0) == []

    def test_unrequested_checkpointed_ends_session(self) -> None:
        client = created(auto_reconnect=True)
        feed(client, ST("SANDBOX_CHECKPOINTED"))
        events = client.events()
        (ended,) = of_type(events, SessionEnded)
        assert isinstance(ended.error, SandboxDeletedError)
        assert CloseConnection(1000) in events
        assert not of_type(events, CheckpointDone)
        assert dropped(client) == []

    def test_unrequested_checkpoint_error_without_error_frame_is_harmless(self) -> None:
        client = created()
        exec_id = running_exec(client)
        feed(client, ST("SANDBOX_CHECKPOINT_ERROR"), OUT("stdout", "x"))
        assert client.events() == [Output(exec_id, "stdout", "x")]

    def test_unrequested_killed_does_not_end_kill(self) -> None:
        client = created(auto_reconnect=True)
        feed(client, ST("SANDBOX_KILLED"))
        assert of_type(client.events(), KillSandboxDone) == []
        # ... but it is fatal: no reconnect after the close that follows.
        events = dropped(client, code=1000)
        assert not of_type(events, ReconnectScheduled)
        assert len(of_type(events, SessionEnded)) == 1


# --------------------------------------------------------------------------
# deliberate operations


class TestOperations:
    def test_checkpoint_refused_leaves_sandbox_running_and_reconnectable(self) -> None:
        client = created(auto_reconnect=True)
        exec_id = running_exec(client)
        client.checkpoint()
        assert client.state is SandboxState.CHECKPOINTING
        feed(
            client,
            ST("SANDBOX_CHECKPOINTING"),
            ST("SANDBOX_EXECUTION_IN_PROGRESS_ERROR"),
            ERR("Cannot checkpoint while an execution is in progress."),
        )
        (done,) = client.events()
        assert isinstance(done, CheckpointDone)
        assert done.error is not None
        assert done.error.status is Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR
        assert client.state is SandboxState.RUNNING
        assert client.process_state is ProcessState.RUNNING
        client.checkpoint()  # can be tried again
        feed(client, ST("SANDBOX_CHECKPOINTING"), ST("SANDBOX_EXECUTION_IN_PROGRESS_ERROR"), ERR("again"))
        client.events()
        # Unlike upstream JS (10.5 item 4), a refused checkpoint does not disable reconnects.
        events = dropped(client)
        assert of_type(events, ReconnectScheduled)
        assert exec_id == 1

    def test_snapshot_error_then_later_exec_works(self) -> None:
        client = created()
        client.snapshot_filesystem("env")
        feed(
            client,
            ST("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"),
            ST("SANDBOX_FILESYSTEM_SNAPSHOT_ERROR"),
            ERR("no storage"),
        )
        (done,) = client.events()
        assert isinstance(done, SnapshotDone)
        assert done.error is not None
        assert done.error.server_message == "no storage"
        client.data_to_send()
        exec_id = client.exec("python", "print(1)")
        assert sent(client) == [{"language": "python", "code": "print(1)"}]
        feed(client, RUNNING, DONE)
        assert client.events() == [ExecStarted(exec_id), ProcessEnded(exec_id, None, None)]

    def test_snapshot_interleaves_with_exec_output(self) -> None:
        client = created()
        exec_id = running_exec(client)
        client.snapshot_filesystem("env")
        feed(
            client,
            ST("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"),
            OUT("stdout", "a"),
            ST("SANDBOX_FILESYSTEM_SNAPSHOT_CREATED"),
            OUT("stderr", "b"),
            DONE,
        )
        assert client.events() == [
            Output(exec_id, "stdout", "a"),
            SnapshotDone(None),
            Output(exec_id, "stderr", "b"),
            ProcessEnded(exec_id, None, None),
        ]

    def test_second_snapshot_or_checkpoint_while_pending_is_local_error(self) -> None:
        client = created()
        client.snapshot_filesystem("a")
        with pytest.raises(LocalProtocolError):
            client.snapshot_filesystem("b")
        client.checkpoint()
        with pytest.raises(LocalProtocolError):
            client.checkpoint()

    def test_kill_sandbox_closed_without_status(self) -> None:
        # 7.6: a sandbox already gone: just close 1000.
        client = created(auto_reconnect=True)
        client.kill_sandbox()
        assert sent(client) == [{"action": "kill_sandbox"}]
        client.connection_closed(1000)
        events = client.events()
        assert events[0] == KillSandboxDone(None)
        assert of_type(events, SessionEnded) == [SessionEnded(None)]
        assert not of_type(events, ReconnectScheduled)

    @pytest.mark.parametrize("status", ["SANDBOX_KILLED", "SANDBOX_KILL_ERROR"])
    def test_kill_sandbox_with_exec_running(self, status: str) -> None:
        client = created()
        exec_id = running_exec(client)
        client.kill_sandbox()
        feed(client, ST("SANDBOX_KILLING"), ST("SANDBOX_DELETING"), DONE, ST("SANDBOX_DELETED"), ST(status))
        events = client.events()
        assert events[0] == ProcessEnded(exec_id, None, None)
        (kill,) = of_type(events, KillSandboxDone)
        assert (kill.error is None) == (status == "SANDBOX_KILLED")
        assert len(of_type(events, SessionEnded)) == 1


# --------------------------------------------------------------------------
# setup orderings (7.1, 7.2)


class TestSetup:
    @pytest.mark.parametrize(
        ("frames", "status"),
        [
            ([ST("SANDBOX_NOT_FOUND")], Status.SANDBOX_NOT_FOUND),
            ([ST("SANDBOX_IN_USE")], Status.SANDBOX_IN_USE),
            ([ST("SANDBOX_RESTORING"), ST("SANDBOX_NOT_FOUND")], Status.SANDBOX_NOT_FOUND),
            ([ST("SANDBOX_RESTORING"), ST("SANDBOX_RESTORE_ERROR"), ERR("m")], Status.SANDBOX_RESTORE_ERROR),
            (
                [ST("SANDBOX_RESTORING"), ST("SANDBOX_LOCK_ACQUIRING"), ST("SANDBOX_RESTORE_ERROR"), ERR("m")],
                Status.SANDBOX_RESTORE_ERROR,
            ),
            (
                [ST("SANDBOX_RESTORING"), ST("SANDBOX_PERMISSION_DENIAL_ERROR"), ERR("m")],
                Status.SANDBOX_PERMISSION_DENIAL_ERROR,
            ),
        ],
    )
    def test_attach_refusals_never_hang(self, frames: list[str], status: Status) -> None:
        client = ClientProtocol(URL, sandbox_id=ID, sandbox_token=TOKEN, auto_reconnect=True)
        client.connection_opened()
        feed(client, *frames)
        events = client.events()
        (failed,) = of_type(events, SetupFailed)
        assert isinstance(failed.error, SandboxCreationError)
        assert failed.error.status is status
        assert failed.error.server_message == ("m" if frames[-1] == ERR("m") else None)
        assert len(of_type(events, SessionEnded)) == 1
        assert CloseConnection(1000) in events
        assert dropped(client, code=1011) == []

    @pytest.mark.parametrize("code", [1000, 1006, 1011, 4000])
    def test_close_during_setup_fails_setup(self, code: int) -> None:
        client = ClientProtocol(URL, init=InitRequest(), auto_reconnect=True)
        client.connection_opened()
        feed(client, ST("SANDBOX_CREATING"), SANDBOX_ID_FRAME)
        events = dropped(client, code=code)
        (failed,) = of_type(events, SetupFailed)
        assert isinstance(failed.error, SandboxConnectionError)
        assert len(of_type(events, SessionEnded)) == 1
        assert not of_type(events, ReconnectScheduled)

    def test_handshake_failure_fails_setup(self) -> None:
        client = ClientProtocol(URL, init=InitRequest(), auto_reconnect=True)
        client.connection_failed(SandboxConnectionError("HTTP 403"), now=0.0, http_status=403)
        events = client.events()
        assert [type(e) for e in events] == [SetupFailed, SessionEnded]

    def test_running_without_sandbox_id_fails(self) -> None:
        client = ClientProtocol(URL, init=InitRequest())
        client.connection_opened()
        feed(client, ST("SANDBOX_CREATING"), ST("SANDBOX_RUNNING"))
        (failed,) = of_type(client.events(), SetupFailed)
        assert isinstance(failed.error, SandboxCreationError)

    def test_sandbox_id_twice_keeps_the_first(self) -> None:
        client = ClientProtocol(URL, init=InitRequest())
        client.connection_opened()
        other = json.dumps({"event": "sandbox_id", "sandbox_id": "sandbox-beef", "sandbox_token": "other"})
        feed(client, ST("SANDBOX_CREATING"), SANDBOX_ID_FRAME, other, ST("SANDBOX_RUNNING"), other)
        assert client.events() == [SetupComplete(ID, restored=False)]
        assert (client.sandbox_id, client.sandbox_token) == (ID, TOKEN)

    def test_sandbox_id_on_attach_is_ignored(self) -> None:
        client = ClientProtocol(URL, sandbox_id=ID, sandbox_token=TOKEN)
        client.connection_opened()
        feed(client, json.dumps({"event": "sandbox_id", "sandbox_id": "sandbox-beef", "sandbox_token": "t"}))
        feed(client, ST("SANDBOX_RUNNING"))
        assert client.events() == [SetupComplete(ID, restored=False)]
        assert client.sandbox_token == TOKEN

    def test_sandbox_id_without_token_cannot_reattach(self) -> None:
        client = ClientProtocol(URL, init=InitRequest(), auto_reconnect=True)
        client.connection_opened()
        feed(
            client, ST("SANDBOX_CREATING"), json.dumps({"event": "sandbox_id", "sandbox_id": ID}), ST("SANDBOX_RUNNING")
        )
        assert client.events() == [SetupComplete(ID, restored=False)]
        assert client.sandbox_token is None
        dropped(client)
        with pytest.raises(LocalProtocolError):
            client.handshake()  # never `sandbox_token=None` (4.2)

    def test_setup_frames_after_running_are_ignored(self) -> None:
        client = created()
        exec_id = running_exec(client)
        feed(client, ST("SANDBOX_RUNNING"), ST("SANDBOX_NOT_FOUND"), ST("SANDBOX_IN_USE"), ST("SANDBOX_RESTORING"))
        feed(client, ST("SANDBOX_CREATING"), DONE)
        assert client.events() == [ProcessEnded(exec_id, None, None)]
        assert client.state is SandboxState.RUNNING


class TestForwardCompatibility:
    @pytest.mark.parametrize(
        "frame",
        [
            ST("SANDBOX_TELEPORTING"),
            ST("SANDBOX_EXECUTION_PAUSED"),
            ST("SANDBOX_RUNNING_LATE"),
            '{"event":"heartbeat"}',
            '{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","message":"the unit tests fake this"}',
            '{"event":"stdout","data":"x","extra":{"nested":[1]}}',
            "not json",
            "[]",
            b"\x00\x01",
            '{"event":"status_update"}',
            '{"event":"status_update","status":null}',
            '{"event":"stdout","data":5}',
            '{"no_event":true}',
        ],
    )
    def test_unknown_or_malformed_frames_do_not_disturb(self, frame: str | bytes) -> None:
        client = created()
        exec_id = running_exec(client)
        client.receive(frame)
        events = client.events()
        # The only frames with an effect are the valid DONE (with an ignored key) and the stdout.
        assert events in ([], [ProcessEnded(exec_id, None, None)], [Output(exec_id, "stdout", "x")])
        if events == []:
            feed(client, OUT("stdout", "y"), DONE)
            assert client.events() == [Output(exec_id, "stdout", "y"), ProcessEnded(exec_id, None, None)]
        assert client.state is SandboxState.RUNNING

    def test_force_terminated_is_an_alias(self) -> None:
        client = created()
        exec_id = running_exec(client)
        client.kill_process(exec_id)
        feed(client, DONE, ST("SANDBOX_EXECUTION_FORCE_TERMINATED"))
        assert client.events() == [ProcessEnded(exec_id, None, None)]
        nxt = client.exec("python", "y")
        feed(client, RUNNING)
        assert client.events() == [ExecStarted(nxt)]


# --------------------------------------------------------------------------
# reconnect (7.12, 2.4)


class TestReconnect:
    def test_drop_schedules_reconnect_to_attach_url_with_cookies(self) -> None:
        client = created(
            auto_reconnect=True,
            set_cookies=(
                "GAESA=one; expires=Mon, 24-Nov-2025 01:17:28 GMT; path=/",
                "SANDBOX_AFFINITY=i1; Path=/; HttpOnly",
            ),
            headers={"Authorization": "Bearer abc"},
        )
        events = dropped(client, now=1.0)
        (scheduled,) = of_type(events, ReconnectScheduled)
        assert scheduled.attempt == 1
        assert scheduled.delay >= 0
        assert client.state is SandboxState.RECONNECTING
        handshake = client.handshake()
        assert handshake.url == f"wss://sandbox.example.run.app/attach/{ID}?sandbox_token={TOKEN}&{EXTENSIONS_QUERY}"
        assert handshake.headers["Cookie"] == "GAESA=one; SANDBOX_AFFINITY=i1"
        assert handshake.headers["Authorization"] == "Bearer abc"
        # The reconnect's own Set-Cookie replaces a value; attributes never travel back.
        client.connection_opened(["GAESA=two; Secure", "junk-without-equals"])
        feed(client, ST("SANDBOX_RUNNING"))
        assert client.events() == [Reconnected(restored=False)]
        dropped(client, now=2.0)
        assert client.handshake().headers["Cookie"] == "GAESA=two; SANDBOX_AFFINITY=i1"

    def test_fresh_create_and_attach_start_without_cookies(self) -> None:
        create = ClientProtocol(URL, init=InitRequest())
        assert "Cookie" not in create.handshake().headers
        attach = ClientProtocol(URL, sandbox_id=ID, sandbox_token=TOKEN)
        assert "Cookie" not in attach.handshake().headers

    def test_reconnect_sent_after_running_only_with_active_process(self) -> None:
        client = created(auto_reconnect=True)
        exec_id = running_exec(client)
        feed(client, OUT("stdout", "1\n"))
        client.events()
        dropped(client)
        client.write_stdin(exec_id, "typed while away\n")
        client.connection_opened()
        assert client.data_to_send() == []
        with pytest.raises(LocalProtocolError):
            client.exec("python", "y")  # still reconnecting
        feed(client, ST("SANDBOX_RUNNING"))
        assert sent(client) == [{"action": "reconnect"}, {"event": "stdin", "data": "typed while away\n"}]
        events = client.events()
        assert OutputIncomplete(exec_id) in events
        assert Reconnected(restored=False) in events
        feed(client, RUNNING, OUT("stdout", "2\n"), DONE)  # duplicate RUNNING starts the reply
        assert client.events() == [Output(exec_id, "stdout", "2\n"), ProcessEnded(exec_id, None, None)]

    def test_reconnect_with_seq_sends_last_seq(self) -> None:
        client = created(auto_reconnect=True, extensions=["seq", "exit_code"])
        exec_id = running_exec(client)
        feed(client, OUT("stdout", "a", seq=1), OUT("stderr", "b", seq=2))
        client.events()
        dropped(client)
        client.connection_opened()
        feed(client, ST("SANDBOX_RUNNING", extensions=["seq", "exit_code"]))
        assert sent(client) == [{"action": "reconnect", "last_seq": 2}]
        events = client.events()
        assert not of_type(events, OutputIncomplete)
        feed(
            client,
            RUNNING,
            OUT("stderr", "b", seq=2),
            OUT("stdout", "c", seq=3),
            ST("SANDBOX_EXECUTION_DONE", exit_code=0),
        )
        assert client.events() == [Output(exec_id, "stdout", "c"), ProcessEnded(exec_id, 0, None)]

    def test_no_last_seq_when_the_new_server_lacks_seq(self) -> None:
        client = created(auto_reconnect=True, extensions=["seq"])
        running_exec(client)
        feed(client, OUT("stdout", "a", seq=1))
        dropped(client)
        client.connection_opened()
        feed(client, ST("SANDBOX_RUNNING"))  # e.g. an upstream instance after failover
        assert sent(client) == [{"action": "reconnect"}]

    def test_output_gap_reports_incomplete(self) -> None:
        client = created(auto_reconnect=True, extensions=["seq"])
        exec_id = running_exec(client)
        feed(client, '{"event":"output_gap","from_seq":1,"to_seq":4}')
        assert client.events() == [OutputIncomplete(exec_id)]

    def test_no_reconnect_frame_without_process(self) -> None:
        client = created(auto_reconnect=True)
        dropped(client)
        client.connection_opened()
        feed(client, ST("SANDBOX_RUNNING"))
        assert client.data_to_send() == []
        assert client.events() == [Reconnected(restored=False)]
        exec_id = client.exec("python", "x")  # usable again
        assert sent(client) == [{"language": "python", "code": "x"}]
        assert exec_id == 1

    def test_exec_unanswered_at_drop_is_killed_without_seq(self) -> None:
        # The request may have reached the server: a kill makes sure no orphan holds the sandbox.
        client = created(auto_reconnect=True)
        exec_id = client.exec("python", "x")
        client.data_to_send()  # written; whether it arrived is unknown
        events = dropped(client)
        assert not of_type(events, ExecRejected)
        assert of_type(events, ReconnectScheduled)
        client.connection_opened()
        feed(client, ST("SANDBOX_RUNNING"))
        assert sent(client) == [{"action": "kill_process"}]
        (rejected,) = of_type(client.events(), ExecRejected)
        assert rejected.exec_id == exec_id
        assert isinstance(rejected.error, SandboxConnectionError)
        feed(client, FORCE_KILLED, DONE)  # the kill's reply is absorbed, not taken for the next exec's
        next_id = client.exec("python", "y")
        feed(client, RUNNING)
        assert ExecStarted(next_id) in client.events()

    @pytest.mark.parametrize("outcome", ["ours", "another", "none"])
    def test_exec_unanswered_at_drop_is_asked_about_with_exec_ref(self, outcome: str) -> None:
        extensions = ["exec_ref", "seq"]
        client = created(auto_reconnect=True, extensions=extensions)
        exec_id = client.exec("python", "x")
        (request,) = sent(client)
        assert request["code"] == "x" and isinstance(request["ref"], str)
        dropped(client)
        client.connection_opened()
        feed(client, ST("SANDBOX_RUNNING", extensions=extensions))
        assert sent(client) == [{"action": "reconnect", "last_seq": 0}]
        if outcome == "ours":
            feed(client, ST("SANDBOX_EXECUTION_RUNNING", ref=request["ref"]), OUT("stdout", "hi", seq=1), DONE)
            events = client.events()
            assert ExecStarted(exec_id) in events
            assert Output(exec_id, "stdout", "hi") in events
            assert of_type(events, ProcessEnded) == [ProcessEnded(exec_id, None, None)]
            return
        if outcome == "another":  # another client's exec runs: its stream is not ours
            feed(client, ST("SANDBOX_EXECUTION_RUNNING", ref="someone-else"), OUT("stdout", "theirs", seq=1))
        else:
            feed(client, DONE)  # our server's answer when nothing runs (S1)
        events = client.events()
        (rejected,) = of_type(events, ExecRejected)
        assert isinstance(rejected.error, SandboxConnectionError)
        assert not of_type(events, Output)

    def test_exec_never_sent_is_sent_after_the_reconnect(self) -> None:
        client = created(auto_reconnect=True)
        exec_id = client.exec("python", "x")
        client.send_failed(client.data_to_send())  # did not leave
        dropped(client)
        client.connection_opened()
        feed(client, ST("SANDBOX_RUNNING"))
        assert sent(client) == [{"language": "python", "code": "x"}]
        feed(client, RUNNING)
        assert ExecStarted(exec_id) in client.events()

    def test_in_use_and_1011_during_reconnect_is_retried(self) -> None:
        client = created(auto_reconnect=True, reconnect_policy=ReconnectPolicy(initial_delay=0.5, deadline=60.0))
        exec_id = running_exec(client)
        dropped(client, now=0.0)
        client.connection_opened()
        feed(client, ST("SANDBOX_IN_USE"))
        assert client.events() == []  # transient, not a setup failure
        client.connection_closed(1011, now=0.2)
        (scheduled,) = client.events()
        assert isinstance(scheduled, ReconnectScheduled)
        assert scheduled.attempt == 2
        assert 0.25 <= scheduled.delay <= 0.5
        client.connection_opened()
        feed(client, ST("SANDBOX_IN_USE"))
        client.connection_closed(1011, now=1.0)
        (scheduled,) = client.events()
        assert scheduled.attempt == 3
        assert 0.5 <= scheduled.delay <= 1.0
        client.connection_opened()
        feed(client, ST("SANDBOX_RUNNING"))
        assert sent(client) == [{"action": "reconnect"}]
        assert Reconnected(restored=False) in client.events()
        assert client.process_state is ProcessState.RUNNING
        feed(client, RUNNING, DONE)
        assert client.events() == [ProcessEnded(exec_id, None, None)]

    def test_restoring_during_reconnect_ends_the_process(self) -> None:
        client = created(auto_reconnect=True)
        exec_id = running_exec(client)
        dropped(client)
        client.connection_opened()
        feed(client, ST("SANDBOX_RESTORING"), ST("SANDBOX_LOCK_ACQUIRING"), ST("SANDBOX_LOCK_ACQUIRED"))
        assert client.events() == []
        feed(client, ST("SANDBOX_RUNNING"))
        assert client.data_to_send() == []  # no `reconnect` to a restored sandbox (7.10)
        events = client.events()
        (proc,) = of_type(events, ProcessEnded)
        assert proc.exec_id == exec_id
        assert proc.error is not None
        assert events[-1] == Reconnected(restored=True)

    @pytest.mark.parametrize(
        "frames",
        [
            [ST("SANDBOX_NOT_FOUND")],
            [ST("SANDBOX_RESTORING"), ST("SANDBOX_RESTORE_ERROR"), ERR("Latest checkpoint not found")],
            [ST("SANDBOX_PERMISSION_DENIAL_ERROR"), ERR("Invalid sandbox token.")],
        ],
    )
    def test_refusal_during_reconnect_ends_session(self, frames: list[str]) -> None:
        client = created(auto_reconnect=True)
        exec_id = running_exec(client)
        dropped(client)
        client.connection_opened()
        feed(client, *frames)
        events = client.events()
        assert not of_type(events, SetupFailed)  # setup succeeded long ago
        (proc,) = of_type(events, ProcessEnded)
        assert proc.exec_id == exec_id
        (ended,) = of_type(events, SessionEnded)
        assert isinstance(ended.error, SandboxCreationError)
        assert dropped(client, code=1011) == []

    def test_close_1012_is_reconnectable(self) -> None:
        client = created(auto_reconnect=True)
        assert of_type(dropped(client, code=1012), ReconnectScheduled)

    def test_no_reconnect_without_auto_reconnect(self) -> None:
        client = created()
        exec_id = running_exec(client)
        events = dropped(client)
        assert not of_type(events, ReconnectScheduled)
        (proc,) = of_type(events, ProcessEnded)
        assert proc.exec_id == exec_id
        assert isinstance(proc.error, SandboxConnectionError)
        assert len(of_type(events, SessionEnded)) == 1

    @pytest.mark.parametrize("status", sorted(s.value for s in FATAL_STATUSES))
    def test_fatal_statuses_never_reconnect(self, status: str) -> None:
        client = created(auto_reconnect=True)
        feed(client, ST(status), ERR("m"))
        client.events()
        events = dropped(client, code=4000)
        assert not of_type(events, ReconnectScheduled)
        assert len(of_type(events, SessionEnded)) <= 1
        assert client.is_ended

    @pytest.mark.parametrize("action", ["kill_sandbox", "close", "checkpoint"])
    def test_deliberate_operations_never_reconnect(self, action: str) -> None:
        client = created(auto_reconnect=True)
        getattr(client, action)()
        client.data_to_send()  # handed to the socket
        before = client.events()
        events = before + dropped(client, code=1000 if action == "kill_sandbox" else 1006)
        assert not of_type(events, ReconnectScheduled)
        assert len(of_type(events, SessionEnded)) == 1
        if action == "checkpoint":
            (done,) = of_type(events, CheckpointDone)
            assert done.error is not None
        if action == "kill_sandbox":
            assert of_type(events, KillSandboxDone) == [KillSandboxDone(None)]

    def test_kill_sandbox_cut_abnormally_is_sent_again(self) -> None:
        # A 1006 right after the kill left: it may not have arrived, so it goes again once reattached.
        client = created(auto_reconnect=True)
        client.kill_sandbox()
        client.data_to_send()
        assert of_type(dropped(client, code=1006), ReconnectScheduled)
        client.connection_opened()
        feed(client, ST("SANDBOX_RUNNING"))
        assert sent(client) == [{"action": "kill_sandbox"}]
        feed(client, ST("SANDBOX_KILLING"), ST("SANDBOX_DELETING"), ST("SANDBOX_DELETED"), ST("SANDBOX_KILLED"))
        assert KillSandboxDone(None) in client.events()
        assert client.state is SandboxState.KILLED

    def test_kill_sandbox_already_gone_on_reattach(self) -> None:
        client = created(auto_reconnect=True)
        client.kill_sandbox()
        client.data_to_send()
        dropped(client, code=1006)
        client.connection_opened()
        feed(client, ST("SANDBOX_NOT_FOUND"))
        assert KillSandboxDone(None) in client.events()
        assert client.state is SandboxState.KILLED

    def test_backoff_deadline_gives_up(self) -> None:
        policy = ReconnectPolicy(initial_delay=0.5, max_delay=4.0, deadline=20.0)
        client = created(auto_reconnect=True, reconnect_policy=policy)
        exec_id = running_exec(client)
        events = dropped(client, now=100.0)
        now = 100.0
        delays: list[float] = []
        for _ in range(100):
            scheduled = of_type(events, ReconnectScheduled)
            if not scheduled:
                break
            delays.append(scheduled[0].delay)
            now += scheduled[0].delay + 0.5  # the handshake itself takes time
            client.connection_failed(SandboxConnectionError("connection refused"), now=now)
            events = client.events()
        else:
            pytest.fail("never gave up")
        (ended,) = of_type(events, SessionEnded)
        assert isinstance(ended.error, SandboxConnectionError)
        assert now - 100.0 <= policy.deadline + policy.max_delay
        assert all(d <= policy.max_delay for d in delays)
        assert delays[1] < delays[-1]  # it backs off
        (proc,) = of_type(events, ProcessEnded)
        assert proc.exec_id == exec_id
        assert client.is_ended

    @pytest.mark.parametrize("http_status", [401, 403, 404])
    def test_non_retryable_handshake_refusal_ends_reconnect(self, http_status: int) -> None:
        client = created(auto_reconnect=True)
        dropped(client)
        client.connection_failed(SandboxConnectionError(f"HTTP {http_status}"), now=0.1, http_status=http_status)
        events = client.events()
        assert not of_type(events, ReconnectScheduled)
        assert len(of_type(events, SessionEnded)) == 1

    def test_retryable_handshake_refusal_is_retried(self) -> None:
        client = created(auto_reconnect=True)
        dropped(client)
        client.connection_failed(SandboxConnectionError("HTTP 503"), now=0.1, http_status=503)
        (scheduled,) = of_type(client.events(), ReconnectScheduled)
        assert scheduled.attempt == 2

    def test_successful_reconnect_resets_backoff(self) -> None:
        client = created(auto_reconnect=True)
        dropped(client, now=0.0)
        client.connection_failed(SandboxConnectionError("x"), now=1.0)
        client.events()
        client.connection_opened()
        feed(client, ST("SANDBOX_RUNNING"))
        client.events()
        (scheduled,) = of_type(dropped(client, now=500.0), ReconnectScheduled)
        assert scheduled.attempt == 1

    def test_close_while_reconnecting_ends_everything(self) -> None:
        client = created(auto_reconnect=True)
        exec_id = running_exec(client)
        dropped(client)
        client.close()
        events = client.events()
        (proc,) = of_type(events, ProcessEnded)
        assert proc.exec_id == exec_id
        assert len(of_type(events, SessionEnded)) == 1


# --------------------------------------------------------------------------
# extensions (15)


class TestExitCode:
    def test_exit_code_extension_sets_returncode(self) -> None:
        client = created(extensions=["exit_code"])
        exec_id = running_exec(client)
        feed(client, ST("SANDBOX_EXECUTION_DONE", exit_code=-9))
        assert client.events() == [ProcessEnded(exec_id, -9, None)]

    def test_without_extension_returncode_is_none(self) -> None:
        client = created()
        exec_id = running_exec(client)
        feed(client, DONE)
        assert client.events() == [ProcessEnded(exec_id, None, None)]

    def test_unadvertised_exit_code_is_not_used(self) -> None:
        # 15: "Our client uses an extension only after the server advertised it."
        client = created()
        exec_id = running_exec(client)
        feed(client, ST("SANDBOX_EXECUTION_DONE", exit_code=3))
        assert client.events() == [ProcessEnded(exec_id, None, None)]

    def test_unadvertised_seq_is_not_used_for_dedup(self) -> None:
        client = created()
        exec_id = running_exec(client)
        feed(client, OUT("stdout", "a", seq=1), OUT("stdout", "b", seq=1))
        assert client.events() == [Output(exec_id, "stdout", "a"), Output(exec_id, "stdout", "b")]


class TestAskingForExtensions:
    """The handshake URL asks (extensions.md); only what was asked for and granted is used."""

    def test_a_subset_is_asked_for_on_create_and_every_attach(self) -> None:
        client = ClientProtocol(URL, init=InitRequest(), auto_reconnect=True, extensions=["seq", "exit_code"])
        assert client.handshake().url == "wss://sandbox.example.run.app/create?extensions=exit_code,seq"
        client.connection_opened()
        feed(client, ST("SANDBOX_CREATING"), SANDBOX_ID_FRAME, ST("SANDBOX_RUNNING", extensions=["exit_code"]))
        assert client.extensions == {"exit_code"}
        dropped(client, now=1.0)
        assert client.handshake().url == (
            f"wss://sandbox.example.run.app/attach/{ID}?sandbox_token={TOKEN}&extensions=exit_code,seq"
        )

    def test_asking_for_none_sends_no_parameter(self) -> None:
        client = ClientProtocol(URL, sandbox_id=ID, sandbox_token=TOKEN, extensions=())
        assert client.handshake().url == f"wss://sandbox.example.run.app/attach/{ID}?sandbox_token={TOKEN}"
        assert "extensions" not in ClientProtocol(URL, init=InitRequest(), extensions=()).handshake().url

    def test_a_grant_not_asked_for_is_not_used(self) -> None:
        client = ClientProtocol(URL, init=InitRequest(), extensions=["seq"])
        client.connection_opened()
        feed(client, ST("SANDBOX_CREATING"), SANDBOX_ID_FRAME, ST("SANDBOX_RUNNING", extensions=["exit_code", "seq"]))
        assert client.extensions == {"seq"}
        client.events()
        exec_id = running_exec(client)
        feed(client, ST("SANDBOX_EXECUTION_DONE", exit_code=3))
        assert client.events() == [ProcessEnded(exec_id, None, None)]

    @pytest.mark.parametrize("names", [["time_travel"], "seq"])
    def test_only_implemented_extensions_can_be_asked_for(self, names: Any) -> None:
        with pytest.raises(LocalProtocolError):
            ClientProtocol(URL, init=InitRequest(), extensions=names)


# --------------------------------------------------------------------------
# secrets (2.3, 2.6)


class TestNoTokenLeaks:
    def test_reprs_and_safe_url(self) -> None:
        client = created(auto_reconnect=True, set_cookies=("GAESA=cookie-secret",))
        assert TOKEN not in repr(client)
        assert TOKEN not in repr(decode_server_frame(SANDBOX_ID_FRAME))
        assert TOKEN not in repr(SandboxIdFrame(ID, TOKEN))
        dropped(client)
        handshake = client.handshake()
        assert TOKEN in handshake.url
        assert TOKEN not in handshake.safe_url
        assert "sandbox_token=***" in handshake.safe_url
        assert TOKEN not in repr(handshake)
        assert TOKEN not in str(handshake)
        assert "cookie-secret" not in repr(handshake)

    def test_odd_token_is_encoded_and_redacted(self) -> None:
        token = "a b&c=d/e?f#g'h\"i"
        client = ClientProtocol(URL, sandbox_id="sandbox/../x", sandbox_token=token)
        handshake = client.handshake()
        assert handshake.url == (
            "wss://sandbox.example.run.app/attach/sandbox%2F..%2Fx?sandbox_token=a%20b%26c%3Dd%2Fe%3Ff%23g%27h%22i"
            f"&{EXTENSIONS_QUERY}"
        )
        assert "sandbox_token=***" in handshake.safe_url
        assert "%26" not in handshake.safe_url
        assert token not in repr(client) + repr(handshake)

    def test_logs_and_errors_never_carry_the_token(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG, logger="sandbox_proto")
        client = created(auto_reconnect=True, label="t")
        exec_id = running_exec(client)
        client.write_stdin(exec_id, TOKEN)  # even stdin content is not logged
        feed(client, OUT("stdout", "x"), '{"event":"mystery"}', "garbage")
        dropped(client)
        client.handshake()
        client.connection_opened(["A=1"])
        feed(client, ST("SANDBOX_IN_USE"))
        client.connection_closed(1011, now=0.5)
        client.connection_opened()
        feed(client, ST("SANDBOX_PERMISSION_DENIAL_ERROR"), ERR("Invalid sandbox token."))
        events = client.events()
        assert caplog.records  # debug logging was exercised
        assert TOKEN not in caplog.text
        for event in events:
            assert TOKEN not in repr(event)
            error = getattr(event, "error", None)
            if error is not None:
                assert TOKEN not in str(error)

    def test_setup_errors_do_not_carry_the_token(self) -> None:
        client = ClientProtocol(URL, sandbox_id=ID, sandbox_token=TOKEN)
        client.connection_failed(SandboxConnectionError("refused"), now=0.0)
        for event in client.events():
            assert TOKEN not in repr(event)


def test_exec_errors_carry_status_and_server_text() -> None:
    client = created()
    client.exec("python", "x")
    feed(
        client, ST("SANDBOX_EXECUTION_ERROR"), ERR("Cannot execute code in a sandbox that is not in the RUNNING state")
    )
    (event,) = client.events()
    assert isinstance(event.error, SandboxExecutionError)
    assert "not in the RUNNING state" in str(event.error)


def test_a_timed_out_session_is_dropped_without_a_closing_handshake() -> None:
    # A peer that stopped answering would only make a closing handshake wait.
    client = created()
    client.events()
    client.checkpoint()
    client.operation_timed_out("checkpoint")
    closes = [e for e in client.events() if isinstance(e, CloseConnection)]
    assert closes == [CloseConnection(1000, abort=True)]


def test_a_deliberate_close_keeps_the_closing_handshake() -> None:
    client = created()
    client.events()
    client.close()
    closes = [e for e in client.events() if isinstance(e, CloseConnection)]
    assert closes == [CloseConnection(1000, abort=False)]
