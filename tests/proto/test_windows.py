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
    ExecutionView,
    InitRequest,
    KillSandboxDone,
    LocalProtocolError,
    Output,
    ProcessEnded,
    ReconnectPolicy,
    ReconnectRequested,
    SandboxConnectionError,
    SandboxState,
    ServerProtocol,
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


# --------------------------------------------------------------------------
# found by the window fuzzer (tests/fuzz/test_state_machines.py), each as its minimal case

#: What a handoff to another instance looks like on the wire (7.10).
HANDOFF = (
    "SANDBOX_LOCK_RELEASE_REQUESTED",
    "SANDBOX_CHECKPOINTING",
    "SANDBOX_DELETING",
    "SANDBOX_LOCK_RELEASING",
    "SANDBOX_LOCK_RELEASED",
    "SANDBOX_DELETED",
    "SANDBOX_CHECKPOINTED",
)


def test_exec_that_ran_while_its_replies_were_lost_is_not_reported_as_never_run() -> None:
    """The exec request arrived, the process ran and exited without output; its RUNNING
    and DONE went into a dead socket. On the reattach the client asks with ``reconnect``,
    and the server's reply (a single DONE, computed here by the server core itself) is
    read as "it did not run": the user is told an exec that ran never did, and may run
    it again. The reply cannot say which exec it is about, so the client cannot claim
    more than "it may have run"."""
    client = created(ALL_EXT)
    exec_id = client.exec("bash", "touch done")
    (request,) = sent(client)
    assert request["code"] == "touch done"
    client.connection_closed(1006)  # RUNNING and DONE were written to the dead socket
    client.connection_opened()
    client.receive(ST("SANDBOX_RUNNING", extensions=ALL_EXT))
    (reconnect,) = sent(client)
    assert reconnect == {"action": "reconnect", "last_seq": 0, "stdin_seq": True}

    server = ServerProtocol(create=False)
    ran = ExecutionView(running=False, done_delivered=True, first_seq=1, last_seq=0, delivered=0, exit_code=0)
    server.answer_reconnect(ReconnectRequested(last_seq=0, stdin_seq=True), ran)
    for frame in server.data_to_send():
        assert isinstance(frame, str)
        client.receive(frame)

    ended = [e for e in client.events() if isinstance(e, ExecRejected | ProcessEnded) and e.exec_id == exec_id]
    assert len(ended) == 1
    claims = str(getattr(ended[0], "error", ""))
    assert "did not run" not in claims, f"the exec ran, but the client says: {claims}"
    assert "may have run" in claims


def test_exec_queued_behind_an_abandoned_exec_is_answered_when_the_session_ends() -> None:
    """An exec waiting behind an abandoned one (whose kill is owed) gets no event at all
    when the session ends: ``_end`` drops ``_queued_exec`` without an ``ExecRejected``,
    so the waiter of that exec is never answered by the core."""
    client = created(ALL_EXT)
    first = client.exec("bash", "sleep 9")
    client.data_to_send()
    client.abandon_exec(first)  # sent, not started: killed once it starts
    second = client.exec("bash", "echo next")  # waits behind it
    client.close()
    events = client.events()
    assert any(isinstance(e, ExecRejected) and e.exec_id == first for e in events)
    assert any(isinstance(e, ExecRejected) and e.exec_id == second for e in events), events


def test_kill_sandbox_overtaken_by_a_handoff_does_not_report_the_sandbox_killed() -> None:
    """A kill_sandbox is on its way when the server hands the sandbox to another
    instance (7.10): LOCK_RELEASE_REQUESTED ... DELETED, CHECKPOINTED, then the bare
    close 1000 of a kill on a sandbox no longer here. The sandbox lives on elsewhere,
    but the client reports ``KillSandboxDone(error=None)``: killed."""
    client = created(ALL_EXT)
    client.kill_sandbox()
    assert sent(client) == [{"action": "kill_sandbox"}]
    for status in HANDOFF:
        client.receive(ST(status))
    client.connection_closed(1000)
    (done,) = [e for e in client.events() if isinstance(e, KillSandboxDone)]
    assert done.error is not None, "the sandbox was handed off, not killed"


def test_reconnect_reply_about_another_exec_is_not_taken_for_ours() -> None:
    """Client A ran an exec in the sandbox and detached, leaving it running. Client B
    attaches and asks for an exec; the request dies with the socket. On the reattach B
    asks with ``reconnect`` whether its exec runs, and the server core answers, rightly,
    with the stream of the exec that runs: A's. B takes it for its own: ``ExecStarted``,
    then A's output as its own. (Had B's request arrived, the server would have refused
    it: another exec was running.) The same happens within one session when an exec
    was given up by its kill timer but still runs on the server."""
    b = ClientProtocol(URL, sandbox_id=ID, sandbox_token=TOKEN, auto_reconnect=True, rng=random.Random(1))
    b.connection_opened()
    b.receive(ST("SANDBOX_RUNNING", extensions=ALL_EXT))
    b.events()
    mine = b.exec("bash", "echo mine")
    (request,) = sent(b)
    assert request["code"] == "echo mine"
    b.connection_closed(1006)  # the request never reached the server
    b.connection_opened()
    b.receive(ST("SANDBOX_RUNNING", extensions=ALL_EXT))
    (reconnect,) = sent(b)

    server = ServerProtocol(create=False)
    request = ReconnectRequested(last_seq=reconnect["last_seq"], stdin_seq=True)
    theirs = ExecutionView(running=True, done_delivered=False, first_seq=1, last_seq=1, delivered=1)
    server.answer_reconnect(request, theirs)  # resume A's stream: its RUNNING again
    server.send_output("stdout", "A's output\n", 2)
    for frame in server.data_to_send():
        assert isinstance(frame, str)
        b.receive(frame)

    events = b.events()
    assert ExecStarted(mine) not in events, f"another exec's stream was taken for ours: {events}"
    assert not any(isinstance(e, Output) for e in events), events


def test_kill_sandbox_overtaken_by_a_handoff_during_a_checkpoint_does_not_report_the_sandbox_killed() -> None:
    """As above, with a checkpoint of ours also on its way: the handoff's statuses are
    then all taken for our checkpoint's (LOCK_RELEASE_REQUESTED is ignored while a
    checkpoint is pending), so nothing marks the sandbox as living on, and the kill is
    reported done: ``KillSandboxDone(error=None)``, although the sandbox now runs on
    another instance."""
    client = created(ALL_EXT)
    client.checkpoint()
    client.kill_sandbox()
    assert sent(client) == [{"action": "checkpoint"}, {"action": "kill_sandbox"}]
    for status in HANDOFF:
        client.receive(ST(status))
    client.connection_closed(1000)
    (done,) = [e for e in client.events() if isinstance(e, KillSandboxDone)]
    assert done.error is not None, "the sandbox was handed off, not killed"
