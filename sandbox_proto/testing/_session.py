"""Play client actions against a system under test and check each reply with the reference model.

A :class:`ProtocolSession` turns an action (``create``, ``exec``, ``drop``...)
into frames, sends them through a :class:`Driver` to the system under test
and to the :class:`~sandbox_proto.testing.ReferenceModel`, then reads what
each connection received, through the driver, until the model's expectation
is met. The driver is the only part that does I/O: a WebSocket client for a
live server, or a function call for a server, client or proxy in memory.

Every wait is bounded: a driver returns ``None`` when nothing arrived within
the timeout it was given, and that is a :class:`Finding`, not a hang.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Literal, NoReturn, Protocol

from ._model import Closed, Expectation, Matcher, Mismatch, Program, ProtocolMode, ReferenceModel

__all__ = ["Action", "Driver", "DriverError", "Finding", "ProtocolSession", "render"]

TokenChoice = Literal["right", "wrong", "empty"]
#: One action of a session: its method's name, positional and keyword arguments.
Action = tuple[str, tuple[object, ...], dict[str, object]]
LastSeq = Literal["zero", "seen"] | None

#: The ``idle_timeout`` of every sandbox the session creates: longer than any example runs.
IDLE_TIMEOUT = 300
#: Name of a sandbox that was never created.
UNKNOWN = "unknown"
#: Longest ``data`` shown per frame in a transcript.
_SHOWN_DATA = 200
_IN_USE = {"event": "status_update", "status": "SANDBOX_IN_USE"}


class Driver(Protocol):
    """Carries frames between the session and the system under test; one object per session.

    Connections are named by the session (``"c1"``...). ``path`` is the
    handshake's path and query, e.g. ``/create?extensions=seq`` or
    ``/attach/<id>?sandbox_token=<token>``.
    """

    def open(self, conn: str, path: str) -> None:
        """Open a WebSocket (the name may be reused after its connection closed); :class:`DriverError` if refused."""

    def send(self, conn: str, text: str) -> None:
        """Send one text frame (silently nothing if the connection is closed: the next receive says so)."""

    def receive(self, conn: str, timeout: float) -> str | Closed | None:
        """The next frame, or :class:`Closed` once closed (again on every call), or ``None`` after ``timeout`` s."""

    def drop(self, conn: str) -> None:
        """Cut the connection without a close frame, as a network failure would."""

    def pause(self, seconds: float) -> None:
        """Let time pass (a backoff before retrying an attach); an in-memory driver may return at once."""

    def close(self) -> None:
        """Release every connection."""


class DriverError(Exception):
    """The driver could not do what was asked (a handshake refused, a connection that failed to open)."""


class Finding(AssertionError):
    """The system under test did something the protocol does not allow (or nothing, where it must answer)."""

    def __init__(self, problem: str, transcript: list[str], actions: list[Action]) -> None:
        self.problem = problem
        self.transcript = list(transcript)
        self.actions = list(actions)
        super().__init__(self.report())

    @property
    def calls(self) -> list[str]:
        """The actions as Python calls on a session named ``session``, which replay them."""
        return [render(*action) for action in self.actions]

    def report(self) -> str:
        """The problem and the transcript of the frames each way, for a person."""
        return f"{self.problem}\n\nTranscript (→ sent, ← received):\n" + "\n".join(
            f"  {line}" for line in self.transcript
        )


def dumps(obj: dict[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class ProtocolSession:
    """Actions of clients on sandboxes, each checked against the reference model as it happens.

    Sandboxes and connections have names chosen by the caller (``"s1"``,
    ``"c1"``); the session maps them to the real ids and tokens the system
    under test hands out. ``prefix`` makes snapshot names and unknown ids
    unique to this run. ``timeout`` bounds each wait for a frame.
    """

    def __init__(
        self,
        driver: Driver,
        *,
        protocol: ProtocolMode = "extended",
        checkpoints: bool = True,
        snapshots: bool = True,
        timeout: float = 10.0,
        prefix: str = "fuzz",
    ) -> None:
        self.driver = driver
        self.protocol = protocol
        self.timeout = timeout
        self.prefix = prefix
        self.model = ReferenceModel(protocol=protocol, checkpoints=checkpoints, snapshots=snapshots)
        self.transcript: list[str] = []
        #: The actions so far: method name, positional and keyword arguments (:func:`render` writes them).
        self.actions: list[Action] = []
        #: How many times each action ran.
        self.counts: Counter[str] = Counter()
        self.failed = False
        #: What went wrong, once something did.
        self.finding: Finding | None = None
        self._finishing = False
        self._model_ids: dict[str, str] = {}
        self._real: dict[str, tuple[str, str]] = {}
        self._conn_sandbox: dict[str, str] = {}
        # Per sandbox: the highest seq of output seen since its output log (re)started.
        self._seen: dict[str, int] = {}
        self._generation: dict[str, int] = {}

    # -- what the caller may ask

    def sandboxes(self) -> list[str]:
        """Names of the sandboxes created so far."""
        return list(self._model_ids)

    def attached(self) -> list[str]:
        """Names of the connections that are open and attached to a live sandbox."""
        return [conn for conn in self._conn_sandbox if self.model.attached(conn)]

    def sandbox_of(self, conn: str) -> str:
        return self._conn_sandbox[conn]

    def model_id(self, sandbox: str) -> str:
        return self._model_ids[sandbox]

    def granted(self, conn: str) -> frozenset[str]:
        return self.model.granted(conn)

    def running(self, conn: str) -> Program | None:
        """The program running in the connection's sandbox, if any."""
        return self.model.running_program(self._model_ids[self._conn_sandbox[conn]])

    def streams(self, conn: str) -> bool:
        """The connection receives the output of its sandbox's running exec."""
        return self.model.streamed_by(self._model_ids[self._conn_sandbox[conn]]) == conn

    def restored(self, sandbox: str) -> bool:
        """Restored from a checkpoint at least once (its output numbering is then the server's own)."""
        return self.model.generation(self._model_ids[sandbox]) > 0

    # -- actions

    def create(
        self,
        conn: str,
        sandbox: str,
        *,
        checkpoint: bool = False,
        handoff: bool = False,
        snapshot: str | None = None,
        extensions: tuple[str, ...] | None = None,
    ) -> None:
        """``/create`` with these options (``snapshot``: a name given to :meth:`snapshot` earlier, or any)."""
        options = {"checkpoint": checkpoint, "handoff": handoff, "snapshot": snapshot, "extensions": extensions}
        self._begin("create", conn, sandbox, **options)
        init: dict[str, object] = {"idle_timeout": IDLE_TIMEOUT}
        if checkpoint:
            init["enable_checkpoint"] = True
        if handoff:
            init["enable_sandbox_handoff"] = True
        if snapshot is not None:
            init["filesystem_snapshot_name"] = self._snapshot_name(snapshot)
        self._conn_sandbox[conn] = sandbox
        path = "/create" + _query(extensions, first=True)
        self._open(conn, path, path)
        self._send(conn, dumps(init))
        model_id = self.model.sandbox_id(conn)
        if model_id is not None:
            self._model_ids[sandbox] = model_id
            self._generation[sandbox] = 0

    def attach(
        self, conn: str, sandbox: str, *, token: TokenChoice = "right", extensions: tuple[str, ...] | None = None
    ) -> None:
        """``/attach`` to a sandbox created earlier (or to ``"unknown"``), with its token, another, or an empty one."""
        shown_token = None if token == "right" else token
        self._begin("attach", conn, sandbox, token=shown_token, extensions=extensions)
        self._conn_sandbox[conn] = sandbox
        known = sandbox in self._model_ids
        model_id = self._model_ids[sandbox] if known else "sandbox-unknown"
        real_id, real_token = self._real[sandbox] if known else (f"{self.prefix}-unknown", "")
        model_token = self.model.token(model_id) if known else "0" * 32
        if token == "wrong" or not known:
            model_token = "wrong"
            real_token = "0" * 32 if real_token != "0" * 32 else "1" * 32
        elif token == "empty":
            model_token = real_token = ""
        query = _query(extensions, first=False)
        model_path = f"/attach/{model_id}?sandbox_token={model_token}{query}"
        wire_path = f"/attach/{real_id}?sandbox_token={real_token}{query}"
        in_use_possible = known and self.model.may_be_in_use(model_id)
        expectations = self.model.connect(conn, model_path)
        self._handshake(conn, wire_path)
        first: str | Closed | None = None
        if in_use_possible:
            first = self._until_not_in_use(conn, wire_path)
        self._verify(expectations, conn, first)
        if known and self.model.generation(model_id) != self._generation.get(sandbox):
            self._generation[sandbox] = self.model.generation(model_id)
            self._seen[sandbox] = 0

    def exec(self, conn: str, program: Program) -> None:
        self._begin("exec", conn, program)
        self._send(conn, dumps({"language": program.language, "code": program.code}))

    def stdin(self, conn: str, data: str) -> None:
        self._begin("stdin", conn, data)
        self._send(conn, dumps({"event": "stdin", "data": data}))

    def close_stdin(self, conn: str) -> None:
        self._begin("close_stdin", conn)
        self._send(conn, dumps({"action": "close_stdin"}))

    def kill_process(self, conn: str) -> None:
        self._begin("kill_process", conn)
        self._send(conn, dumps({"action": "kill_process"}))

    def kill_sandbox(self, conn: str) -> None:
        self._begin("kill_sandbox", conn)
        self._send(conn, dumps({"action": "kill_sandbox"}))

    def checkpoint(self, conn: str) -> None:
        self._begin("checkpoint", conn)
        self._send(conn, dumps({"action": "checkpoint"}))

    def snapshot(self, conn: str, name: str) -> None:
        """``snapshot_filesystem``; ``name`` is made unique to the run."""
        self._begin("snapshot", conn, name)
        self._send(conn, dumps({"action": "snapshot_filesystem", "name": self._snapshot_name(name)}))

    def reconnect(self, conn: str, *, last_seq: LastSeq = None) -> None:
        """``reconnect``; with ``seq`` granted, ``last_seq`` 0 or the highest seq seen on the sandbox."""
        self._begin("reconnect", conn, last_seq=last_seq)
        sandbox = self._conn_sandbox[conn]
        model_frame: dict[str, object] = {"action": "reconnect"}
        wire_frame = dict(model_frame)
        if last_seq is not None:
            model_frame["last_seq"] = 0 if last_seq == "zero" else self.model.delivered(self._model_ids[sandbox])
            wire_frame["last_seq"] = 0 if last_seq == "zero" else self._seen.get(sandbox, 0)
        self._send(conn, dumps(model_frame), dumps(wire_frame))

    def malformed(self, conn: str, kind: Literal["language", "no_code", "action"]) -> None:
        """A request the server must refuse: an unsupported language, no code, an unknown action."""
        self._begin("malformed", conn, kind)
        frames: dict[str, dict[str, object]] = {
            "language": {"language": "ruby", "code": "puts 1"},
            "no_code": {"language": "python"},
            "action": {"action": "pause"},
        }
        self._send(conn, dumps(frames[kind]))

    def drop(self, conn: str) -> None:
        """Cut the connection with no close frame; the sandbox lives on, detached."""
        self._begin("drop", conn)
        self.transcript.append(f"{conn} ✂ connection cut")
        self.model.drop(conn)
        self.driver.drop(conn)

    def finish(self) -> None:
        """Kill every sandbox still there (attaching to those left detached or checkpointed), checking each reply.

        The kill's frames come last on each connection, so anything sent
        twice or too late shows up here at the latest.
        """
        self._begin("finish")
        self._finishing = True
        try:
            for conn in self.attached():
                self.kill_sandbox(conn)
            for number, sandbox in enumerate(self.sandboxes(), 1):
                if self.model.state(self._model_ids[sandbox]) == "killed":
                    continue
                conn = f"{sandbox}-end{number}"
                self.attach(conn, sandbox)
                self.kill_sandbox(conn)
        finally:
            self.driver.close()

    def cleanup(self) -> None:
        """After a finding: delete what can be deleted, quickly, checking nothing; then close the driver."""
        wait = min(self.timeout, 1.0)
        try:
            for sandbox, (real_id, real_token) in self._real.items():
                model_id = self._model_ids.get(sandbox)
                if model_id is None or self.model.state(model_id) == "killed":
                    continue
                conn = next((c for c in self.attached() if self._conn_sandbox[c] == sandbox), None)
                if conn is None:
                    conn = f"{sandbox}-cleanup"
                    self.driver.open(conn, f"/attach/{real_id}?sandbox_token={real_token}")
                    self.driver.receive(conn, wait)
                self.driver.send(conn, dumps({"action": "kill_sandbox"}))
                for _ in range(16):  # up to the close, or as long as frames keep coming within the wait
                    frame = self.driver.receive(conn, wait)
                    if frame is None or isinstance(frame, Closed):
                        break
        except DriverError:
            pass
        finally:
            self.driver.close()

    # -- machinery

    def _begin(self, name: str, *args: object, **options: object) -> None:
        """Record the action before doing it; options at their default (``None``, ``False``) are left out."""
        kept = {key: value for key, value in options.items() if value is not None and value is not False}
        if not self._finishing:  # what finish() does is part of its own action
            self.actions.append((name, args, kept))
            self.counts[name] += 1
        self.transcript.append(f"# {render(name, args, kept)}")

    def _snapshot_name(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _open(self, conn: str, model_path: str, wire_path: str) -> None:
        expectations = self.model.connect(conn, model_path)
        self._handshake(conn, wire_path)
        self._verify(expectations, conn)

    def _handshake(self, conn: str, wire_path: str) -> None:
        self.transcript.append(f"{conn} ⇢ open {self._redact_path(wire_path)}")
        try:
            self.driver.open(conn, wire_path)
        except DriverError as exc:
            self._fail(f"{conn}: the handshake failed: {exc}")

    def _until_not_in_use(self, conn: str, wire_path: str) -> str | Closed | None:
        """The first frame of an attach, retrying while the server has not yet noticed its observer dropped."""
        waited, delay = 0.0, 0.05
        while True:
            frame = self.driver.receive(conn, self.timeout)
            self._log_received(conn, frame)
            if not isinstance(frame, str) or _parsed(frame) != _IN_USE or waited >= self.timeout:
                return frame
            closing = self.driver.receive(conn, self.timeout)
            self._log_received(conn, closing)
            if closing != Closed(1011):
                return frame  # the matcher reports it
            self.driver.pause(delay)
            waited += delay
            delay = min(delay * 2, 1.0)
            self.transcript.append(f"{conn} ⇢ open again (the server had not yet noticed the drop)")
            try:
                self.driver.open(conn, wire_path)
            except DriverError as exc:
                self._fail(f"{conn}: the handshake failed: {exc}")

    def _send(self, conn: str, model_text: str, wire_text: str | None = None) -> None:
        wire = model_text if wire_text is None else wire_text
        self.transcript.append(f"{conn} → {self._shown(wire)}")
        expectations = self.model.receive(conn, model_text)
        try:
            self.driver.send(conn, wire)
        except DriverError as exc:
            self._fail(f"{conn}: could not send: {exc}")
        self._verify(expectations, conn)

    def _verify(self, expectations: dict[str, Expectation], acting: str, first: str | Closed | None = None) -> None:
        """Read each connection's frames until its expectation is met; the acting connection first."""
        order = sorted(expectations, key=lambda name: name != acting)
        for conn in order:
            matcher = Matcher(expectations[conn], seq="seq" in self.model.granted(conn))
            pending = first if conn == acting else None
            while not matcher.done:
                frame: str | Closed | None = pending
                pending = None
                if frame is None:
                    frame = self.driver.receive(conn, self.timeout)
                    self._log_received(conn, frame)
                if frame is None:
                    self._fail(f"{conn}: nothing within {self.timeout:g}s; still expected: {matcher.missing()}")
                self._learn(conn, frame)
                try:
                    matcher.feed(frame)
                except Mismatch as exc:
                    self._fail(f"{conn}: {exc}")
            sandbox = self._conn_sandbox.get(conn)
            if sandbox is not None and matcher.max_seq:
                self._seen[sandbox] = max(self._seen.get(sandbox, 0), matcher.max_seq)

    def _learn(self, conn: str, frame: str | Closed) -> None:
        """Remember the real id and token a ``sandbox_id`` frame hands out."""
        if isinstance(frame, Closed):
            return
        obj = _parsed(frame)
        if obj is not None and obj.get("event") == "sandbox_id":
            sandbox_id, token = obj.get("sandbox_id"), obj.get("sandbox_token")
            if isinstance(sandbox_id, str) and isinstance(token, str):
                self._real[self._conn_sandbox[conn]] = (sandbox_id, token)

    def _log_received(self, conn: str, frame: str | Closed | None) -> None:
        if frame is None:
            self.transcript.append(f"{conn} ⋯ nothing within {self.timeout:g}s")
        elif isinstance(frame, Closed):
            self.transcript.append(f"{conn} ← close {frame.code}")
        else:
            self.transcript.append(f"{conn} ← {self._shown(frame)}")

    def _fail(self, problem: str) -> NoReturn:
        self.failed = True
        transcript = [self._redact(line) for line in self.transcript]
        self.finding = Finding(self._redact(problem), transcript, self.actions)
        raise self.finding

    # -- what a person may see

    def _redact(self, text: str) -> str:
        """Tokens never appear in a transcript or report."""
        for _, token in self._real.values():
            if token:
                text = text.replace(token, "…")
        return text

    @staticmethod
    def _redact_path(path: str) -> str:
        return re.sub(r"(sandbox_token=)[^&]+", r"\1…", path)

    def _shown(self, frame: str) -> str:
        obj = _parsed(frame)
        if obj is None:
            return repr(frame)
        if obj.get("event") == "sandbox_id" and "sandbox_token" in obj:
            obj["sandbox_token"] = "…"
        for key in ("data", "code"):
            value = obj.get(key)
            if isinstance(value, str) and len(value) > _SHOWN_DATA:
                obj[key] = value[:_SHOWN_DATA] + f"…(+{len(value) - _SHOWN_DATA} characters)"
        return dumps(obj)


def render(name: str, args: tuple[object, ...], options: dict[str, object]) -> str:
    """An action as the Python call that does it again."""
    shown = [*(repr(arg) for arg in args), *(f"{key}={value!r}" for key, value in options.items())]
    return f"session.{name}({', '.join(shown)})"


def _parsed(frame: str) -> dict[str, object] | None:
    try:
        obj = json.loads(frame)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _query(extensions: tuple[str, ...] | None, *, first: bool) -> str:
    if not extensions:
        return ""
    return f"{'?' if first else '&'}extensions={','.join(sorted(extensions))}"
