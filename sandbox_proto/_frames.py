"""Typed frames of both directions and the one codec that reads and writes them.

Every application message is one JSON object in a text frame (protocol.md 1.2).
Decoding never raises anything but :class:`RemoteProtocolError`; unknown
server events and statuses are kept, not rejected (section 4).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ._errors import RemoteProtocolError
from ._status import Status, parse_status

Stream = Literal["stdout", "stderr"]

# --------------------------------------------------------------------------
# client -> server


@dataclass(frozen=True, slots=True)
class InitRequest:
    """First frame on ``/create`` (3.2). ``None`` fields are omitted from the wire."""

    idle_timeout: float | None = 60
    enable_checkpoint: bool = False
    enable_idle_timeout_auto_checkpoint: bool = False
    enable_sandbox_handoff: bool = False
    filesystem_snapshot_name: str | None = None
    #: Send ``"idle_timeout": null`` (no expiry) instead of omitting the key.
    send_null_idle_timeout: bool = False


@dataclass(frozen=True, slots=True)
class ExecRequest:
    language: str
    code: str
    #: Extension ``exec_ref``: a name the client chose for this exec (omitted when ``None``).
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class StdinRequest:
    data: str
    #: Extension ``stdin_seq``: this frame's number in the exec's stdin sequence (omitted when ``None``).
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class KillProcessRequest:
    pass


@dataclass(frozen=True, slots=True)
class KillSandboxRequest:
    pass


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    pass


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    name: str


@dataclass(frozen=True, slots=True)
class ReconnectRequest:
    #: Only with the ``seq`` extension: the last output sequence number received.
    last_seq: int | None = None
    #: Only with the ``stdin_seq`` extension: ask for a ``stdin_ack`` first (sent as ``"stdin_seq": true``).
    stdin_seq: bool = False


@dataclass(frozen=True, slots=True)
class CloseStdinRequest:
    """Extension ``close_stdin`` (section 15)."""

    #: Extension ``stdin_seq``: numbered in the same sequence as the exec's stdin frames.
    seq: int | None = None


ClientFrame = (
    InitRequest
    | ExecRequest
    | StdinRequest
    | KillProcessRequest
    | KillSandboxRequest
    | CheckpointRequest
    | SnapshotRequest
    | ReconnectRequest
    | CloseStdinRequest
)

_ACTIONS: dict[type[Any], str] = {
    KillProcessRequest: "kill_process",
    KillSandboxRequest: "kill_sandbox",
    CheckpointRequest: "checkpoint",
}

# --------------------------------------------------------------------------
# server -> client


@dataclass(frozen=True, slots=True)
class StatusFrame:
    status: Status | str
    #: Extension names granted with ``SANDBOX_RUNNING`` (section 15), else ``None``.
    extensions: tuple[str, ...] | None = None
    #: Extension ``exit_code`` on ``SANDBOX_EXECUTION_DONE``.
    exit_code: int | None = None
    #: Extension ``exec_ref`` on ``SANDBOX_EXECUTION_RUNNING``: the exec it is about.
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class SandboxIdFrame:
    sandbox_id: str
    # A secret: never in a repr.
    sandbox_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class OutputFrame:
    stream: Stream
    data: str
    #: Extension ``seq``.
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    message: str


@dataclass(frozen=True, slots=True)
class OutputGapFrame:
    """Extension ``seq``: frames ``from_seq..to_seq`` were evicted before replay."""

    from_seq: int
    to_seq: int


@dataclass(frozen=True, slots=True)
class StdinAckFrame:
    """Extension ``stdin_seq``: the exec's stdin frames up to ``seq`` are accepted; resend only later ones."""

    seq: int


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    """A frame with an ``event`` this library does not know; kept for logging."""

    event: str


ServerFrame = StatusFrame | SandboxIdFrame | OutputFrame | ErrorFrame | OutputGapFrame | StdinAckFrame | UnknownFrame


# --------------------------------------------------------------------------
# codec


# The server's own format (1.2): compact, raw non-ASCII, insertion order. One
# encoder for all: json.dumps with options builds a new one per call.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# The string encoder ``_dumps`` applies to every str (C): an exec request is written by
# concatenation, the same text without JSONEncoder's per-call setup (~1 us, once per exec).
_encode_str: Callable[[str], str] = json.encoder.encode_basestring


def encode_exec_request(language: str, code: str, ref: str | None = None) -> str:
    """The text of an :class:`ExecRequest`, exactly as :func:`encode_client_frame` writes it."""
    try:
        head = '{"language":' + _encode_str(language) + ',"code":' + _encode_str(code)
        return head + "}" if ref is None else head + ',"ref":' + _encode_str(ref) + "}"
    except TypeError:  # a value that is not a str (untyped callers): the generic encoder's text or error
        obj = {"language": language, "code": code} if ref is None else {"language": language, "code": code, "ref": ref}
        return _dumps(obj)


def encode_client_frame(frame: ClientFrame) -> str:
    """Serialise a client frame to the text of one WebSocket message."""
    if isinstance(frame, InitRequest):
        init: dict[str, Any] = {}
        if frame.idle_timeout is not None or frame.send_null_idle_timeout:
            init["idle_timeout"] = frame.idle_timeout
        # Only truthy flags, as upstream's Python client sends them.
        if frame.filesystem_snapshot_name:
            init["filesystem_snapshot_name"] = frame.filesystem_snapshot_name
        if frame.enable_checkpoint:
            init["enable_checkpoint"] = True
        if frame.enable_idle_timeout_auto_checkpoint:
            init["enable_idle_timeout_auto_checkpoint"] = True
        if frame.enable_sandbox_handoff:
            init["enable_sandbox_handoff"] = True
        return _dumps(init)
    if isinstance(frame, ExecRequest):
        return encode_exec_request(frame.language, frame.code, frame.ref)
    if isinstance(frame, StdinRequest):
        if frame.seq is None:
            return _dumps({"event": "stdin", "data": frame.data})
        return _dumps({"event": "stdin", "data": frame.data, "seq": frame.seq})
    if isinstance(frame, SnapshotRequest):
        return _dumps({"action": "snapshot_filesystem", "name": frame.name})
    if isinstance(frame, ReconnectRequest):
        reconnect: dict[str, Any] = {"action": "reconnect"}
        if frame.last_seq is not None:
            reconnect["last_seq"] = frame.last_seq
        if frame.stdin_seq:
            reconnect["stdin_seq"] = True
        return _dumps(reconnect)
    if isinstance(frame, CloseStdinRequest):
        if frame.seq is None:
            return _dumps({"action": "close_stdin"})
        return _dumps({"action": "close_stdin", "seq": frame.seq})
    return _dumps({"action": _ACTIONS[type(frame)]})


def encode_server_frame(frame: ServerFrame) -> str:
    """Serialise a server frame with upstream's exact key order (1.2)."""
    if isinstance(frame, StatusFrame):
        obj: dict[str, Any] = {"event": "status_update", "status": str(frame.status)}
        if frame.extensions is not None:
            obj["extensions"] = list(frame.extensions)
        if frame.exit_code is not None:
            obj["exit_code"] = frame.exit_code
        if frame.ref is not None:
            obj["ref"] = frame.ref
        return _dumps(obj)
    if isinstance(frame, OutputFrame):
        if frame.seq is None:
            return _dumps({"event": frame.stream, "data": frame.data})
        return _dumps({"event": frame.stream, "data": frame.data, "seq": frame.seq})
    if isinstance(frame, SandboxIdFrame):
        return _dumps({"event": "sandbox_id", "sandbox_id": frame.sandbox_id, "sandbox_token": frame.sandbox_token})
    if isinstance(frame, ErrorFrame):
        return _dumps({"event": "error", "message": frame.message})
    if isinstance(frame, OutputGapFrame):
        return _dumps({"event": "output_gap", "from_seq": frame.from_seq, "to_seq": frame.to_seq})
    if isinstance(frame, StdinAckFrame):
        return _dumps({"event": "stdin_ack", "seq": frame.seq})
    raise TypeError(f"cannot encode {type(frame).__name__}")


# The C scanner behind ``json.loads``, without its two layers of Python wrappers
# (~2.5 us of a ~4 us parse of a small frame). Only a message it consumes whole
# is taken from it; anything else goes through ``json.loads`` for the same
# result or error message.
scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def load_json(text: str | bytes) -> Any:
    """Parse one message as JSON (any value), or raise :class:`RemoteProtocolError`."""
    if type(text) is str:
        try:
            obj, end = scan_json(text, 0)
        except (StopIteration, ValueError, RecursionError):
            pass
        else:
            if end == len(text):
                return obj
    if not isinstance(text, str):
        raise RemoteProtocolError("binary frames are not part of the protocol")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"frame is not valid JSON: {exc}") from None


def _require_object(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"frame is a JSON {type(obj).__name__}, not an object")
    return obj


def load_object(text: str | bytes) -> dict[str, Any]:
    """Parse one message as a JSON object, or raise :class:`RemoteProtocolError`."""
    return _require_object(load_json(text))


def _optional_int(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise RemoteProtocolError(f"{key!r} must be an integer, got {type(value).__name__}")
    return value


def _required_str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise RemoteProtocolError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def decode_server_frame(text: str | bytes) -> ServerFrame:
    """Parse a server message into a typed frame."""
    return decode_server_object(load_json(text))


def decode_server_object(value: Any) -> ServerFrame:
    """A typed frame from an already parsed message (see :func:`load_json`)."""
    obj = _require_object(value)
    event = obj.get("event")
    if event == "status_update":
        status = parse_status(_required_str(obj, "status"))
        extensions = obj.get("extensions")
        if extensions is not None:
            if not isinstance(extensions, list) or not all(isinstance(e, str) for e in extensions):
                raise RemoteProtocolError("'extensions' must be a list of strings")
            extensions = tuple(extensions)
        ref = obj.get("ref")
        if ref is not None and not isinstance(ref, str):
            raise RemoteProtocolError("'ref' must be a string")
        return StatusFrame(status, extensions, _optional_int(obj, "exit_code"), ref)
    if event == "stdout" or event == "stderr":
        return OutputFrame(event, _required_str(obj, "data"), _optional_int(obj, "seq"))
    if event == "sandbox_id":
        token = obj.get("sandbox_token")
        if token is not None and not isinstance(token, str):
            raise RemoteProtocolError("'sandbox_token' must be a string")
        sandbox_id = _required_str(obj, "sandbox_id")
        if not sandbox_id:
            raise RemoteProtocolError("'sandbox_id' is empty")
        return SandboxIdFrame(sandbox_id, token)
    if event == "error":
        message = obj.get("message")
        return ErrorFrame(message if isinstance(message, str) else str(message))
    if event == "output_gap":
        from_seq = _optional_int(obj, "from_seq")
        to_seq = _optional_int(obj, "to_seq")
        if from_seq is None or to_seq is None:
            raise RemoteProtocolError("'output_gap' needs 'from_seq' and 'to_seq'")
        return OutputGapFrame(from_seq, to_seq)
    if event == "stdin_ack":
        seq = _optional_int(obj, "seq")
        if seq is None:
            raise RemoteProtocolError("'stdin_ack' needs 'seq'")
        return StdinAckFrame(seq)
    if not isinstance(event, str):
        raise RemoteProtocolError("frame has no 'event' string")
    return UnknownFrame(event)
