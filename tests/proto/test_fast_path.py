"""The stdout/stderr fast path of ``ClientProtocol.receive`` behaves exactly as the full decoder."""

from __future__ import annotations

import json
import logging

import pytest

from sandbox_proto import ClientProtocol, InitRequest, Output, decode_server_frame
from sandbox_proto._frames import load_json


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _status(value: str, **extra: object) -> str:
    return _dumps({"event": "status_update", "status": value, **extra})


def _running(extensions: tuple[str, ...] = ()) -> ClientProtocol:
    protocol = ClientProtocol("http://127.0.0.1:1", init=InitRequest())
    protocol.connection_opened([])
    protocol.receive(_status("SANDBOX_CREATING"))
    protocol.receive(_dumps({"event": "sandbox_id", "sandbox_id": "sb-1", "sandbox_token": "t" * 32}))
    protocol.receive(_status("SANDBOX_RUNNING", extensions=list(extensions)))
    protocol.events()
    return protocol


def _exec(protocol: ClientProtocol) -> int:
    exec_id = protocol.exec("python", "")
    protocol.receive(_status("SANDBOX_EXECUTION_RUNNING"))
    protocol.events()
    return exec_id


def test_output_while_running() -> None:
    protocol = _running()
    exec_id = _exec(protocol)
    protocol.receive(_dumps({"event": "stdout", "data": "out"}))
    protocol.receive(_dumps({"event": "stderr", "data": "err"}))
    assert protocol.events() == [Output(exec_id, "stdout", "out"), Output(exec_id, "stderr", "err")]


def test_output_dropped_with_no_running_process() -> None:
    protocol = _running()
    protocol.receive(_dumps({"event": "stdout", "data": "early"}))
    assert protocol.events() == []
    protocol.exec("python", "")  # STARTING: output is still dropped
    protocol.receive(_dumps({"event": "stdout", "data": "early"}))
    assert protocol.events() == []


def test_output_after_the_session_ended_is_ignored() -> None:
    protocol = _running()
    _exec(protocol)
    protocol.close()
    protocol.events()
    protocol.receive(_dumps({"event": "stdout", "data": "late"}))
    assert protocol.events() == []


def test_seq_deduplicated_only_when_advertised() -> None:
    protocol = _running(("seq",))
    exec_id = _exec(protocol)
    for seq, data in ((1, "a"), (2, "b"), (2, "b"), (1, "a"), (3, "c")):
        protocol.receive(_dumps({"event": "stdout", "data": data, "seq": seq}))
    assert [e.data for e in protocol.events() if isinstance(e, Output)] == ["a", "b", "c"]

    plain = _running(())
    _exec(plain)
    for seq, data in ((1, "a"), (1, "a")):
        plain.receive(_dumps({"event": "stdout", "data": data, "seq": seq}))
    assert [e.data for e in plain.events() if isinstance(e, Output)] == ["a", "a"]
    del exec_id


@pytest.mark.parametrize(
    "message",
    [
        '{"event":"stdout","data":5}',
        '{"event":"stdout"}',
        '{"event":"stdout","data":"x","seq":"1"}',
        '{"event":"stdout","data":"x","seq":true}',
        '{"event":"stdout","data":"x","seq":1.0}',
        '{"event":"stdout","data":"x"} trailing',
        '["stdout"]',
        "not json",
        b'{"event":"stdout","data":"x"}',
    ],
)
def test_malformed_output_is_logged_and_ignored(message: str | bytes, caplog: pytest.LogCaptureFixture) -> None:
    protocol = _running()
    _exec(protocol)
    with caplog.at_level(logging.WARNING, logger="sandbox_proto.client"):
        protocol.receive(message)
    assert protocol.events() == []
    assert "malformed" in caplog.text


@pytest.mark.parametrize(
    "text",
    [
        '{"event":"stdout","data":"x"}',
        ' {"event":"stdout","data":"x"} ',
        '{"a":[1,2.5,null,true,"\\u00e9"],"b":{"c":NaN}}',
        "\ufeff{}",
        '{"a":1}{"b":2}',
        "",
        "[" * 100_000,
    ],
)
def test_load_json_matches_json_loads(text: str) -> None:
    try:
        expected = json.loads(text)
    except (ValueError, RecursionError):
        with pytest.raises(Exception, match="not valid JSON"):
            load_json(text)
        return
    assert json.dumps(load_json(text)) == json.dumps(expected)


def test_decoder_unchanged_for_output_frames() -> None:
    frame = decode_server_frame('{"event":"stderr","data":"x","seq":4}')
    assert (frame.stream, frame.data, frame.seq) == ("stderr", "x", 4)  # type: ignore[union-attr]
