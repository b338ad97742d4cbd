"""The hypothesis state machine that draws client actions and checks each against the reference model."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar, Literal

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from .._server import ALL_EXTENSIONS
from ._model import ECHO_EXIT, Program, ProtocolMode
from ._session import UNKNOWN, Driver, LastSeq, ProtocolSession, TokenChoice

__all__ = ["ProtocolMachine"]

_LANGUAGE_NAMES: list[Literal["python", "bash"]] = ["python", "bash"]
_LANGUAGES = st.sampled_from(_LANGUAGE_NAMES)
# Output that crosses the 1024-byte chunks of the upstream server, splits multi-byte characters there, has lines.
_PYTHON_TEXTS = st.sampled_from(["", "hi\n", "x" * 1500, "é" * 700 + "\n", "line\n" * 250, "tab\tünï ✓\n"])
_BASH_TEXTS = st.sampled_from(["", "hi\n", "two words\n", "ünï ✓\n"])
_EXIT_CODES = st.sampled_from([0, 1, 3, 255])
_TOKENS: list[TokenChoice] = ["right", "right", "wrong", "empty"]
_LAST_SEQS: list[LastSeq] = [None, "zero", "seen"]
_SOME_EXTENSIONS = st.lists(st.sampled_from(ALL_EXTENSIONS), min_size=1, max_size=3, unique=True).map(tuple)
_EXTENSIONS: st.SearchStrategy[tuple[str, ...] | None] = st.sampled_from([ALL_EXTENSIONS, None]) | _SOME_EXTENSIONS
_LINES = ["a\n", "hello world\n", "ünï ✓\n", "y" * 3000 + "\n"]


class ProtocolMachine(RuleBasedStateMachine):
    """Clients acting on sandboxes in any order, each reply checked against :class:`ReferenceModel`.

    Subclass it, say how to reach the system under test in
    :meth:`make_driver`, and run it as any hypothesis state machine
    (``TestMine = MyMachine.TestCase``). Several sandboxes and connections
    live at once; the rules create, attach (right, wrong and empty tokens,
    unknown ids, attaches to a sandbox in use), exec programs whose output
    is known (:class:`Program`), write stdin, close it, kill the process or
    the sandbox, checkpoint, snapshot and create from snapshots, send
    ``reconnect``, drop connections, and send requests the server must
    refuse. Teardown kills every sandbox left, checking those replies too.

    Class attributes say what the server offers: ``protocol`` (``"upstream"``
    asks for no extension and expects none), ``checkpoints`` and
    ``snapshots`` (its storage), ``handoff`` (whether creates may ask for
    ``enable_sandbox_handoff``), ``timeout`` (seconds per awaited frame).
    """

    protocol: ClassVar[ProtocolMode] = "extended"
    checkpoints: ClassVar[bool] = True
    snapshots: ClassVar[bool] = True
    #: Handoff needs the deployment's shared lock (upstream: a GCS bucket); off where it has none.
    handoff: ClassVar[bool] = True
    timeout: ClassVar[float] = 10.0
    #: At most this many connections attached at once, so that a run holds few sandboxes.
    max_attached: ClassVar[int] = 3

    def __init__(self) -> None:
        super().__init__()
        self.session = ProtocolSession(
            self.make_driver(),
            protocol=self.protocol,
            checkpoints=self.checkpoints,
            snapshots=self.snapshots,
            timeout=self.timeout,
            prefix=self.prefix(),
        )
        self._names: Counter[str] = Counter()
        self._snapshot_names: set[str] = set()

    def make_driver(self) -> Driver:
        """The driver of the system under test, one per example."""
        raise NotImplementedError("a ProtocolMachine subclass says how to reach the system under test")

    def prefix(self) -> str:
        """Makes snapshot names and unknown ids unique (override for a server that outlives one run)."""
        return "fuzz"

    # -- strategies (override to fuzz with other programs or options)

    def programs(self) -> st.SearchStrategy[Program]:
        return st.one_of(
            st.builds(Program, st.just("output"), st.just("python"), _PYTHON_TEXTS, _PYTHON_TEXTS, _EXIT_CODES),
            st.builds(Program, st.just("output"), st.just("bash"), _BASH_TEXTS, _BASH_TEXTS, _EXIT_CODES),
            st.builds(Program, st.just("echo"), _LANGUAGES, exit_code=st.sampled_from([0, 4])),
            st.builds(Program, st.just("write"), _LANGUAGES, value=st.sampled_from(["v1", "v2", "✓"])),
            st.builds(Program, st.just("read"), _LANGUAGES),
        )

    def extensions(self) -> st.SearchStrategy[tuple[str, ...] | None]:
        """What a connection asks for: nothing, everything, or some (none in upstream mode)."""
        return st.none() if self.protocol == "upstream" else _EXTENSIONS

    # -- helpers

    def _name(self, kind: str) -> str:
        self._names[kind] += 1
        return f"{kind}{self._names[kind]}"

    def _conns(self, *, quiet_ok: bool = True, echo: bool = False, granted: str | None = None) -> list[str]:
        """Attached connections; ``quiet_ok=False`` leaves out those whose sandbox runs an exec they do not stream.

        That exec's output goes nowhere until a ``reconnect``; when it ends
        then (killed, or done with stdin) is the server's race, not the
        protocol's, so those actions wait for the ``reconnect``.
        """
        chosen = []
        for conn in self.session.attached():
            running = self.session.running(conn)
            if not quiet_ok and running is not None and not self.session.streams(conn):
                continue
            if echo and (running is None or running.kind != "echo"):
                continue
            if granted is not None and granted not in self.session.granted(conn):
                continue
            chosen.append(conn)
        return chosen

    def _pick(self, data: st.DataObject, conns: list[str]) -> str:
        return data.draw(st.sampled_from(conns), label="connection")

    def _create(self, data: st.DataObject) -> None:
        checkpoint = data.draw(st.booleans() if self.checkpoints else st.just(False), label="checkpoint")
        handoff = checkpoint and self.handoff and data.draw(st.booleans(), label="handoff")
        snapshot = None
        if data.draw(st.integers(0, 3), label="from a snapshot") == 0:
            snapshot = data.draw(st.sampled_from([*sorted(self._snapshot_names), "missing"]), label="snapshot")
        self.session.create(
            self._name("c"),
            self._name("s"),
            checkpoint=checkpoint,
            handoff=handoff,
            snapshot=snapshot,
            extensions=data.draw(self.extensions(), label="extensions"),
        )

    # -- rules

    @initialize(data=st.data())
    def first_sandbox(self, data: st.DataObject) -> None:
        self._create(data)

    @precondition(lambda self: len(self.session.attached()) < self.max_attached)
    @rule(data=st.data())
    def create(self, data: st.DataObject) -> None:
        self._create(data)

    @precondition(lambda self: len(self.session.attached()) < self.max_attached)
    @rule(data=st.data())
    def attach(self, data: st.DataObject) -> None:
        sandbox = data.draw(st.sampled_from([*self.session.sandboxes(), UNKNOWN]), label="sandbox")
        token = data.draw(st.sampled_from(_TOKENS), label="token")
        extensions = data.draw(self.extensions(), label="extensions")
        self.session.attach(self._name("c"), sandbox, token=token, extensions=extensions)

    @precondition(lambda self: bool(self.session.attached()))
    @rule(data=st.data())
    def exec(self, data: st.DataObject) -> None:
        conn = self._pick(data, self._conns())
        self.session.exec(conn, data.draw(self.programs(), label="program"))

    @precondition(lambda self: bool(self.session.attached()))
    @rule(data=st.data())
    def start_echo(self, data: st.DataObject) -> None:
        """An exec that keeps running until its stdin says so: what stdin, kills and drops act on."""
        conn = self._pick(data, self._conns())
        program = Program("echo", data.draw(_LANGUAGES, label="language"), exit_code=4)
        self.session.exec(conn, program)

    @precondition(lambda self: bool(self._conns(echo=True)))
    @rule(data=st.data())
    def stdin(self, data: st.DataObject) -> None:
        conn = self._pick(data, self._conns(echo=True))
        # The line that ends the program only where its end is seen (see _conns).
        lines = [*_LINES, ECHO_EXIT] if self.session.streams(conn) else _LINES
        self.session.stdin(conn, data.draw(st.sampled_from(lines), label="line"))

    @precondition(lambda self: bool(self._conns(quiet_ok=False, granted="close_stdin")))
    @rule(data=st.data())
    def close_stdin(self, data: st.DataObject) -> None:
        self.session.close_stdin(self._pick(data, self._conns(quiet_ok=False, granted="close_stdin")))

    @precondition(lambda self: bool(self._conns(quiet_ok=False)))
    @rule(data=st.data())
    def kill_process(self, data: st.DataObject) -> None:
        self.session.kill_process(self._pick(data, self._conns(quiet_ok=False)))

    @precondition(lambda self: bool(self.session.attached()))
    @rule(data=st.data())
    def kill_sandbox(self, data: st.DataObject) -> None:
        self.session.kill_sandbox(self._pick(data, self._conns()))

    @precondition(lambda self: bool(self.session.attached()))
    @rule(data=st.data())
    def checkpoint(self, data: st.DataObject) -> None:
        self.session.checkpoint(self._pick(data, self._conns()))

    @precondition(lambda self: bool(self.session.attached()))
    @rule(data=st.data())
    def snapshot(self, data: st.DataObject) -> None:
        conn = self._pick(data, self._conns())
        name = data.draw(st.sampled_from([*sorted(self._snapshot_names), f"snap{len(self._snapshot_names) + 1}"]))
        self._snapshot_names.add(name)
        self.session.snapshot(conn, name)

    @precondition(lambda self: bool(self.session.attached()))
    @rule(data=st.data())
    def reconnect(self, data: st.DataObject) -> None:
        conn = self._pick(data, self._conns())
        last_seq: LastSeq = None
        # After a restore the numbering of output is the server's to choose: "seen" and 0 mean nothing certain.
        if "seq" in self.session.granted(conn) and not self.session.restored(self.session.sandbox_of(conn)):
            last_seq = data.draw(st.sampled_from(_LAST_SEQS), label="last_seq")
        self.session.reconnect(conn, last_seq=last_seq)

    @precondition(lambda self: bool(self.session.attached()))
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.session.drop(self._pick(data, self._conns()))

    @precondition(lambda self: bool(self.session.attached()))
    @rule(data=st.data())
    def malformed(self, data: st.DataObject) -> None:
        conn = self._pick(data, self._conns())
        self.session.malformed(conn, data.draw(st.sampled_from(["language", "no_code", "action"]), label="kind"))

    def teardown(self) -> None:
        if self.session.failed:
            self.session.cleanup()
        else:
            self.session.finish()
