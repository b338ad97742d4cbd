"""The per-exec fast paths of ``ClientProtocol`` behave exactly as the general ones.

``receive`` recognises the two statuses of every exec by their whole text, or
once parsed; ``exec`` writes its request without the generic encoder. Each
scenario here runs twice, with the fast paths and with them switched off, and
the transcripts (events, states, frames sent, log records) must be equal.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox_proto import (
    ALL_EXTENSIONS,
    ClientProtocol,
    ExecRequest,
    ExecStarted,
    InitRequest,
    ProcessEnded,
    _client,
    encode_client_frame,
)
from sandbox_proto._frames import encode_exec_request

_LOGGER = "sandbox_proto.client"


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _status(value: object, **extra: object) -> str:
    return _dumps({"event": "status_update", "status": value, **extra})


_RUNNING = "SANDBOX_EXECUTION_RUNNING"
_DONE = "SANDBOX_EXECUTION_DONE"
_SEED = 15
#: The ``exec_ref`` of the first exec of a protocol seeded with ``_SEED``.
_REF = f"{random.Random(_SEED).getrandbits(64):016x}"

#: What a server may send about an exec: the exact texts, then everything near them.
_MESSAGES: list[str | bytes] = [
    _status(_RUNNING),
    _status(_DONE),
    _status(_DONE, exit_code=0),
    _status(_DONE, exit_code=255),
    _status(_DONE, exit_code=-64),
    _status(_DONE, exit_code=-65),  # outside the recognised texts: parsed
    _status(_DONE, exit_code=256),
    _status(_DONE, exit_code=None),
    _status(_DONE, exit_code="0"),
    _status(_DONE, exit_code=True),
    _status(_DONE, exit_code=1.0),
    _status(_RUNNING, ref=_REF),
    _status(_RUNNING, ref="0123456789abcdef"),
    _status(_RUNNING, ref="someone else's"),
    _status(_RUNNING, ref=None),
    _status(_RUNNING, ref=5),
    _status(_RUNNING, extensions=["seq"]),
    _status(_RUNNING, extensions=None),
    _status(_RUNNING, extensions="seq"),
    _status(["SANDBOX_EXECUTION_RUNNING"]),
    _status({"a": 1}),
    _status(None),
    _status("SANDBOX_EXECUTION_FORCE_KILLED"),
    _status("SANDBOX_EXECUTION_TOTALLY_NEW"),
    '{"status":"SANDBOX_EXECUTION_DONE","event":"status_update"}',
    '{"event": "status_update", "status": "SANDBOX_EXECUTION_DONE"}',
    '{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","exit_code":0} ',
    '{"event":"status_update","status":"SANDBOX_EXECUTION_DONE"',
    '{"event":"status_update","status":"SANDBOX_EXECUTION_\\u0044ONE"}',
    _status(_DONE).encode(),
    _dumps({"event": "stdout", "data": "x"}),
]


def _running(extensions: tuple[str, ...]) -> ClientProtocol:
    protocol = ClientProtocol("http://127.0.0.1:1", init=InitRequest(), rng=random.Random(_SEED))
    protocol.connection_opened([])
    protocol.receive(_status("SANDBOX_CREATING"))
    protocol.receive(_dumps({"event": "sandbox_id", "sandbox_id": "sb-1", "sandbox_token": "t" * 32}))
    protocol.receive(_status("SANDBOX_RUNNING", extensions=list(extensions)))
    protocol.data_to_send()
    protocol.events()
    return protocol


def _transcript(
    caplog: pytest.LogCaptureFixture, extensions: tuple[str, ...], setup: str, messages: list[str | bytes]
) -> list[object]:
    caplog.clear()
    protocol = _running(extensions)
    if setup == "starting":
        protocol.exec("python", "")
    elif setup == "running":
        protocol.exec("python", "")
        protocol.receive(_status(_RUNNING))
    elif setup == "ended":
        protocol.exec("python", "")
        protocol.close()
    elif setup == "adopting":
        protocol.auto_reconnect = True
        protocol.exec("python", "")
        protocol.connection_closed(1006, now=0.0)
        protocol.connection_opened([])
        protocol.receive(_status("SANDBOX_RUNNING", extensions=list(extensions)))
    # Events by repr: their errors are new exception objects each run.
    out: list[object] = [repr(protocol.events()), protocol.data_to_send()]
    for message in messages:
        protocol.receive(message)
        out += [repr(protocol.events()), protocol.data_to_send(), protocol.state, protocol.process_state]
    out.append([(record.levelno, record.getMessage()) for record in caplog.records])
    return out


@pytest.mark.parametrize("extensions", [(), tuple(ALL_EXTENSIONS)], ids=["upstream", "extended"])
@pytest.mark.parametrize("setup", ["idle", "starting", "running", "ended", "adopting"])
@pytest.mark.parametrize("message", _MESSAGES)
def test_status_fast_paths_match_the_full_decoder(
    message: str | bytes,
    setup: str,
    extensions: tuple[str, ...],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The message twice (a duplicate, a stray), then a whole exec's pair after it.
    messages = [message, message, _status(_RUNNING), _status(_DONE, exit_code=3)]
    with caplog.at_level(logging.DEBUG, logger=_LOGGER):
        fast = _transcript(caplog, extensions, setup, messages)
        # The reference: every status through the full decoder.
        monkeypatch.setattr(_client, "_EXEC_STATUS_TEXTS", {})
        monkeypatch.setattr(_client, "_EXEC_STATUSES", {})
        slow = _transcript(caplog, extensions, setup, messages)
    assert fast == slow


def test_exec_round_trip_on_the_fast_paths() -> None:
    protocol = _running(tuple(ALL_EXTENSIONS))
    exec_id = protocol.exec("python", "print(1)")
    [request] = protocol.data_to_send()
    ref = json.loads(request)["ref"]
    assert request == _dumps({"language": "python", "code": "print(1)", "ref": ref})
    protocol.receive(_status(_RUNNING, ref=ref))
    assert protocol.events() == [ExecStarted(exec_id)]
    protocol.receive(_status(_DONE, exit_code=7))
    assert protocol.events() == [ProcessEnded(exec_id, 7, None)]

    upstream = _running(())
    exec_id = upstream.exec("python", "")
    assert upstream.data_to_send() == ['{"language":"python","code":""}']
    upstream.receive(_status(_RUNNING))
    upstream.receive(_status(_DONE, exit_code=7))  # not granted: ignored
    assert upstream.events() == [ExecStarted(exec_id), ProcessEnded(exec_id, None, None)]


def test_events_stay_hashable_and_comparable() -> None:
    assert {ExecStarted(1), ExecStarted(1)} == {ExecStarted(1)}
    assert hash(ProcessEnded(1, 0, None)) == hash(ProcessEnded(1, 0, None))


_ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=()))


@given(_ANY_TEXT, _ANY_TEXT, st.none() | _ANY_TEXT)
def test_exec_request_text_is_the_generic_encoders(language: str, code: str, ref: str | None) -> None:
    obj = {"language": language, "code": code} if ref is None else {"language": language, "code": code, "ref": ref}
    expected = _dumps(obj)
    assert encode_exec_request(language, code, ref) == expected
    assert encode_client_frame(ExecRequest(language, code, ref)) == expected


@pytest.mark.parametrize("code", [5, None, ["x"], {"a": 1}])
def test_exec_request_of_untyped_values_is_the_generic_encoders(code: object) -> None:
    assert encode_exec_request("python", code) == _dumps({"language": "python", "code": code})  # type: ignore[arg-type]
