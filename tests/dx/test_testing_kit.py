"""The fuzzing kit of sandbox_proto.testing: its strategies produce what they promise."""

from __future__ import annotations

import contextlib
import json

from hypothesis import given, settings

from sandbox_proto import (
    ALL_EXTENSIONS,
    ClientProtocol,
    InitRequest,
    RemoteProtocolError,
    ServerFrame,
    ServerProtocol,
    Status,
    UnknownFrame,
    decode_server_frame,
    encode_client_frame,
    encode_server_frame,
)
from sandbox_proto.testing import (
    client_frames,
    client_texts,
    malformed_texts,
    server_frames,
    server_texts,
)

# Enough to exercise each strategy branch; the property suites of tests/proto fuzz the core itself.
kit = settings(max_examples=60, deadline=None)
EXTENSION_KEYS = {"extensions", "exit_code", "seq", "from_seq", "to_seq", "last_seq"}


@kit
@given(server_frames())
def test_server_frames_survive_the_codec(frame: ServerFrame) -> None:
    # The codec does not write unknown events (a newer server would); build them by hand.
    text = json.dumps({"event": frame.event}) if isinstance(frame, UnknownFrame) else encode_server_frame(frame)
    assert decode_server_frame(text) == frame


@kit
@given(server_texts(extended=False, unknown=False), client_texts(extended=False))
def test_upstream_only_traffic_has_no_extension_fields(server_text: str, client_text: str) -> None:
    for text in (server_text, client_text):
        obj = json.loads(text)
        assert isinstance(obj, dict)
        assert not EXTENSION_KEYS & obj.keys()
        assert obj.get("action") != "close_stdin"
    assert json.loads(server_text).get("event") != "output_gap"


@kit
@given(server_texts())
def test_a_running_client_never_raises_on_server_texts(text: str) -> None:
    client = ClientProtocol("http://127.0.0.1:1", init=InitRequest())
    client.handshake()
    client.connection_opened([])
    client.receive(text)  # any frame, in any state: events or a defined failure, never an exception
    client.events()


@kit
@given(client_frames())
def test_a_server_answers_every_client_frame(frame: object) -> None:
    server = ServerProtocol(create=isinstance(frame, InitRequest), extensions=ALL_EXTENSIONS)
    text = encode_client_frame(frame)  # type: ignore[arg-type]
    if isinstance(frame, InitRequest):
        server.receive_init(text)
        assert server.data_to_send()  # at least SANDBOX_CREATING
    else:
        server.send_running()
        server.receive(text)


@kit
@given(malformed_texts())
def test_malformed_texts_are_refused_in_a_defined_way(text: str | bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):  # the only exception decoding may raise
        decode_server_frame(text)
    server = ServerProtocol(create=False)
    server.send_running()
    server.data_to_send()
    request = server.receive(text)
    try:
        is_object = isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):  # the deeply nested arrays of the kit
        is_object = False
    if not is_object:
        # Not a JSON object: SANDBOX_ERROR and its error frame, nothing to act on (11.2 S6).
        assert request is None
        assert server.data_to_send()[0] == json.dumps(
            {"event": "status_update", "status": Status.SANDBOX_ERROR.value}, separators=(",", ":")
        )


def test_hypothesis_is_only_imported_by_the_kit() -> None:
    import subprocess
    import sys

    code = "import sys, sandbox_proto; assert 'hypothesis' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
