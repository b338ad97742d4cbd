"""Hypothesis strategies for every frame of the protocol."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from .._frames import (
    CheckpointRequest,
    ClientFrame,
    CloseStdinRequest,
    ErrorFrame,
    ExecRequest,
    InitRequest,
    KillProcessRequest,
    KillSandboxRequest,
    OutputFrame,
    OutputGapFrame,
    ReconnectRequest,
    SandboxIdFrame,
    ServerFrame,
    SnapshotRequest,
    StatusFrame,
    StdinAckFrame,
    StdinRequest,
    UnknownFrame,
    encode_client_frame,
    encode_server_frame,
)
from .._server import ALL_EXTENSIONS
from .._status import Status, parse_status

__all__ = [
    "client_frames",
    "client_texts",
    "error_frames",
    "exec_requests",
    "init_requests",
    "malformed_texts",
    "output_frames",
    "output_gap_frames",
    "reconnect_requests",
    "sandbox_id_frames",
    "sandbox_ids",
    "sandbox_tokens",
    "server_frames",
    "server_texts",
    "snapshot_names",
    "snapshot_requests",
    "status_frames",
    "statuses",
    "stdin_ack_frames",
    "stdin_requests",
    "unknown_frames",
]

#: Server ``event`` values this library understands; anything else decodes to :class:`UnknownFrame`.
_KNOWN_EVENTS = frozenset({"status_update", "sandbox_id", "stdout", "stderr", "error", "output_gap", "stdin_ack"})

# Output text: any Unicode the JSON codec can carry, including control characters and
# astral-plane characters; lone surrogates are excluded because they are not UTF-8.
_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=64)


# --------------------------------------------------------------------------
# building blocks


def statuses(*, unknown: bool = True) -> st.SearchStrategy[Status | str]:
    """Status values: every one of :class:`Status`, and (``unknown=True``) strings that are none of them."""
    known: st.SearchStrategy[Status | str] = st.sampled_from(list(Status))
    if not unknown:
        return known
    # A future server may add statuses; clients must tolerate them (protocol.md 4.1).
    strange = st.text(max_size=40).filter(lambda s: not isinstance(parse_status(s), Status))
    return known | strange


def sandbox_ids() -> st.SearchStrategy[str]:
    """Sandbox ids: upstream's ``sandbox-xxxx`` shape, longer ones, and other URL-safe strings."""
    return st.one_of(
        st.from_regex(r"sandbox-[0-9a-f]{4}", fullmatch=True),
        st.from_regex(r"sandbox-[0-9a-f]{12}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9._~-]{1,40}", fullmatch=True),
    )


def sandbox_tokens() -> st.SearchStrategy[str]:
    """Sandbox tokens: 32 or 64 lowercase hex digits, as upstream and the reference server make them."""
    return st.from_regex(r"[0-9a-f]{32}", fullmatch=True) | st.from_regex(r"[0-9a-f]{64}", fullmatch=True)


def snapshot_names(*, valid: bool = True) -> st.SearchStrategy[str]:
    """Snapshot names the reference server accepts; ``valid=False`` adds names it must refuse (S7)."""
    good = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,40}", fullmatch=True)
    if valid:
        return good
    bad = st.sampled_from(["", ".", "..", "../etc", "a/b", ".hidden", "x" * 129, "name with space"])
    return good | bad | st.text(max_size=20)


# --------------------------------------------------------------------------
# client -> server


def init_requests() -> st.SearchStrategy[InitRequest]:
    """Init messages of ``/create`` with every combination of options (valid or not for a server)."""
    return st.builds(
        InitRequest,
        idle_timeout=st.none()
        | st.integers(min_value=0, max_value=10**6)
        | st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
        enable_checkpoint=st.booleans(),
        enable_idle_timeout_auto_checkpoint=st.booleans(),
        enable_sandbox_handoff=st.booleans(),
        filesystem_snapshot_name=st.none() | snapshot_names(),
        send_null_idle_timeout=st.booleans(),
    )


def exec_requests(*, languages: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[ExecRequest]:
    """Exec requests; the language is ``python`` or ``bash`` unless ``languages`` says otherwise."""
    return st.builds(ExecRequest, languages or st.sampled_from(["python", "bash"]), _text)


# Stdin numbers (extension stdin_seq): per exec from 1; small ones most of the time, so runs repeat them.
_stdin_seqs = st.integers(min_value=1, max_value=8) | st.integers(min_value=1, max_value=2**31)


def stdin_requests(*, extended: bool = False) -> st.SearchStrategy[StdinRequest]:
    """Stdin messages; with ``extended``, some carry a ``seq`` (extension ``stdin_seq``)."""
    seqs: st.SearchStrategy[int | None] = st.none()
    if extended:
        seqs = seqs | _stdin_seqs
    return st.builds(StdinRequest, _text, seqs)


def snapshot_requests() -> st.SearchStrategy[SnapshotRequest]:
    return st.builds(SnapshotRequest, snapshot_names())


def reconnect_requests(*, extended: bool = True) -> st.SearchStrategy[ReconnectRequest]:
    """``reconnect`` actions; with ``extended``, some carry ``last_seq`` (extension ``seq``) and
    ``"stdin_seq": true`` (extension ``stdin_seq``: the reply starts with a ``stdin_ack``)."""
    if not extended:
        return st.just(ReconnectRequest())
    return st.builds(ReconnectRequest, st.none() | st.integers(min_value=0, max_value=2**31), st.booleans())


def client_frames(*, extended: bool = True) -> st.SearchStrategy[ClientFrame]:
    """Every kind of client frame, the init message included."""
    frames: list[st.SearchStrategy[ClientFrame]] = [
        init_requests(),
        exec_requests(),
        stdin_requests(extended=extended),
        st.just(KillProcessRequest()),
        st.just(KillSandboxRequest()),
        st.just(CheckpointRequest()),
        snapshot_requests(),
        reconnect_requests(extended=extended),
    ]
    if extended:
        frames.append(st.builds(CloseStdinRequest, st.none() | _stdin_seqs))
    return st.one_of(frames)


def client_texts(*, extended: bool = True) -> st.SearchStrategy[str]:
    """The encoded text of :func:`client_frames`."""
    return client_frames(extended=extended).map(encode_client_frame)


# --------------------------------------------------------------------------
# server -> client


def status_frames(*, extended: bool = True, unknown: bool = True) -> st.SearchStrategy[StatusFrame]:
    """``status_update`` frames; with ``extended``, ``extensions`` on RUNNING and ``exit_code`` on DONE.

    Extension fields appear only on the status that carries them on the wire
    (section 15), so every frame is one a conforming server could send.
    """

    @st.composite
    def build(draw: st.DrawFn) -> StatusFrame:
        status = draw(statuses(unknown=unknown))
        extensions: tuple[str, ...] | None = None
        exit_code: int | None = None
        if extended and status == Status.SANDBOX_RUNNING:
            names = draw(st.none() | st.lists(st.sampled_from(ALL_EXTENSIONS), unique=True))
            extensions = None if names is None else tuple(names)
        if extended and status == Status.SANDBOX_EXECUTION_DONE:
            exit_code = draw(st.none() | st.integers(min_value=-64, max_value=255))
        return StatusFrame(status, extensions, exit_code)

    return build()


def sandbox_id_frames() -> st.SearchStrategy[SandboxIdFrame]:
    """``sandbox_id`` frames; a few without a token, as older servers sent them (4.2)."""
    return st.builds(SandboxIdFrame, sandbox_ids(), sandbox_tokens() | st.none())


def output_frames(*, extended: bool = True) -> st.SearchStrategy[OutputFrame]:
    """``stdout``/``stderr`` frames; with ``extended``, most carry a ``seq``."""
    seqs: st.SearchStrategy[int | None] = st.none()
    if extended:
        seqs = seqs | st.integers(min_value=1, max_value=2**31)
    return st.builds(OutputFrame, st.sampled_from(["stdout", "stderr"]), _text, seqs)


def error_frames() -> st.SearchStrategy[ErrorFrame]:
    return st.builds(ErrorFrame, _text)


def output_gap_frames() -> st.SearchStrategy[OutputGapFrame]:
    """``output_gap`` frames (extension ``seq``): ``from_seq <= to_seq``."""
    return st.tuples(st.integers(min_value=1, max_value=2**31), st.integers(min_value=0, max_value=1000)).map(
        lambda pair: OutputGapFrame(pair[0], pair[0] + pair[1])
    )


def stdin_ack_frames() -> st.SearchStrategy[StdinAckFrame]:
    """``stdin_ack`` frames (extension ``stdin_seq``): the exec's stdin up to ``seq`` is accepted; 0 for none."""
    return st.builds(StdinAckFrame, st.integers(min_value=0, max_value=8) | st.integers(min_value=0, max_value=2**31))


def unknown_frames() -> st.SearchStrategy[UnknownFrame]:
    """Frames with an ``event`` this library does not know, which clients must ignore (section 4)."""
    return st.builds(UnknownFrame, st.text(max_size=20).filter(lambda e: e not in _KNOWN_EVENTS))


def server_frames(*, extended: bool = True, unknown: bool = True) -> st.SearchStrategy[ServerFrame]:
    """Every kind of server frame; ``unknown`` adds unknown statuses and unknown events."""
    frames: list[st.SearchStrategy[ServerFrame]] = [
        status_frames(extended=extended, unknown=unknown),
        sandbox_id_frames(),
        output_frames(extended=extended),
        error_frames(),
    ]
    if extended:
        frames += [output_gap_frames(), stdin_ack_frames()]
    if unknown:
        frames.append(unknown_frames())
    return st.one_of(frames)


def _encode_server(frame: ServerFrame) -> str:
    if isinstance(frame, UnknownFrame):
        # The codec refuses to write events it does not know; a newer server would send this.
        return json.dumps({"event": frame.event}, separators=(",", ":"), ensure_ascii=False)
    return encode_server_frame(frame)


def server_texts(*, extended: bool = True, unknown: bool = True) -> st.SearchStrategy[str]:
    """The encoded text of :func:`server_frames`, in the server's compact format (1.2)."""
    return server_frames(extended=extended, unknown=unknown).map(_encode_server)


# --------------------------------------------------------------------------
# garbage


def malformed_texts() -> st.SearchStrategy[str | bytes]:
    """Messages no peer should send: binary, invalid JSON, JSON that is not an object,
    and objects with the right keys but values of the wrong type.

    A robust peer answers them with a defined error (protocol.md 11.2 S6) or a
    :class:`~sandbox_proto.RemoteProtocolError`, never a crash.
    """
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
    wrong_types = st.fixed_dictionaries(
        {"event": st.sampled_from(sorted(_KNOWN_EVENTS)) | scalars},
        optional={
            key: scalars | st.lists(scalars, max_size=3)
            for key in ("status", "data", "seq", "exit_code", "extensions", "sandbox_id", "message", "language")
        },
    ).map(json.dumps)
    return st.one_of(
        st.binary(max_size=32),
        st.text(max_size=32).filter(lambda s: not s.strip().startswith("{")),
        st.sampled_from(["", "{", "}", "[]", "null", "0", '"text"', "NaN", "1e999", "[" * 2000, '{"event":']),
        st.lists(scalars, max_size=3).map(json.dumps),
        wrong_types,
    )
