"""The windows between the paths: every user call in every state, drops at every step, late results.

Each test drives :class:`ClientProtocol` alone (no I/O) into one of the
windows where a promise used to break, and checks what it sends and emits.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox_proto import (
    CALL_TABLE,
    Call,
    CheckpointDone,
    ClientProtocol,
    CloseConnection,
    ExecRejected,
    ExecStarted,
    InitRequest,
    KillSandboxDone,
    LocalProtocolError,
    ProcessEnded,
    ReconnectPolicy,
    SandboxConnectionError,
    SandboxState,
    SessionEnded,
    StdinIncomplete,
    Verdict,
)

URL = "http://127.0.0.1:1"
ID = "sb-1"
TOKEN = "tok-secret"
ALL_EXT = ["close_stdin", "exec_ref", "exit_code", "seq", "stdin_seq"]


def ST(status: str, **extra: Any) -> str:
    return json.dumps({"event": "status_update", "status": status, **extra})


RUNNING = ST("SANDBOX_EXECUTION_RUNNING")
DONE = ST("SANDBOX_EXECUTION_DONE")


def ACK(seq: int) -> str:
    return json.dumps({"event": "stdin_ack", "seq": seq})


def sent(client: ClientProtocol) -> list[dict[str, Any]]:
    return [json.loads(text) for text in client.data_to_send()]


def created(extensions: list[str] | None = None, **options: Any) -> ClientProtocol:
    client = ClientProtocol(URL, init=InitRequest(), auto_reconnect=True, rng=random.Random(1), **options)
    client.connection_opened()
    client.receive(ST("SANDBOX_CREATING"))
    client.receive(json.dumps({"event": "sandbox_id", "sandbox_id": ID, "sandbox_token": TOKEN}))
    client.receive(ST("SANDBOX_RUNNING", extensions=extensions or []))
    client.data_to_send()
    client.events()
    return client


def running(client: ClientProtocol) -> int:
    exec_id = client.exec("python", "x")
    client.receive(RUNNING)
    client.data_to_send()
    client.events()
    return exec_id


def reattach(client: ClientProtocol, extensions: list[str] | None = None) -> None:
    client.connection_opened()
    client.receive(ST("SANDBOX_RUNNING", extensions=extensions or []))


class TestStdinExactlyOnce:
    def test_written_into_a_dead_socket_is_resent_after_the_ack(self) -> None:
        client = created(ALL_EXT)
        exec_id = running(client)
        client.write_stdin(exec_id, "a\n")
        assert sent(client) == [{"event": "stdin", "data": "a\n", "seq": 1}]  # into a socket already dead
        client.connection_closed(1006)
        client.write_stdin(exec_id, "b\n")  # while reconnecting: held
        assert sent(client) == []
        reattach(client, ALL_EXT)
        # Nothing but the reconnect until the server says what it has.
        assert sent(client) == [{"action": "reconnect", "last_seq": 0, "stdin_seq": True}]
        client.receive(ACK(0))
        assert sent(client) == [
            {"event": "stdin", "data": "a\n", "seq": 1},
            {"event": "stdin", "data": "b\n", "seq": 2},
        ]
        assert not any(isinstance(e, StdinIncomplete) for e in client.events())

    def test_what_the_server_acknowledged_is_not_sent_twice(self) -> None:
        client = created(ALL_EXT)
        exec_id = running(client)
        for data in ("a", "b", "c"):
            client.write_stdin(exec_id, data)
        client.close_stdin(exec_id)
        client.data_to_send()
        client.connection_closed(1006)
        reattach(client, ALL_EXT)
        client.data_to_send()
        client.receive(ACK(2))
        assert sent(client) == [{"event": "stdin", "data": "c", "seq": 3}, {"action": "close_stdin", "seq": 4}]

    def test_periodic_ack_frees_what_was_kept(self) -> None:
        client = created(ALL_EXT)
        exec_id = running(client)
        client.write_stdin(exec_id, "a")
        client.write_stdin(exec_id, "b")
        client.data_to_send()
        client.receive(ACK(2))
        client.connection_closed(1006)
        reattach(client, ALL_EXT)
        client.data_to_send()
        client.receive(ACK(2))
        assert sent(client) == []

    def test_without_the_extension_a_possible_loss_is_flagged(self) -> None:
        client = created(["seq"])
        exec_id = running(client)
        client.write_stdin(exec_id, "a\n")
        assert sent(client) == [{"event": "stdin", "data": "a\n"}]
        assert StdinIncomplete(exec_id) in (client.connection_closed(1006) or client.events())

    def test_a_frame_that_never_left_is_sent_once_on_the_next_socket(self) -> None:
        client = created(["seq"])
        exec_id = running(client)
        client.write_stdin(exec_id, "a\n")
        client.send_failed(client.data_to_send())
        client.connection_closed(1006)
        assert not any(isinstance(e, StdinIncomplete) for e in client.events())
        reattach(client, ["seq"])
        assert sent(client) == [{"action": "reconnect", "last_seq": 0}, {"event": "stdin", "data": "a\n"}]

    def test_cancelled_send_on_a_live_socket_keeps_the_order(self) -> None:
        client = created(ALL_EXT)
        exec_id = running(client)
        for data in ("a", "b", "c"):
            client.write_stdin(exec_id, data)
        frames = client.data_to_send()
        client.send_failed(frames[1:])  # the first left, the send was cancelled after it
        client.write_stdin(exec_id, "d")
        assert [f["data"] for f in sent(client)] == ["b", "c", "d"]


class TestCallsWhileReconnecting:
    def test_kill_sandbox_is_sent_once_reattached(self) -> None:
        client = created()
        running(client)
        client.connection_closed(1006)
        client.kill_sandbox()
        assert client.state is SandboxState.RECONNECTING
        reattach(client)
        assert sent(client) == [{"action": "kill_sandbox"}]  # no reconnect: the sandbox is going
        client.receive(ST("SANDBOX_KILLED"))
        assert KillSandboxDone(None) in client.events()
        assert client.state is SandboxState.KILLED

    def test_kill_sandbox_that_never_reached_the_server_says_so(self) -> None:
        client = created(reconnect_policy=ReconnectPolicy(deadline=1.0))
        client.connection_closed(1006, now=0.0)
        client.kill_sandbox()
        client.connection_failed(SandboxConnectionError("refused"), now=5.0)
        (done,) = [e for e in client.events() if isinstance(e, KillSandboxDone)]
        assert isinstance(done.error, SandboxConnectionError)
        assert "not killed" in str(done.error)

    def test_kill_sandbox_timeout_before_it_left(self) -> None:
        client = created()
        client.connection_closed(1006)
        client.kill_sandbox()
        client.kill_sandbox_timed_out()
        events = client.events()
        (done,) = [e for e in events if isinstance(e, KillSandboxDone)]
        assert done.error is not None
        assert client.is_ended
        # The handshake that was in flight completes late: its socket is closed, nothing else happens.
        client.connection_opened()
        assert client.events() == [CloseConnection(1000)]
        assert client.data_to_send() == []

    def test_process_kill_is_sent_after_the_reconnect(self) -> None:
        client = created()
        exec_id = running(client)
        client.connection_closed(1006)
        client.kill_process(exec_id)
        assert not client.kill_process_timed_out(exec_id)  # not sent yet: the process still runs
        reattach(client)
        assert sent(client) == [{"action": "reconnect"}, {"action": "kill_process"}]
        client.receive(ST("SANDBOX_EXECUTION_FORCE_KILLED"))
        client.receive(DONE)
        assert ProcessEnded(exec_id, None, None) in client.events()

    def test_exec_requested_while_reconnecting_starts_after(self) -> None:
        client = created()
        client.connection_closed(1006)
        exec_id = client.exec("bash", "true")
        assert sent(client) == []
        reattach(client)
        assert sent(client) == [{"language": "bash", "code": "true"}]
        client.receive(RUNNING)
        assert ExecStarted(exec_id) in client.events()

    def test_timed_out_snapshot_is_never_sent_later(self) -> None:
        client = created()
        client.connection_closed(1006)
        client.snapshot_filesystem("snap")
        client.snapshot_timed_out()
        reattach(client)
        assert sent(client) == []


class TestCheckpointPending:
    def test_stdin_and_kill_go_while_a_checkpoint_is_pending(self) -> None:
        client = created(ALL_EXT)
        exec_id = running(client)
        client.checkpoint()
        client.write_stdin(exec_id, "x\n")
        client.kill_process(exec_id)
        assert sent(client) == [
            {"action": "checkpoint"},
            {"event": "stdin", "data": "x\n", "seq": 1},
            {"action": "kill_process"},
        ]

    def test_refused_checkpoint_leaves_stdin_flowing(self) -> None:
        client = created(ALL_EXT)
        exec_id = running(client)
        client.checkpoint()
        client.write_stdin(exec_id, "x\n")
        client.data_to_send()
        client.receive(ST("SANDBOX_CHECKPOINTING"))
        client.receive(ST("SANDBOX_EXECUTION_IN_PROGRESS_ERROR"))
        client.receive(json.dumps({"event": "error", "message": "busy"}))
        (done,) = [e for e in client.events() if isinstance(e, CheckpointDone)]
        assert done.error is not None
        assert client.state is SandboxState.RUNNING
        client.write_stdin(exec_id, "y\n")
        client.close_stdin(exec_id)
        assert sent(client) == [{"event": "stdin", "data": "y\n", "seq": 2}, {"action": "close_stdin", "seq": 3}]


class TestAbandonedExec:
    def test_timed_out_exec_is_killed_once_it_starts_and_the_next_waits(self) -> None:
        client = created()
        first = client.exec("bash", "sleep 9")
        client.data_to_send()
        client.abandon_exec(first)
        assert client.state is SandboxState.RUNNING  # the sandbox stays usable
        second = client.exec("bash", "echo ok")
        assert sent(client) == []  # behind the abandoned one
        client.receive(RUNNING)
        assert sent(client) == [{"action": "kill_process"}]
        client.receive(ST("SANDBOX_EXECUTION_FORCE_KILLED"))
        client.receive(DONE)
        assert sent(client) == [{"language": "bash", "code": "echo ok"}]
        client.receive(RUNNING)
        assert ExecStarted(second) in client.events()

    def test_exec_abandoned_before_it_left_is_withdrawn(self) -> None:
        client = created()
        client.connection_closed(1006)
        first = client.exec("bash", "true")
        client.abandon_exec(first)
        assert any(isinstance(e, ExecRejected) for e in client.events())
        reattach(client)
        assert sent(client) == []


# --------------------------------------------------------------------------
# the table, and ended states absorbing


def _in_state(state: SandboxState) -> ClientProtocol:
    """A client with an active process, in ``state``."""
    client = ClientProtocol(URL, init=InitRequest(), auto_reconnect=True, rng=random.Random(1))
    if state is SandboxState.CONNECTING:
        return client
    client.connection_opened()
    if state is SandboxState.CREATING:
        return client
    if state in (SandboxState.ATTACHING, SandboxState.RESTORING):
        client = ClientProtocol(URL, sandbox_id=ID, sandbox_token=TOKEN, auto_reconnect=True)
        client.connection_opened()
        if state is SandboxState.RESTORING:
            client.receive(ST("SANDBOX_RESTORING"))
        return client
    client.receive(json.dumps({"event": "sandbox_id", "sandbox_id": ID, "sandbox_token": TOKEN}))
    client.receive(ST("SANDBOX_RUNNING", extensions=ALL_EXT))
    running(client)
    enter: dict[SandboxState, Callable[[], None]] = {
        SandboxState.RUNNING: lambda: None,
        SandboxState.CHECKPOINTING: client.checkpoint,
        SandboxState.RECONNECTING: lambda: client.connection_closed(1006),
        SandboxState.CLOSED: client.close,
        SandboxState.FAILED: lambda: client.operation_timed_out("test"),
        SandboxState.KILLED: lambda: (client.kill_sandbox(), client.receive(ST("SANDBOX_KILLED"))),
        SandboxState.CHECKPOINTED: lambda: (client.checkpoint(), client.receive(ST("SANDBOX_CHECKPOINTED"))),
    }
    enter[state]()
    assert client.state is state
    return client


_CALLS: dict[Call, Callable[[ClientProtocol], object]] = {
    Call.EXEC: lambda c: c.exec("bash", "true"),
    Call.STDIN: lambda c: c.write_stdin(1, "x"),
    Call.CLOSE_STDIN: lambda c: c.close_stdin(1),
    Call.KILL_PROCESS: lambda c: c.kill_process(1),
    Call.KILL_SANDBOX: lambda c: c.kill_sandbox(),
    Call.CHECKPOINT: lambda c: c.checkpoint(),
    Call.SNAPSHOT: lambda c: c.snapshot_filesystem("s"),
    Call.CLOSE: lambda c: c.close(),
}
_PROCESS_CALLS = {Call.STDIN, Call.CLOSE_STDIN, Call.KILL_PROCESS}


@pytest.mark.parametrize("state", list(SandboxState))
@pytest.mark.parametrize("call", list(Call))
def test_every_call_in_every_state_does_what_the_table_says(state: SandboxState, call: Call) -> None:
    client = _in_state(state)
    verdict = CALL_TABLE[state][call]
    has_process = client.process_state is not None
    # The per-exec sub-machine adds its own precondition: one process at a time, stdin only to one.
    busy = call is Call.EXEC and has_process
    no_process = call in _PROCESS_CALLS and not has_process and verdict is not Verdict.IGNORE
    if verdict is Verdict.REFUSE or busy or no_process:
        with pytest.raises(LocalProtocolError):
            _CALLS[call](client)
        return
    _CALLS[call](client)
    if verdict is Verdict.END:
        assert client.is_ended
    elif verdict is Verdict.IGNORE:
        assert client.state is state
    elif verdict is Verdict.HOLD:
        assert client.data_to_send() == []  # held until the sandbox is running again


_LATE_INPUTS: list[Callable[[ClientProtocol], object]] = [
    lambda c: c.connection_opened(),
    lambda c: c.connection_closed(1006, now=1.0),
    lambda c: c.connection_failed(SandboxConnectionError("x"), now=1.0),
    lambda c: c.send_failed(["{}"]),
    lambda c: c.receive(ST("SANDBOX_RUNNING")),
    lambda c: c.receive(RUNNING),
    lambda c: c.receive(DONE),
    lambda c: c.receive(ACK(3)),
    lambda c: c.receive(json.dumps({"event": "stdout", "data": "late"})),
    lambda c: c.kill_sandbox_timed_out(),
    lambda c: c.kill_process_timed_out(1),
    lambda c: c.operation_timed_out("x"),
    lambda c: c.snapshot_timed_out(),
    lambda c: c.checkpoint_timed_out(),
    lambda c: c.abandon_exec(1),
    *_CALLS.values(),
]


@given(
    st.sampled_from([SandboxState.CLOSED, SandboxState.FAILED, SandboxState.KILLED, SandboxState.CHECKPOINTED]),
    st.lists(st.sampled_from(range(len(_LATE_INPUTS))), max_size=12),
)
def test_ended_states_absorb_every_late_input(state: SandboxState, inputs: list[int]) -> None:
    client = _in_state(state)
    assert any(isinstance(e, SessionEnded) for e in client.events())
    client.data_to_send()
    for index in inputs:
        with contextlib.suppress(LocalProtocolError):  # the one uniform answer to a user call after the end
            _LATE_INPUTS[index](client)
        assert client.state is state
        assert all(isinstance(e, CloseConnection) for e in client.events())
        assert client.data_to_send() == []
