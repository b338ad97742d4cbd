"""``sandbox conformance URL``: play the conformance vectors of protocol.md section 12 against a server.

The runner speaks raw WebSocket frames through ``websockets`` and never uses
the ``Sandbox`` class, so what it tests is the server, not this library's
client. It runs every vector a plain client can run against any deployment
and reports each one as PASS, FAIL or SKIP with a reason; vectors that need a
server configuration it cannot know (checkpoint or snapshot storage present
or absent, several instances sharing storage) are reported as SKIP.

Frames are compared byte for byte, as section 12 asks. With the extensions
of section 15 in effect (``--protocol extended``, or ``auto`` when the server
advertises them), the extension fields are accepted after the upstream fields
of the frames that may carry them, and checked.

Exit status: 0 if no vector failed, 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import ssl
import struct
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from _sandbox_anyio import default_ssl_context
from sandbox_proto import LocalProtocolError, cookie_header, merge_set_cookies, websocket_base

__all__ = ["Result", "main", "run_vectors"]

Verdict = Literal["PASS", "FAIL", "SKIP"]
ProtocolChoice = Literal["auto", "upstream", "extended"]

DEFAULT_TIMEOUT = 10.0

MSG_ALREADY_RUNNING = "An execution is already in progress."
MSG_NO_PROCESS = "No process is running in the sandbox."
MSG_INVALID_FORMAT = (
    "Invalid message format. 'language' and 'code' fields are required. Supported languages are: python, bash"
)
MSG_INVALID_STDIN = "Invalid stdin message format. 'data' field is required."


class Failed(Exception):
    """The server did something the vector does not allow."""


class Skipped(Exception):
    """The vector cannot be run here."""


@dataclass(frozen=True, slots=True)
class Result:
    vector: str
    title: str
    verdict: Verdict
    reason: str = ""


def _dumps(obj: dict[str, Any]) -> str:
    # The server's frame format (protocol.md 1.2): compact, raw non-ASCII, insertion order.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def st(status: str) -> str:
    return _dumps({"event": "status_update", "status": status})


def err(message: str) -> str:
    return _dumps({"event": "error", "message": message})


DONE = st("SANDBOX_EXECUTION_DONE")
EXEC_RUNNING = st("SANDBOX_EXECUTION_RUNNING")


@dataclass
class ExecOutput:
    stdout: str = ""
    stderr: str = ""
    #: Every frame that is not output, up to and including the DONE, extension fields removed.
    frames: list[str] = field(default_factory=list)
    exit_code: int | None = None
    seqs: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------
# one WebSocket


class Conn:
    """One WebSocket to the server under test, with frame checks in the runner's protocol mode."""

    def __init__(self, runner: Runner, ws: ClientConnection, what: str) -> None:
        self.runner = runner
        self.ws = ws
        self.what = what
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

    async def recv(self, waiting_for: str) -> str:
        """The next frame as text; a close or a silence is a failure."""
        if self._pushed_back:
            return self._pushed_back.pop()
        try:
            async with asyncio.timeout(self.runner.timeout):
                message = await self.ws.recv()
        except TimeoutError:
            raise Failed(
                f"{self.what}: nothing within {self.runner.timeout:g}s while waiting for {waiting_for}"
            ) from None
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            raise Failed(f"{self.what}: connection closed ({code}) while waiting for {waiting_for}") from None
        if not isinstance(message, str):
            raise Failed(f"{self.what}: binary frame while waiting for {waiting_for}")
        return message

    def push_back(self, raw: str) -> None:
        self._pushed_back.append(raw)

    async def expect(self, *expected: str) -> None:
        """The next frames are exactly these (extension fields allowed where negotiated)."""
        for want in expected:
            raw = await self.recv(want)
            if self.runner.normalise(raw) != want:
                raise Failed(f"{self.what}: expected {want}, got {raw}")
            if want == st("SANDBOX_RUNNING"):
                self.attached = True

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
            obj = _parse(raw, self.what)
            if obj.get("event") in ("stdout", "stderr"):
                self._output(raw, obj, result)
                continue
            normal = self.runner.normalise(raw)
            result.frames.append(normal)
            if normal == DONE:
                code = obj.get("exit_code")
                result.exit_code = code if isinstance(code, int) else None
                return result

    def _output(self, raw: str, obj: dict[str, Any], result: ExecOutput) -> None:
        data = obj.get("data")
        if not isinstance(data, str):
            raise Failed(f"{self.what}: output frame without a string 'data': {raw}")
        if self.runner.normalise(raw) != _dumps({"event": obj["event"], "data": data}):
            raise Failed(f"{self.what}: malformed output frame {raw}")
        if "seq" in self.runner.extensions:
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
        await self.send(_dumps({"language": language, "code": code}))
        await self.expect(EXEC_RUNNING)
        return await self.collect()

    async def sentinel(self) -> None:
        """Run a trivial exec: proves nothing stray was queued before it and the sandbox still works."""
        await self.send(_dumps({"language": "bash", "code": "echo sentinel"}))
        raw = await self.recv("the RUNNING of a follow-up exec")
        if self.runner.normalise(raw) != EXEC_RUNNING:
            raise Failed(f"{self.what}: a follow-up exec got {raw} before its SANDBOX_EXECUTION_RUNNING")
        out = await self.collect()
        if (out.stdout, out.frames) != ("sentinel\n", [DONE]):
            raise Failed(f"{self.what}: a follow-up exec gave stdout {out.stdout!r} and frames {out.frames}")

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
                    await self.ws.send(_dumps({"action": "kill_sandbox"}))
                    async for _ in self.ws:
                        pass
                await self.ws.close()
        except (TimeoutError, WebSocketException, OSError):
            self.ws.transport.abort()


def _parse(raw: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise Failed(f"{what}: frame is not JSON: {raw!r}") from None
    if not isinstance(obj, dict):
        raise Failed(f"{what}: frame is not a JSON object: {raw!r}")
    return obj


# --------------------------------------------------------------------------
# the runner


class Runner:
    def __init__(
        self,
        url: str,
        *,
        protocol: ProtocolChoice = "auto",
        timeout: float = DEFAULT_TIMEOUT,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.base = websocket_base(url)
        self.timeout = timeout
        self.headers = dict(headers or {})
        #: ``None`` until learned from the first SANDBOX_RUNNING (``auto``).
        self.protocol: Literal["upstream", "extended"] | None = None if protocol == "auto" else protocol
        self.extensions: frozenset[str] = frozenset()
        self._ssl: ssl.SSLContext | None = default_ssl_context(self.base, None)
        self._conns: list[Conn] = []

    # -- frames

    def normalise(self, raw: str) -> str:
        """``raw`` without the extension fields the mode allows on it, if they follow the upstream fields.

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
        if event == "status_update" and status == "SANDBOX_RUNNING":
            self._learn(obj)
        allowed: set[str] = set()
        if self.protocol == "extended":
            if event == "status_update" and status == "SANDBOX_RUNNING":
                allowed = {"extensions"}
            elif event == "status_update" and status == "SANDBOX_EXECUTION_DONE" and "exit_code" in self.extensions:
                allowed = {"exit_code"}
            elif event in ("stdout", "stderr") and "seq" in self.extensions:
                allowed = {"seq"}
        if not allowed & obj.keys():
            return raw
        base = _dumps({key: value for key, value in obj.items() if key not in allowed})
        # Upstream fields first and byte-exact, extension fields after them.
        return base if raw.startswith(base[:-1] + ",") else raw

    def _learn(self, running: dict[str, Any]) -> None:
        advertised = running.get("extensions")
        if self.protocol is None:
            self.protocol = "extended" if advertised is not None else "upstream"
        if self.protocol == "extended":
            if not isinstance(advertised, list) or not all(isinstance(name, str) for name in advertised):
                raise Failed(f"SANDBOX_RUNNING without an 'extensions' list of names (protocol extended): {running}")
            self.extensions = frozenset(advertised)

    # -- connections

    async def open(self, path: str, what: str, cookies: dict[str, str] | None = None) -> Conn:
        headers = dict(self.headers)
        if cookies and (cookie := cookie_header(cookies)):
            headers["Cookie"] = cookie
        ws = await connect(
            self.base + path, additional_headers=headers, open_timeout=self.timeout, max_size=None, ssl=self._ssl
        )
        conn = Conn(self, ws, what)
        self._conns.append(conn)
        return conn

    async def create(self, init: str = "{}", what: str = "create") -> tuple[Conn, str, str]:
        """A new sandbox; returns the connection, its id and its token."""
        conn = await self.open("/create", what)
        await conn.send(init)
        await conn.expect(st("SANDBOX_CREATING"))
        raw = await conn.recv("the sandbox_id frame")
        obj = _parse(raw, what)
        sandbox_id, token = obj.get("sandbox_id"), obj.get("sandbox_token")
        if not (isinstance(sandbox_id, str) and sandbox_id and isinstance(token, str) and token):
            raise Failed(f"{what}: expected the sandbox_id frame with an id and a token, got {raw}")
        expected = _dumps({"event": "sandbox_id", "sandbox_id": sandbox_id, "sandbox_token": token})
        if raw != expected:
            raise Failed(f"{what}: sandbox_id frame not in the server's format: {raw}")
        await conn.expect(st("SANDBOX_RUNNING"))
        return conn, sandbox_id, token

    def attach_path(self, sandbox_id: str, token: str | None) -> str:
        from urllib.parse import quote

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
    ) -> Conn:
        """Attach; a transient IN_USE (the server has not yet noticed the old socket go) is retried."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.timeout
        delay = 0.05
        while True:
            conn = await self.open(self.attach_path(sandbox_id, token), what, cookies)
            if first is not None:
                await conn.send(first)  # as upstream clients do, before reading anything
            raw = await conn.recv("the first attach frame")
            if raw != st("SANDBOX_IN_USE") or not retry_in_use or loop.time() > give_up:
                conn.push_back(raw)
                return conn
            await conn.expect_close(1011)
            await asyncio.sleep(delay)  # backoff between attempts, not synchronisation
            delay = min(delay * 2, 1.0)

    async def expect_not_found(self, conn: Conn) -> None:
        """NOT_FOUND and close 1011; a server with checkpoint storage says RESTORING first (CV-26)."""
        raw = await conn.recv("SANDBOX_NOT_FOUND")
        if raw != st("SANDBOX_RESTORING"):
            conn.push_back(raw)
        await conn.expect(st("SANDBOX_NOT_FOUND"))
        await conn.expect_close(1011)

    async def cleanup(self) -> None:
        conns, self._conns = self._conns, []
        await asyncio.gather(*(conn.cleanup() for conn in conns))

    def exit_code_is(self, out: ExecOutput, expected: int, vector: str) -> None:
        if "exit_code" in self.extensions and out.exit_code != expected:
            raise Failed(f"{vector}: DONE must carry exit_code {expected} (extension exit_code), got {out.exit_code}")


# --------------------------------------------------------------------------
# the vectors


async def cv01(r: Runner) -> None:
    conn, _, _ = await r.create("{}")
    await conn.sentinel()


async def cv02(r: Runner) -> None:
    conn, _, _ = await r.create()
    # The upstream Python client's spacing: servers must accept any JSON formatting.
    await conn.send('{"language": "python", "code": "print(6 * 7)"}')
    await conn.expect(EXEC_RUNNING)
    out = await conn.collect()
    if (out.stdout, out.stderr, out.frames) != ("42\n", "", [DONE]):
        raise Failed(f"stdout {out.stdout!r}, stderr {out.stderr!r}, frames {out.frames}")
    r.exit_code_is(out, 0, "CV-02")
    if "seq" in r.extensions and out.seqs != list(range(1, len(out.seqs) + 1)):
        raise Failed(f"'seq' must start at 1 in a new sandbox and grow by 1: {out.seqs}")


async def cv03(r: Runner) -> None:
    conn, _, _ = await r.create()
    out = await conn.run("bash", "echo oops >&2; exit 3")
    if (out.stdout, out.stderr, out.frames) != ("", "oops\n", [DONE]):
        raise Failed(f"stdout {out.stdout!r}, stderr {out.stderr!r}, frames {out.frames}")
    r.exit_code_is(out, 3, "CV-03")


async def _creation_error(r: Runner, init: str, message: str) -> None:
    conn = await r.open("/create", "create")
    await conn.send(init)
    await conn.expect(st("SANDBOX_CREATING"), st("SANDBOX_CREATION_ERROR"), err(message))
    await conn.expect_close(4000)


async def cv07(r: Runner) -> None:
    await _creation_error(r, '{"enable_sandbox_handoff":true}', "Sandbox handoff requires checkpointing to be enabled.")


async def cv08(r: Runner) -> None:
    await _creation_error(
        r,
        '{"enable_idle_timeout_auto_checkpoint":true}',
        "Idle timeout auto checkpoint requires checkpointing to be enabled.",
    )


async def _start_error(r: Runner, request: str, status: str, message: str) -> None:
    conn, _, _ = await r.create()
    await conn.send(request)
    await conn.expect(st(status), err(message), DONE)
    await conn.sentinel()


async def cv10(r: Runner) -> None:
    await _start_error(
        r,
        '{"language":"ruby","code":"puts 1"}',
        "SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR",
        "Unsupported language: 'ruby'. Supported languages are: python, bash",
    )


async def cv11(r: Runner) -> None:
    await _start_error(
        r,
        '{"action":"pause"}',
        "SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR",
        "Unsupported language: 'None'. Supported languages are: python, bash",
    )


async def cv12(r: Runner) -> None:
    await _start_error(r, '{"language":"python"}', "SANDBOX_EXECUTION_ERROR", MSG_INVALID_FORMAT)


async def cv13(r: Runner) -> None:
    conn, _, _ = await r.create()
    await conn.send('{"language":"bash","code":"sleep 1; echo first"}')
    await conn.expect(EXEC_RUNNING)
    await conn.send('{"language":"python","code":"print(2)"}')
    out = await conn.collect()
    expected = [st("SANDBOX_EXECUTION_ERROR"), err(MSG_ALREADY_RUNNING), DONE]
    if (out.stdout, out.frames) != ("first\n", expected):
        raise Failed(f"stdout {out.stdout!r}, frames {out.frames}")
    await conn.sentinel()  # exactly one DONE: a second one would precede the sentinel's RUNNING


async def cv14(r: Runner) -> None:
    conn, _, _ = await r.create()
    await conn.send('{"language":"python","code":"who = input(); print(\'hi \' + who)"}')
    await conn.expect(EXEC_RUNNING)
    await conn.send('{"event":"stdin","data":"Ada\\n"}')
    out = await conn.collect()
    if (out.stdout, out.frames) != ("hi Ada\n", [DONE]):
        raise Failed(f"stdout {out.stdout!r}, frames {out.frames}")


async def cv15(r: Runner) -> None:
    conn, _, _ = await r.create()
    await conn.send('{"language":"python","code":"print(input())"}')
    await conn.expect(EXEC_RUNNING)
    await conn.send('{"event":"stdin"}')
    await conn.expect(st("SANDBOX_STDIN_ERROR"), err(MSG_INVALID_STDIN))
    await conn.send('{"event":"stdin","data":"still here\\n"}')
    out = await conn.collect()
    if (out.stdout, out.frames) != ("still here\n", [DONE]):
        raise Failed(f"stdout {out.stdout!r}, frames {out.frames}")


async def cv16(r: Runner) -> None:
    conn, _, _ = await r.create()
    await conn.send('{"event":"stdin","data":"x\\n"}')
    await conn.expect(st("SANDBOX_EXECUTION_ERROR"), err(MSG_NO_PROCESS))
    await conn.sentinel()  # and no DONE after it


async def cv17(r: Runner) -> None:
    conn, _, _ = await r.create()
    await conn.send('{"action":"kill_process"}')
    await conn.expect(st("SANDBOX_EXECUTION_FORCE_KILLED"))
    await conn.sentinel()


async def cv18(r: Runner) -> None:
    conn, _, _ = await r.create()
    await conn.send('{"language":"bash","code":"sleep 30"}')
    await conn.expect(EXEC_RUNNING)
    await conn.send('{"action":"kill_process"}')
    seen = sorted([r.normalise(await conn.recv("FORCE_KILLED and DONE")) for _ in range(2)])
    if seen != sorted([st("SANDBOX_EXECUTION_FORCE_KILLED"), DONE]):
        raise Failed(f"expected FORCE_KILLED and DONE in either order, got {seen}")
    out = await conn.run("bash", "echo again")
    if (out.stdout, out.frames) != ("again\n", [DONE]):
        raise Failed(f"the exec after the kill gave stdout {out.stdout!r}, frames {out.frames}")


async def cv19(r: Runner) -> None:
    conn, sandbox_id, token = await r.create()
    await conn.send('{"action":"kill_sandbox"}')
    await conn.expect(st("SANDBOX_KILLING"), st("SANDBOX_DELETING"), st("SANDBOX_DELETED"), st("SANDBOX_KILLED"))
    await conn.expect_close(1000)
    again = await r.attach(sandbox_id, token, "attach after kill", retry_in_use=False)
    await r.expect_not_found(again)


async def cv22(r: Runner) -> None:
    conn, sandbox_id, token = await r.create()
    await conn.send('{"action":"checkpoint"}')
    message = f"Failed to checkpoint sandbox {sandbox_id}: Sandbox {sandbox_id} is not configured for checkpointing."
    await conn.expect(st("SANDBOX_CHECKPOINTING"), st("SANDBOX_CHECKPOINT_ERROR"), err(message))
    await conn.expect_close(4000)
    # The sandbox itself survives: attach still works.
    again = await r.attach(sandbox_id, token, "attach after the refused checkpoint")
    await again.expect(st("SANDBOX_RUNNING"))


async def cv25(r: Runner) -> None:
    first, sandbox_id, token = await r.create()
    await first.ws.close()
    first.attached = False
    second = await r.attach(sandbox_id, token, "connection 2")
    await second.expect(st("SANDBOX_RUNNING"))
    third = await r.attach(sandbox_id, token, "connection 3", retry_in_use=False)
    await third.expect(st("SANDBOX_IN_USE"))
    await third.expect_close(1011)
    await second.sentinel()  # unaffected by the refused attach


async def cv26(r: Runner) -> None:
    conn = await r.attach("sandbox-0000", secrets.token_hex(16), "attach", retry_in_use=False)
    await r.expect_not_found(conn)


async def cv27(r: Runner) -> None:
    _, sandbox_id, _ = await r.create()
    for token, message in (("0000", "Invalid sandbox token."), ("", "Sandbox token is missing.")):
        conn = await r.attach(sandbox_id, token, f"attach with token {token!r}", retry_in_use=False)
        await conn.expect(st("SANDBOX_PERMISSION_DENIAL_ERROR"), err(message))
        await conn.expect_close(4000)
    try:
        await r.open(r.attach_path(sandbox_id, None), "attach without a token")
    except InvalidStatus as exc:
        if exc.response.status_code != 403:
            raise Failed(f"attach without a token: expected HTTP 403, got {exc.response.status_code}") from None
    else:
        raise Failed("attach without a token: the handshake was accepted, expected HTTP 403")


COUNT_TO_THREE = '{"language":"bash","code":"for i in 1 2 3; do echo $i; sleep 1; done"}'


async def cv30(r: Runner) -> None:
    conn, sandbox_id, token = await r.create()
    await conn.send(COUNT_TO_THREE)
    await conn.expect(EXEC_RUNNING)
    before = ExecOutput()
    while "1\n" not in before.stdout:
        raw = await conn.recv("the first line of output")
        obj = _parse(raw, conn.what)
        if obj.get("event") != "stdout":
            raise Failed(f"expected output before the drop, got {raw}")
        conn._output(raw, obj, before)
    cookies = conn.cookies
    conn.drop()
    again = await r.attach(sandbox_id, token, "reconnect", cookies=cookies, first='{"action":"reconnect"}')
    await again.expect(st("SANDBOX_RUNNING"), EXEC_RUNNING)
    after = await again.collect()
    total = before.stdout + after.stdout
    if (total, after.frames) != ("1\n2\n3\n", [DONE]):
        raise Failed(f"stdout over both connections {total!r} (expected '1\\n2\\n3\\n'), frames {after.frames}")


async def cv30_ref(r: Runner) -> None:
    conn, sandbox_id, token = await r.create()
    cookies = conn.cookies
    conn.drop()
    again = await r.attach(sandbox_id, token, "reconnect", cookies=cookies)
    await again.expect(st("SANDBOX_RUNNING"))
    await again.send('{"action":"reconnect"}')
    await again.expect(DONE)
    await again.sentinel()


async def http_execute(r: Runner) -> None:
    request = urllib.request.Request(
        r.url.replace("ws://", "http://", 1).replace("wss://", "https://", 1) + "/execute?language=bash",
        data=b"echo hi; echo err >&2",
        headers={**r.headers, "Content-Type": "text/plain"},
        method="POST",
    )
    context = r._ssl

    def post() -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(request, timeout=r.timeout, context=context) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode(errors="replace")

    status, content_type, body = await asyncio.to_thread(post)
    if status != 200 or not content_type.startswith("text/plain"):
        raise Failed(f"expected 200 text/plain, got {status} {content_type!r}")
    if body not in ("hi\nerr\n", "err\nhi\n"):
        raise Failed(f"expected the body 'hi\\nerr\\n' (either order), got {body!r}")


Vector = Callable[[Runner], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    title: str
    run: Vector | None = None
    #: Why a plain client cannot run it here (then ``run`` is ``None``).
    skip: str = ""
    #: Upstream fails it; the reference server must pass it.
    ref: bool = False
    #: Not a WebSocket vector: run only when asked (``--http``).
    http: bool = False


_NEEDS_PLAIN = "needs a server known to have no {} storage; the runner cannot tell"
SPECS = (
    Spec("CV-01", "create with an empty init message", cv01),
    Spec("CV-02", "python exec with stdout", cv02),
    Spec("CV-03", "bash exec that fails: stderr, no exit code", cv03),
    Spec("CV-04", "create with checkpoint and handoff", skip="needs checkpoint storage and a shared handoff lock"),
    Spec("CV-05", "checkpoint requested, server cannot", skip=_NEEDS_PLAIN.format("checkpoint")),
    Spec("CV-06", "snapshot requested, server cannot", skip=_NEEDS_PLAIN.format("snapshot")),
    Spec("CV-07", "handoff without checkpoint", cv07),
    Spec("CV-08", "idle auto-checkpoint without checkpoint", cv08),
    Spec("CV-09", "create from a snapshot that does not exist", skip="needs snapshot storage"),
    Spec("CV-10", "unsupported language", cv10),
    Spec("CV-11", "unknown action falls through to exec", cv11),
    Spec("CV-12", "exec request without code", cv12),
    Spec("CV-13", "second exec while the first runs", cv13),
    Spec("CV-14", "stdin feeds input()", cv14),
    Spec("CV-15", "stdin frame without data, exec unaffected", cv15),
    Spec("CV-16", "stdin with no process in a fresh sandbox", cv16),
    Spec("CV-17", "kill_process with nothing running", cv17),
    Spec("CV-18", "kill_process on a running exec, sandbox stays usable", cv18),
    Spec("CV-19", "kill_sandbox, then the id is gone", cv19),
    Spec("CV-20", "checkpoint, then restore on attach", skip="needs checkpoint storage"),
    Spec("CV-21", "checkpoint refused while an exec runs", skip="needs checkpoint storage"),
    Spec("CV-22", "checkpoint of a sandbox created without checkpointing", cv22),
    Spec("CV-23", "snapshot, then create from it", skip="needs snapshot storage"),
    Spec("CV-24", "snapshot on a server without snapshot storage", skip=_NEEDS_PLAIN.format("snapshot")),
    Spec("CV-25", "attach to a free sandbox; a second attach is refused", cv25),
    Spec("CV-26", "attach to an unknown id", cv26),
    Spec("CV-27", "attach with a wrong, an empty, or no token", cv27),
    Spec("CV-28", "handoff between two instances", skip="needs two instances sharing checkpoint storage and locks"),
    Spec("CV-29", "idle expiry while attached", skip="takes 5 to 15 s of idleness; not run"),
    Spec("CV-30", "drop and reconnect during an exec", cv30),
    Spec("CV-30(ref)", "reconnect with no exec in progress", cv30_ref, ref=True),
    Spec("HTTP", "stateless POST /execute", http_execute, http=True),
)


async def run_vectors(
    url: str,
    *,
    protocol: ProtocolChoice = "auto",
    timeout: float = DEFAULT_TIMEOUT,
    headers: dict[str, str] | None = None,
    include_ref: bool = True,
    include_http: bool = False,
    only: Sequence[str] = (),
) -> list[Result]:
    """Play the vectors one after another against ``url``; one :class:`Result` each."""
    runner = Runner(url, protocol=protocol, timeout=timeout, headers=headers)
    wanted = {name.upper() for name in only}
    results: list[Result] = []
    for spec in SPECS:
        if wanted and spec.name.upper() not in wanted:
            continue
        results.append(await _play(runner, spec, include_ref=include_ref, include_http=include_http))
    return results


async def _play(runner: Runner, spec: Spec, *, include_ref: bool, include_http: bool) -> Result:
    if spec.run is None:
        return Result(spec.name, spec.title, "SKIP", spec.skip)
    if spec.http and not include_http:
        return Result(spec.name, spec.title, "SKIP", "HTTP endpoint, not requested (--http)")
    if spec.ref and not include_ref:
        return Result(spec.name, spec.title, "SKIP", "reference-server behaviour that upstream lacks (--no-ref)")
    try:
        # A budget for the whole vector, beyond the per-frame timeouts, so nothing can hang the run.
        async with asyncio.timeout(runner.timeout * 4):
            await spec.run(runner)
    except Failed as exc:
        return Result(spec.name, spec.title, "FAIL", str(exc))
    except Skipped as exc:
        return Result(spec.name, spec.title, "SKIP", str(exc))
    except TimeoutError:
        return Result(spec.name, spec.title, "FAIL", f"did not finish within {runner.timeout * 4:g}s")
    except (OSError, WebSocketException) as exc:
        return Result(spec.name, spec.title, "FAIL", f"{type(exc).__name__}: {exc}")
    finally:
        await runner.cleanup()
    note = " (upstream fails this one)" if spec.ref else ""
    return Result(spec.name, spec.title, "PASS", note.strip())


# --------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandbox conformance",
        description="Check a Cloud Run Sandbox server against the conformance vectors of the protocol "
        "(section 12) with a raw WebSocket client. Creates and deletes a few sandboxes on it.",
    )
    parser.add_argument("url", help="service URL, e.g. http://127.0.0.1:8080 or https://my-service.run.app")
    parser.add_argument(
        "--protocol",
        choices=("auto", "upstream", "extended"),
        default="auto",
        help="'upstream' forbids extension fields, 'extended' requires them, "
        "'auto' follows what the server advertises (default)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for each frame (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra handshake header, e.g. 'Authorization: Bearer TOKEN' (repeatable)",
    )
    parser.add_argument(
        "--no-ref", action="store_true", help="skip vectors only the reference server passes (upstream fails them)"
    )
    parser.add_argument("--http", action="store_true", help="also check the stateless HTTP endpoint POST /execute")
    parser.add_argument(
        "--vector", action="append", default=[], metavar="NAME", help="run only this vector (repeatable)"
    )
    return parser


def main(argv: list[str]) -> int:
    """``sandbox conformance URL [options]``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            parser.error(f"--header {item!r}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    try:
        websocket_base(args.url)
    except LocalProtocolError as exc:
        parser.error(str(exc))
    results = asyncio.run(
        run_vectors(
            args.url,
            protocol=args.protocol,
            timeout=args.timeout,
            headers=headers,
            include_ref=not args.no_ref,
            include_http=args.http,
            only=args.vector,
        )
    )
    out = sys.stdout
    for result in results:
        line = f"{result.verdict}  {result.vector:<11} {result.title}"
        out.write(f"{line}: {result.reason}\n" if result.reason else f"{line}\n")
    counts = {verdict: sum(r.verdict == verdict for r in results) for verdict in ("PASS", "FAIL", "SKIP")}
    out.write(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped\n")
    out.flush()
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
