"""A raw WebSocket client for the server tests: frames compared exactly, no client library."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from sandbox_proto import ALL_EXTENSIONS

#: Keys the extended protocol adds (protocol.md 15), and the only frames allowed to carry them.
EXTENSION_KEYS = {
    "extensions": ("status_update",),
    "exit_code": ("status_update",),
    "ref": ("status_update",),
    "seq": ("output", "stdin_ack"),
}
TIMEOUT = 10.0
#: The handshake parameter asking for every extension (extensions.md); a wire in "extended" mode sends it.
REQUEST_ALL = "extensions=" + ",".join(sorted(ALL_EXTENSIONS))


def with_extensions(path: str, protocol: str) -> str:
    """``path`` asking for every extension in the "extended" mode, for none (upstream frames) otherwise."""
    if protocol != "extended":
        return path
    return f"{path}{'&' if '?' in path else '?'}{REQUEST_ALL}"


def st(status: str) -> str:
    return json.dumps({"event": "status_update", "status": status}, separators=(",", ":"))


def err(message: str) -> str:
    return json.dumps({"event": "error", "message": message}, separators=(",", ":"), ensure_ascii=False)


def ws_base(url: str) -> str:
    return "ws" + url.removeprefix("http")


@dataclass
class Exec:
    stdout: str = ""
    stderr: str = ""
    #: Non-output frames until (and including) the DONE, normalised.
    statuses: list[str] = field(default_factory=list)
    exit_code: int | None = None
    seqs: list[int] = field(default_factory=list)


class Wire:
    """One WebSocket to the server, with checks that every frame is well-formed for the mode.

    ``protocol="extended"`` asks for every extension and requires them all
    granted; ``"upstream"`` asks for none and allows no extension field: what
    any upstream client gets, whatever the server's mode.
    """

    def __init__(self, ws: ClientConnection, protocol: str) -> None:
        self.ws = ws
        self.protocol = protocol
        self.sandbox_id = ""
        self.token = ""
        self.last_raw: dict[str, Any] = {}
        self._pushed_back: list[str] = []

    @classmethod
    async def open(cls, url: str, path: str, protocol: str, **kwargs: Any) -> Wire:
        ws = await connect(
            ws_base(url) + with_extensions(path, protocol), max_size=None, open_timeout=TIMEOUT, **kwargs
        )
        return cls(ws, protocol)

    @classmethod
    async def create(cls, url: str, protocol: str, init: str = "{}") -> Wire:
        wire = await cls.open(url, "/create", protocol)
        await wire.send(init)
        await wire.expect(st("SANDBOX_CREATING"))
        if json.loads(init).get("enable_sandbox_handoff"):
            await wire.expect(st("SANDBOX_LOCK_ACQUIRING"), st("SANDBOX_LOCK_ACQUIRED"))  # CV-04
        frame = await wire.frame()
        assert frame["event"] == "sandbox_id", frame
        wire.sandbox_id, wire.token = frame["sandbox_id"], frame["sandbox_token"]
        await wire.expect(st("SANDBOX_RUNNING"))
        return wire

    @classmethod
    async def attach(cls, url: str, protocol: str, sandbox_id: str, token: str) -> Wire:
        wire = await cls.open(url, f"/attach/{sandbox_id}?sandbox_token={token}", protocol)
        wire.sandbox_id, wire.token = sandbox_id, token
        return wire

    async def send(self, frame: str | dict[str, Any] | bytes) -> None:
        await self.ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)

    def push_back(self, raw: str) -> None:
        self._pushed_back.append(raw)

    async def recv_raw(self, limit: float = TIMEOUT) -> str:
        if self._pushed_back:
            return self._pushed_back.pop()
        async with asyncio.timeout(limit):
            message = await self.ws.recv()
        assert isinstance(message, str), "the server only sends text frames"
        return message

    async def frame(self, limit: float = TIMEOUT) -> dict[str, Any]:
        """The next frame with the extension keys checked and removed."""
        raw = await self.recv_raw(limit)
        obj: dict[str, Any] = json.loads(raw)
        # Compact, raw non-ASCII, as upstream's send_json (1.2).
        assert json.dumps(obj, separators=(",", ":"), ensure_ascii=False) == raw
        self.last_raw = dict(obj)
        kind = "output" if obj.get("event") in ("stdout", "stderr") else obj.get("event")
        for key, where in EXTENSION_KEYS.items():
            if key in obj:
                assert self.protocol == "extended", f"extension key {key!r} in upstream mode: {raw}"
                assert kind in where, raw
        if self.protocol == "extended":
            if obj.get("status") == "SANDBOX_RUNNING":
                assert obj.get("extensions") == ["close_stdin", "exec_ref", "exit_code", "seq", "stdin_seq"], raw
            if kind == "output":
                assert isinstance(obj.get("seq"), int), raw
        for key in EXTENSION_KEYS:
            obj.pop(key, None)
        return obj

    async def text(self, limit: float = TIMEOUT) -> str:
        return json.dumps(await self.frame(limit), separators=(",", ":"), ensure_ascii=False)

    async def expect(self, *expected: str) -> None:
        for want in expected:
            got = await self.text()
            assert got == want, f"expected {want}, got {got}"

    async def expect_close(self, code: int, limit: float = TIMEOUT) -> None:
        async with asyncio.timeout(limit):
            try:
                extra = await self.ws.recv()
            except ConnectionClosed:
                pass
            else:
                raise AssertionError(f"expected close {code}, got frame {extra!r}")
        assert self.ws.close_code == code, (self.ws.close_code, self.ws.close_reason)

    async def collect(self, until: str = "SANDBOX_EXECUTION_DONE") -> Exec:
        """Output per stream and the other frames, up to and including the status ``until``."""
        result = Exec()
        chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}
        while True:
            frame = await self.frame()
            if frame["event"] in ("stdout", "stderr"):
                chunks[frame["event"]].append(frame["data"])
                if "seq" in self.last_raw:
                    result.seqs.append(self.last_raw["seq"])
                continue
            result.statuses.append(json.dumps(frame, separators=(",", ":"), ensure_ascii=False))
            if frame.get("status") == until:
                result.exit_code = self.last_raw.get("exit_code")
                result.stdout, result.stderr = "".join(chunks["stdout"]), "".join(chunks["stderr"])
                return result

    async def run(self, language: str, code: str) -> Exec:
        await self.send({"language": language, "code": code})
        await self.expect(st("SANDBOX_EXECUTION_RUNNING"))
        return await self.collect()

    async def close(self) -> None:
        await self.ws.close()


async def attach_when_free(url: str, protocol: str, old: Wire, *, first_frame: str | None = None) -> Wire:
    """Attach after ``old`` went away, retrying the transient IN_USE of 7.12 while the server notices.

    ``first_frame`` is sent right after the handshake, as upstream clients send ``reconnect``.
    """
    for _ in range(100):
        wire = await Wire.attach(url, protocol, old.sandbox_id, old.token)
        if first_frame is not None:
            await wire.send(first_frame)
        raw = await wire.recv_raw()
        if '"SANDBOX_IN_USE"' not in raw:
            wire.push_back(raw)
            return wire
        await wire.expect_close(1011)
        await asyncio.sleep(0.02)  # backoff between attempts, as a client does
    raise AssertionError("the sandbox stayed in use")


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in the process group."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


async def wait_group_gone(pgid: int) -> None:
    """Poll briefly: the kernel gives no event for "a process group emptied"."""
    for _ in range(250):
        if not group_alive(pgid):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"process group {pgid} is still alive")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] not in ("Z", "X")
