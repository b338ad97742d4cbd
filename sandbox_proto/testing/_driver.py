"""A conforming server in memory, as a :class:`~sandbox_proto.testing.Driver`: the reference model answering."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ._model import Closed, Expectation, ProtocolMode, ReferenceModel

__all__ = ["ReferenceDriver"]

#: What a proxy in front of the reference server may do to each frame it forwards: change it,
#: drop it (an empty list) or add more. Called with the connection's name and the frame.
FrameFilter = Callable[[str, str], list[str]]


class ReferenceDriver:
    """A :class:`~sandbox_proto.testing.ReferenceModel` of its own, answering every frame at once.

    It sends one of the frame sequences the protocol allows: the model's own.
    ``server_to_client`` stands for a proxy between the fuzzer and this
    server (or for a server of yours written as a transformation of it):
    each frame the server sends goes through it.
    """

    def __init__(
        self,
        *,
        protocol: ProtocolMode = "extended",
        checkpoints: bool = True,
        snapshots: bool = True,
        server_to_client: FrameFilter | None = None,
    ) -> None:
        self.model = ReferenceModel(protocol=protocol, checkpoints=checkpoints, snapshots=snapshots)
        self._filter = server_to_client
        self._queues: dict[str, deque[str | Closed]] = {}
        # A name the session reuses (an attach retried) is a new connection to the model.
        self._current: dict[str, str] = {}
        self._opened = 0

    def open(self, conn: str, path: str) -> None:
        self._opened += 1
        name = self._current[conn] = f"{conn}#{self._opened}"
        self._queues[conn] = deque()
        self._play(self.model.connect(name, path))

    def send(self, conn: str, text: str) -> None:
        name = self._current.get(conn)
        if name is not None and self.model.is_open(name):
            self._play(self.model.receive(name, text))

    def receive(self, conn: str, timeout: float) -> str | Closed | None:
        queue = self._queues.get(conn)
        if not queue:
            return None
        frame = queue[0]
        if not isinstance(frame, Closed):
            queue.popleft()  # a close stays: it is what every later receive reports
        return frame

    def drop(self, conn: str) -> None:
        name = self._current.get(conn)
        if name is not None and self.model.is_open(name):
            self.model.drop(name)
        self._queues[conn] = deque([Closed(1006)])

    def pause(self, seconds: float) -> None:
        pass  # nothing here happens with time

    def close(self) -> None:
        self._queues.clear()

    def _play(self, expectations: dict[str, Expectation]) -> None:
        by_name = {name: conn for conn, name in self._current.items()}
        for name, expectation in expectations.items():
            conn = by_name.get(name)
            if conn is None:
                continue
            queue = self._queues[conn]
            for frame in expectation.frames:
                queue.extend(self._filter(conn, frame) if self._filter is not None else [frame])
            if expectation.close is not None:
                queue.append(Closed(expectation.close))
