"""Client role and server role back to back, in memory, under every ordering section 8 allows.

A :class:`ClientProtocol` talks to a :class:`ServerProtocol` through two
queues whose delivery hypothesis schedules. Behind the server role sits a small
model of a sandbox (id, token, one fake process that hypothesis starts, makes
write, exits and kills), so the server side can choose every legal ordering:
FORCE_KILLED and DONE either way round, a frame slipped into an error pair,
the DONE of a refused exec arriving after the next exec was sent, output
written into a socket the server has not yet noticed is dead, IN_USE on a
reattach, idle deletion on an open connection. Invariants after every step:

* nothing follows ``SessionEnded`` but its ``CloseConnection``; no frame is
  produced with no socket to carry it;
* every exec ends at most once, and exactly once by the end (teardown);
* output reaches the client in order per stream (a subsequence of what the
  process wrote) and, with ``seq``, exactly once: a prefix, the whole of it
  when the exec ended normally;
* stdin reaches the process in order, never twice, only the exec it was
  written for;
* when nothing is in flight, both sides agree on the sandbox and the process;
* every checkpoint, snapshot and kill_sandbox gets exactly one answer.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sandbox_proto import (
    ALL_EXTENSIONS,
    EXT_EXIT_CODE,
    EXT_SEQ,
    CheckpointDone,
    CheckpointRequested,
    ClientProtocol,
    Close,
    CloseConnection,
    ExecRejected,
    ExecRequested,
    ExecStarted,
    InitRequest,
    KillProcessRequested,
    KillSandboxDone,
    KillSandboxRequested,
    LocalProtocolError,
    Output,
    OutputFrame,
    ProcessEnded,
    ProcessPhase,
    ProcessState,
    Reconnected,
    ReconnectRequested,
    ReconnectScheduled,
    SandboxConnectionError,
    ServerProtocol,
    SessionEnded,
    SetupComplete,
    SetupFailed,
    SnapshotDone,
    SnapshotRequested,
    Status,
    StdinReceived,
    encode_server_frame,
)


def examples(default: int) -> int:
    """``default`` under hypothesis' default profile, the profile's count under a bigger one."""
    current = settings.default.max_examples
    return default if current <= 100 else current


# Output and stdin text: any character but lone surrogates, which no socket can carry.
texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
choices = st.lists(st.booleans(), max_size=8)
# Rules that end the session fire a quarter of the time, so that runs get deep.
rarely = st.sampled_from([False, False, False, True])
# After an action: deliver everything (runs get deep), or leave it in flight (races).
thens = st.sampled_from(["settle", "settle", "race"])

MSG_NOT_RUNNING = "Cannot execute code in a sandbox that is not in the RUNNING state (current state: STOPPED)"


# --------------------------------------------------------------------------
# the server side: a sandbox model behind ServerProtocol


@dataclass(eq=False)
class FakeExec:
    #: (client session number, exec id in that session)
    owner: tuple[int, int]
    chunks: list[tuple[int, str, str]] = field(default_factory=list)  # (seq, stream, data)
    stdin: list[str] = field(default_factory=list)
    running: bool = True
    killed: bool = False
    exit_code: int | None = None
    done_delivered: bool = False


@dataclass(eq=False)
class FakeSandbox:
    id: str
    token: str
    checkpointable: bool
    state: str = "running"  # running | deleted | killed | checkpointed
    execution: FakeExec | None = None
    observer: Conn | None = None
    seq: int = 0
    #: Highest seq the server has written to some socket (upstream's queue cursor, 7.12).
    delivered: int = 0
    execs: list[FakeExec] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.state == "running"

    def phase(self) -> ProcessPhase:
        ex = self.execution
        if ex is None or ex.killed:
            return ProcessPhase.NONE
        return ProcessPhase.RUNNING if ex.running else ProcessPhase.EXITED


@dataclass(eq=False)
class Conn:
    proto: ServerProtocol
    c2s: deque[str] = field(default_factory=deque)
    s2c: deque[str | Close] = field(default_factory=deque)
    #: The client still reads this socket.
    client_open: bool = True
    #: The server still handles this socket (an open zombie: the client is gone, the server has not noticed).
    server_open: bool = True
    setup_done: bool = False
    streaming: FakeExec | None = None


class Picker:
    """Server-side choices drawn by hypothesis; ``False`` once the list runs out."""

    def __init__(self, values: list[bool]) -> None:
        self._values = list(values)

    def __call__(self) -> bool:
        return self._values.pop() if self._values else False


class BackToBack(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sandbox: FakeSandbox | None = None
        self.sandboxes: list[FakeSandbox] = []
        self.conns: list[Conn] = []
        self.stats: dict[str, int] = {"execs started": 0, "output chunks": 0, "reconnected": 0}
        self.code_owner: dict[str, tuple[int, int]] = {}
        self.extensions: tuple[str, ...] = ()
        self.now = 0.0
        self.session = 0
        self.sessions_done = 0
        self._new_session_state()

    def _new_session_state(self) -> None:
        """What one client session (one ClientProtocol) is checked against."""
        self.client: ClientProtocol | None = None
        self.conn: Conn | None = None
        self.events: list[Any] = []
        self.exec_ids: list[int] = []
        self.locally_ended: set[int] = set()
        #: Execs ended by the end of the session (kill_sandbox completed by a close), not by a DONE.
        self.ended_with_session: set[int] = set()
        self.stdin_written: dict[int, list[str]] = {}
        self.reconnect_pending = False
        self.snapshots_asked = 0
        self.checkpoints_asked = 0
        self.kills_asked = 0

    # ------------------------------------------------------------------
    # setup

    @initialize(
        mode=st.sampled_from(["create", "attach", "attach-restore", "attach-bad-token"]),
        extended=st.booleans(),
        auto_reconnect=st.sampled_from([True, True, False]),
        checkpointable=st.booleans(),
        seed=st.integers(0, 2**16),
        finish_setup=st.sampled_from([True, True, True, False]),
    )
    def start(
        self, mode: str, extended: bool, auto_reconnect: bool, checkpointable: bool, seed: int, finish_setup: bool
    ) -> None:
        self.extensions = ALL_EXTENSIONS if extended else ()
        if mode != "create":
            state = "checkpointed" if mode == "attach-restore" else "running"
            self.sandbox = FakeSandbox("sandbox-fuzz", "token-1", checkpointable, state)
            self.sandboxes.append(self.sandbox)
        self._begin(mode, auto_reconnect, checkpointable, seed, finish_setup)

    @precondition(lambda self: self.client is not None and self.client.is_ended)
    @rule(
        mode=st.sampled_from(["attach", "create"]),
        auto_reconnect=st.sampled_from([True, True, False]),
        checkpointable=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def next_session(self, mode: str, auto_reconnect: bool, checkpointable: bool, seed: int) -> None:
        """The session ended: check it fully, then a new client creates or attaches on the same server."""
        self._finish_session()
        self._new_session_state()
        self.session += 1
        sb = self.sandbox
        if sb is None or sb.state in ("deleted", "killed"):
            mode = "create"  # attaching would only be refused; create instead
        self._begin(mode, auto_reconnect, checkpointable, seed, True)

    def _begin(self, mode: str, auto_reconnect: bool, checkpointable: bool, seed: int, finish_setup: bool) -> None:
        common: dict[str, Any] = {"auto_reconnect": auto_reconnect, "rng": random.Random(seed)}
        if mode == "create":
            self.client = ClientProtocol(
                "http://127.0.0.1:1", init=InitRequest(enable_checkpoint=checkpointable), **common
            )
        else:
            assert self.sandbox is not None
            token = "wrong" if mode == "attach-bad-token" else self.sandbox.token
            self.client = ClientProtocol(
                "http://127.0.0.1:1", sandbox_id=self.sandbox.id, sandbox_token=token, **common
            )
        self._open(attach=mode != "create", token=self.client.sandbox_token)
        if finish_setup:
            self.settle([])

    def _open(self, *, attach: bool, token: str | None) -> None:
        assert self.client is not None
        self.client.handshake()
        conn = Conn(ServerProtocol(create=not attach, extensions=self.extensions))
        self.conn = conn
        self.conns.append(conn)
        self.client.connection_opened(["SANDBOX_AFFINITY=x; Path=/"])
        self._collect()
        if attach:
            self._server_attach(conn, token or "")

    # ------------------------------------------------------------------
    # plumbing

    def _collect(self) -> None:
        client = self.client
        assert client is not None
        frames = client.data_to_send()
        new = client.events()
        ended_before = any(isinstance(e, SessionEnded) for e in self.events)
        conn = self.conn
        if frames:
            assert not ended_before, f"frames after the session ended: {frames}"
            assert conn is not None and conn.client_open, f"frames with no socket to carry them: {frames}"
            conn.c2s.extend(frames)
        close = False
        if any(isinstance(e, SessionEnded) for e in new):
            self.ended_with_session |= {e.exec_id for e in new if isinstance(e, ProcessEnded)}
        for item in new:
            self.events.append(item)
            if isinstance(item, ReconnectScheduled):
                self.reconnect_pending = True
            elif isinstance(item, CloseConnection):
                close = True
            elif isinstance(item, ExecRejected | ProcessEnded) and isinstance(item.error, SandboxConnectionError):
                self.locally_ended.add(item.exec_id)
        if close and conn is not None and conn.client_open:
            # The adapter obeys: it closes the socket; what was in flight is moot.
            self._close_conn(conn)
            client.connection_closed(1000, now=self.now)
            self._collect()

    def _close_conn(self, conn: Conn) -> None:
        conn.client_open = False
        conn.c2s.clear()
        conn.s2c.clear()
        self._server_detach(conn)
        if self.conn is conn:
            self.conn = None

    def _server_detach(self, conn: Conn) -> None:
        conn.server_open = False
        conn.streaming = None
        if self.sandbox is not None and self.sandbox.observer is conn:
            self.sandbox.observer = None

    def _push(self, conn: Conn, slip: bool = False) -> None:
        """Move what the server role queued onto the wire, maybe slipping output into an error pair."""
        out = conn.proto.data_to_send()
        sb = self.sandbox
        if slip and sb is not None and sb.execution is not None and sb.execution.running:
            ex = sb.execution
            index = next((i for i, item in enumerate(out) if isinstance(item, str) and '"event":"error"' in item), None)
            if index is not None and conn.streaming is ex:
                sb.seq += 1
                ex.chunks.append((sb.seq, "stdout", "slipped\n"))
                seq = sb.seq if EXT_SEQ in conn.proto.extensions else None
                out.insert(index, encode_server_frame(OutputFrame("stdout", "slipped\n", seq)))
                sb.delivered = sb.seq
        if conn.client_open:
            conn.s2c.extend(out)
        if any(isinstance(item, Close) for item in out):
            self._server_detach(conn)

    def _stream_output(self, ex: FakeExec, stream: str, data: str) -> None:
        sb = self.sandbox
        assert sb is not None
        sb.seq += 1
        ex.chunks.append((sb.seq, stream, data))
        conn = sb.observer
        if conn is not None and conn.streaming is ex:
            conn.proto.send_output(stream, data, sb.seq)  # type: ignore[arg-type]
            sb.delivered = sb.seq
            self._push(conn)

    def _finish_stream(self, conn: Conn, ex: FakeExec) -> None:
        conn.proto.exec_finished(ex.exit_code, killed=ex.killed)
        conn.streaming = None
        ex.done_delivered = True

    # ------------------------------------------------------------------
    # the server role acting on what arrived

    def _server_attach(self, conn: Conn, token: str) -> None:
        proto, sb = conn.proto, self.sandbox
        if sb is None or sb.state in ("deleted", "killed"):
            proto.send_status(Status.SANDBOX_NOT_FOUND)
            proto.close(1011)
        elif token != sb.token:
            proto.send_error(Status.SANDBOX_PERMISSION_DENIAL_ERROR, "Invalid sandbox token.", close=4000)
        elif sb.observer is not None:
            proto.send_status(Status.SANDBOX_IN_USE)
            proto.close(1011)
        else:
            if sb.state == "checkpointed":
                proto.send_status(Status.SANDBOX_RESTORING)
                sb.state = "running"
                sb.execution = None  # a restore brings back no exec (9.5)
            sb.observer = conn
            conn.setup_done = True
            proto.sandbox_id = sb.id
            proto.process = sb.phase()
            proto.send_running()
        self._push(conn)

    def _server_handle(self, conn: Conn, text: str, pick: Picker) -> None:
        proto = conn.proto
        if not conn.setup_done:
            options = proto.receive_init(text)
            assert options is not None, "our own init message was refused"
            number = self.session
            sb = self.sandbox = FakeSandbox(f"sandbox-{number}", f"token-{number}", options.enable_checkpoint)
            self.sandboxes.append(sb)
            proto.send_sandbox_id(sb.id, sb.token)
            proto.send_running()
            sb.observer = conn
            conn.setup_done = True
            self._push(conn)
            return
        sb = self.sandbox
        assert sb is not None
        proto.process = sb.phase()
        request = proto.receive(text)
        ex = sb.execution
        if isinstance(request, ExecRequested):
            if not sb.alive:
                proto.reject_exec(Status.SANDBOX_EXECUTION_ERROR, MSG_NOT_RUNNING)
            else:
                new = FakeExec(self.code_owner[request.code])
                sb.execution = new
                sb.execs.append(new)
                conn.streaming = new
                proto.exec_started()
        elif isinstance(request, StdinReceived):
            assert ex is not None and ex.running
            ex.stdin.append(request.data)
        elif isinstance(request, KillProcessRequested):
            if sb.alive and ex is not None and ex.running:
                ex.running, ex.killed, ex.exit_code = False, True, -9
                if conn.streaming is ex:
                    if pick():  # 7.5: either order
                        self._finish_stream(conn, ex)
                        proto.send_status(Status.SANDBOX_EXECUTION_FORCE_KILLED)
                    else:
                        proto.send_status(Status.SANDBOX_EXECUTION_FORCE_KILLED)
                        self._finish_stream(conn, ex)
                else:
                    proto.send_status(Status.SANDBOX_EXECUTION_FORCE_KILLED)
            else:
                proto.send_status(Status.SANDBOX_EXECUTION_FORCE_KILLED)
        elif isinstance(request, KillSandboxRequested):
            if not sb.alive:
                proto.close(1000)  # 7.6: already gone, no status at all
            else:
                sb.state = "killed"
                lifecycle = [Status.SANDBOX_KILLING, Status.SANDBOX_DELETING, Status.SANDBOX_DELETED]
                done_at = 1 + sum(pick() for _ in range(2))  # DONE's position may vary (7.6)
                for index, status in enumerate(lifecycle):
                    if index == done_at and ex is not None and ex.running and conn.streaming is ex:
                        ex.running, ex.killed, ex.exit_code = False, True, -9
                        self._finish_stream(conn, ex)
                    proto.send_status(status)
                if ex is not None and ex.running:
                    ex.running, ex.killed, ex.exit_code = False, True, -9
                proto.send_status(Status.SANDBOX_KILLED)
                proto.close(1000)
        elif isinstance(request, CheckpointRequested):
            proto.send_status(Status.SANDBOX_CHECKPOINTING)
            if not sb.alive:
                proto.send_error(
                    Status.SANDBOX_CHECKPOINT_ERROR, f"Failed to checkpoint sandbox {sb.id}: not found", close=4000
                )
            elif not sb.checkpointable:
                message = f"Failed to checkpoint sandbox {sb.id}: Sandbox {sb.id} is not configured for checkpointing."
                proto.send_error(Status.SANDBOX_CHECKPOINT_ERROR, message, close=4000)
            elif ex is not None and ex.running:
                proto.send_error(
                    Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR, "Cannot checkpoint while an execution is in progress."
                )
            elif pick():
                sb.state = "checkpointed"
                for status in (Status.SANDBOX_DELETING, Status.SANDBOX_DELETED, Status.SANDBOX_CHECKPOINTED):
                    proto.send_status(status)
                proto.close(1000)
            else:  # S11: the sandbox is kept
                proto.send_error(
                    Status.SANDBOX_CHECKPOINT_ERROR, f"Failed to checkpoint sandbox {sb.id}: x", close=4000
                )
        elif isinstance(request, SnapshotRequested):
            proto.send_status(Status.SANDBOX_FILESYSTEM_SNAPSHOT_CREATING)
            if sb.alive and pick():
                proto.send_status(Status.SANDBOX_FILESYSTEM_SNAPSHOT_CREATED)
            else:
                proto.send_error(Status.SANDBOX_FILESYSTEM_SNAPSHOT_ERROR, "Failed to snapshot filesystem: no")
        elif isinstance(request, ReconnectRequested):
            self._server_reconnect(conn, request.last_seq)
        self._push(conn, slip=pick())

    def _server_reconnect(self, conn: Conn, last_seq: int | None) -> None:
        """7.12 case (a) with the ``seq`` replay of section 15, else exactly one DONE (S1)."""
        sb = self.sandbox
        assert sb is not None
        ex = None if not sb.alive else sb.execution
        proto = conn.proto
        if ex is None:
            proto.send_done(None)
            return
        start = last_seq if last_seq is not None else sb.delivered
        missing = [chunk for chunk in ex.chunks if chunk[0] > start]
        if ex.running or missing or not ex.done_delivered:
            proto.exec_started()  # the duplicate RUNNING
            for seq, stream, data in missing:
                proto.send_output(stream, data, seq)  # type: ignore[arg-type]
                sb.delivered = max(sb.delivered, seq)
            conn.streaming = ex
            if not ex.running:
                self._finish_stream(conn, ex)
        else:
            proto.send_done(ex.exit_code)

    # ------------------------------------------------------------------
    # rules: delivery

    @precondition(lambda self: self.conn is not None and bool(self.conn.c2s) and self.conn.server_open)
    @rule(count=st.integers(1, 3), picks=choices)
    def deliver_to_server(self, count: int, picks: list[bool]) -> None:
        conn = self.conn
        assert conn is not None
        pick = Picker(picks)
        for _ in range(count):
            if not conn.c2s or not conn.server_open:
                break
            self._server_handle(conn, conn.c2s.popleft(), pick)

    @precondition(lambda self: self.conn is not None and bool(self.conn.s2c))
    @rule(count=st.integers(1, 4))
    def deliver_to_client(self, count: int) -> None:
        assert self.client is not None
        for _ in range(count):
            conn = self.conn
            if conn is None or not conn.s2c:
                break
            item = conn.s2c.popleft()
            if isinstance(item, Close):
                self._close_conn(conn)
                self.client.connection_closed(int(item), now=self.now)
            else:
                self.client.receive(item)
            self._collect()

    @precondition(lambda self: self.conn is not None)
    @rule(picks=choices)
    def settle(self, picks: list[bool]) -> None:
        """Deliver everything both ways until nothing is in flight."""
        assert self.client is not None
        pick = Picker(picks)
        for _ in range(100):
            conn = self.conn
            if conn is None or not (conn.c2s or conn.s2c):
                break
            while conn.c2s and conn.server_open:
                self._server_handle(conn, conn.c2s.popleft(), pick)
            conn.c2s.clear()  # a server that closed reads nothing more
            while self.conn is conn and conn.s2c:
                item = conn.s2c.popleft()
                if isinstance(item, Close):
                    self._close_conn(conn)
                    self.client.connection_closed(int(item), now=self.now)
                else:
                    self.client.receive(item)
                self._collect()

    # ------------------------------------------------------------------
    # rules: the network

    @precondition(lambda self: self.conn is not None and self.conn.client_open)
    @rule(server_notices=st.booleans())
    def drop(self, server_notices: bool) -> None:
        """TCP dies: frames in flight are lost; the server may not notice yet (7.12)."""
        assert self.client is not None and self.conn is not None
        conn = self.conn
        conn.client_open = False
        conn.c2s.clear()
        conn.s2c.clear()
        self.conn = None
        if server_notices:
            self._server_detach(conn)
        self.client.connection_closed(1006, now=self.now)
        self._collect()

    @precondition(lambda self: any(c.server_open and not c.client_open for c in self.conns))
    @rule()
    def server_notices_drop(self) -> None:
        for conn in self.conns:
            if conn.server_open and not conn.client_open:
                self._server_detach(conn)

    @precondition(lambda self: self.reconnect_pending and self.conn is None)
    @rule(outcome=st.sampled_from(["open", "open", "open", 503, 403]), after=st.floats(0, 30))
    def reconnect(self, outcome: Any, after: float) -> None:
        client = self.client
        assert client is not None
        self.now += after  # the reconnect deadline (7.12) counts from the drop
        self.reconnect_pending = False
        if client.is_ended:
            return
        if outcome == "open":
            self._open(attach=True, token=client.sandbox_token)
        else:
            client.connection_failed(SandboxConnectionError("refused"), now=self.now, http_status=outcome)
            self._collect()

    # ------------------------------------------------------------------
    # rules: the fake process and the sandbox's own life

    def _running_exec(self) -> FakeExec | None:
        sb = self.sandbox
        if sb is None or not sb.alive or sb.execution is None or not sb.execution.running:
            return None
        return sb.execution

    @precondition(lambda self: self._running_exec() is not None)
    @rule(stream=st.sampled_from(["stdout", "stderr"]), data=texts, then=thens)
    def process_writes(self, stream: str, data: str, then: str) -> None:
        ex = self._running_exec()
        assert ex is not None
        self._stream_output(ex, stream, data)
        self._then(then)

    @precondition(lambda self: self._running_exec() is not None)
    @rule(code=st.integers(-15, 255), then=thens)
    def process_exits(self, code: int, then: str) -> None:
        ex = self._running_exec()
        assert ex is not None and self.sandbox is not None
        ex.running, ex.exit_code = False, code
        conn = self.sandbox.observer
        if conn is not None and conn.streaming is ex:
            self._finish_stream(conn, ex)
            self._push(conn)
        self._then(then)

    @precondition(lambda self: self.sandbox is not None and self.sandbox.alive and self._running_exec() is None)
    @rule(fire=rarely)
    def idle_expiry(self, fire: bool) -> None:
        """7.9: DELETING, DELETED on the attached connection, which stays open."""
        sb = self.sandbox
        assert sb is not None
        if not fire:
            return
        sb.state = "deleted"
        conn = sb.observer
        if conn is not None:
            conn.proto.send_status(Status.SANDBOX_DELETING)
            conn.proto.send_status(Status.SANDBOX_DELETED)
            self._push(conn)

    # ------------------------------------------------------------------
    # rules: the user

    def _then(self, then: str) -> None:
        if then == "settle" and self.conn is not None:
            self.settle([])

    def _client_running(self) -> bool:
        return self.client is not None and self.client.state.value == "running"

    def _current_exec(self) -> int:
        return self.exec_ids[-1] if self.exec_ids else 999

    @precondition(lambda self: self._client_running())
    @rule(language=st.sampled_from(["python", "bash", "ruby"]), then=thens)
    def user_exec(self, language: str, then: str) -> None:
        assert self.client is not None
        code = f"#{len(self.code_owner)}"
        try:
            exec_id = self.client.exec(language, code)
        except LocalProtocolError:
            return
        self.code_owner[code] = (self.session, exec_id)
        self.exec_ids.append(exec_id)
        self._collect()
        self._then(then)

    @precondition(
        lambda self: (
            self._client_running()
            and self.client.process_state in (None, ProcessState.DONE)
            and self.conn is not None
            and not self.conn.c2s
            and not self.conn.s2c
        )
    )
    @rule(language=st.sampled_from(["python", "bash"]), then=thens)
    def refused_exec_then_exec(self, language: str, then: str) -> None:
        """7.3.5: the DONE that follows a refused exec reaches the client after its next exec request."""
        conn = self.conn
        assert self.client is not None and conn is not None
        self.user_exec("ruby", "race")
        self.deliver_to_server(1, [])
        while conn.s2c and '"event":"error"' not in str(conn.s2c[0]):
            self.deliver_to_client(1)
        if conn.s2c:
            self.deliver_to_client(1)  # the error frame: the exec is rejected, its DONE still in flight
        self.user_exec(language, then)

    @precondition(lambda self: self._client_running() and self.client.process_state not in (None, ProcessState.DONE))
    @rule(data=texts, then=thens)
    def user_stdin(self, data: str, then: str) -> None:
        assert self.client is not None
        exec_id = self._current_exec()
        try:
            self.client.write_stdin(exec_id, data)
        except LocalProtocolError:
            return
        self.stdin_written.setdefault(exec_id, []).append(data)
        self._collect()
        self._then(then)

    @precondition(lambda self: self._client_running() and self.client.process_state not in (None, ProcessState.DONE))
    @rule(then=thens)
    def user_kill_process(self, then: str) -> None:
        assert self.client is not None
        self.client.kill_process(self._current_exec())
        self._collect()
        self._then(then)

    @precondition(lambda self: self._client_running())
    @rule(fire=rarely)
    def user_kill_sandbox(self, fire: bool) -> None:
        assert self.client is not None
        if self.client.is_ended or not fire:
            return
        self.kills_asked += 1
        self.client.kill_sandbox()
        self._collect()

    @precondition(lambda self: self._client_running())
    @rule(fire=rarely)
    def user_checkpoint(self, fire: bool) -> None:
        assert self.client is not None
        if not fire:
            return
        try:
            self.client.checkpoint()
        except LocalProtocolError:
            return
        self.checkpoints_asked += 1
        self._collect()

    @precondition(lambda self: self._client_running() and not self.client._snapshot_pending)
    @rule(then=thens)
    def user_snapshot(self, then: str) -> None:
        assert self.client is not None
        try:
            self.client.snapshot_filesystem("snap-1")
        except LocalProtocolError:
            return
        self.snapshots_asked += 1
        self._collect()
        self._then(then)

    # ------------------------------------------------------------------
    # invariants

    @invariant()
    def nothing_after_session_ended(self) -> None:
        ended = [i for i, e in enumerate(self.events) if isinstance(e, SessionEnded)]
        assert len(ended) <= 1, self.events
        if self.client is not None:
            assert bool(ended) == self.client.is_ended, (self.client.state, self.events)
        if ended:
            assert all(isinstance(e, CloseConnection) for e in self.events[ended[0] + 1 :]), self.events
        assert len([e for e in self.events if isinstance(e, SetupComplete | SetupFailed)]) <= 1

    @invariant()
    def execs_end_at_most_once(self) -> None:
        for exec_id in self.exec_ids:
            mine = [e for e in self.events if getattr(e, "exec_id", None) == exec_id]
            terminal = [i for i, e in enumerate(mine) if isinstance(e, ExecRejected | ProcessEnded)]
            started = [i for i, e in enumerate(mine) if isinstance(e, ExecStarted)]
            assert len(terminal) <= 1, mine
            assert len(started) <= 1, mine
            if terminal and isinstance(mine[terminal[0]], ExecRejected):
                assert not started, mine
            if terminal and isinstance(mine[terminal[0]], ProcessEnded) and mine[terminal[0]].error is None:
                assert started and started[0] < terminal[0], mine  # a DONE ends only a started exec
            outputs = [i for i, e in enumerate(mine) if isinstance(e, Output)]
            if outputs:
                assert started and started[0] < outputs[0], mine
                assert not terminal or outputs[-1] < terminal[0], mine

    @invariant()
    def answers_at_most_once(self) -> None:
        assert len([e for e in self.events if isinstance(e, SnapshotDone)]) <= self.snapshots_asked
        assert len([e for e in self.events if isinstance(e, CheckpointDone)]) <= self.checkpoints_asked
        assert len([e for e in self.events if isinstance(e, KillSandboxDone)]) <= 1

    @invariant()
    def output_in_order_and_with_seq_exactly_once(self) -> None:
        sb = self.sandbox
        if sb is None:
            return
        for ex in self._my_execs():
            ended = [e for e in self.events if isinstance(e, ProcessEnded | ExecRejected) and e.exec_id == ex.owner[1]]
            # Ended by its DONE (not by a lost connection, nor with the session).
            normal_end = (
                bool(ended)
                and isinstance(ended[0], ProcessEnded)
                and ended[0].error is None
                and ex.owner[1] not in self.ended_with_session
            )
            for stream in ("stdout", "stderr"):
                wrote = [data for _, s, data in ex.chunks if s == stream]
                got = [
                    e.data
                    for e in self.events
                    if isinstance(e, Output) and e.exec_id == ex.owner[1] and e.stream == stream
                ]
                assert _is_subsequence(got, wrote), (stream, got, wrote)
                if EXT_SEQ in self.extensions:
                    assert got == wrote[: len(got)], (stream, got, wrote)
                    if normal_end:
                        assert got == wrote, (stream, got, wrote)
            if normal_end:
                expected = ex.exit_code if EXT_EXIT_CODE in self.extensions else None
                assert ended[0].returncode == expected, (ended[0], ex)

    @invariant()
    def stdin_in_order_never_twice_never_misrouted(self) -> None:
        sb = self.sandbox
        if sb is None:
            return
        for ex in self._my_execs():
            written = self.stdin_written.get(ex.owner[1], [])
            assert _is_subsequence(ex.stdin, written), (ex.stdin, written)

    @invariant()
    def both_sides_agree_when_quiet(self) -> None:
        client, sb, conn = self.client, self.sandbox, self.conn
        if client is None or sb is None or conn is None:
            return
        if conn.c2s or conn.s2c or not conn.client_open or not conn.server_open or not conn.setup_done:
            return
        assert client.sandbox_id == sb.id
        if client.state.value == "running":
            assert sb.alive and sb.observer is conn, (client.state, sb.state)
        if not sb.alive:
            assert client.is_ended, (client.state, sb.state)
            return
        proc = client._process
        ex = sb.execution
        if proc is None:
            return
        if proc.state in (ProcessState.RUNNING, ProcessState.KILLING):
            assert ex is not None and ex.owner == (self.session, proc.exec_id) and ex.running, (proc, ex)
        if ex is not None and ex.owner == (self.session, proc.exec_id) and proc.exec_id not in self.locally_ended:
            if ex.running:
                assert proc.state in (ProcessState.RUNNING, ProcessState.KILLING), (proc, ex)
            elif ex.done_delivered:
                assert proc.state is ProcessState.DONE, (proc, ex)

    def _my_execs(self) -> list[FakeExec]:
        return [ex for sb in self.sandboxes for ex in sb.execs if ex.owner[0] == self.session]

    def teardown(self) -> None:
        self._finish_session()
        if not currently_in_test_context():
            return  # called by a regression test
        # How deep the run got, for --hypothesis-show-statistics.
        event(f"sessions: {min(self.session + 1, 4)}")
        event(f"connections: {min(len(self.conns), 6)}")
        for name, count in self.stats.items():
            event(f"{name}: {min(count, 5)}")

    def _finish_session(self) -> None:
        """End the session if it is not over (the socket dies, the user gives up), then check all of it."""
        client = self.client
        if client is None:
            return
        if self.conn is not None and self.conn.client_open:
            conn = self.conn
            self._close_conn(conn)
            client.connection_closed(1006, now=self.now)
        if not client.is_ended:
            client.close()
        self._collect()
        assert len([e for e in self.events if isinstance(e, SessionEnded)]) == 1, self.events
        for exec_id in self.exec_ids:
            terminal = [e for e in self.events if isinstance(e, ExecRejected | ProcessEnded) and e.exec_id == exec_id]
            assert len(terminal) == 1, (exec_id, self.events)
        assert len([e for e in self.events if isinstance(e, SnapshotDone)]) == self.snapshots_asked
        assert len([e for e in self.events if isinstance(e, CheckpointDone)]) == self.checkpoints_asked
        self.output_in_order_and_with_seq_exactly_once()
        self.stdin_in_order_never_twice_never_misrouted()
        # What the run reached, for --hypothesis-show-statistics.
        self.stats["execs started"] += sum(isinstance(e, ExecStarted) for e in self.events)
        self.stats["output chunks"] += sum(isinstance(e, Output) for e in self.events)
        self.stats["reconnected"] += sum(isinstance(e, Reconnected) for e in self.events)


def _is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


BackToBack.TestCase.settings = settings(
    max_examples=examples(150),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestBackToBack = BackToBack.TestCase


# --------------------------------------------------------------------------
# regressions: every failure the machine found, as its minimal case


def test_refused_reconnect_with_403_ends_in_failed_not_reconnecting() -> None:
    """Found by BackToBack: after a 401/403/404 on a reconnect the session had ended
    (SessionEnded emitted) but ``state`` stayed ``reconnecting`` and ``is_ended`` was
    ``False``, so adapters kept the sandbox open and user calls said "retry when the
    sandbox is running again". Fixed in ``ClientProtocol.connection_failed``."""
    machine = BackToBack()
    machine.start(mode="create", extended=False, auto_reconnect=True, checkpointable=False, seed=0, finish_setup=True)
    machine.drop(server_notices=True)
    machine.reconnect(outcome=403, after=0.0)
    assert machine.client is not None
    assert machine.client.is_ended
    assert machine.client.state.value == "failed"
    machine.nothing_after_session_ended()
    machine.teardown()
