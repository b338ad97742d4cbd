"""The Handoff between websockets' parser and the driver, with frames made by hand (no I/O)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from _sandbox_anyio import Handoff


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def message_received(self, message: str | bytes) -> None:
        self.calls.append(("message", message))

    def connection_lost(self, code: int, reason: str) -> None:
        self.calls.append(("lost", (code, reason)))


def new_handoff() -> Handoff:
    return Handoff(ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN))


def started() -> tuple[Handoff, Recorder]:
    handoff, recorder = new_handoff(), Recorder()
    handoff.start(recorder)
    return handoff, recorder


def fragments(opcode: Opcode, data: bytes, cuts: list[int]) -> list[Frame]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    return [Frame(opcode if i == 0 else Opcode.CONT, piece, fin=i == len(pieces) - 1) for i, piece in enumerate(pieces)]


@given(st.text(max_size=200), st.lists(st.integers(min_value=0, max_value=800), max_size=5))
def test_a_text_message_in_any_fragments_arrives_whole(text: str, cuts: list[int]) -> None:
    data = text.encode()
    handoff, recorder = started()
    for frame in fragments(Opcode.TEXT, data, [c for c in cuts if c <= len(data)]):
        assert handoff.take(frame)
    assert recorder.calls == [("message", text)]


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=5))
def test_a_binary_message_stays_bytes(data: bytes, cuts: list[int]) -> None:
    handoff, recorder = started()
    for frame in fragments(Opcode.BINARY, data, [c for c in cuts if c <= len(data)]):
        assert handoff.take(frame)
    assert recorder.calls == [("message", data)]


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
def test_control_frames_are_left_to_websockets(opcode: Opcode) -> None:
    handoff, recorder = started()
    assert not handoff.take(Frame(opcode, b""))
    assert recorder.calls == []


def test_invalid_utf8_fails_the_connection_with_1007() -> None:
    handoff, recorder = started()
    assert handoff.take(Frame(Opcode.TEXT, b"\xff\xfe"))
    assert handoff.failed
    assert handoff._protocol.close_sent is not None and handoff._protocol.close_sent.code == 1007
    assert handoff.take(Frame(Opcode.TEXT, b"parsed in the same read, after it"))
    assert recorder.calls == []


def test_what_arrives_before_start_is_held_then_delivered_in_order() -> None:
    handoff, recorder = new_handoff(), Recorder()
    handoff.take(Frame(Opcode.TEXT, b"one"))
    handoff.take(Frame(Opcode.TEXT, b"two"))
    handoff.lost(ConnectionClosed(Close(1001, "bye"), None))
    assert recorder.calls == []
    handoff.start(recorder)
    assert recorder.calls == [("message", "one"), ("message", "two"), ("lost", (1001, "bye"))]


@pytest.mark.parametrize(
    ("received", "sent", "expected"),
    [
        (Close(4000, "why"), None, (4000, "why")),
        (None, Close(1011, "keepalive ping timeout"), (1011, "keepalive ping timeout")),
        (None, Close(1000, ""), (1006, "")),  # we closed and heard nothing back: a loss
        (None, None, (1006, "")),
    ],
)
def test_the_end_is_reported_once_with_its_code(
    received: Close | None, sent: Close | None, expected: tuple[int, str]
) -> None:
    handoff, recorder = started()
    handoff.lost(ConnectionClosed(received, sent))
    handoff.lost(ConnectionClosed(None, None))
    assert recorder.calls == [("lost", expected)]
