"""Bugs the window fuzzers found (tests/fuzz/test_state_machines.py), each as its minimal case.

Each failed before its fix; they stay as regression tests. A bug not fixed yet
fails here, and is named in ``KNOWN_BUGS`` of the fuzz machine, which relaxes the
one check it breaks so that it keeps looking for others; remove it there once fixed.
"""

from __future__ import annotations

import json
import random
from typing import Any

from sandbox_proto import (
    ClientProtocol,
    ExecRejected,
    ExecStarted,
    ExecutionView,
    InitRequest,
    KillSandboxDone,
    Output,
    ProcessEnded,
    ReconnectRequested,
    ServerProtocol,
)

URL = "http://127.0.0.1:1"
ID = "sb-1"
TOKEN = "tok-secret"
ALL_EXT = ["close_stdin", "exec_ref", "exit_code", "seq", "stdin_seq"]


def ST(status: str, **extra: Any) -> str:
    return json.dumps({"event": "status_update", "status": status, **extra})


def sent(client: ClientProtocol) -> list[dict[str, Any]]:
    return [json.loads(text) for text in client.data_to_send()]


def created(extensions: list[str]) -> ClientProtocol:
    client = ClientProtocol(URL, init=InitRequest(), auto_reconnect=True, rng=random.Random(1))
    client.connection_opened()
    client.receive(ST("SANDBOX_CREATING"))
    client.receive(json.dumps({"event": "sandbox_id", "sandbox_id": ID, "sandbox_token": TOKEN}))
    client.receive(ST("SANDBOX_RUNNING", extensions=extensions))
    client.data_to_send()
    client.events()
    return client


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
    for status in (
        "SANDBOX_LOCK_RELEASE_REQUESTED",
        "SANDBOX_CHECKPOINTING",
        "SANDBOX_DELETING",
        "SANDBOX_LOCK_RELEASING",
        "SANDBOX_LOCK_RELEASED",
        "SANDBOX_DELETED",
        "SANDBOX_CHECKPOINTED",
    ):
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
    for status in (
        "SANDBOX_LOCK_RELEASE_REQUESTED",
        "SANDBOX_CHECKPOINTING",
        "SANDBOX_DELETING",
        "SANDBOX_LOCK_RELEASING",
        "SANDBOX_LOCK_RELEASED",
        "SANDBOX_DELETED",
        "SANDBOX_CHECKPOINTED",
    ):
        client.receive(ST(status))
    client.connection_closed(1000)
    (done,) = [e for e in client.events() if isinstance(e, KillSandboxDone)]
    assert done.error is not None, "the sandbox was handed off, not killed"
