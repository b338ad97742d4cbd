"""The real client core and the real server core back to back, through a network that loses things.

A :class:`ClientProtocol` talks to one :class:`ServerProtocol` per socket.
Every decision on the server side is the server core's own
(``answer_attach``, ``answer_reconnect``, ``is_new_stdin``, ``stdin_accepted``,
``reject_exec``...); what sits behind it is only a small simulated sandbox:
an output log with ``seq`` numbers (optionally bounded, so replays can meet
``output_gap``), and a process that echoes every stdin item to stdout and
exits when its stdin is closed, or when hypothesis says so.

What hypothesis drives, in any order and in any client state:

* every user call (exec, stdin, close stdin, kill process, kill sandbox,
  checkpoint, snapshot, close, abandon exec) and every timer of the adapter;
* connection results at any time, also after the session ended (a handshake
  that completes late, a close reported late, frames read late);
* ``send_failed`` for a suffix of the last batch, with the socket living on
  or closing;
* cuts: the tail of what each side wrote before the cut is lost (a black
  hole), frames written after it vanish, and each side notices on its own,
  so the server may keep the dead socket attached and answer the reattach
  with ``SANDBOX_IN_USE``;
* the sandbox's own life: output, exit, idle deletion, handoff to another
  instance (the reattach then restores it), server-initiated closes.

Invariants after every step:

* a user call raises ``LocalProtocolError`` only where ``CALL_TABLE`` says
  REFUSE or a precondition of the exec (or of a request already waiting)
  fails; HOLD sends nothing, END ends, IGNORE changes nothing;
* ended states absorb; nothing follows ``SessionEnded`` but
  ``CloseConnection``; a socket opened after the end gets only
  ``CloseConnection``; no frame is produced with no socket to carry it;
* with ``stdin_seq`` granted, the process reads every stdin item the user
  wrote exactly once, in order, whatever the cuts (checked whenever the
  network is quiet and the exec runs on both sides); without it, an item
  missing at such a moment implies a ``StdinIncomplete`` for that exec;
* output reaches the client in order; with ``seq``, exactly once (a prefix,
  all of it when the exec ended normally) unless ``OutputIncomplete`` said
  otherwise;
* every exec, checkpoint, snapshot and kill_sandbox gets at most one answer
  while the session runs, and exactly one once the peer answered or the
  session ended (checked at the end of each session).
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context, currently_in_test_context, note
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sandbox_proto import (
    ALL_EXTENSIONS,
    CALL_TABLE,
    EXT_CLOSE_STDIN,
    EXT_EXIT_CODE,
    EXT_SEQ,
    EXT_STDIN_SEQ,
    MSG_CHECKPOINT_IN_PROGRESS,
    AttachFacts,
    AttachStep,
    Call,
    CheckpointDone,
    CheckpointRequested,
    ClientProtocol,
    Close,
    CloseConnection,
    CloseStdinRequested,
    Event,
    ExecRejected,
    ExecRequested,
    ExecStarted,
    ExecutionView,
    InitRequest,
    KillProcessFailed,
    KillProcessRequested,
    KillSandboxDone,
    KillSandboxRequested,
    LocalProtocolError,
    Output,
    OutputIncomplete,
    ProcessEnded,
    ProcessPhase,
    Reconnected,
    ReconnectRequested,
    ReconnectScheduled,
    RestoreResult,
    ResumeStream,
    SandboxConnectionError,
    SandboxState,
    ServerProtocol,
    SessionEnded,
    SetupComplete,
    SetupFailed,
    SnapshotDone,
    SnapshotRequested,
    Status,
    StdinIncomplete,
    StdinReceived,
    Verdict,
)


def examples(default: int) -> int:
    """``default`` under hypothesis' default profile, the profile's count under a bigger one."""
    current = settings.default.max_examples
    return default if current <= 100 else current


# Output and stdin text: any character but lone surrogates, which no socket can carry.
texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)
choices = st.lists(st.booleans(), max_size=8)
# Rules that end the session fire an eighth of the time, so that runs get deep.
rarely = st.integers(0, 7).map(lambda n: n == 0)
# After an action: deliver everything (runs get deep), or leave it in flight (races).
thens = st.sampled_from(["settle", "settle", "race"])
# Which exec a process call names: the newest, the one before, or one that never existed.
targets = st.sampled_from(["latest", "latest", "latest", "previous", "bogus"])
#: What the server grants: everything, everything but stdin_seq (the previous server), nothing (upstream).
EXTENSION_SETS = {
    "all": ALL_EXTENSIONS,
    "no-stdin-seq": tuple(e for e in ALL_EXTENSIONS if e != EXT_STDIN_SEQ),
    "upstream": (),
}
#: Bugs this machine found that are not fixed yet, each with its failing test in
#: tests/proto/test_windows.py. Only the check each one breaks is relaxed, and only
#: for its case, so that the machine keeps finding the others; remove a name once fixed.
KNOWN_BUGS: frozenset[str] = frozenset()
MSG_NOT_RUNNING = "Cannot execute code in a sandbox that is not in the RUNNING state (current state: STOPPED)"
ENDED_STATES = frozenset({SandboxState.CHECKPOINTED, SandboxState.KILLED, SandboxState.CLOSED, SandboxState.FAILED})


# --------------------------------------------------------------------------
# the simulated sandbox behind the server core


@dataclass(eq=False)
class SimExec:
    #: (client session number, exec id in that session)
    owner: tuple[int, int]
    first_seq: int
    last_seq: int
    chunks: list[tuple[int, str, str]] = field(default_factory=list)  # (seq, stream, data)
    #: What the process read from its stdin, in order; ``None`` is the end of input.
    stdin: list[str | None] = field(default_factory=list)
    stdin_seq: int = 0
    running: bool = True
    killed: bool = False
    exit_code: int | None = None
    done_delivered: bool = False
    #: The client's name for the exec (``exec_ref``).
    ref: str | None = None


@dataclass(eq=False)
class SimSandbox:
    id: str
    token: str
    checkpointable: bool
    #: How many output frames the log keeps once delivered (None: all); evicted ones make gaps.
    retain: int | None
    state: str = "running"  # running | deleted | killed | checkpointed (restorable)
    observer: SimConn | None = None
    seq: int = 0
    #: Highest seq handed to some socket (what the real OutputLog calls ``delivered``).
    delivered: int = 0
    #: Frames with seq up to this one are evicted.
    evicted: int = 0
    execution: SimExec | None = None
    execs: list[SimExec] = field(default_factory=list)

    def phase(self) -> ProcessPhase:
        ex = self.execution
        if self.state != "running" or ex is None:
            return ProcessPhase.NONE
        if ex.running:
            return ProcessPhase.RUNNING
        return ProcessPhase.NONE if ex.killed else ProcessPhase.EXITED

    def mark_delivered(self, seq: int) -> None:
        self.delivered = max(self.delivered, seq)
        if self.retain is not None:
            self.evicted = max(self.evicted, min(self.delivered, self.seq - self.retain))


@dataclass(eq=False)
class SimConn:
    proto: ServerProtocol
    number: int
    sandbox: SimSandbox | None = None
    c2s: deque[str] = field(default_factory=deque)
    s2c: deque[str | Close] = field(default_factory=deque)
    #: The client has not yet been told this socket closed.
    client_open: bool = True
    #: The server still handles it (it may not have noticed the client is gone).
    server_open: bool = True
    #: TCP is dead: nothing written from now on arrives, either way.
    cut: bool = False
    #: The client asked to close it (CloseConnection); the close completes later.
    closing: bool = False
    abort: bool = False
    setup_done: bool = False
    streaming: SimExec | None = None
    cursor: int = 0
    report_gaps: bool = False


class Picker:
    """Server-side choices drawn by hypothesis; then from the run's seeded generator, so that
    deliveries made on the way (``then="settle"``) also take every branch."""

    def __init__(self, values: list[bool], rng: random.Random) -> None:
        self._values = list(values)
        self._rng = rng

    def __call__(self) -> bool:
        return self._values.pop() if self._values else self._rng.random() < 0.5


# --------------------------------------------------------------------------
# what the user of one client session did and saw


@dataclass(eq=False)
class ExecModel:
    exec_id: int
    #: Stdin the user wrote (accepted by the core), ``None`` for close_stdin.
    written: list[str | None] = field(default_factory=list)
    closed: bool = False
    started: bool = False
    ended: ExecRejected | ProcessEnded | None = None
    #: Ended by the kill timer or with the session, not by its DONE: its output may be cut short.
    ended_early: bool = False
    #: The user asked to kill it after it started (the adapter then runs a kill timer).
    kill_timer: bool = False
    abandoned: bool = False
    #: Asked for while an abandoned exec was still on: it waits behind it.
    queued: bool = False
    #: Abandoned while still queued: withdrawn, nothing is owed for it.
    withdrawn: bool = False
    #: Started on a reconnect reply about another exec (a known bug): its checks are off.
    foreign: bool = False
    output: list[tuple[str, str]] = field(default_factory=list)
    output_incomplete: bool = False
    stdin_incomplete: bool = False
    kill_failures: int = 0
    kills_asked: int = 0

    @property
    def open(self) -> bool:
        """Neither ended nor withdrawn: the core still has it."""
        return self.ended is None and not self.withdrawn


def trace(message: Callable[[], str]) -> None:
    """What crossed the wire, printed with the failing example only (formatted only then)."""
    if currently_in_test_context() and current_build_context().is_final:
        note(message())


def _is_subsequence(small: list[Any], big: list[Any]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


class BackToBack(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sandboxes: dict[str, SimSandbox] = {}
        self.sandbox: SimSandbox | None = None
        self.conns: list[SimConn] = []
        self.extensions: tuple[str, ...] = ()
        self.retain: int | None = None
        self.code_owner: dict[str, tuple[int, int]] = {}
        self.now = 0.0
        self.rng = random.Random(0)
        self.session = 0
        #: What the run reached, for --hypothesis-show-statistics.
        self.reach: set[str] = set()
        self.endings: list[str] = []
        self._new_session_state()

    def _new_session_state(self) -> None:
        self.client: ClientProtocol | None = None
        #: The socket the client has open (its view): None between sockets.
        self.conn: SimConn | None = None
        self.events: list[Event] = []
        self.ended_state: SandboxState | None = None
        self.execs: dict[int, ExecModel] = {}
        #: A handshake the adapter started and that has not completed: (path kind, id, token).
        self.handshake: tuple[str, str | None, str | None] | None = None
        self.reconnect_due: float | None = None
        #: The latest batch of data_to_send, not yet on the wire (send_failed may still take part back).
        self.writing: list[str] = []
        self.writing_conn: SimConn | None = None
        self.checkpoint_waiting = False
        self.checkpoint_asked = False
        self.snapshot_waiting = False
        #: How kill_sandbox was answered: None (not asked), "waiting", "answered".
        self.kill_sandbox: str | None = None
        self.setup_events = 0
        #: The client read the start of a handoff (7.10) on this session.
        self.handoff_seen = False
        self.stdin_sent: dict[tuple[int, int], int] = {}  # (exec id, seq) -> socket number it first left on

    @property
    def c(self) -> ClientProtocol:
        assert self.client is not None
        return self.client

    # ------------------------------------------------------------------
    # setup

    @initialize(
        mode=st.sampled_from(["create"] * 4 + ["attach", "attach-restore", "attach-restore", "attach-bad-token"]),
        grant=st.sampled_from(["all", "all", "no-stdin-seq", "upstream"]),
        auto_reconnect=st.sampled_from([True, True, True, False]),
        checkpointable=st.booleans(),
        retain=st.sampled_from([None, None, 2]),
        seed=st.integers(0, 2**16),
        then=thens,
    )
    def start(
        self,
        mode: str,
        grant: str,
        auto_reconnect: bool,
        checkpointable: bool,
        retain: int | None,
        seed: int,
        then: str = "race",
    ) -> None:
        self.extensions = EXTENSION_SETS[grant]
        self.retain = retain
        self.rng = random.Random(seed)
        if mode != "create":
            state = "checkpointed" if mode == "attach-restore" else "running"
            self.sandbox = SimSandbox("sandbox-fuzz", "token-1", checkpointable, retain, state)
            self.sandboxes[self.sandbox.id] = self.sandbox
        self._begin(mode, auto_reconnect, checkpointable, seed)
        if then == "settle":
            self.handshake_completes("open", "settle")

    @precondition(lambda self: self.client is not None and self.client.is_ended)
    @rule(
        mode=st.sampled_from(["attach", "create"]),
        auto_reconnect=st.sampled_from([True, True, False]),
        checkpointable=st.booleans(),
        seed=st.integers(0, 2**16),
        then=thens,
    )
    def next_session(self, mode: str, auto_reconnect: bool, checkpointable: bool, seed: int, then: str) -> None:
        """The session ended: check all of it, then a new client creates or attaches on the same server."""
        self._finish_session()
        self._new_session_state()
        self.session += 1
        if self.sandbox is None or self.sandbox.state in ("deleted", "killed"):
            mode = "create"  # attaching would only be refused
        self._begin(mode, auto_reconnect, checkpointable, seed)
        if then == "settle":
            self.handshake_completes("open", "settle")

    def _begin(self, mode: str, auto_reconnect: bool, checkpointable: bool, seed: int) -> None:
        common: dict[str, Any] = {"auto_reconnect": auto_reconnect, "rng": random.Random(seed)}
        if mode == "create":
            init = InitRequest(enable_checkpoint=checkpointable)
            self.client = ClientProtocol("http://127.0.0.1:1", init=init, **common)
        else:
            assert self.sandbox is not None
            token = "wrong" if mode == "attach-bad-token" else self.sandbox.token
            self.client = ClientProtocol(
                "http://127.0.0.1:1", sandbox_id=self.sandbox.id, sandbox_token=token, **common
            )
        self._start_handshake()

    def _start_handshake(self) -> None:
        client = self.c
        client.handshake()
        kind = "create" if client.sandbox_id is None else "attach"
        self.handshake = (kind, client.sandbox_id, client.sandbox_token)

    # ------------------------------------------------------------------
    # plumbing: the client side

    def _collect(self) -> None:
        """What the adapter does after every input: take the frames to write and the events."""
        client = self.c
        frames = client.data_to_send()
        new = client.events()
        if frames:
            assert self.ended_state is None, f"frames after the session ended: {frames}"
            conn = self.conn
            assert conn is not None and conn.client_open and not conn.closing, f"frames with no socket: {frames}"
            self._flush_writes()  # the batch before went first
            self.writing, self.writing_conn = frames, conn
            self._note_sent(conn, frames)
        for item in new:
            self._on_event(item)
        if any(isinstance(e, SessionEnded) for e in new):
            # Ended with the session (a kill, a close, a failure): not by a DONE.
            for model in self.execs.values():
                if model.ended in new:
                    model.ended_early = True
        self._check_ended()

    def _flush_writes(self) -> None:
        """The pending batch reached the socket (or vanished, if TCP is dead)."""
        frames, conn = self.writing, self.writing_conn
        self.writing, self.writing_conn = [], None
        if frames and conn is not None and not conn.cut and conn.server_open:
            conn.c2s.extend(frames)
        elif frames:
            trace(lambda: f"  lost on socket {conn and conn.number}: {frames}")

    def _note_sent(self, conn: SimConn, frames: list[str]) -> None:
        for text in frames:
            obj = json.loads(text)
            seq = obj.get("seq")
            if seq is None or not (obj.get("event") == "stdin" or obj.get("action") == "close_stdin"):
                continue
            key = (max(self.execs, default=0), seq)
            first = self.stdin_sent.setdefault(key, conn.number)
            if first != conn.number:
                self.reach.add("stdin resent on a new socket")

    def _on_event(self, item: Event) -> None:
        ended = any(isinstance(e, SessionEnded) for e in self.events)
        assert not ended or isinstance(item, CloseConnection), f"{item} after SessionEnded: {self.events}"
        self.events.append(item)
        trace(lambda: f"  client event {item}")
        if isinstance(item, SessionEnded):
            self.ended_state = self.c.state
            assert self.c.is_ended, self.c.state
        elif isinstance(item, SetupComplete | SetupFailed):
            self.setup_events += 1
            assert self.setup_events == 1, self.events
        elif isinstance(item, ReconnectScheduled):
            assert self.handshake is None and self.conn is None, (self.handshake, self.conn)
            self.reconnect_due = item.delay
        elif isinstance(item, Reconnected):
            self.reach.add("reconnect")
            if item.restored:
                self.reach.add("restored on a reconnect")
            for model in self.execs.values():
                if model.written and model.ended is None:
                    self.reach.add("stdin across a reconnect")
        elif isinstance(item, CloseConnection):
            conn = self.conn
            if conn is not None:
                conn.closing = True
                conn.abort = conn.abort or item.abort
        elif isinstance(item, ExecStarted):
            model = self.execs[item.exec_id]
            assert not model.started and model.ended is None, (item, model)
            model.started = True
            self.reach.add("exec")
            if self._sim_exec(item.exec_id) is None and "another exec's stream adopted" in KNOWN_BUGS:
                model.foreign = True
                self.reach.add("known bug: another exec's stream adopted")
            assert model.foreign or self._sim_exec(item.exec_id) is not None, "started, never ran"
        elif isinstance(item, ExecRejected | ProcessEnded):
            model = self.execs[item.exec_id]
            assert model.ended is None and not model.withdrawn, (item, model)
            model.ended = item
            if isinstance(item, ExecRejected):
                assert not model.started, (item, model)
                if "did not run" in str(item.error):
                    ran = [ex for ex in self._sim_execs() if ex.owner == (self.session, item.exec_id)]
                    assert not ran, f"{item.error} but it ran: {ran}"
            else:
                assert model.started, (item, model)
        elif isinstance(item, Output):
            model = self.execs[item.exec_id]
            assert model.started and model.ended is None, (item, model)
            model.output.append((item.stream, item.data))
            self.reach.add("output")
        elif isinstance(item, OutputIncomplete):
            self.execs[item.exec_id].output_incomplete = True
            self.reach.add("output incomplete")
        elif isinstance(item, StdinIncomplete):
            self.execs[item.exec_id].stdin_incomplete = True
            self.reach.add("stdin incomplete")
        elif isinstance(item, KillProcessFailed):
            model = self.execs[item.exec_id]
            model.kill_failures += 1
            assert model.kill_failures <= model.kills_asked, (item, model)
        elif isinstance(item, CheckpointDone):
            assert self.checkpoint_waiting, f"{item} with no checkpoint waiting"
            self.checkpoint_waiting = False
        elif isinstance(item, SnapshotDone):
            assert self.snapshot_waiting, f"{item} with no snapshot waiting"
            self.snapshot_waiting = False
        elif isinstance(item, KillSandboxDone):
            assert self.kill_sandbox == "waiting", f"{item} with kill_sandbox {self.kill_sandbox}"
            self.kill_sandbox = "answered"
            # A kill handed and unanswered is taken as done (as upstream); one the client saw
            # overtaken by a handoff (7.10) is not: the sandbox lives on elsewhere.
            known = self.checkpoint_asked and "kill_sandbox overtaken by a handoff during a checkpoint" in KNOWN_BUGS
            assert item.error is not None or not self.handoff_seen or known, f"{item} after the handoff"

    def _check_ended(self) -> None:
        client = self.c
        ended = any(isinstance(e, SessionEnded) for e in self.events)
        assert ended == client.is_ended, (client.state, self.events)
        if self.ended_state is not None:
            assert client.state is self.ended_state, f"ended state {self.ended_state} became {client.state}"

    def _late(self, action: Callable[[], object], *, opened: bool = False) -> None:
        """An input after the end must change nothing and emit nothing (but a CloseConnection for a socket)."""
        client = self.c
        assert client.is_ended
        state = client.state
        action()
        assert client.data_to_send() == []
        events = client.events()
        assert events == ([CloseConnection(1000)] if opened else []), events
        assert client.state is state
        self.reach.add("late input after the end")

    def _sim_execs(self) -> list[SimExec]:
        return [ex for sb in self.sandboxes.values() for ex in sb.execs]

    def _sim_exec(self, exec_id: int) -> SimExec | None:
        found = [ex for ex in self._sim_execs() if ex.owner == (self.session, exec_id)]
        assert len(found) <= 1, found  # an exec request runs at most once
        return found[0] if found else None

    # ------------------------------------------------------------------
    # plumbing: the server side

    def _push(self, conn: SimConn, slip: bool = False) -> list[str | Close]:
        """Move what the server core queued onto the wire, maybe slipping output into an error pair (8.2)."""
        out = conn.proto.data_to_send()
        ex = conn.streaming
        if slip and ex is not None and ex.running and conn.sandbox is not None:
            index = next((i for i, item in enumerate(out) if isinstance(item, str) and '"event":"error"' in item), None)
            if index is not None:
                self._process_output(ex, "stdout", "slipped\n", push=False)
                self._pump(conn, push=False)
                out[index:index] = [item for item in conn.proto.data_to_send() if isinstance(item, str)]
        if conn.client_open and not conn.cut and not conn.closing:
            conn.s2c.extend(out)
        elif out:
            trace(lambda: f"  lost server frames on socket {conn.number}: {out}")
        if any(isinstance(item, Close) for item in out):
            self._server_detach(conn)
        return out

    def _server_detach(self, conn: SimConn) -> None:
        conn.server_open = False
        conn.streaming = None
        conn.c2s.clear()
        sb = conn.sandbox
        if sb is not None and sb.observer is conn:
            sb.observer = None

    def _process_output(self, ex: SimExec, stream: str, data: str, *, push: bool = True) -> None:
        sb = next(sb for sb in self.sandboxes.values() if ex in sb.execs)
        sb.seq += 1
        ex.chunks.append((sb.seq, stream, data))
        ex.last_seq = sb.seq
        if push and sb.observer is not None and sb.observer.streaming is ex:
            self._pump(sb.observer)

    def _pump(self, conn: SimConn, *, push: bool = True) -> None:
        """The connection's forwarder: the exec's frames after the cursor, then its DONE (as sandbox_server)."""
        ex, sb = conn.streaming, conn.sandbox
        if ex is None or sb is None or not conn.server_open:
            return
        frames = [chunk for chunk in ex.chunks if conn.cursor < chunk[0] <= ex.last_seq and chunk[0] > sb.evicted]
        if frames and conn.report_gaps and frames[0][0] > conn.cursor + 1:
            conn.proto.send_output_gap(conn.cursor + 1, frames[0][0] - 1)
        for seq, stream, data in frames:
            conn.proto.send_output(stream, data, seq)  # type: ignore[arg-type]
        if frames:
            conn.cursor = frames[-1][0]
            sb.mark_delivered(conn.cursor)
        if not ex.running:
            if conn.cursor < ex.last_seq:
                if conn.report_gaps:
                    conn.proto.send_output_gap(conn.cursor + 1, ex.last_seq)
                conn.cursor = ex.last_seq
            conn.proto.exec_finished(ex.exit_code, killed=ex.killed)
            ex.done_delivered = True
            conn.streaming = None
        if push:
            self._push(conn)

    def _attach_facts(self, facts: AttachFacts, sb: SimSandbox | None, token: str | None) -> AttachFacts:
        if sb is None or sb.state != "running":
            return facts
        return replace(
            facts, found=True, token_ok=token == sb.token, observed=sb.observer is not None, phase=sb.phase()
        )

    def _server_attach(self, conn: SimConn, sandbox_id: str, token: str | None) -> None:
        """What sandbox_server does on /attach: gather facts, restore if told to, act on the answer."""
        proto = conn.proto
        sb = self.sandboxes.get(sandbox_id)
        facts = self._attach_facts(AttachFacts(sandbox_id, bool(token)), sb if token else None, token)
        step = proto.answer_attach(facts)
        if step is AttachStep.RESTORE:
            result = self._restore(sb, token)
            facts = replace(facts, restore=result, restore_error="Latest checkpoint not found")
            if result is RestoreResult.RESTORED:
                facts = self._attach_facts(facts, sb, token)
            step = proto.answer_attach(facts)
        if step is AttachStep.ATTACHED:
            assert sb is not None
            conn.sandbox = sb
            conn.setup_done = True
            sb.observer = conn
        out = self._push(conn)
        if any(isinstance(item, str) and "SANDBOX_IN_USE" in item for item in out):
            self.reach.add("IN_USE on a reattach")

    def _restore(self, sb: SimSandbox | None, token: str | None) -> RestoreResult:
        if sb is None or sb.state == "killed" or (sb.state == "deleted" and not sb.checkpointable):
            return RestoreResult.NOT_FOUND
        if token != sb.token:
            return RestoreResult.PERMISSION_DENIED
        if sb.state == "deleted":
            return RestoreResult.FAILED  # checkpointable, never checkpointed
        if sb.state == "checkpointed":
            sb.state = "running"
            if sb.execution is not None and sb.execution.running:
                sb.execution.running, sb.execution.killed = False, True
            sb.execution = None  # a restore brings back no exec (7.10)
        return RestoreResult.RESTORED

    def _server_handle(self, conn: SimConn, text: str, pick: Picker) -> None:
        trace(lambda: f"  server {conn.number} <- {text}")
        proto = conn.proto
        if not conn.setup_done:
            if not proto.is_create:
                return  # a refused attach reads nothing
            options = proto.receive_init(text)
            assert options is not None, "our own init message was refused"
            number = len(self.sandboxes)
            sb = SimSandbox(f"sandbox-{number}", f"token-{number}", options.enable_checkpoint, self.retain)
            self.sandboxes[sb.id] = self.sandbox = sb
            conn.sandbox, conn.setup_done, sb.observer = sb, True, conn
            proto.send_sandbox_id(sb.id, sb.token)
            proto.send_running()
            self._push(conn)
            return
        sb = conn.sandbox
        assert sb is not None
        if conn.streaming is None:
            proto.process = sb.phase()  # as sandbox_server: another connection may have seen the exec end
        request = proto.receive(text)
        ex = sb.execution
        if isinstance(request, ExecRequested):
            self._server_exec(conn, sb, request)
        elif isinstance(request, StdinReceived | CloseStdinRequested):
            self._server_stdin(conn, sb, request)
        elif isinstance(request, KillProcessRequested):
            if sb.state == "running" and ex is not None and ex.running:
                ex.running, ex.killed, ex.exit_code = False, True, -9
                if pick() and conn.streaming is ex:
                    self._pump(conn, push=False)  # 7.5: DONE and FORCE_KILLED in either order
            proto.send_status(Status.SANDBOX_EXECUTION_FORCE_KILLED)
        elif isinstance(request, KillSandboxRequested):
            if sb.state != "running":
                proto.close(1000)  # 7.6: already gone, no status at all
            else:
                proto.send_status(Status.SANDBOX_KILLING)
                self._delete(sb, "killed")
                proto.send_status(Status.SANDBOX_KILLED)
                proto.close(1000)
        elif isinstance(request, CheckpointRequested):
            self._server_checkpoint(conn, sb, pick)
        elif isinstance(request, SnapshotRequested):
            proto.send_status(Status.SANDBOX_FILESYSTEM_SNAPSHOT_CREATING)
            if sb.state == "running" and pick():
                proto.send_status(Status.SANDBOX_FILESYSTEM_SNAPSHOT_CREATED)
            else:
                message = f"Failed to snapshot filesystem for sandbox {sb.id}: no"
                proto.send_error(Status.SANDBOX_FILESYSTEM_SNAPSHOT_ERROR, message)
        elif isinstance(request, ReconnectRequested):
            view = None if ex is None else self._view(sb, ex)
            cursor = conn.cursor if conn.streaming is not None else None
            answer = proto.answer_reconnect(request, view, streaming_cursor=cursor)
            if isinstance(answer, ResumeStream):
                assert ex is not None
                conn.streaming, conn.cursor, conn.report_gaps = ex, answer.cursor, answer.report_gaps
            elif answer.done_delivered and ex is not None:
                ex.done_delivered = True
        self._push(conn, slip=pick())

    def _view(self, sb: SimSandbox, ex: SimExec) -> ExecutionView:
        return ExecutionView(
            running=ex.running,
            done_delivered=ex.done_delivered,
            first_seq=ex.first_seq,
            last_seq=ex.last_seq,
            delivered=sb.delivered,
            stdin_seq=ex.stdin_seq,
            exit_code=ex.exit_code,
            sandbox_deleted=sb.state != "running",
            ref=ex.ref,
        )

    def _server_exec(self, conn: SimConn, sb: SimSandbox, request: ExecRequested) -> None:
        if sb.state != "running":
            conn.proto.reject_exec(Status.SANDBOX_EXECUTION_ERROR, MSG_NOT_RUNNING)
            return
        if sb.execution is not None and sb.execution.running:
            conn.proto.reject_exec(Status.SANDBOX_EXECUTION_ERROR, "An execution is already in progress.")
            return
        sb.mark_delivered(sb.seq)  # output of an earlier exec that nobody streamed is given up
        ex = SimExec(self.code_owner[request.code], sb.seq + 1, sb.seq, ref=request.ref)
        sb.execution = ex
        sb.execs.append(ex)
        conn.streaming, conn.cursor, conn.report_gaps = ex, ex.first_seq - 1, False
        conn.proto.exec_started(request.ref)

    def _server_stdin(self, conn: SimConn, sb: SimSandbox, request: StdinReceived | CloseStdinRequested) -> None:
        ex = sb.execution
        if ex is None or not ex.running:
            return
        if not conn.proto.is_new_stdin(request, ex.stdin_seq):
            self.reach.add("server dropped a resent stdin")
            return
        if request.seq is not None:
            ex.stdin_seq = max(ex.stdin_seq, request.seq)
        conn.proto.stdin_accepted(request)
        # The process: echo each item, exit at the end of its input.
        if isinstance(request, StdinReceived):
            ex.stdin.append(request.data)
            self._process_output(ex, "stdout", request.data, push=False)
        else:
            ex.stdin.append(None)
            ex.running, ex.exit_code = False, len(ex.stdin) - 1
        observer = sb.observer
        if observer is not None and observer.streaming is ex:
            self._pump(observer, push=observer is not conn)  # conn's own frames are pushed by the caller

    def _server_checkpoint(self, conn: SimConn, sb: SimSandbox, pick: Picker) -> None:
        proto = conn.proto
        proto.send_status(Status.SANDBOX_CHECKPOINTING)
        failed = f"Failed to checkpoint sandbox {sb.id}: "
        if sb.state != "running":
            proto.send_error(Status.SANDBOX_CHECKPOINT_ERROR, failed + f"Sandbox not found: {sb.id}", close=4000)
        elif sb.execution is not None and sb.execution.running:
            proto.send_error(Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR, MSG_CHECKPOINT_IN_PROGRESS)
        elif not sb.checkpointable:
            proto.send_error(Status.SANDBOX_CHECKPOINT_ERROR, failed + "not configured for checkpointing.", close=4000)
        elif pick():
            self._delete(sb, "checkpointed")
            proto.send_status(Status.SANDBOX_CHECKPOINTED)
            proto.close(1000)
        else:  # S11: the sandbox is kept
            proto.send_error(Status.SANDBOX_CHECKPOINT_ERROR, failed + "x", close=4000)

    def _delete(self, sb: SimSandbox, state: str, lock: bool = False) -> None:
        """DELETING, [the streamed exec's DONE], [lock frames], DELETED, to the attached connection."""
        sb.state = state
        observer = sb.observer
        ex = sb.execution
        if observer is not None:
            observer.proto.send_status(Status.SANDBOX_DELETING)
        if ex is not None and ex.running:
            ex.running, ex.killed, ex.exit_code = False, True, -9
        if observer is not None:
            if observer.streaming is not None:
                self._pump(observer, push=False)
            if lock:
                observer.proto.send_status(Status.SANDBOX_LOCK_RELEASING)
                observer.proto.send_status(Status.SANDBOX_LOCK_RELEASED)
            observer.proto.send_status(Status.SANDBOX_DELETED)

    # ------------------------------------------------------------------
    # rules: the network and the adapter

    @precondition(lambda self: self.reconnect_due is not None)
    @rule(extra=st.floats(0, 20), then=thens)
    def begin_handshake(self, extra: float, then: str) -> None:
        """The adapter's reconnect timer fires: it opens the next socket, unless the session ended meanwhile."""
        assert self.reconnect_due is not None
        self.now += self.reconnect_due + extra  # the reconnect deadline (7.12) counts from the drop
        self.reconnect_due = None
        if self.c.is_ended:
            return
        self._start_handshake()
        if then == "settle":
            self.handshake_completes("open", "settle")

    @precondition(lambda self: self.handshake is not None)
    @rule(outcome=st.sampled_from(["open"] * 8 + [503, 403, None]), then=thens)
    def handshake_completes(self, outcome: Any, then: str) -> None:
        """The handshake ends, maybe long after the session did."""
        assert self.handshake is not None
        kind, sandbox_id, token = self.handshake
        self.handshake = None
        client = self.c
        if outcome != "open":
            error = SandboxConnectionError("refused")
            if client.is_ended:
                self._late(lambda: client.connection_failed(error, now=self.now, http_status=outcome))
                return
            client.connection_failed(error, now=self.now, http_status=outcome)
            self._collect()
            return
        conn = SimConn(ServerProtocol(create=kind == "create", extensions=self.extensions), len(self.conns))
        self.conns.append(conn)
        if client.is_ended:
            self._late(lambda: client.connection_opened(["SANDBOX_AFFINITY=x; Path=/"]), opened=True)
            # The server attached it before the client closed it.
            if kind == "attach":
                assert sandbox_id is not None
                self._server_attach(conn, sandbox_id, token)
            conn.client_open = False
            self._server_detach(conn)
            return
        client.connection_opened(["SANDBOX_AFFINITY=x; Path=/"])
        self.conn = conn
        if kind == "attach":
            assert sandbox_id is not None
            self._server_attach(conn, sandbox_id, token)
        self._collect()
        self._then(then)

    @precondition(lambda self: bool(self.writing))
    @rule(unsent=st.integers(1, 4), then_close=st.booleans())
    def send_fails(self, unsent: int, then_close: bool) -> None:
        """The socket's send fails part-way: the last frames of the batch never left."""
        frames, conn = self.writing, self.writing_conn
        assert conn is not None
        unsent = min(unsent, len(frames))
        self.writing, self.writing_conn = frames[:-unsent], conn
        self._flush_writes()
        client = self.c
        client.send_failed(frames[-unsent:])
        self.reach.add("send_failed")
        if then_close and conn is self.conn:
            # The failure was the socket dying: it is cut, the client is told now, the server maybe later.
            conn.cut = True
            self._client_lost(conn, 1006)
        self._collect()

    @precondition(lambda self: any(c.server_open and c.c2s for c in self.conns))
    @rule(count=st.integers(1, 3), picks=choices)
    def deliver_to_server(self, count: int, picks: list[bool]) -> None:
        pick = Picker(picks, self.rng)
        conn = next(c for c in self.conns if c.server_open and c.c2s)
        for _ in range(count):
            if not conn.c2s or not conn.server_open:
                break
            self._server_handle(conn, conn.c2s.popleft(), pick)

    @precondition(lambda self: self.handshake is not None or (self.conn is not None and bool(self.conn.s2c)))
    @rule(calls=st.lists(st.sampled_from(list(Call)), min_size=1, max_size=5), which=targets)
    def user_calls_between_frames(self, calls: list[Call], which: str) -> None:
        """Frames reach the client one by one, a user call after each: every state a frame leads to gets calls."""
        if self.handshake is not None:
            self.handshake_completes("open", "race")  # setup too: attaching, restoring, creating
        self._flush_writes()
        if self.conn is not None and self.conn.c2s and self.conn.server_open:
            self.deliver_to_server(len(self.conn.c2s), [])
        for index, call in enumerate(calls):
            if index and self.conn is not None and self.conn.s2c:
                self.deliver_to_client(1)
            self._user_call(call, which)

    def _user_call(self, call: Call, which: str) -> None:
        actions: dict[Call, Callable[[], None]] = {
            Call.EXEC: lambda: self.user_exec("bash", "race"),
            Call.STDIN: lambda: self.user_stdin(which, "x", "race"),
            Call.CLOSE_STDIN: lambda: self.user_close_stdin(which, "race"),
            Call.KILL_PROCESS: lambda: self.user_kill_process(which, "race"),
            Call.KILL_SANDBOX: lambda: self.user_kill_sandbox(True, "race"),
            Call.CHECKPOINT: lambda: self.user_checkpoint(True, "race"),
            Call.SNAPSHOT: lambda: self.user_snapshot("snap-1", "race"),
            Call.CLOSE: lambda: self.user_close(True),
        }
        actions[call]()

    @precondition(lambda self: self.conn is not None and bool(self.conn.s2c))
    @rule(count=st.integers(1, 4))
    def deliver_to_client(self, count: int) -> None:
        for _ in range(count):
            conn = self.conn
            if conn is None or not conn.s2c:
                break
            self._to_client(conn, conn.s2c.popleft())

    def _to_client(self, conn: SimConn, item: str | Close) -> None:
        trace(lambda: f"  client <- {conn.number}: {item!r}")
        client = self.c
        self.handoff_seen = self.handoff_seen or "SANDBOX_LOCK_RELEASE_REQUESTED" in str(item)
        if isinstance(item, Close):
            self._client_lost(conn, int(item))
        elif client.is_ended:
            self._late(lambda: client.receive(item))
        else:
            client.receive(item)
        self._collect()

    def _client_lost(self, conn: SimConn, code: int) -> None:
        """The adapter reports the socket closed; what it had not yet read is gone."""
        conn.client_open = False
        conn.s2c.clear()
        if self.conn is conn:
            self.conn = None
        if self.writing_conn is conn:
            self.writing, self.writing_conn = [], None  # written into a dead socket
        client = self.c
        if client.is_ended:
            self._late(lambda: client.connection_closed(code, now=self.now))
        else:
            client.connection_closed(code, now=self.now)

    @precondition(lambda self: any(c.streaming is not None and c.server_open for c in self.conns))
    @rule()
    def pump(self) -> None:
        """The server's forwarders send the output they have, and DONE once the exec is over."""
        for conn in list(self.conns):
            if conn.streaming is not None and conn.server_open:
                self._pump(conn)

    @rule(picks=choices)
    def settle(self, picks: list[bool]) -> None:
        """Deliver everything both ways until nothing is in flight."""
        pick = Picker(picks, self.rng)
        for _ in range(50):
            self._flush_writes()
            moved = False
            for conn in list(self.conns):
                while conn.c2s and conn.server_open:
                    self._server_handle(conn, conn.c2s.popleft(), pick)
                    moved = True
                if conn.streaming is not None and conn.server_open:
                    before = len(conn.s2c)
                    self._pump(conn)
                    moved = moved or len(conn.s2c) != before or conn.streaming is None
            conn = self.conn
            while conn is not None and self.conn is conn and conn.s2c:
                self._to_client(conn, conn.s2c.popleft())
                moved = True
            if not moved and not self.writing:
                break
        self._check_quiet()

    @precondition(lambda self: self.conn is not None and not self.conn.cut)
    @rule(keep_c2s=st.integers(0, 3), keep_s2c=st.integers(0, 3), client_notices=st.booleans())
    def cut(self, keep_c2s: int, keep_s2c: int, client_notices: bool) -> None:
        """TCP dies silently: the tail of what each side had written is lost, and everything after it."""
        conn = self.conn
        assert conn is not None
        self._flush_writes()
        while len(conn.c2s) > keep_c2s:
            conn.c2s.pop()
        while len(conn.s2c) > keep_s2c:
            conn.s2c.pop()
        conn.cut = True
        self.reach.add("black hole")
        if client_notices:
            self.client_notices_cut(0)

    @precondition(lambda self: self.client is not None and self.client.state is SandboxState.RUNNING)
    @rule(keep_c2s=st.integers(0, 2), keep_s2c=st.integers(0, 2), server_notices=st.booleans())
    def network_blip(self, keep_c2s: int, keep_s2c: int, server_notices: bool) -> None:
        """The common drop: the socket dies mid-flight, the client reconnects at once."""
        if self.conn is None or self.conn.cut:
            return
        self.cut(keep_c2s, keep_s2c, client_notices=True)
        self._reconnect_now(server_notices)

    def _reconnect_now(self, server_notices: bool) -> None:
        for _ in range(3):  # a reattach refused with IN_USE is retried once the server noticed
            if server_notices:
                self.server_notices_all()
            if self.reconnect_due is None:
                break
            self.begin_handshake(0.0, "settle")
            server_notices = True

    def _has_started_exec(self) -> bool:
        return any(m.started and m.ended is None for m in self.execs.values())

    @precondition(
        lambda self: self.client is not None and self.client.state is SandboxState.RUNNING and self._has_started_exec()
    )
    @rule(
        before=st.lists(texts, min_size=1, max_size=3),
        read=st.integers(0, 3),
        keep_s2c=st.integers(0, 2),
        during=st.lists(texts, max_size=2),
        server_notices=st.booleans(),
    )
    def stdin_through_a_drop(
        self, before: list[str], read: int, keep_s2c: int, during: list[str], server_notices: bool
    ) -> None:
        """The window of stdin_seq: stdin in flight when the socket dies, more written while reconnecting."""
        for data in before:
            self.user_stdin("latest", data, "race")
        self._flush_writes()
        conn = self.conn
        if conn is not None and read and conn.c2s:
            self.deliver_to_server(read, [])  # the server read some of it (and may have answered)
        if self.conn is not None and not self.conn.cut:
            self.cut(0, keep_s2c, client_notices=True)
        for data in during:
            self.user_stdin("latest", data, "race")
        self._reconnect_now(server_notices)

    @precondition(lambda self: self.conn is not None and self.conn.cut)
    @rule(unsent=st.integers(0, 3))
    def client_notices_cut(self, unsent: int) -> None:
        """The client's keepalive (or a failed send) finds the socket dead."""
        conn = self.conn
        assert conn is not None
        if unsent and self.writing and self.writing_conn is conn:
            self.c.send_failed(self.writing[-unsent:])
            self.reach.add("send_failed")
        self._client_lost(conn, 1006)
        self._collect()

    @precondition(lambda self: any(c.server_open and (c.cut or not c.client_open) for c in self.conns))
    @rule()
    def server_notices(self) -> None:
        """The server finds its dead sockets; what they had not read is lost."""
        for conn in self.conns:
            if conn.server_open and (conn.cut or not conn.client_open):
                self._server_detach(conn)

    @precondition(lambda self: self.conn is not None and self.conn.server_open and not self.conn.closing)
    @rule(code=st.sampled_from([1011, 1012, 1001, 4000]), fire=rarely)
    def server_closes(self, code: int, fire: bool) -> None:
        """The server closes the socket on its own (restart, internal error)."""
        conn = self.conn
        assert conn is not None
        if fire:
            conn.proto.close(code)
            self._push(conn)

    @precondition(lambda self: any(c.closing and c.client_open for c in self.conns))
    @rule()
    def close_completes(self) -> None:
        """The socket the client asked to close is closed: the server reads what preceded the close."""
        conn = next(c for c in self.conns if c.closing and c.client_open)
        if not conn.cut and not conn.abort:
            pick = Picker([], self.rng)
            while conn.c2s and conn.server_open:
                self._server_handle(conn, conn.c2s.popleft(), pick)
        conn.cut = True
        self._server_detach(conn)
        self._client_lost(conn, 1006 if conn.abort else 1000)
        self._collect()

    # ------------------------------------------------------------------
    # rules: the sandbox's own life

    def _running_exec(self) -> SimExec | None:
        sb = self.sandbox
        if sb is None or sb.state != "running" or sb.execution is None or not sb.execution.running:
            return None
        return sb.execution

    @precondition(lambda self: self._running_exec() is not None)
    @rule(stream=st.sampled_from(["stdout", "stderr"]), data=texts, then=thens)
    def process_writes(self, stream: str, data: str, then: str) -> None:
        ex = self._running_exec()
        assert ex is not None
        self._process_output(ex, stream, data)
        self._then(then)

    @precondition(lambda self: self._running_exec() is not None)
    @rule(code=st.integers(-15, 3), then=thens)
    def process_exits(self, code: int, then: str) -> None:
        ex = self._running_exec()
        assert ex is not None and self.sandbox is not None
        ex.running, ex.exit_code = False, code
        observer = self.sandbox.observer
        if observer is not None and observer.streaming is ex:
            self._pump(observer)
        self._then(then)

    @precondition(lambda self: self.sandbox is not None and self.sandbox.state == "running")
    @rule(fire=rarely)
    def idle_expiry(self, fire: bool) -> None:
        """7.9: DELETING, DELETED on the attached connection, which stays open."""
        sb = self.sandbox
        assert sb is not None
        if fire and self._running_exec() is None:
            self._delete(sb, "deleted")
            if sb.observer is not None:
                self._push(sb.observer)

    @precondition(lambda self: self.sandbox is not None and self.sandbox.state == "running")
    @rule(fire=rarely)
    def handoff(self, fire: bool) -> None:
        """7.10: another instance takes the sandbox; the attached connection is told and left open."""
        sb = self.sandbox
        assert sb is not None
        if not fire or not sb.checkpointable:
            return
        observer = sb.observer
        if observer is not None:
            observer.proto.send_status(Status.SANDBOX_LOCK_RELEASE_REQUESTED)
            observer.proto.send_status(Status.SANDBOX_CHECKPOINTING)
            if sb.execution is not None and sb.execution.running:
                observer.proto.send_status(Status.SANDBOX_EXECUTION_FORCE_KILLED)
        self._delete(sb, "checkpointed", lock=True)
        sb.observer = None
        if observer is not None:
            observer.proto.send_status(Status.SANDBOX_CHECKPOINTED)
            self._push(observer)
            observer.sandbox = SimSandbox(sb.id, sb.token, False, None, "deleted")  # what is left on this instance
        self.reach.add("handoff")

    # ------------------------------------------------------------------
    # rules: the user, in any state

    def _then(self, then: str) -> None:
        if then == "settle":
            self.settle([])

    def _target(self, which: str) -> int:
        latest = max(self.execs, default=1)
        return {"latest": latest, "previous": latest - 1, "bogus": 999}[which]

    def _call(self, call: Call, action: Callable[[], Any], *, allowed: bool | None = True) -> Any:
        """Make a user call and check it against CALL_TABLE.

        ``allowed``: the call's own precondition holds (``True``), fails (``False``: it must
        raise or change nothing), or the core may do either (``None``).
        """
        client = self.c
        state = client.state
        verdict = CALL_TABLE[state][call]
        self.reach.add(f"call in state {state.value}")
        try:
            result = action()
        except LocalProtocolError:
            assert verdict is Verdict.REFUSE or allowed is not True, f"{call} in {state} ({verdict}) raised"
            assert client.state is state and not client.has_data_to_send, (call, state)
            assert client.events() == []
            return None
        assert verdict is not Verdict.REFUSE, f"{call} in {state} should have been refused"
        if verdict is Verdict.END:
            assert client.is_ended, (call, state, client.state)
        elif verdict is Verdict.IGNORE or allowed is False:
            assert client.state is state and not client.has_data_to_send, (call, state, verdict)
        elif verdict is Verdict.HOLD:
            assert not client.has_data_to_send, f"{call} in {state} is held, not sent"
        self._collect()
        return result

    def _exec_allowed(self) -> bool:
        busy = [m for m in self.execs.values() if m.open]
        # One process at a time; one more may wait behind an abandoned one.
        return not busy or (len(busy) == 1 and busy[0].abandoned)

    @rule(language=st.sampled_from(["python", "bash", "bash", "ruby"]), then=thens)
    def user_exec(self, language: str, then: str) -> None:
        code = f"#{len(self.code_owner)}"
        allowed = self._exec_allowed()
        before = self.c.state
        exec_id = self._call(Call.EXEC, lambda: self.c.exec(language, code), allowed=allowed)
        if exec_id is None:
            return
        assert exec_id not in self.execs
        self.code_owner[code] = (self.session, exec_id)
        self.execs[exec_id] = model = ExecModel(exec_id)
        queued = model.queued = len([m for m in self.execs.values() if m.open]) > 1
        if CALL_TABLE[before][Call.EXEC] is Verdict.SEND and not queued:
            assert any('"language"' in f for f in self.writing), "an exec in RUNNING is sent at once"
        self._then(then)

    @precondition(lambda self: self.client is not None and self.client.state is SandboxState.RUNNING)
    @rule(
        language=st.sampled_from(["python", "bash"]),
        inputs=st.lists(texts, max_size=3),
        close=rarely,
        then=thens,
    )
    def user_runs_a_process(self, language: str, inputs: list[str], close: bool, then: str) -> None:
        """What most users do: start a process, feed it, maybe close its input (each call checked as above)."""
        self.user_exec(language, "settle")
        exec_id = max(self.execs, default=0)
        for data in inputs:
            self.user_stdin("latest", data, "race")
        if close and exec_id in self.execs:
            self.user_close_stdin("latest", "race")
        self._then(then)

    def _stdin_allowed(self, exec_id: int) -> bool | None:
        """``True``: must be accepted; ``False``: must be refused; ``None``: either (not started yet)."""
        model = self.execs.get(exec_id)
        if model is None or not model.open or model.closed:
            return False
        # Before its start the core may buffer it (7.4) or refuse it (queued behind an abandoned exec).
        return True if model.started else None

    @rule(which=targets, data=texts, then=thens)
    def user_stdin(self, which: str, data: str, then: str) -> None:
        exec_id = self._target(which)
        allowed = self._stdin_allowed(exec_id)
        done = self._call(Call.STDIN, lambda: self.c.write_stdin(exec_id, data) or True, allowed=allowed)
        if done and allowed is not False:
            self.execs[exec_id].written.append(data)
        self._then(then)

    @rule(which=targets, then=thens)
    def user_close_stdin(self, which: str, then: str) -> None:
        exec_id = self._target(which)
        allowed = self._stdin_allowed(exec_id)
        granted = EXT_CLOSE_STDIN in self.c.extensions
        done = self._call(
            Call.CLOSE_STDIN, lambda: self.c.close_stdin(exec_id) or True, allowed=allowed if granted else False
        )
        if done and allowed is not False and granted:
            model = self.execs[exec_id]
            model.written.append(None)
            model.closed = True
        self._then(then)

    @rule(which=targets, then=thens)
    def user_kill_process(self, which: str, then: str) -> None:
        exec_id = self._target(which)
        model = self.execs.get(exec_id)
        live = model is not None and model.open
        # Before its start the core kills it once it starts, or ignores it (queued behind an abandoned one).
        self._call(Call.KILL_PROCESS, lambda: self.c.kill_process(exec_id), allowed=None if live else False)
        if live and model is not None:
            model.kills_asked += 1
            model.kill_timer = model.kill_timer or model.started
        self._then(then)

    @rule(which=targets, then=thens)
    def user_abandon_exec(self, which: str, then: str) -> None:
        """The exec's start timed out (or its caller was cancelled): the adapter abandons it."""
        exec_id = self._target(which)
        model = self.execs.get(exec_id)
        if model is None or model.started or not model.open:
            return  # the adapter abandons only an exec it is still waiting for
        model.abandoned = True
        model.kills_asked += 1
        # Still waiting behind another abandoned exec: withdrawn, and its caller is gone.
        model.withdrawn = model.queued and any(m.open for i, m in self.execs.items() if i < exec_id)
        self.c.abandon_exec(exec_id)
        self._collect()
        self._then(then)

    @rule(fire=rarely, then=thens)
    def user_kill_sandbox(self, fire: bool, then: str) -> None:
        if not fire:
            return
        verdict = CALL_TABLE[self.c.state][Call.KILL_SANDBOX]
        first = self.kill_sandbox is None and verdict in (Verdict.SEND, Verdict.HOLD)
        if first:
            self.kill_sandbox = "waiting"  # before the call: its answer may come with it
        self._call(Call.KILL_SANDBOX, self.c.kill_sandbox)
        if first and verdict is Verdict.SEND:
            assert any("kill_sandbox" in f for f in self.writing), "kill_sandbox in RUNNING is sent at once"
        self._then(then)

    @rule(fire=rarely, then=thens)
    def user_checkpoint(self, fire: bool, then: str) -> None:
        if not fire:
            return
        verdict = CALL_TABLE[self.c.state][Call.CHECKPOINT]
        if self._call(Call.CHECKPOINT, lambda: self.c.checkpoint() or True, allowed=not self.checkpoint_waiting):
            self.checkpoint_waiting = self.checkpoint_asked = True
            if verdict is Verdict.SEND:
                assert any('"checkpoint"' in f for f in self.writing), "a checkpoint in RUNNING is sent at once"
        self._then(then)

    @rule(name=st.sampled_from(["snap-1", "snap-2"]), then=thens)
    def user_snapshot(self, name: str, then: str) -> None:
        verdict = CALL_TABLE[self.c.state][Call.SNAPSHOT]
        allowed = not self.snapshot_waiting
        if self._call(Call.SNAPSHOT, lambda: self.c.snapshot_filesystem(name) or True, allowed=allowed):
            self.snapshot_waiting = True
            if verdict is Verdict.SEND:
                assert any("snapshot_filesystem" in f for f in self.writing), "a snapshot in RUNNING is sent at once"
        self._then(then)

    @rule(fire=rarely)
    def user_close(self, fire: bool) -> None:
        if fire:
            self._call(Call.CLOSE, self.c.close)

    @rule(
        timer=st.sampled_from(["kill_process", "kill_process", "checkpoint", "snapshot", "kill_sandbox", "setup"]),
        fire=rarely,
        which=targets,
    )
    def timer_fires(self, timer: str, fire: bool, which: str) -> None:
        """One of the adapter's timeouts, whenever the adapter would have one running."""
        client = self.c
        if timer == "setup" and not fire:
            return  # a failed setup ends the session: rarely, so that runs get deep
        if timer == "kill_process":
            exec_id = self._target(which)
            model = self.execs.get(exec_id)
            if model is None or not model.kill_timer:
                return  # the adapter runs a kill timer only for a process it handed out
            was_running = model.ended is None
            if client.kill_process_timed_out(exec_id):
                self._collect()
                assert model.ended is not None, f"kill of {exec_id} timed out as over, but it never ended"
                model.ended_early = model.ended_early or was_running
            else:
                self._collect()
                assert model.ended is None
            self.reach.add("kill_process timed out")
        elif timer == "checkpoint" and self.checkpoint_waiting:
            client.checkpoint_timed_out()
            self.checkpoint_waiting = False  # the caller got the timeout: no answer is owed any more
            self._collect()
        elif timer == "snapshot" and self.snapshot_waiting:
            client.snapshot_timed_out()
            self.snapshot_waiting = False
            self._collect()
        elif timer == "kill_sandbox" and self.kill_sandbox == "waiting":
            client.kill_sandbox_timed_out()
            self._collect()
            assert self.kill_sandbox == "answered" and client.is_ended, self.events
        elif timer == "setup" and client.state in (
            SandboxState.CONNECTING,
            SandboxState.CREATING,
            SandboxState.ATTACHING,
            SandboxState.RESTORING,
        ):
            client.operation_timed_out("opening the sandbox")
            self._collect()
            assert client.is_ended

    # ------------------------------------------------------------------
    # invariants

    @invariant()
    def ended_states_absorb(self) -> None:
        if self.client is not None:
            self._check_ended()
            if self.client.is_ended:
                assert self.client.state in ENDED_STATES

    @invariant()
    def stdin_in_order_exactly_once(self) -> None:
        for exec_id, model in self.execs.items():
            if model.foreign:
                continue
            ex = self._sim_exec(exec_id)
            got = ex.stdin if ex is not None else []
            if self._granted(EXT_STDIN_SEQ):
                assert got == model.written[: len(got)], (exec_id, got, model.written)
                assert not model.stdin_incomplete, f"StdinIncomplete({exec_id}) although stdin_seq was granted"
            else:
                assert _is_subsequence(got, model.written), (exec_id, got, model.written)

    @invariant()
    def output_in_order_and_with_seq_exactly_once(self) -> None:
        for exec_id, model in self.execs.items():
            if model.foreign:
                continue
            ex = self._sim_exec(exec_id)
            wrote = [(stream, data) for _, stream, data in ex.chunks] if ex is not None else []
            got = model.output
            assert _is_subsequence(got, wrote), (exec_id, got, wrote)
            if self._granted(EXT_SEQ) and not model.output_incomplete:
                assert got == wrote[: len(got)], (exec_id, got, wrote)
                ended = model.ended
                if isinstance(ended, ProcessEnded) and ended.error is None and not model.ended_early:
                    assert got == wrote, ("ended normally with output missing", exec_id, got, wrote)
            ended = model.ended
            normal = isinstance(ended, ProcessEnded) and ended.error is None and not model.ended_early
            if normal and ex is not None and not ex.running and self._granted(EXT_EXIT_CODE):
                assert isinstance(ended, ProcessEnded)
                assert ended.returncode in (ex.exit_code, None), (ended, ex.exit_code)

    def _granted(self, extension: str) -> bool:
        return extension in self.extensions

    def _quiet(self) -> bool:
        conn = self.conn
        if self.client is None or self.client.state is not SandboxState.RUNNING or conn is None:
            return False
        live = conn.server_open and not conn.cut and not conn.closing
        return live and not conn.c2s and not conn.s2c and not self.writing

    def _check_quiet(self) -> None:
        """Nothing in flight, the sandbox running on a live socket: everything written has arrived."""
        if not self._quiet():
            return
        for exec_id, model in self.execs.items():
            ex = self._sim_exec(exec_id)
            if ex is None or not ex.running or model.ended is not None or not model.started:
                continue
            missing = len(model.written) - len(ex.stdin)
            if self._granted(EXT_STDIN_SEQ):
                assert missing == 0, ("stdin not delivered on a quiet socket", exec_id, ex.stdin, model.written)
            elif missing:
                assert model.stdin_incomplete, ("stdin lost without StdinIncomplete", exec_id, ex.stdin, model.written)
            self.reach.add("quiet with a running exec")

    # ------------------------------------------------------------------
    # the end of a session

    def teardown(self) -> None:
        self._finish_session()
        if not currently_in_test_context():
            return  # called by a regression test
        for name in sorted(self.reach):
            event(f"reach: {name}")
        event(f"sessions: {min(self.session + 1, 3)}")
        event(f"first session ended {self.endings[0]}")

    def _drain(self) -> None:
        """Let the peer answer: the server notices dead sockets, the adapter reconnects, all is delivered."""
        for _ in range(8):
            if self.client is None or self.client.is_ended:
                return
            self.server_notices_all()
            if self.conn is not None and self.conn.cut:
                self.client_notices_cut(0)
            if self.reconnect_due is not None:
                self.begin_handshake(0.0, "race")
            if self.handshake is not None:
                self.handshake_completes("open", "race")
            if self.conn is not None:
                self.settle([])

    def server_notices_all(self) -> None:
        for conn in self.conns:
            if conn.server_open and (conn.cut or not conn.client_open):
                self._server_detach(conn)

    def _finish_session(self) -> None:
        """Let the peer answer, end the session if it is not over, then check every request was answered."""
        client = self.client
        if client is None:
            return
        self._drain()
        if not client.is_ended:
            client.close()
            self._collect()
        if self.conn is not None and self.conn.client_open:
            self.close_completes()
        assert [type(e) for e in self.events].count(SessionEnded) == 1, self.events
        ended = next(e for e in self.events if isinstance(e, SessionEnded))
        self.endings.append(f"{self.ended_state and self.ended_state.value} ({type(ended.error).__name__})")
        for exec_id, model in self.execs.items():
            assert model.ended is not None or model.withdrawn, (exec_id, "never ended", self.events)
        assert not self.checkpoint_waiting, ("checkpoint never answered", self.events)
        assert not self.snapshot_waiting, ("snapshot never answered", self.events)
        assert self.kill_sandbox != "waiting", ("kill_sandbox never answered", self.events)
        self.stdin_in_order_exactly_once()
        self.output_in_order_and_with_seq_exactly_once()


BackToBack.TestCase.settings = settings(
    max_examples=examples(200),
    stateful_step_count=60,
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
    machine.start(mode="create", grant="upstream", auto_reconnect=True, checkpointable=False, retain=None, seed=0)
    machine.handshake_completes("open", "settle")
    machine.cut(keep_c2s=0, keep_s2c=0, client_notices=True)
    machine.begin_handshake(0.0, "race")
    machine.handshake_completes(403, "race")
    assert machine.c.is_ended
    assert machine.c.state is SandboxState.FAILED
    machine.ended_states_absorb()
    machine.teardown()
