"""Pre-encoded server frames, shared by the blaster and the core benchmark.

Everything the blaster sends is built once here, as the JSON text the real
server would send (protocol.md 1.2) and as ready-to-write WebSocket bytes,
so that the server side costs next to nothing per message.
"""

from __future__ import annotations

import json
import struct
from functools import cache

CREATE_INIT = json.dumps({"idle_timeout": 60})
KILL_SANDBOX = json.dumps({"action": "kill_sandbox"})
RUNNING = "SANDBOX_RUNNING"
EXEC_RUNNING = "SANDBOX_EXECUTION_RUNNING"
EXEC_DONE = "SANDBOX_EXECUTION_DONE"
#: Blocks of frames written per drain: big enough to make the server's Python cost negligible.
BLOCK_BYTES = 256 * 1024


def _dumps(obj: dict[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def status(value: str) -> str:
    return _dumps({"event": "status_update", "status": value})


def sandbox_id_frame() -> str:
    return _dumps({"event": "sandbox_id", "sandbox_id": "sandbox-b1a5", "sandbox_token": "0" * 32})


def exec_code(count: int, size: int) -> str:
    """The ``code`` of an exec request the blaster understands: how much stdout to send."""
    return f"{count} {size}"


def exec_request(count: int, size: int) -> str:
    return json.dumps({"language": "python", "code": exec_code(count, size)})


@cache
def payload(size: int) -> str:
    """``size`` ASCII characters ending in a newline (so one char is one byte)."""
    if size <= 0:
        return ""
    line = "0123456789abcdefghijklmnopqrstuvwxyz" * (size // 36 + 1)
    return line[: size - 1] + "\n"


@cache
def stdout_frame(size: int) -> str:
    return _dumps({"event": "stdout", "data": payload(size)})


def ws_text(text: str) -> bytes:
    """One unmasked, unfragmented server text frame (RFC 6455 5.2)."""
    data = text.encode()
    n = len(data)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 2**16:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + data


@cache
def create_reply() -> bytes:
    return ws_text(status("SANDBOX_CREATING")) + ws_text(sandbox_id_frame()) + ws_text(status(RUNNING))


@cache
def exec_running() -> bytes:
    return ws_text(status(EXEC_RUNNING))


@cache
def exec_done() -> bytes:
    return ws_text(status(EXEC_DONE))


@cache
def kill_reply() -> bytes:
    return ws_text(status("SANDBOX_KILLING")) + ws_text(status("SANDBOX_KILLED"))


@cache
def output_block(size: int) -> tuple[bytes, int]:
    """As many stdout frames as fit in one block, and how many that is."""
    frame = ws_text(stdout_frame(size))
    per_block = max(1, BLOCK_BYTES // len(frame))
    return frame * per_block, per_block
