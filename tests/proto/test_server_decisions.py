"""The server role's decisions, without I/O: stdin sequence, ``reconnect`` replies, attach checks.

Each test gives :class:`ServerProtocol` the facts a server gathers and checks
the exact frames it queues and what it tells the server to do.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox_proto import (
    ALL_EXTENSIONS,
    STDIN_ACK_BYTES,
    STDIN_ACK_FRAMES,
    AttachFacts,
    AttachStep,
    Close,
    CloseStdinRequest,
    CloseStdinRequested,
    ExecutionView,
    ProcessPhase,
    ReconnectDone,
    ReconnectRequest,
    ReconnectRequested,
    RemoteProtocolError,
    RestoreResult,
    ResumeStream,
    ServerProtocol,
    StdinAckFrame,
    StdinReceived,
    StdinRequest,
    decode_server_frame,
    encode_client_frame,
    encode_server_frame,
)

ID = "sandbox-5eed"


def ST(status: str) -> str:
    return '{"event":"status_update","status":"' + status + '"}'


def ERR(message: str) -> str:
    return json.dumps({"event": "error", "message": message}, separators=(",", ":"), ensure_ascii=False)


def ACK(seq: int) -> str:
    return '{"event":"stdin_ack","seq":' + str(seq) + "}"


SEQ_ERROR = [ST("SANDBOX_STDIN_ERROR"), ERR("Invalid stdin message format. 'seq' must be a positive integer.")]
RUNNING_ALL = (
    '{"event":"status_update","status":"SANDBOX_RUNNING",'
    '"extensions":["close_stdin","exec_ref","exit_code","seq","stdin_seq"]}'
)


def server(extensions: tuple[str, ...] = ALL_EXTENSIONS, *, running: bool = True) -> ServerProtocol:
    """A server role past setup; with ``running``, an exec is streaming."""
    proto = ServerProtocol(create=False, extensions=extensions)
    proto.sandbox_id = ID
    proto.send_running()
    if running:
        proto.exec_started()
    proto.data_to_send()
    return proto


def view(**changes: Any) -> ExecutionView:
    """A running exec whose frames 5..7 exist, 6 of them delivered, stdin accepted up to 3."""
    base = ExecutionView(
        running=True, done_delivered=False, first_seq=5, last_seq=7, delivered=6, stdin_seq=3, exit_code=None
    )
    return replace(base, **changes)


# --------------------------------------------------------------------------
# frames


class TestFrames:
    def test_all_extensions_are_advertised_sorted(self) -> None:
        proto = ServerProtocol(create=True)
        proto.send_running()
        assert proto.data_to_send() == [RUNNING_ALL]

    @pytest.mark.parametrize(
        ("supported", "requested", "running"),
        [
            (ALL_EXTENSIONS, None, '{"event":"status_update","status":"SANDBOX_RUNNING"}'),
            (ALL_EXTENSIONS, {"seq", "x"}, '{"event":"status_update","status":"SANDBOX_RUNNING","extensions":["seq"]}'),
            (ALL_EXTENSIONS, {"x"}, '{"event":"status_update","status":"SANDBOX_RUNNING","extensions":[]}'),
            ((), {"seq"}, '{"event":"status_update","status":"SANDBOX_RUNNING"}'),
        ],
        ids=["nothing-asked", "subset", "none-matched", "upstream-mode"],
    )
    def test_running_lists_what_was_asked_for_and_supported(
        self, supported: tuple[str, ...], requested: set[str] | None, running: str
    ) -> None:
        proto = ServerProtocol(create=True, extensions=supported, requested=requested)
        proto.send_running()
        assert proto.data_to_send() == [running]
        assert proto.extensions == set(supported) & (requested or set())

    def test_client_encodings_unchanged_without_the_new_fields(self) -> None:
        assert encode_client_frame(StdinRequest("x")) == '{"event":"stdin","data":"x"}'
        assert encode_client_frame(CloseStdinRequest()) == '{"action":"close_stdin"}'
        assert encode_client_frame(ReconnectRequest()) == '{"action":"reconnect"}'
        assert encode_client_frame(ReconnectRequest(4)) == '{"action":"reconnect","last_seq":4}'

    def test_client_encodings_with_stdin_seq(self) -> None:
        assert encode_client_frame(StdinRequest("x", 3)) == '{"event":"stdin","data":"x","seq":3}'
        assert encode_client_frame(CloseStdinRequest(4)) == '{"action":"close_stdin","seq":4}'
        assert encode_client_frame(ReconnectRequest(stdin_seq=True)) == '{"action":"reconnect","stdin_seq":true}'
        assert (
            encode_client_frame(ReconnectRequest(9, stdin_seq=True))
            == '{"action":"reconnect","last_seq":9,"stdin_seq":true}'
        )

    def test_stdin_ack_round_trip(self) -> None:
        assert encode_server_frame(StdinAckFrame(7)) == ACK(7)
        assert decode_server_frame(ACK(7)) == StdinAckFrame(7)

    @pytest.mark.parametrize("text", ['{"event":"stdin_ack"}', '{"event":"stdin_ack","seq":"1"}'])
    def test_malformed_stdin_ack(self, text: str) -> None:
        with pytest.raises(RemoteProtocolError):
            decode_server_frame(text)

    def test_server_reads_what_the_client_writes(self) -> None:
        proto = server()
        assert proto.receive(encode_client_frame(StdinRequest("x", 3))) == StdinReceived("x", 3)
        assert proto.receive(encode_client_frame(CloseStdinRequest(4))) == CloseStdinRequested(4)
        assert proto.receive(encode_client_frame(ReconnectRequest(9, stdin_seq=True))) == ReconnectRequested(9, True)
        assert proto.data_to_send() == []


# --------------------------------------------------------------------------
# stdin


class TestStdinSeq:
    def test_unnumbered_frames_as_before(self) -> None:
        proto = server()
        assert proto.receive('{"event":"stdin","data":"x"}') == StdinReceived("x", None)
        assert proto.receive('{"action":"close_stdin"}') == CloseStdinRequested(None)

    @pytest.mark.parametrize("value", ["0", "-1", "1.5", "1.0", "true", "false", '"1"', "null", "[1]"])
    @pytest.mark.parametrize("frame", ['{"event":"stdin","data":"x","seq":', '{"action":"close_stdin","seq":'])
    def test_bad_seq_is_the_documented_error(self, frame: str, value: str) -> None:
        proto = server()
        assert proto.receive(frame + value + "}") is None
        assert proto.data_to_send() == SEQ_ERROR
        assert not proto.closed

    def test_missing_data_is_reported_before_a_bad_seq(self) -> None:
        proto = server()
        assert proto.receive('{"event":"stdin","seq":0}') is None
        assert proto.data_to_send() == [
            ST("SANDBOX_STDIN_ERROR"),
            ERR("Invalid stdin message format. 'data' field is required."),
        ]

    def test_bad_seq_is_a_format_error_even_with_no_process(self) -> None:
        proto = server(running=False)
        assert proto.receive('{"event":"stdin","data":"x","seq":0}') is None
        assert proto.data_to_send() == SEQ_ERROR

    @pytest.mark.parametrize(
        "extensions", [(), ("exit_code", "seq", "close_stdin")], ids=["upstream", "without-stdin_seq"]
    )
    def test_seq_is_ignored_without_the_extension(self, extensions: tuple[str, ...]) -> None:
        proto = server(extensions)
        assert proto.receive('{"event":"stdin","data":"x","seq":"bad"}') == StdinReceived("x", None)
        assert proto.receive('{"event":"stdin","data":"x","seq":1}') == StdinReceived("x", None)
        assert proto.receive('{"action":"reconnect","stdin_seq":true}') == ReconnectRequested(None, False)
        assert proto.data_to_send() == []

    def test_close_stdin_with_seq_is_still_an_exec_request_upstream(self) -> None:
        proto = server(())
        assert proto.receive('{"action":"close_stdin","seq":1}') is None
        assert proto.data_to_send()[0] == ST("SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR")

    @pytest.mark.parametrize("value", ["1", '"yes"', "false", "null"])
    def test_reconnect_asks_for_an_ack_only_with_true(self, value: str) -> None:
        proto = server()
        assert proto.receive('{"action":"reconnect","stdin_seq":' + value + "}") == ReconnectRequested(None, False)

    def test_duplicates_are_not_new(self) -> None:
        proto = server()
        assert proto.is_new_stdin(StdinReceived("x", None), accepted=5)
        assert proto.is_new_stdin(CloseStdinRequested(None), accepted=5)
        assert not proto.is_new_stdin(StdinReceived("x", 5), accepted=5)
        assert not proto.is_new_stdin(StdinReceived("x", 1), accepted=5)
        assert not proto.is_new_stdin(CloseStdinRequested(5), accepted=5)
        assert proto.is_new_stdin(StdinReceived("x", 6), accepted=5)
        assert proto.is_new_stdin(StdinReceived("x", 9), accepted=5)  # "highest accepted", not "next expected"
        assert proto.data_to_send() == []  # dropped silently

    def test_ack_after_16_numbered_frames(self) -> None:
        proto = server()
        for seq in range(1, STDIN_ACK_FRAMES):
            proto.stdin_accepted(StdinReceived("x", seq))
            proto.stdin_accepted(StdinReceived("unnumbered", None))  # not counted
        assert proto.data_to_send() == []
        proto.stdin_accepted(CloseStdinRequested(STDIN_ACK_FRAMES))  # close_stdin counts as a frame
        assert proto.data_to_send() == [ACK(16)]
        for seq in range(17, 32):
            proto.stdin_accepted(StdinReceived("x", seq))
        assert proto.data_to_send() == []  # counted again from the last ack
        proto.stdin_accepted(StdinReceived("x", 32))
        assert proto.data_to_send() == [ACK(32)]

    def test_ack_after_256_kib_of_utf8(self) -> None:
        proto = server()
        proto.stdin_accepted(StdinReceived("é" * (STDIN_ACK_BYTES // 2 - 1), 1))
        assert proto.data_to_send() == []
        proto.stdin_accepted(StdinReceived("xy", 2))
        assert proto.data_to_send() == [ACK(2)]
        proto.stdin_accepted(StdinReceived("x" * STDIN_ACK_BYTES, 3))
        assert proto.data_to_send() == [ACK(3)]

    def test_reconnect_ack_restarts_the_count(self) -> None:
        proto = server()
        for seq in range(1, 10):
            proto.stdin_accepted(StdinReceived("x", seq))
        proto.answer_reconnect(ReconnectRequested(None, True), view(stdin_seq=9), streaming_cursor=7)
        assert proto.data_to_send()[0] == ACK(9)
        for seq in range(10, 25):
            proto.stdin_accepted(StdinReceived("x", seq))
        assert proto.data_to_send() == []

    def test_no_ack_without_the_extension(self) -> None:
        proto = server(("exit_code", "seq", "close_stdin"))
        for seq in range(1, 40):
            proto.stdin_accepted(StdinReceived("x" * STDIN_ACK_BYTES, seq))
        proto.send_stdin_ack(3)
        assert proto.data_to_send() == []


# --------------------------------------------------------------------------
# reconnect


class TestReconnect:
    def test_no_exec_is_one_done_after_the_ack(self) -> None:
        proto = server(running=False)
        assert proto.answer_reconnect(ReconnectRequested(None, True), None) == ReconnectDone(done_delivered=False)
        assert proto.data_to_send() == [ACK(0), ST("SANDBOX_EXECUTION_DONE")]

    def test_without_stdin_seq_no_ack(self) -> None:
        proto = server(running=False)
        proto.answer_reconnect(ReconnectRequested(None), None)
        assert proto.data_to_send() == [ST("SANDBOX_EXECUTION_DONE")]

    def test_running_exec_resumes_after_what_was_delivered(self) -> None:
        proto = server(running=False)
        answer = proto.answer_reconnect(ReconnectRequested(None, True), view())
        assert answer == ResumeStream(cursor=6, report_gaps=False)
        assert proto.data_to_send() == [ACK(3), ST("SANDBOX_EXECUTION_RUNNING")]
        assert proto.process is ProcessPhase.RUNNING

    @pytest.mark.parametrize(("last_seq", "cursor"), [(5, 5), (6, 6), (7, 6), (1, 4), (0, 4)])
    def test_last_seq_resumes_there_with_gap_reports(self, last_seq: int, cursor: int) -> None:
        # Never past what was delivered, never before the exec's own frames.
        proto = server(running=False)
        assert proto.answer_reconnect(ReconnectRequested(last_seq), view()) == ResumeStream(cursor, True)
        assert proto.data_to_send() == [ST("SANDBOX_EXECUTION_RUNNING")]

    @pytest.mark.parametrize(("last_seq", "cursor"), [(None, 7), (5, 5), (9, 7)])
    def test_connection_already_streaming_resumes_from_its_cursor(self, last_seq: int | None, cursor: int) -> None:
        proto = server()
        answer = proto.answer_reconnect(ReconnectRequested(last_seq), view(delivered=7), streaming_cursor=7)
        assert answer == ResumeStream(cursor, last_seq is not None)
        assert proto.data_to_send() == [ST("SANDBOX_EXECUTION_RUNNING")]

    def test_streaming_wins_even_when_the_exec_ended(self) -> None:
        proto = server()
        done = view(running=False, done_delivered=True, delivered=7, exit_code=0)
        assert proto.answer_reconnect(ReconnectRequested(None), done, streaming_cursor=7) == ResumeStream(7, False)

    def test_ended_exec_with_output_not_delivered_is_replayed(self) -> None:
        proto = server(running=False)
        ended = view(running=False, exit_code=4)
        assert proto.answer_reconnect(ReconnectRequested(None), ended) == ResumeStream(6, False)
        assert proto.data_to_send() == [ST("SANDBOX_EXECUTION_RUNNING")]

    def test_ended_exec_everything_but_done_delivered(self) -> None:
        proto = server(running=False)
        ended = view(running=False, delivered=7, exit_code=4)
        assert proto.answer_reconnect(ReconnectRequested(None), ended) == ReconnectDone(done_delivered=True)
        assert proto.data_to_send() == ['{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","exit_code":4}']

    def test_ended_exec_fully_delivered_is_one_bare_done(self) -> None:
        proto = server(running=False)
        ended = view(running=False, done_delivered=True, delivered=7, exit_code=4)
        assert proto.answer_reconnect(ReconnectRequested(None, True), ended) == ReconnectDone(done_delivered=True)
        assert proto.data_to_send() == [ACK(3), ST("SANDBOX_EXECUTION_DONE")]

    def test_ended_exec_fully_delivered_with_last_seq_has_the_exit_code(self) -> None:
        proto = server(running=False)
        ended = view(running=False, done_delivered=True, delivered=7, exit_code=4)
        assert proto.answer_reconnect(ReconnectRequested(7), ended) == ReconnectDone(done_delivered=True)
        assert proto.data_to_send() == ['{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","exit_code":4}']

    def test_missed_frames_are_replayed_even_after_done(self) -> None:
        proto = server(running=False)
        ended = view(running=False, done_delivered=True, delivered=7, exit_code=4)
        assert proto.answer_reconnect(ReconnectRequested(6), ended) == ResumeStream(6, True)

    def test_deleted_sandbox_is_one_done_but_the_ack_is_true(self) -> None:
        proto = server(running=False)
        gone = view(running=False, sandbox_deleted=True, exit_code=-9)
        assert proto.answer_reconnect(ReconnectRequested(2, True), gone) == ReconnectDone(done_delivered=False)
        assert proto.data_to_send() == [ACK(3), ST("SANDBOX_EXECUTION_DONE")]

    def test_upstream_profile_never_acks_nor_numbers(self) -> None:
        proto = server((), running=False)
        request = proto.receive('{"action":"reconnect","last_seq":3,"stdin_seq":true}')
        assert request == ReconnectRequested(None, False)
        assert proto.answer_reconnect(request, view(running=False, exit_code=1)) == ResumeStream(6, False)
        assert proto.data_to_send() == [ST("SANDBOX_EXECUTION_RUNNING")]


# --------------------------------------------------------------------------
# attach


PD = ST("SANDBOX_PERMISSION_DENIAL_ERROR")


class TestAttach:
    def test_free_sandbox(self) -> None:
        proto = ServerProtocol(create=False)
        facts = AttachFacts(ID, token_present=True, found=True, token_ok=True, phase=ProcessPhase.EXITED)
        assert proto.answer_attach(facts) is AttachStep.ATTACHED
        assert proto.data_to_send() == [RUNNING_ALL]
        assert (proto.sandbox_id, proto.process, proto.setup_done) == (ID, ProcessPhase.EXITED, True)

    def test_missing_token_first(self) -> None:
        proto = ServerProtocol(create=False)
        assert proto.answer_attach(AttachFacts(ID, token_present=False, found=True)) is AttachStep.REFUSED
        assert proto.data_to_send() == [PD, ERR("Sandbox token is missing."), Close(4000)]

    def test_wrong_token_before_in_use(self) -> None:
        proto = ServerProtocol(create=False)
        facts = AttachFacts(ID, token_present=True, found=True, token_ok=False, observed=True)
        assert proto.answer_attach(facts) is AttachStep.REFUSED
        assert proto.data_to_send() == [PD, ERR("Invalid sandbox token."), Close(4000)]

    def test_in_use(self) -> None:
        proto = ServerProtocol(create=False)
        facts = AttachFacts(ID, token_present=True, found=True, token_ok=True, observed=True)
        assert proto.answer_attach(facts) is AttachStep.REFUSED
        assert proto.data_to_send() == [ST("SANDBOX_IN_USE"), Close(1011)]
        assert not proto.setup_done

    def test_not_found_without_checkpoint_storage(self) -> None:
        proto = ServerProtocol(create=False, checkpoint_enabled=False)
        assert proto.answer_attach(AttachFacts(ID, token_present=True)) is AttachStep.REFUSED
        assert proto.data_to_send() == [ST("SANDBOX_NOT_FOUND"), Close(1011)]

    def test_restore_then_attach(self) -> None:
        proto = ServerProtocol(create=False)
        facts = AttachFacts(ID, token_present=True)
        assert proto.answer_attach(facts) is AttachStep.RESTORE
        assert proto.data_to_send() == [ST("SANDBOX_RESTORING")]
        restored = replace(facts, restore=RestoreResult.RESTORED, found=True, token_ok=True)
        assert proto.answer_attach(restored) is AttachStep.ATTACHED
        assert proto.data_to_send() == [RUNNING_ALL]

    @pytest.mark.parametrize(
        ("result", "frames"),
        [
            (RestoreResult.NOT_FOUND, [ST("SANDBOX_NOT_FOUND"), Close(1011)]),
            (RestoreResult.PERMISSION_DENIED, [PD, ERR("Invalid sandbox token."), Close(4000)]),
            (
                RestoreResult.FAILED,
                [
                    ST("SANDBOX_RESTORE_ERROR"),
                    ERR(f"Failed to restore sandbox {ID}: Latest checkpoint not found for sandbox {ID}"),
                    Close(4000),
                ],
            ),
        ],
    )
    def test_restore_refusals(self, result: RestoreResult, frames: list[object]) -> None:
        proto = ServerProtocol(create=False)
        facts = AttachFacts(
            ID, token_present=True, restore=result, restore_error=f"Latest checkpoint not found for sandbox {ID}"
        )
        assert proto.answer_attach(facts) is AttachStep.REFUSED
        assert proto.data_to_send() == frames

    def test_restored_sandbox_still_checks_token_and_use(self) -> None:
        # A concurrent attach may have restored it: its token and use are checked as for a live one.
        proto = ServerProtocol(create=False)
        facts = AttachFacts(ID, token_present=True, found=True, restore=RestoreResult.RESTORED, observed=True)
        assert proto.answer_attach(replace(facts, token_ok=True)) is AttachStep.REFUSED
        assert proto.data_to_send() == [ST("SANDBOX_IN_USE"), Close(1011)]

    @given(
        token_present=st.booleans(),
        found=st.booleans(),
        restore=st.none() | st.sampled_from(RestoreResult),
        token_ok=st.booleans(),
        observed=st.booleans(),
        checkpoint_enabled=st.booleans(),
    )
    def test_every_combination_has_one_defined_answer(
        self,
        token_present: bool,
        found: bool,
        restore: RestoreResult | None,
        token_ok: bool,
        observed: bool,
        checkpoint_enabled: bool,
    ) -> None:
        proto = ServerProtocol(create=False, checkpoint_enabled=checkpoint_enabled)
        facts = AttachFacts(ID, token_present, found, restore, "reason", token_ok, observed)
        step = proto.answer_attach(facts)
        out = proto.data_to_send()
        if step is AttachStep.REFUSED:
            assert isinstance(out[-1], Close) and proto.closed and not proto.setup_done
        elif step is AttachStep.RESTORE:
            assert out == [ST("SANDBOX_RESTORING")]
            assert token_present and restore is None and not found and checkpoint_enabled
        else:
            assert out == [RUNNING_ALL]
            assert token_present and found and token_ok and not observed
            assert restore in (None, RestoreResult.RESTORED, RestoreResult.NOT_FOUND)


def test_a_huge_unsupported_language_is_quoted_in_part() -> None:
    # Upstream quotes the value whole: a 16 MiB list would make an error frame four times its size.
    proto = server()
    assert proto.receive(json.dumps({"language": "x" * 100_000, "code": ""})) is None
    frames = proto.data_to_send()
    assert frames[0] == ST("SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR")
    message = json.loads(frames[1])["message"]
    assert message == f"Unsupported language: '{'x' * 100}...'. Supported languages are: python, bash"
