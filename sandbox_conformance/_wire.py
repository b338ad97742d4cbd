"""Raw WebSocket connections to the server under test, and the frame comparisons of section 12.

Everything here speaks frames through ``websockets`` directly and never uses
the ``Sandbox`` client, so a vector tests the server and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from _sandbox_anyio import default_ssl_context
from sandbox_proto import ALL_EXTENSIONS, EXTENSIONS_PARAM, cookie_header, merge_set_cookies, websocket_base

ProtocolChoice = Literal["auto", "upstream", "extended"]

#: What a connection opened with ``extensions=True`` asks for: every extension of protocol.md 15.
REQUESTED = frozenset(ALL_EXTENSIONS)

#: Seconds to wait for each frame, handshake or HTTP answer.
DEFAULT_TIMEOUT = 10.0
#: Seconds between the idle sweeps of the upstream server (protocol.md 7.9): CV-29 waits this much longer.
DEFAULT_IDLE_SWEEP = 10.0

MSG_CHECKPOINT_DISABLED = "Checkpointing is not enabled on the server."
MSG_SNAPSHOT_DISABLED = "Filesystem snapshot is not enabled on the server."


class Failed(Exception):
    """The server did something the vector does not allow."""


class Skipped(Exception):
    """The vector cannot be run against this server."""


def dumps(obj: dict[str, Any]) -> str:
    # The server's frame format (protocol.md 1.2): compact, raw non-ASCII, insertion order.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def st(status: str) -> str:
    return dumps({"event": "status_update", "status": status})


def err(message: str) -> str:
    return dumps({"event": "error", "message": message})


DONE = st("SANDBOX_EXECUTION_DONE")
EXEC_RUNNING = st("SANDBOX_EXECUTION_RUNNING")
RUNNING = st("SANDBOX_RUNNING")


def parse(raw: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise Failed(f"{what}: frame is not JSON: {raw!r}") from None
    if not isinstance(obj, dict):
        raise Failed(f"{what}: frame is not a JSON object: {raw!r}")
    return obj


@dataclass
class ExecOutput:
    stdout: str = ""
    stderr: str = ""
    #: Every frame that is not output, up to and including the DONE, extension fields removed.
    frames: list[str] = field(default_factory=list)
    exit_code: int | None = None
    seqs: list[int] = field(default_factory=list)


class Conn:
    """One WebSocket to the server under test, with frame checks in the runner's protocol mode.

    A connection that asked for no extension (the default, as any upstream
    client) must get exactly the upstream frames, whatever the mode. One that
    asked (``asked``) may get the fields of the extensions its
    ``SANDBOX_RUNNING`` grants, and the mode says whether the server must grant.
    """

    def __init__(self, runner: Runner, ws: ClientConnection, what: str, *, asked: bool = False) -> None:
        self.runner = runner
        self.ws = ws
        self.what = what
        self.asked = asked
        #: Granted by this connection's SANDBOX_RUNNING (empty until then, and when it asked for none).
        self.extensions: frozenset[str] = frozenset()
        #: The server holds a sandbox for this connection: cleanup deletes it.
        self.attached = False
        self.dropped = False
        self._pushed_back: list[str] = []
        self._last_seq = 0

    @property
    def cookies(self) -> dict[str, str]:
        jar: dict[str, str] = {}
        if self.ws.response is not None:
            merge_set_cookies(jar, self.ws.response.headers.get_all("Set-Cookie"))
        return jar

    async def send(self, text: str) -> None:
        await self.ws.send(text)

    async def recv(self, waiting_for: str, timeout: float | None = None) -> str:
        """The next frame as text; a close, or nothing within the timeout, is a failure."""
        if self._pushed_back:
            return self._pushed_back.pop()
        limit = self.runner.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                message = await self.ws.recv()
        except TimeoutError:
            raise Failed(f"{self.what}: nothing within {limit:g}s while waiting for {waiting_for}") from None
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            raise Failed(f"{self.what}: connection closed ({code}) while waiting for {waiting_for}") from None
        if not isinstance(message, str):
            raise Failed(f"{self.what}: binary frame while waiting for {waiting_for}")
        return message

    def push_back(self, raw: str) -> None:
        self._pushed_back.append(raw)

    async def expect(self, *expected: str, timeout: float | None = None) -> None:
        """The next frames are exactly these (extension fields allowed where negotiated)."""
        for want in expected:
            raw = await self.recv(want, timeout)
            if self.normalise(raw) != want:
                raise Failed(f"{self.what}: expected {want}, got {raw}")
            if want == RUNNING:
                self.attached = True

    async def expect_error(self) -> str:
        """An ``error`` frame with any message (``ERR(<text>)`` in section 12); returns the message."""
        raw = await self.recv("an error frame")
        obj = parse(raw, self.what)
        message = obj.get("message")
        if obj.keys() != {"event", "message"} or obj["event"] != "error" or not isinstance(message, str):
            raise Failed(f"{self.what}: expected an error frame, got {raw}")
        if raw != err(message):
            raise Failed(f"{self.what}: error frame not in the server's format: {raw}")
        return message

    async def expect_close(self, code: int) -> None:
        try:
            async with asyncio.timeout(self.runner.timeout):
                raw = await self.ws.recv()
        except TimeoutError:
            raise Failed(f"{self.what}: no close {code} within {self.runner.timeout:g}s") from None
        except ConnectionClosed as exc:
            got = exc.rcvd.code if exc.rcvd is not None else 1006
            if got != code:
                raise Failed(f"{self.what}: expected close {code}, got close {got}") from None
            self.attached = False
            return
        raise Failed(f"{self.what}: expected close {code}, got {raw!r}")

    async def collect(self) -> ExecOutput:
        """Output and other frames up to the exec's DONE."""
        result = ExecOutput()
        while True:
            raw = await self.recv("SANDBOX_EXECUTION_DONE")
            obj = parse(raw, self.what)
            if obj.get("event") in ("stdout", "stderr"):
                self.add_output(raw, obj, result)
                continue
            normal = self.normalise(raw)
            result.frames.append(normal)
            if normal == DONE:
                code = obj.get("exit_code")
                result.exit_code = code if isinstance(code, int) else None
                return result

    def add_output(self, raw: str, obj: dict[str, Any], result: ExecOutput) -> None:
        """Check one output frame and add its data to ``result``."""
        data = obj.get("data")
        if not isinstance(data, str):
            raise Failed(f"{self.what}: output frame without a string 'data': {raw}")
        if self.normalise(raw) != dumps({"event": obj["event"], "data": data}):
            raise Failed(f"{self.what}: malformed output frame {raw}")
        if "seq" in self.extensions:
            seq = obj.get("seq")
            if type(seq) is not int or seq <= self._last_seq:
                raise Failed(
                    f"{self.what}: 'seq' must increase with every output frame (after {self._last_seq}): {raw}"
                )
            self._last_seq = seq
            result.seqs.append(seq)
        if obj["event"] == "stdout":
            result.stdout += data
        else:
            result.stderr += data

    async def run(self, language: str, code: str) -> ExecOutput:
        await self.send(dumps({"language": language, "code": code}))
        await self.expect(EXEC_RUNNING)
        return await self.collect()

    async def run_quietly(self, language: str, code: str) -> None:
        """An exec that must succeed without output (a setup step of a vector)."""
        out = await self.run(language, code)
        if (out.stdout, out.stderr, out.frames) != ("", "", [DONE]):
            raise Failed(
                f"{self.what}: setup exec {code!r} gave stdout {out.stdout!r}, stderr {out.stderr!r}, "
                f"frames {out.frames}"
            )

    async def sentinel(self) -> None:
        """Run a trivial exec: proves nothing stray was queued before it and the sandbox still works."""
        await self.send(dumps({"language": "bash", "code": "echo sentinel"}))
        raw = await self.recv("the RUNNING of a follow-up exec")
        if self.normalise(raw) != EXEC_RUNNING:
            raise Failed(f"{self.what}: a follow-up exec got {raw} before its SANDBOX_EXECUTION_RUNNING")
        out = await self.collect()
        if (out.stdout, out.frames) != ("sentinel\n", [DONE]):
            raise Failed(f"{self.what}: a follow-up exec gave stdout {out.stdout!r} and frames {out.frames}")

    def normalise(self, raw: str) -> str:
        """``raw`` without the extension fields granted on this connection, if they follow the upstream fields.

        Anything else comes back unchanged, so comparing with the expected
        upstream frame stays a byte-for-byte comparison.
        """
        try:
            obj = json.loads(raw)
        except ValueError:
            return raw
        if not isinstance(obj, dict):
            return raw
        event, status = obj.get("event"), obj.get("status")
        allowed: set[str] = set()
        if event == "status_update" and status == "SANDBOX_RUNNING":
            if self.asked and self._learn(obj):
                allowed = {"extensions"}
        elif event == "status_update" and status == "SANDBOX_EXECUTION_DONE" and "exit_code" in self.extensions:
            allowed = {"exit_code"}
        elif event in ("stdout", "stderr") and "seq" in self.extensions:
            allowed = {"seq"}
        if not allowed & obj.keys():
            return raw
        base = dumps({key: value for key, value in obj.items() if key not in allowed})
        # Upstream fields first and byte-exact, extension fields after them.
        return base if raw.startswith(base[:-1] + ",") else raw

    def _learn(self, running: dict[str, Any]) -> bool:
        """Take the grant of a connection that asked; whether its ``extensions`` list may stay on the frame."""
        granted = running.get("extensions")
        mode = self.runner.protocol
        if granted is None:
            if mode == "extended":
                raise Failed(f"{self.what}: asked for extensions, SANDBOX_RUNNING has no 'extensions' list: {running}")
            return False  # an upstream server ignores the request
        if mode == "upstream":
            raise Failed(
                f"{self.what}: asked for extensions, SANDBOX_RUNNING grants some (protocol upstream): {running}"
            )
        if not isinstance(granted, list) or not all(isinstance(name, str) for name in granted):
            raise Failed(f"{self.what}: SANDBOX_RUNNING with an 'extensions' value that is no list of names: {running}")
        if not set(granted) <= REQUESTED:
            raise Failed(f"{self.what}: SANDBOX_RUNNING grants extensions nobody asked for: {running}")
        self.extensions = frozenset(granted)
        return True

    def exit_code_is(self, out: ExecOutput, expected: int) -> None:
        if "exit_code" in self.extensions and out.exit_code != expected:
            raise Failed(f"DONE must carry exit_code {expected} (extension exit_code), got {out.exit_code}")

    def drop(self) -> None:
        """Reset the TCP connection with no close frame, like a network failure the server sees at once."""
        sock = self.ws.transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 makes close() send a RST rather than a FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.ws.transport.abort()
        self.dropped = True
        self.attached = False

    async def cleanup(self) -> None:
        """Delete the sandbox this connection holds (a real service would keep it), then close."""
        if self.dropped:
            return
        try:
            async with asyncio.timeout(min(self.runner.timeout, 5.0)):
                if self.attached:
                    await self.ws.send(dumps({"action": "kill_sandbox"}))
                    async for _ in self.ws:
                        pass
                await self.ws.close()
        except (TimeoutError, WebSocketException, OSError):
            self.ws.transport.abort()


class Runner:
    """The server under test: its URL, the protocol mode, what it turned out to support, open connections."""

    def __init__(
        self,
        url: str,
        *,
        protocol: ProtocolChoice = "auto",
        timeout: float = DEFAULT_TIMEOUT,
        idle_sweep: float = DEFAULT_IDLE_SWEEP,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.base = websocket_base(url)
        self.timeout = timeout
        self.idle_sweep = idle_sweep
        self.headers = dict(headers or {})
        #: What a connection that asks for extensions must be granted: none, some (a list), or whatever comes.
        self.protocol: ProtocolChoice = protocol
        self.ssl: ssl.SSLContext | None = default_ssl_context(self.base, None)
        self._conns: list[Conn] = []
        # What the server said about its storage; None until asked (and after a probe that failed).
        self._checkpoints: bool | None = None
        self._snapshots: bool | None = None

    # -- connections

    async def open(
        self, path: str, what: str, cookies: dict[str, str] | None = None, *, extensions: bool = False
    ) -> Conn:
        """A WebSocket to ``path``; with ``extensions`` it asks for every extension (extensions.md)."""
        if extensions:
            path += f"{'&' if '?' in path else '?'}{EXTENSIONS_PARAM}={','.join(sorted(REQUESTED))}"
        headers = dict(self.headers)
        if cookies and (cookie := cookie_header(cookies)):
            headers["Cookie"] = cookie
        try:
            ws = await connect(
                self.base + path, additional_headers=headers, open_timeout=self.timeout, max_size=None, ssl=self.ssl
            )
        except TimeoutError:
            raise Failed(f"{what}: no WebSocket handshake within {self.timeout:g}s") from None
        conn = Conn(self, ws, what, asked=extensions)
        self._conns.append(conn)
        return conn

    async def create(
        self, init: str = "{}", what: str = "create", *, lock: bool = False, extensions: bool = False
    ) -> tuple[Conn, str, str]:
        """A new sandbox; returns the connection, its id and its token.

        ``lock``: the two lock frames of a handoff-enabled create come before the id (7.1).
        ``extensions``: ask for them (only the vectors that check an extension do).
        """
        conn = await self.open("/create", what, extensions=extensions)
        await conn.send(init)
        await conn.expect(st("SANDBOX_CREATING"))
        if lock:
            await conn.expect(st("SANDBOX_LOCK_ACQUIRING"), st("SANDBOX_LOCK_ACQUIRED"))
        sandbox_id, token = await self._sandbox_id(conn, await conn.recv("the sandbox_id frame"))
        await conn.expect(RUNNING)
        return conn, sandbox_id, token

    async def _sandbox_id(self, conn: Conn, raw: str) -> tuple[str, str]:
        obj = parse(raw, conn.what)
        sandbox_id, token = obj.get("sandbox_id"), obj.get("sandbox_token")
        if not (isinstance(sandbox_id, str) and sandbox_id and isinstance(token, str) and token):
            raise Failed(f"{conn.what}: expected the sandbox_id frame with an id and a token, got {raw}")
        if raw != dumps({"event": "sandbox_id", "sandbox_id": sandbox_id, "sandbox_token": token}):
            raise Failed(f"{conn.what}: sandbox_id frame not in the server's format: {raw}")
        # Until RUNNING arrives, a failure still leaves a sandbox behind: cleanup deletes it.
        conn.attached = True
        return sandbox_id, token

    def attach_path(self, sandbox_id: str, token: str | None) -> str:
        path = f"/attach/{quote(sandbox_id, safe='')}"
        return path if token is None else f"{path}?sandbox_token={quote(token, safe='')}"

    async def attach(
        self,
        sandbox_id: str,
        token: str,
        what: str,
        *,
        cookies: dict[str, str] | None = None,
        first: str | None = None,
        retry_in_use: bool = True,
        extensions: bool = False,
    ) -> Conn:
        """Attach; a transient IN_USE (the server has not yet noticed the old socket go) is retried."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.timeout
        delay = 0.05
        while True:
            conn = await self.open(self.attach_path(sandbox_id, token), what, cookies, extensions=extensions)
            if first is not None:
                # As upstream clients do, before reading anything. A refusal (IN_USE, then close
                # 1011) can close the socket before this goes out: the frames read next tell.
                with contextlib.suppress(ConnectionClosed):
                    await conn.send(first)
            raw = await conn.recv("the first attach frame")
            if raw != st("SANDBOX_IN_USE") or not retry_in_use or loop.time() > give_up:
                conn.push_back(raw)
                return conn
            await conn.expect_close(1011)
            # Backoff between attempts: the server gives no event when it notices the old socket gone.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def expect_not_found(self, conn: Conn) -> None:
        """NOT_FOUND and close 1011; a server with checkpoint storage says RESTORING first (CV-26)."""
        if await self.checkpoints_enabled():
            await conn.expect(st("SANDBOX_RESTORING"))
        await conn.expect(st("SANDBOX_NOT_FOUND"))
        await conn.expect_close(1011)

    async def cleanup(self) -> None:
        conns, self._conns = self._conns, []
        await asyncio.gather(*(conn.cleanup() for conn in conns))

    # -- what the server supports, as it says itself

    async def checkpoints_enabled(self) -> bool:
        """Ask for a checkpointable sandbox: the server refuses with CV-05's answer exactly when it has no storage."""
        if self._checkpoints is None:
            conn = await self.open("/create", "asking for a checkpointable sandbox")
            await conn.send('{"enable_checkpoint":true}')
            await conn.expect(st("SANDBOX_CREATING"))
            raw = await conn.recv("SANDBOX_CREATION_ERROR or the sandbox_id frame")
            if raw == st("SANDBOX_CREATION_ERROR"):
                await conn.expect(err(MSG_CHECKPOINT_DISABLED))
                await conn.expect_close(4000)
                self._checkpoints = False
            else:
                await self._sandbox_id(conn, raw)
                await conn.expect(RUNNING)
                self._checkpoints = True
        return self._checkpoints

    async def snapshots_enabled(self) -> bool:
        """Create from a snapshot that does not exist: CV-06's message means no storage, any other error means some."""
        if self._snapshots is None:
            name = f"conformance-missing-{secrets.token_hex(6)}"
            conn = await self.open("/create", "creating from a snapshot that does not exist")
            await conn.send(dumps({"filesystem_snapshot_name": name}))
            await conn.expect(st("SANDBOX_CREATING"))
            raw = await conn.recv("SANDBOX_CREATION_ERROR")
            if raw != st("SANDBOX_CREATION_ERROR"):
                raise Failed(f"{conn.what} ({name!r}): expected SANDBOX_CREATION_ERROR, got {raw}")
            message = await conn.expect_error()
            await conn.expect_close(4000)
            self._snapshots = message != MSG_SNAPSHOT_DISABLED
        return self._snapshots
