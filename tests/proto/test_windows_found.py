"""Bugs the window fuzzers found (tests/fuzz/test_state_machines.py), each as its minimal case.

Each failed before its fix; they stay as regression tests.
"""

from __future__ import annotations

import json
import random
from typing import Any

from sandbox_proto import (
    ClientProtocol,
    ExecRejected,
    ExecutionView,
    InitRequest,
    KillSandboxDone,
    ProcessEnded,
    ReconnectRequested,
    ServerProtocol,
)

URL = "http://127.0.0.1:1"
ID = "sb-1"
TOKEN = "tok-secret"
ALL_EXT = ["close_stdin", "exit_code", "seq", "stdin_seq"]


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
    assert sent(client) == [{"language": "bash", "code": "touch done"}]
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
