"""One exec as the client sees it: its lifecycle, its kill, and its stdin until delivered."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass


class ProcessState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    KILLING = "killing"
    DONE = "done"


class Wire(enum.Enum):
    """Where a request stands: the same three steps for an exec, a kill, a checkpoint, a snapshot."""

    NONE = "none"  # not asked for (or answered)
    HELD = "held"  # asked for, not handed to a connection yet: sent once one is ready
    HANDED = "handed"  # handed to the current connection: it may or may not have reached the server


# As globals for Exec's own use, once per exec or more: on Python 3.11 ``Enum.MEMBER``
# goes through EnumType.__getattr__'s slow lookup (~1,100 instructions).
_STARTING = ProcessState.STARTING
_RUNNING = ProcessState.RUNNING
_KILLING = ProcessState.KILLING
_DONE = ProcessState.DONE
_NONE = Wire.NONE
_HELD = Wire.HELD


@dataclass(slots=True)
class StdinItem:
    """One write (``data``) or the end of input (``data is None``), numbered per exec from 1."""

    seq: int
    data: str | None


class Exec:
    """The per-exec sub-machine: the states of :class:`ProcessState` plus what is owed to the server.

    Stdin lives in two queues: ``pending`` (not handed to the current
    connection) and ``unacked`` (handed with a number, kept until the server
    acknowledges it, so a reconnect can send the rest exactly once).
    """

    __slots__ = (
        "abandoned",
        "code",
        "exec_id",
        "force_killed_seen",
        "kill",
        "language",
        "next_stdin_seq",
        "pending",
        "ref",
        "request",
        "state",
        "stdin_closed",
        "unacked",
        "unnumbered_handed",
    )

    def __init__(self, exec_id: int, language: str, code: str, ref: str) -> None:
        self.exec_id = exec_id
        # The request's fields, not an ExecRequest: it is encoded straight from them (once per exec).
        self.language = language
        self.code = code
        #: The name sent with the request where ``exec_ref`` is granted, to know its stream again.
        self.ref = ref
        self.state = _STARTING
        self.request = _HELD
        self.kill = _NONE
        self.force_killed_seen = False
        #: The caller gave up on it (timeout, cancellation): kill it once it starts.
        self.abandoned = False
        self.pending: deque[StdinItem] = deque()
        self.unacked: deque[StdinItem] = deque()
        self.next_stdin_seq = 1
        self.stdin_closed = False
        #: Unnumbered stdin items handed to the current connection and not given back: a drop may lose them.
        self.unnumbered_handed = 0

    def __repr__(self) -> str:
        return f"<Exec {self.exec_id} {self.state.value}>"

    @property
    def active(self) -> bool:
        return self.state is not _DONE

    @property
    def started(self) -> bool:
        return self.state is _RUNNING or self.state is _KILLING

    # -- stdin

    def add_stdin(self, data: str | None) -> None:
        self.pending.append(StdinItem(self.next_stdin_seq, data))
        self.next_stdin_seq += 1
        if data is None:
            self.stdin_closed = True

    def take_stdin(self, numbered: bool) -> list[StdinItem]:
        """Everything pending, to hand to the connection; numbered items are kept until acknowledged."""
        items = list(self.pending)
        self.pending.clear()
        if numbered:
            self.unacked.extend(items)
        else:
            self.unnumbered_handed += len(items)
        return items

    def give_back(self, item: StdinItem) -> None:
        """``item`` never left (a failed or cancelled send): it goes first again, once."""
        if self.unacked and self.unacked[-1] is item:
            self.unacked.pop()
        else:
            self.unnumbered_handed -= 1
        self.pending.appendleft(item)

    def acknowledge(self, seq: int) -> None:
        """The server has every numbered item up to ``seq``."""
        unacked = self.unacked
        while unacked and unacked[0].seq <= seq:
            unacked.popleft()

    def resend_unacknowledged(self) -> None:
        """After a reconnect's acknowledgement: what the server lacks is sent again, in order."""
        self.pending.extendleft(reversed(self.unacked))
        self.unacked.clear()

    def drop_stdin(self) -> None:
        self.pending.clear()
        self.unacked.clear()
