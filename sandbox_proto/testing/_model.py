"""The reference model: what a conforming server sends, with the latitude the protocol allows.

:class:`ReferenceModel` is a simulated server. Each of its connections is a
:class:`~sandbox_proto.ServerProtocol` (the server role, which takes every
wire decision: dispatch, texts, the DONE-iff-idle rule, attach checks,
``reconnect`` replies, extension fields), and behind them is a simulated
sandbox that runs the small deterministic :class:`Program` s the fuzzer
sends, keeps one file, and can be checkpointed, snapshotted and killed.

For each client action it answers with one :class:`Expectation` per
connection that must receive something. An expectation is not a list of
frames but a description with the protocol's latitude (sections 8 and 12):
output is compared as the concatenated text of each stream (chunking and the
interleaving of stdout with stderr are free), some frames may come at any
position (FORCE_KILLED and DONE after a kill, the DONE of an exec ended by
``kill_sandbox``), and texts or values the protocol leaves to the server
(error messages that embed paths, the exit code of a killed process) match
anything. :class:`Matcher` checks received frames against one.

Pure: no I/O, no clock, stdlib only.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from .._frames import Stream
from .._server import (
    ALL_EXTENSIONS,
    MSG_CHECKPOINT_IN_PROGRESS,
    AttachFacts,
    AttachStep,
    CheckpointRequested,
    Close,
    CloseStdinRequested,
    CreateOptions,
    ExecRequested,
    ExecutionView,
    KillProcessRequested,
    KillSandboxRequested,
    ProcessPhase,
    ReconnectRequested,
    RestoreResult,
    ResumeStream,
    ServerProtocol,
    SnapshotRequested,
    StdinReceived,
    valid_snapshot_name,
)
from .._status import Status
from .._url import requested_extensions

__all__ = [
    "ANY",
    "ECHO_EXIT",
    "STATE_FILE",
    "Closed",
    "Expectation",
    "Matcher",
    "Mismatch",
    "Output",
    "Program",
    "ReferenceModel",
]

ProtocolMode = Literal["extended", "upstream"]


class _Any:
    """A value in an expected frame that matches any value."""

    def __repr__(self) -> str:
        return "ANY"


#: Matches any value of a key in an expected frame (the key must still be there).
ANY: Any = _Any()

#: The stdin line that makes an echo program exit with its exit code.
ECHO_EXIT = "exit\n"
#: The file that ``write`` programs write and ``read`` programs read, in the exec's working directory.
STATE_FILE = "fuzz-state"
#: What a ``read`` program prints when the file does not exist.
NO_FILE = "<none>"
_MARKER = "# sandbox-fuzz "
#: The exit code a killed exec reports (extension ``exit_code``): SIGKILL, negative as ``subprocess`` has it.
KILLED_EXIT = -9


# --------------------------------------------------------------------------
# programs


@dataclass(frozen=True, slots=True)
class Program:
    """A small program whose behaviour the model predicts exactly.

    ``output``: writes ``stdout`` then ``stderr``, exits with ``exit_code``.
    ``echo``: copies each stdin line to stdout until end of input (exit 0) or
    the line :data:`ECHO_EXIT` (exit ``exit_code``); it runs until then.
    ``write``: writes ``value`` to :data:`STATE_FILE`. ``read``: prints the
    file, or ``<none>``. The first line of its code (a comment in both
    languages) describes it, so a simulated server can tell what it does.
    """

    kind: Literal["output", "echo", "write", "read"]
    language: Literal["python", "bash"] = "python"
    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    value: str = ""

    def __repr__(self) -> str:
        # A short literal, for reproduction scripts: only the fields that differ from their default.
        parts = [repr(self.kind), repr(self.language)]
        defaults = Program(self.kind)
        for name in ("stdout", "stderr", "exit_code", "value"):
            value = getattr(self, name)
            if value != getattr(defaults, name):
                parts.append(f"{name}={_literal(value)}")
        return f"Program({', '.join(parts)})"

    @property
    def code(self) -> str:
        marker = _MARKER + json.dumps(asdict(self), sort_keys=True, ensure_ascii=True) + "\n"
        return marker + (self._python() if self.language == "python" else self._bash())

    def _python(self) -> str:
        if self.kind == "output":
            return (
                "import sys\n"
                f"sys.stdout.write({self.stdout!r})\n"
                "sys.stdout.flush()\n"
                f"sys.stderr.write({self.stderr!r})\n"
                "sys.stderr.flush()\n"
                f"sys.exit({self.exit_code})\n"
            )
        if self.kind == "echo":
            return (
                "import sys\n"
                "for line in sys.stdin:\n"
                f"    if line == {ECHO_EXIT!r}:\n"
                f"        sys.exit({self.exit_code})\n"
                "    sys.stdout.write(line)\n"
                "    sys.stdout.flush()\n"
            )
        if self.kind == "write":
            return f"with open({STATE_FILE!r}, 'w') as f:\n    f.write({self.value!r})\n"
        return (
            "import os\n"
            f"print(open({STATE_FILE!r}).read() if os.path.exists({STATE_FILE!r}) else {NO_FILE!r}, end='')\n"
        )

    def _bash(self) -> str:
        if self.kind == "output":
            return f"printf '%s' {_sh(self.stdout)}\nprintf '%s' {_sh(self.stderr)} >&2\nexit {self.exit_code}\n"
        if self.kind == "echo":
            return (
                "while IFS= read -r line; do\n"
                f'  if [ "$line" = {_sh(ECHO_EXIT.rstrip())} ]; then exit {self.exit_code}; fi\n'
                "  printf '%s\\n' \"$line\"\n"
                "done\n"
            )
        if self.kind == "write":
            return f"printf '%s' {_sh(self.value)} > {STATE_FILE}\n"
        return f"if [ -f {STATE_FILE} ]; then cat {STATE_FILE}; else printf '%s' {_sh(NO_FILE)}; fi\n"

    @classmethod
    def from_code(cls, code: str) -> Program | None:
        """The program a code text was made from; ``None`` for any other code."""
        first, _, _ = code.partition("\n")
        if not first.startswith(_MARKER):
            return None
        try:
            fields = json.loads(first[len(_MARKER) :])
            program = cls(**fields)
        except (ValueError, TypeError):
            return None
        return program if program.code == code else None


def _sh(text: str) -> str:
    """A bash single-quoted word."""
    return "'" + text.replace("'", "'\\''") + "'"


def _literal(value: object) -> str:
    """``repr``, with long repetitions written as ``'x' * 1500``."""
    if isinstance(value, str) and len(value) > 16:
        for size in range(1, 9):
            unit, count = value[:size], len(value) // size
            if unit * count == value:
                return f"{unit!r} * {count}"
    return repr(value)


# --------------------------------------------------------------------------
# expectations


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection was closed, with this code (1006 when no close frame came)."""

    code: int


@dataclass(frozen=True, slots=True)
class Output:
    """Output frames whose ``data`` concatenates, per stream, to these texts (any chunking, any interleaving)."""

    stdout: str = ""
    stderr: str = ""

    def stream(self, name: str) -> str:
        return self.stdout if name == "stdout" else self.stderr


Pattern = dict[str, Any]
Item = Pattern | Output


@dataclass(slots=True)
class Expectation:
    """What one connection must receive in reply to one action.

    ``items`` come in this order; each of ``floating`` exactly once, at any
    position; then the close with code ``close`` if set (nothing after it).
    """

    items: list[Item] = field(default_factory=list)
    floating: list[Pattern] = field(default_factory=list)
    close: int | None = None
    #: One sequence of frames that meets it: what the model's own server sent (an in-memory server plays it).
    frames: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.items and not self.floating and self.close is None

    def describe(self) -> str:
        parts = [_describe(item) for item in self.items]
        if self.floating:
            parts.append("in any position: " + ", ".join(_describe(p) for p in self.floating))
        if self.close is not None:
            parts.append(f"close {self.close}")
        return "; ".join(parts) or "nothing"


def _describe(item: Item) -> str:
    if isinstance(item, Output):
        shown = [f"{name} {_short(item.stream(name))}" for name in ("stdout", "stderr") if item.stream(name)]
        return "output (" + ", ".join(shown) + ")"
    return json.dumps(item, default=lambda _: "<any>", ensure_ascii=False, separators=(",", ":"))


def _short(text: str, limit: int = 60) -> str:
    return _literal(text) if len(text) <= limit or _literal(text) != repr(text) else repr(text[:limit]) + "..."


def _matches(pattern: Pattern, obj: dict[str, Any]) -> bool:
    if pattern.keys() != obj.keys():
        return False
    return all(want is ANY or want == obj[key] for key, want in pattern.items())


class Mismatch(Exception):
    """A frame (or a close) that the expectation does not allow."""


class Matcher:
    """Checks the frames of one connection, as they come, against an :class:`Expectation`.

    ``seq``: the connection was granted the ``seq`` extension, so every output
    frame carries one and, within one block of output, they grow by 1.
    """

    def __init__(self, expectation: Expectation, *, seq: bool = False) -> None:
        self._items = list(expectation.items)
        self._floating = list(expectation.floating)
        self._close = expectation.close
        self._seq = seq
        self._got = {"stdout": "", "stderr": ""}
        self._last_seq: int | None = None
        self.closed = False
        #: The highest ``seq`` of the output frames seen.
        self.max_seq = 0
        self._settle()

    @property
    def done(self) -> bool:
        # A complete block of output at the end stays current, so that any more output is a mismatch.
        items_done = not self._items or (
            len(self._items) == 1 and isinstance(self._items[0], Output) and self._complete(self._items[0])
        )
        return items_done and not self._floating and (self._close is None or self.closed)

    def missing(self) -> str:
        """What is still expected, for a report."""
        rest = Expectation(self._items, self._floating, None if self.closed else self._close)
        if self._items and isinstance(self._items[0], Output):
            got = ", ".join(f"{name} {_short(text)}" for name, text in self._got.items() if text)
            return f"{rest.describe()} (output so far: {got or 'none'})"
        return rest.describe()

    def feed(self, frame: str | Closed) -> None:
        """Take the next thing received; raise :class:`Mismatch` if it is not allowed here."""
        if self.closed:
            raise Mismatch(f"received {_shown(frame)} after the close")
        if isinstance(frame, Closed):
            self._feed_close(frame)
            return
        try:
            obj = json.loads(frame)
        except ValueError:
            raise Mismatch(f"frame is not JSON: {frame!r}") from None
        if not isinstance(obj, dict):
            raise Mismatch(f"frame is not a JSON object: {frame}")
        if obj.get("event") in ("stdout", "stderr"):
            self._feed_output(frame, obj)
            return
        if self._items and isinstance(self._items[0], Output):
            if not self._complete(self._items[0]):
                # A floating frame may come in the middle of a block of output.
                self._take_floating(frame, obj, f"the rest of the output ({self.missing()})")
                return
            self._next_item()
        if self._items and not isinstance(self._items[0], Output) and _matches(self._items[0], obj):
            self._next_item()
            return
        self._take_floating(frame, obj, self.missing())

    def _take_floating(self, frame: str, obj: dict[str, Any], wanted: str) -> None:
        for index, pattern in enumerate(self._floating):
            if _matches(pattern, obj):
                del self._floating[index]
                return
        raise Mismatch(f"expected {wanted}, got {frame}")

    def _feed_close(self, frame: Closed) -> None:
        if self._items and isinstance(self._items[0], Output) and self._complete(self._items[0]):
            self._next_item()
        if self._items or self._floating or self._close is None:
            raise Mismatch(f"connection closed ({frame.code}) while expecting {self.missing()}")
        if frame.code != self._close:
            raise Mismatch(f"expected close {self._close}, got close {frame.code}")
        self.closed = True

    def _feed_output(self, frame: str, obj: dict[str, Any]) -> None:
        item = self._items[0] if self._items else None
        if not isinstance(item, Output):
            raise Mismatch(f"expected {self.missing()}, got output {frame}")
        data, seq = obj.get("data"), obj.get("seq")
        keys = {"event", "data", "seq"} if self._seq else {"event", "data"}
        if obj.keys() != keys or not isinstance(data, str):
            raise Mismatch(f"malformed output frame (expected the keys {sorted(keys)}): {frame}")
        if self._seq:
            if type(seq) is not int or seq < 1 or (self._last_seq is not None and seq != self._last_seq + 1):
                after = "" if self._last_seq is None else f" after {self._last_seq}"
                raise Mismatch(f"'seq' must grow by 1 with every output frame{after}: {frame}")
            self._last_seq = seq
            self.max_seq = max(self.max_seq, seq)
        stream = obj["event"]
        got = self._got[stream] + data
        want = item.stream(stream)
        if not want.startswith(got):
            raise Mismatch(f"{stream} so far is {_short(got)}, not a beginning of the expected {_short(want)}")
        self._got[stream] = got

    def _complete(self, item: Output) -> bool:
        return self._got["stdout"] == item.stdout and self._got["stderr"] == item.stderr

    def _next_item(self) -> None:
        self._items.pop(0)
        self._got = {"stdout": "", "stderr": ""}
        self._last_seq = None
        self._settle()

    def _settle(self) -> None:
        # A block of output that is complete (or expects nothing) ends where the next frame begins.
        while self._items and isinstance(self._items[0], Output) and self._complete(self._items[0]):
            if len(self._items) == 1 and (self._got["stdout"] or self._got["stderr"]):
                return  # the last item stays, so that more output than expected is a mismatch
            self._items.pop(0)
            self._got = {"stdout": "", "stderr": ""}
            self._last_seq = None


def _shown(frame: str | Closed) -> str:
    return f"close {frame.code}" if isinstance(frame, Closed) else frame


# --------------------------------------------------------------------------
# the simulated sandbox


@dataclass(slots=True)
class _Exec:
    program: Program | None
    first_seq: int
    last_seq: int
    running: bool = True
    killed: bool = False
    exit_code: int | None = None
    done_delivered: bool = False
    #: The connection streaming its frames, ``None`` once that one is gone.
    streamer: str | None = None
    #: Its output as the simulated process wrote it: (abstract seq, stream, data).
    writes: list[tuple[int, Stream, str]] = field(default_factory=list)


@dataclass(slots=True)
class _Sandbox:
    sandbox_id: str
    token: str
    checkpointable: bool
    handoff: bool
    file: str | None
    state: Literal["live", "checkpointed", "killed"] = "live"
    observer: str | None = None
    #: Its observer was dropped: until it attaches again, the server may not have noticed (IN_USE).
    dropped: bool = False
    execution: _Exec | None = None
    #: Output frames are counted per write here (``seq`` in the model); only order relations matter.
    seq: int = 0
    delivered: int = 0
    #: Incremented by each restore: the output log starts afresh.
    generation: int = 0

    def phase(self) -> ProcessPhase:
        ex = self.execution
        if self.state != "live" or ex is None:
            return ProcessPhase.NONE
        if ex.running:
            return ProcessPhase.RUNNING
        return ProcessPhase.NONE if ex.killed else ProcessPhase.EXITED

    def view(self) -> ExecutionView | None:
        ex = self.execution
        if ex is None:
            return None
        return ExecutionView(
            running=ex.running,
            done_delivered=ex.done_delivered,
            first_seq=ex.first_seq,
            last_seq=ex.last_seq,
            delivered=self.delivered,
            exit_code=ex.exit_code,
        )


@dataclass(slots=True)
class _Conn:
    name: str
    proto: ServerProtocol
    sandbox: _Sandbox | None = None
    open: bool = True
    #: ``/create`` before its init message.
    awaiting_init: bool = False
    #: The highest (model) seq this connection has been handed while streaming.
    cursor: int = 0


_LOCK_TAKEN = (Status.SANDBOX_LOCK_ACQUIRING, Status.SANDBOX_LOCK_ACQUIRED)
_LOCK_GIVEN = (Status.SANDBOX_LOCK_RELEASING, Status.SANDBOX_LOCK_RELEASED)


def _status(status: Status, **extra: Any) -> Pattern:
    return {"event": "status_update", "status": str(status), **extra}


class ReferenceModel:
    """A simulated conforming server, answering each action with what every connection must receive.

    Drive it with what a client sends: :meth:`connect` (the handshake's path
    and query), :meth:`receive` (one text frame) and :meth:`drop` (the
    connection is cut). ``protocol="upstream"`` grants no extension, as the
    upstream server; ``checkpoints``/``snapshots`` say whether the server has
    that storage. Sandbox ids and tokens are the model's own; a driver of a
    real server maps them to the real ones.
    """

    def __init__(
        self, *, protocol: ProtocolMode = "extended", checkpoints: bool = True, snapshots: bool = True
    ) -> None:
        self.protocol = protocol
        self.checkpoints = checkpoints
        self.snapshots = snapshots
        self.supported: tuple[str, ...] = ALL_EXTENSIONS if protocol == "extended" else ()
        self._conns: dict[str, _Conn] = {}
        self._sandboxes: dict[str, _Sandbox] = {}
        #: Snapshot name -> the file it holds (``None``: no file).
        self.snapshot_files: dict[str, str | None] = {}
        self._out: dict[str, Expectation] = {}

    # -- what a driver may ask

    def sandbox_id(self, conn: str) -> str | None:
        """The model id of the sandbox this connection is (or was last) about."""
        sandbox = self._conns[conn].sandbox
        return None if sandbox is None else sandbox.sandbox_id

    def token(self, sandbox_id: str) -> str:
        return self._sandboxes[sandbox_id].token

    def granted(self, conn: str) -> frozenset[str]:
        """Extensions granted on the connection."""
        return self._conns[conn].proto.extensions

    def is_open(self, conn: str) -> bool:
        return conn in self._conns and self._conns[conn].open

    def attached(self, conn: str) -> bool:
        """Open, set up, and observing a live sandbox."""
        c = self._conns.get(conn)
        return c is not None and c.open and c.sandbox is not None and c.sandbox.observer == conn

    def state(self, sandbox_id: str) -> Literal["live", "checkpointed", "killed"]:
        return self._sandboxes[sandbox_id].state

    def observer(self, sandbox_id: str) -> str | None:
        return self._sandboxes[sandbox_id].observer

    def may_be_in_use(self, sandbox_id: str) -> bool:
        """Its observer was dropped and no one attached since: the server may not have noticed yet."""
        sandbox = self._sandboxes.get(sandbox_id)
        return sandbox is not None and sandbox.dropped

    def generation(self, sandbox_id: str) -> int:
        return self._sandboxes[sandbox_id].generation

    def running_program(self, sandbox_id: str) -> Program | None:
        """The program of the exec running in the sandbox, if any."""
        sandbox = self._sandboxes[sandbox_id]
        ex = sandbox.execution
        return ex.program if ex is not None and ex.running and sandbox.state == "live" else None

    def streamed_by(self, sandbox_id: str) -> str | None:
        """The connection that receives the running exec's output; ``None`` when nobody does."""
        ex = self._sandboxes[sandbox_id].execution
        return None if ex is None or not ex.running else ex.streamer

    def delivered(self, sandbox_id: str) -> int:
        """The model's ``seq`` of the last output handed to a connection (what "all seen" means to it)."""
        return self._sandboxes[sandbox_id].delivered

    def sandbox_ids(self) -> list[str]:
        return list(self._sandboxes)

    # -- what a client does

    def connect(self, conn: str, path: str) -> dict[str, Expectation]:
        """A WebSocket handshake to ``path`` (``/create`` or ``/attach/<id>?sandbox_token=...``)."""
        if conn in self._conns:
            raise ValueError(f"connection {conn!r} exists already")
        parts = urlsplit(path)
        requested = requested_extensions(parts.query)
        create = parts.path == "/create"
        proto = ServerProtocol(
            create=create,
            extensions=self.supported,
            requested=requested,
            checkpoint_enabled=self.checkpoints,
            snapshots_enabled=self.snapshots,
        )
        c = self._conns[conn] = _Conn(conn, proto, awaiting_init=create)
        self._out = {}
        if create:
            return {}  # the server waits for the init message (2.2)
        match = re.fullmatch(r"/attach/([^/]+)", parts.path)
        if match is None:
            raise ValueError(f"not a path of the protocol: {path!r}")
        tokens = parse_qs(parts.query, keep_blank_values=True).get("sandbox_token", [""])
        self._attach(c, unquote(match[1]), tokens[0])
        return self._flush()

    def receive(self, conn: str, text: str) -> dict[str, Expectation]:
        """One text frame from the client on ``conn``."""
        c = self._conns[conn]
        if not c.open:
            raise ValueError(f"connection {conn!r} is closed")
        self._out = {}
        if c.awaiting_init:
            c.awaiting_init = False
            options = c.proto.receive_init(text)
            if options is not None:
                self._create(c, options)
            return self._flush()
        sandbox = c.sandbox
        assert sandbox is not None and sandbox.observer == conn, "frames on a connection that is not attached"
        c.proto.process = sandbox.phase()
        request = c.proto.receive(text)
        if isinstance(request, ExecRequested):
            self._exec(c, sandbox, request)
        elif isinstance(request, StdinReceived):
            self._stdin(sandbox, request.data)
        elif isinstance(request, CloseStdinRequested):
            ex = sandbox.execution
            if ex is not None and ex.running:
                self._end(sandbox, ex, 0)
        elif isinstance(request, KillProcessRequested):
            self._kill_process(c, sandbox)
        elif isinstance(request, KillSandboxRequested):
            self._kill_sandbox(c, sandbox)
        elif isinstance(request, CheckpointRequested):
            self._checkpoint(c, sandbox)
        elif isinstance(request, SnapshotRequested):
            self._snapshot(c, sandbox, request.name)
        elif isinstance(request, ReconnectRequested):
            self._reconnect(c, sandbox, request)
        return self._flush()

    def drop(self, conn: str) -> None:
        """The connection is cut (no close frame); the server notices on its own, some time later."""
        c = self._conns[conn]
        c.open = False
        c.proto.closed = True  # nothing more is sent on it
        sandbox = c.sandbox
        if sandbox is not None and sandbox.observer == conn:
            sandbox.observer = None
            sandbox.dropped = True
            ex = sandbox.execution
            if ex is not None and ex.streamer == conn:
                ex.streamer = None

    # -- the server's work

    def _emit(self, c: _Conn, *floating: Pattern) -> None:
        """Move what ``c``'s protocol queued into its expectation; ``floating`` may come anywhere."""
        exp = self._out.setdefault(c.name, Expectation())
        for item in c.proto.data_to_send():
            if isinstance(item, Close):
                exp.close = int(item)
                c.open = False
                continue
            exp.frames.append(item)
            obj = json.loads(item)
            event = obj.get("event")
            if event in ("stdout", "stderr"):
                # Output is compared as text per stream: consecutive frames make one block.
                last = exp.items[-1] if exp.items else None
                block = last if isinstance(last, Output) else Output()
                grown = block.stdout + obj["data"] if event == "stdout" else block.stdout
                block = Output(grown, block.stderr + obj["data"] if event == "stderr" else block.stderr)
                if isinstance(last, Output):
                    exp.items[-1] = block
                else:
                    exp.items.append(block)
            elif event == "sandbox_id":
                exp.items.append({"event": "sandbox_id", "sandbox_id": ANY, "sandbox_token": ANY})
            else:
                exp.items.append(obj)
        exp.floating.extend(floating)
        exp.frames.extend(json.dumps(p, separators=(",", ":"), ensure_ascii=False) for p in floating)

    def _any_message(self, c: _Conn) -> None:
        """The last error frame queued: its text is the server's (it embeds paths or ids)."""
        exp = self._out.get(c.name)
        if exp is not None:
            for item in reversed(exp.items):
                if isinstance(item, dict) and item.get("event") == "error":
                    item["message"] = ANY
                    return

    def _flush(self) -> dict[str, Expectation]:
        for c in self._conns.values():
            self._emit(c)
        out, self._out = self._out, {}
        return {name: exp for name, exp in out.items() if not exp.empty}

    def _create(self, c: _Conn, options: CreateOptions) -> None:
        name = options.filesystem_snapshot_name
        if name is not None and name not in self.snapshot_files:
            # The lock is taken before the snapshot is looked for, and released before the error (7.1).
            for status in (*_LOCK_TAKEN, *_LOCK_GIVEN) if options.enable_sandbox_handoff else ():
                c.proto.send_status(status)
            c.proto.fail_creation("no such snapshot")
            self._emit(c)
            self._any_message(c)
            return
        number = len(self._sandboxes) + 1
        sandbox = _Sandbox(
            sandbox_id=f"sandbox-{number:012x}",
            token=f"{number:032x}",
            checkpointable=options.enable_checkpoint,
            handoff=options.enable_sandbox_handoff,
            file=self.snapshot_files[name] if name is not None else None,
            observer=c.name,
        )
        self._sandboxes[sandbox.sandbox_id] = sandbox
        c.sandbox = sandbox
        if sandbox.handoff:
            for status in _LOCK_TAKEN:
                c.proto.send_status(status)
        c.proto.send_sandbox_id(sandbox.sandbox_id, sandbox.token)
        c.proto.send_running()

    def _attach(self, c: _Conn, sandbox_id: str, token: str) -> None:
        sandbox = self._sandboxes.get(sandbox_id)
        c.sandbox = sandbox
        facts = AttachFacts(sandbox_id, token_present=bool(token))
        live = sandbox is not None and sandbox.state == "live"
        if live and token:
            assert sandbox is not None
            facts = AttachFacts(
                sandbox_id,
                token_present=True,
                found=True,
                token_ok=token == sandbox.token,
                observed=sandbox.observer is not None,
                phase=sandbox.phase(),
            )
        step = c.proto.answer_attach(facts)
        if step is AttachStep.RESTORE:
            if sandbox is None or sandbox.state != "checkpointed":
                result = RestoreResult.NOT_FOUND
            elif token != sandbox.token:
                result = RestoreResult.PERMISSION_DENIED  # checked before restoring (S4)
            else:
                result = RestoreResult.RESTORED
                for status in _LOCK_TAKEN if sandbox.handoff else ():
                    c.proto.send_status(status)
                sandbox.state = "live"
                sandbox.execution = None
                sandbox.seq = sandbox.delivered = 0
                sandbox.generation += 1
            facts = AttachFacts(
                sandbox_id,
                token_present=True,
                found=result is RestoreResult.RESTORED,
                restore=result,
                token_ok=result is RestoreResult.RESTORED,
            )
            step = c.proto.answer_attach(facts)
        if step is AttachStep.ATTACHED:
            assert sandbox is not None
            sandbox.observer = c.name
            sandbox.dropped = False

    def _exec(self, c: _Conn, sandbox: _Sandbox, request: ExecRequested) -> None:
        program = Program.from_code(request.code) if request.language in ("python", "bash") else None
        if program is not None and program.language != request.language:
            program = None
        # Output of an earlier exec that nobody streamed is given up (it stays replayable by seq).
        sandbox.delivered = sandbox.seq
        ex = _Exec(program, first_seq=sandbox.seq + 1, last_seq=sandbox.seq, streamer=c.name)
        sandbox.execution = ex
        if program is None:
            raise ValueError("the model runs only the programs of sandbox_proto.testing.Program")
        c.cursor = sandbox.seq
        c.proto.exec_started(request.ref)
        if program.kind == "output":
            self._write(sandbox, "stdout", program.stdout)
            self._write(sandbox, "stderr", program.stderr)
            self._end(sandbox, ex, program.exit_code)
        elif program.kind == "write":
            sandbox.file = program.value
            self._end(sandbox, ex, 0)
        elif program.kind == "read":
            self._write(sandbox, "stdout", NO_FILE if sandbox.file is None else sandbox.file)
            self._end(sandbox, ex, 0)

    def _write(self, sandbox: _Sandbox, stream: Stream, data: str) -> None:
        """The running process writes: its streamer gets it at once, else it waits for a ``reconnect``."""
        ex = sandbox.execution
        if not data or ex is None:
            return
        sandbox.seq += 1
        ex.last_seq = sandbox.seq
        ex.writes.append((sandbox.seq, stream, data))
        streamer = self._conns.get(ex.streamer) if ex.streamer is not None else None
        if streamer is not None and streamer.open:
            streamer.proto.send_output(stream, data, sandbox.seq)
            streamer.cursor = sandbox.delivered = sandbox.seq

    def _end(self, sandbox: _Sandbox, ex: _Exec, exit_code: int | None, *, killed: bool = False) -> None:
        """The process exits; its streamer gets DONE (floating when a kill raced it)."""
        ex.running = False
        ex.killed = killed
        ex.exit_code = KILLED_EXIT if killed else exit_code
        streamer = self._conns.get(ex.streamer) if ex.streamer is not None else None
        if streamer is None or not streamer.open:
            return
        ex.done_delivered = True
        if not killed:
            streamer.proto.exec_finished(exit_code)
            return
        streamer.proto.process = ProcessPhase.NONE
        # Its DONE races the other frames of the kill (7.5, 7.6): it may come anywhere.
        self._emit(streamer, self._done_pattern(streamer))

    def _done_pattern(self, c: _Conn) -> Pattern:
        extra = {"exit_code": KILLED_EXIT} if "exit_code" in c.proto.extensions else {}
        return _status(Status.SANDBOX_EXECUTION_DONE, **extra)

    def _stdin(self, sandbox: _Sandbox, data: str) -> None:
        ex = sandbox.execution
        program = ex.program if ex is not None else None
        if ex is None or not ex.running or program is None or program.kind != "echo":
            return  # nothing reads it
        for line in data.splitlines(keepends=True):
            if not ex.running:
                break
            if line == ECHO_EXIT:
                self._end(sandbox, ex, program.exit_code)
            elif line.endswith("\n"):
                self._write(sandbox, "stdout", line)

    def _kill_process(self, c: _Conn, sandbox: _Sandbox) -> None:
        ex = sandbox.execution
        if ex is not None and ex.running:
            self._end(sandbox, ex, None, killed=True)
            # FORCE_KILLED and the DONE of the stream come in either order (7.5).
            self._emit(c, _status(Status.SANDBOX_EXECUTION_FORCE_KILLED))
            return
        c.proto.send_status(Status.SANDBOX_EXECUTION_FORCE_KILLED)

    def _kill_sandbox(self, c: _Conn, sandbox: _Sandbox) -> None:
        c.proto.send_status(Status.SANDBOX_KILLING)
        self._delete(c, sandbox)
        c.proto.send_status(Status.SANDBOX_KILLED)
        c.proto.close(1000)
        sandbox.state = "killed"
        sandbox.observer = None

    def _delete(self, c: _Conn, sandbox: _Sandbox) -> None:
        """DELETING, [the running exec's DONE, anywhere], [lock frames], DELETED (7.6)."""
        c.proto.send_status(Status.SANDBOX_DELETING)
        ex = sandbox.execution
        if ex is not None and ex.running:
            self._end(sandbox, ex, None, killed=True)
        for status in _LOCK_GIVEN if sandbox.handoff else ():
            c.proto.send_status(status)
        c.proto.send_status(Status.SANDBOX_DELETED)

    def _checkpoint(self, c: _Conn, sandbox: _Sandbox) -> None:
        c.proto.send_status(Status.SANDBOX_CHECKPOINTING)
        if not (sandbox.checkpointable and self.checkpoints):
            # Kept alive (S11 allows it; upstream too, for a sandbox never checkpointable), connection closed.
            c.proto.send_error(Status.SANDBOX_CHECKPOINT_ERROR, "not configured for checkpointing", close=4000)
            self._emit(c)
            self._any_message(c)
            sandbox.observer = None
            if sandbox.execution is not None and sandbox.execution.streamer == c.name:
                sandbox.execution.streamer = None
            return
        if sandbox.phase() is ProcessPhase.RUNNING:
            c.proto.send_error(Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR, MSG_CHECKPOINT_IN_PROGRESS)
            return
        self._delete(c, sandbox)
        c.proto.send_status(Status.SANDBOX_CHECKPOINTED)
        c.proto.close(1000)
        sandbox.state = "checkpointed"
        sandbox.observer = None

    def _snapshot(self, c: _Conn, sandbox: _Sandbox, name: object) -> None:
        c.proto.send_status(Status.SANDBOX_FILESYSTEM_SNAPSHOT_CREATING)
        if not self.snapshots or not valid_snapshot_name(name):
            c.proto.send_error(Status.SANDBOX_FILESYSTEM_SNAPSHOT_ERROR, "snapshot refused")
            self._emit(c)
            self._any_message(c)
            return
        assert isinstance(name, str)
        self.snapshot_files[name] = sandbox.file
        c.proto.send_status(Status.SANDBOX_FILESYSTEM_SNAPSHOT_CREATED)

    def _reconnect(self, c: _Conn, sandbox: _Sandbox, request: ReconnectRequested) -> None:
        ex = sandbox.execution
        # Streaming: this connection forwards the exec and has not sent its DONE yet.
        streaming = ex is not None and ex.streamer == c.name and not ex.done_delivered
        answer = c.proto.answer_reconnect(request, sandbox.view(), streaming_cursor=c.cursor if streaming else None)
        if not isinstance(answer, ResumeStream):
            if answer.done_delivered and ex is not None:
                ex.done_delivered = True
            return
        assert ex is not None
        ex.streamer = c.name
        for seq, stream, data in ex.writes:
            if seq > answer.cursor:
                c.proto.send_output(stream, data, seq)
        c.cursor = sandbox.delivered = max(sandbox.delivered, ex.last_seq)
        if not ex.running:
            ex.done_delivered = True
            if ex.killed:
                c.proto.process = ProcessPhase.NONE
                self._emit(c, self._done_pattern(c))
            else:
                c.proto.exec_finished(ex.exit_code)
