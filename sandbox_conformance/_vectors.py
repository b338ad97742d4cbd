"""The conformance vectors of protocol.md section 12, each written once: its transcript as check code.

Files are written where the transcripts write them (``/tmp``, ``/opt``): a
conforming server keeps its sandboxes' whole filesystem across execs,
checkpoints and snapshots.
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from websockets.exceptions import InvalidStatus

from ._wire import (
    DONE,
    EXEC_RUNNING,
    MSG_CHECKPOINT_DISABLED,
    MSG_SNAPSHOT_DISABLED,
    RUNNING,
    Conn,
    ExecOutput,
    Failed,
    Runner,
    dumps,
    err,
    parse,
    st,
)

__all__ = ["VECTORS", "Need", "Vector"]

MSG_ALREADY_RUNNING = "An execution is already in progress."
MSG_NO_PROCESS = "No process is running in the sandbox."
MSG_INVALID_FORMAT = (
    "Invalid message format. 'language' and 'code' fields are required. Supported languages are: python, bash"
)
MSG_INVALID_STDIN = "Invalid stdin message format. 'data' field is required."

CHECKPOINTABLE = '{"idle_timeout":60,"enable_checkpoint":true}'
HANDOFF = (
    '{"idle_timeout":60,"enable_checkpoint":true,"enable_sandbox_handoff":true,'
    '"enable_idle_timeout_auto_checkpoint":false}'
)
#: CV-29's idle_timeout: short, so the vector takes seconds; the transcript's 5 would add 4 to every run.
IDLE_TIMEOUT = 1


# --------------------------------------------------------------------------
# create, exec


async def cv01(r: Runner) -> None:
    conn, _, _ = await r.create("{}")
    await conn.sentinel()


async def cv02(r: Runner) -> None:
    # Asks for the extensions: exit_code and seq are checked when granted, the upstream frames always.
    conn, _, _ = await r.create(extensions=True)
    # The upstream Python client's spacing: servers must accept any JSON formatting.
    await conn.send('{"language": "python", "code": "print(6 * 7)"}')
    await conn.expect(EXEC_RUNNING)
    out = await conn.collect()
    if (out.stdout, out.stderr, out.frames) != ("42\n", "", [DONE]):
        raise Failed(f"stdout {out.stdout!r}, stderr {out.stderr!r}, frames {out.frames}")
    conn.exit_code_is(out, 0)
    if "seq" in conn.extensions and out.seqs != list(range(1, len(out.seqs) + 1)):
        raise Failed(f"'seq' must start at 1 in a new sandbox and grow by 1: {out.seqs}")


async def cv03(r: Runner) -> None:
    conn, _, _ = await r.create(extensions=True)  # exit_code, when granted
    out = await conn.run("bash", "echo oops >&2; exit 3")
    if (out.stdout, out.stderr, out.frames) != ("", "oops\n", [DONE]):
        raise Failed(f"stdout {out.stdout!r}, stderr {out.stderr!r}, frames {out.frames}")
    conn.exit_code_is(out, 3)


async def cv04(r: Runner) -> None:
    conn, _, _ = await r.create(HANDOFF, lock=True)
    await conn.sentinel()


async def _creation_error(r: Runner, init: str, message: str) -> None:
    conn = await r.open("/create", "create")
    await conn.send(init)
    await conn.expect(st("SANDBOX_CREATING"), st("SANDBOX_CREATION_ERROR"), err(message))
    await conn.expect_close(4000)


async def cv05(r: Runner) -> None:
    await _creation_error(r, '{"idle_timeout": 60, "enable_checkpoint": true}', MSG_CHECKPOINT_DISABLED)


async def cv06(r: Runner) -> None:
    await _creation_error(r, '{"idle_timeout":60,"filesystem_snapshot_name":"base-env"}', MSG_SNAPSHOT_DISABLED)


async def cv07(r: Runner) -> None:
    await _creation_error(r, '{"enable_sandbox_handoff":true}', "Sandbox handoff requires checkpointing to be enabled.")


async def cv08(r: Runner) -> None:
    await _creation_error(
        r,
        '{"enable_idle_timeout_auto_checkpoint":true}',
        "Idle timeout auto checkpoint requires checkpointing to be enabled.",
    )


async def cv09(r: Runner) -> None:
    conn = await r.open("/create", "create")
    # A random name, so that no snapshot of that name can exist on a real service.
    await conn.send(dumps({"filesystem_snapshot_name": f"no-such-snapshot-{secrets.token_hex(6)}"}))
    await conn.expect(st("SANDBOX_CREATING"), st("SANDBOX_CREATION_ERROR"))
    await conn.expect_error()
    await conn.expect_close(4000)


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


# --------------------------------------------------------------------------
# stdin, kills


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
    seen = sorted([conn.normalise(await conn.recv("FORCE_KILLED and DONE")) for _ in range(2)])
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


# --------------------------------------------------------------------------
# checkpoint, snapshot


async def _checkpoint(conn: Conn) -> None:
    await conn.send('{"action":"checkpoint"}')
    await conn.expect(
        st("SANDBOX_CHECKPOINTING"), st("SANDBOX_DELETING"), st("SANDBOX_DELETED"), st("SANDBOX_CHECKPOINTED")
    )
    await conn.expect_close(1000)


async def cv20(r: Runner) -> None:
    conn, sandbox_id, token = await r.create(CHECKPOINTABLE)
    await conn.run_quietly("bash", "printf 'v1\\n' > /tmp/note.txt")
    await _checkpoint(conn)
    again = await r.attach(sandbox_id, token, "attach after the checkpoint")
    await again.expect(st("SANDBOX_RESTORING"), RUNNING)
    out = await again.run("bash", "cat /tmp/note.txt")
    if (out.stdout, out.frames) != ("v1\n", [DONE]):
        raise Failed(f"the restored sandbox gave stdout {out.stdout!r} (expected 'v1\\n'), frames {out.frames}")


async def cv21(r: Runner) -> None:
    conn, _, _ = await r.create(CHECKPOINTABLE)
    # One second of exec is ample for a checkpoint request to arrive while it runs.
    await conn.send('{"language":"bash","code":"sleep 1; echo finished"}')
    await conn.expect(EXEC_RUNNING)
    await conn.send('{"action":"checkpoint"}')
    await conn.expect(
        st("SANDBOX_CHECKPOINTING"),
        st("SANDBOX_EXECUTION_IN_PROGRESS_ERROR"),
        err("Cannot checkpoint while an execution is in progress."),
    )
    out = await conn.collect()
    if (out.stdout, out.frames) != ("finished\n", [DONE]):
        raise Failed(f"the exec gave stdout {out.stdout!r}, frames {out.frames}")
    await conn.sentinel()  # the connection stays open


async def cv22(r: Runner) -> None:
    conn, sandbox_id, token = await r.create()
    await conn.send('{"action":"checkpoint"}')
    message = f"Failed to checkpoint sandbox {sandbox_id}: Sandbox {sandbox_id} is not configured for checkpointing."
    await conn.expect(st("SANDBOX_CHECKPOINTING"), st("SANDBOX_CHECKPOINT_ERROR"), err(message))
    await conn.expect_close(4000)
    # The sandbox itself survives: attach still works.
    again = await r.attach(sandbox_id, token, "attach after the refused checkpoint")
    await again.expect(RUNNING)


async def cv23(r: Runner) -> None:
    conn, first_id, _ = await r.create()
    await conn.run_quietly("bash", "mkdir -p /opt/env && echo ready > /opt/env/flag")
    # A fresh name: a real service may hold snapshots of its own (the transcript's env-v1).
    name = f"conformance-{secrets.token_hex(6)}"
    await conn.send(dumps({"action": "snapshot_filesystem", "name": name}))
    await conn.expect(st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"), st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATED"))
    other, other_id, _ = await r.create(dumps({"filesystem_snapshot_name": name}), "create from the snapshot")
    if other_id == first_id:
        raise Failed(f"the sandbox created from the snapshot has the id of its source: {other_id}")
    out = await other.run("bash", "cat /opt/env/flag")
    if (out.stdout, out.frames) != ("ready\n", [DONE]):
        raise Failed(f"the new sandbox gave stdout {out.stdout!r} (expected 'ready\\n'), frames {out.frames}")


async def cv24(r: Runner) -> None:
    conn, sandbox_id, _ = await r.create()
    await conn.send('{"action":"snapshot_filesystem","name":"env-v1"}')
    message = f"Failed to snapshot filesystem for sandbox {sandbox_id}: {MSG_SNAPSHOT_DISABLED}"
    await conn.expect(st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"), st("SANDBOX_FILESYSTEM_SNAPSHOT_ERROR"), err(message))
    await conn.sentinel()  # the connection stays open


# --------------------------------------------------------------------------
# attach, idle, reconnect


async def cv25(r: Runner) -> None:
    first, sandbox_id, token = await r.create()
    await first.ws.close()
    first.attached = False
    second = await r.attach(sandbox_id, token, "connection 2")
    await second.expect(RUNNING)
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


async def cv29(r: Runner) -> None:
    conn, _, _ = await r.create(dumps({"idle_timeout": IDLE_TIMEOUT}))
    # Expiry comes idle_timeout plus at most one sweep period after creation; then the usual frame wait.
    await conn.expect(st("SANDBOX_DELETING"), timeout=IDLE_TIMEOUT + r.idle_sweep + r.timeout)
    await conn.expect(st("SANDBOX_DELETED"))
    await conn.send('{"language":"bash","code":"echo hi"}')
    await conn.expect(st("SANDBOX_EXECUTION_ERROR"))
    await conn.expect_error()
    await conn.expect(DONE)
    conn.attached = False  # nothing left to delete


COUNT_TO_THREE = '{"language":"bash","code":"for i in 1 2 3; do echo $i; sleep 1; done"}'


async def cv30(r: Runner) -> None:
    conn, sandbox_id, token = await r.create()
    await conn.send(COUNT_TO_THREE)
    await conn.expect(EXEC_RUNNING)
    before = ExecOutput()
    while "1\n" not in before.stdout:
        raw = await conn.recv("the first line of output")
        obj = parse(raw, conn.what)
        if obj.get("event") != "stdout":
            raise Failed(f"expected output before the drop, got {raw}")
        conn.add_output(raw, obj, before)
    cookies = conn.cookies
    conn.drop()
    again = await r.attach(sandbox_id, token, "reconnect", cookies=cookies, first='{"action":"reconnect"}')
    await again.expect(RUNNING, EXEC_RUNNING)
    after = await again.collect()
    total = before.stdout + after.stdout
    if (total, after.frames) != ("1\n2\n3\n", [DONE]):
        raise Failed(f"stdout over both connections {total!r} (expected '1\\n2\\n3\\n'), frames {after.frames}")


async def cv30_ref(r: Runner) -> None:
    conn, sandbox_id, token = await r.create()
    cookies = conn.cookies
    conn.drop()
    again = await r.attach(sandbox_id, token, "reconnect", cookies=cookies)
    await again.expect(RUNNING)
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
    context = r.ssl

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


# --------------------------------------------------------------------------
# the table

Check = Callable[[Runner], Awaitable[None]]
#: What a vector needs of the server; the runner asks the server (never guesses) and skips otherwise.
Need = Literal["checkpoints", "no checkpoints", "snapshots", "no snapshots"]


@dataclass(frozen=True, slots=True)
class Vector:
    name: str
    title: str
    check: Check | None = None
    #: Why no single server can run it (then ``check`` is ``None``).
    skip: str = ""
    needs: tuple[Need, ...] = ()
    #: Upstream fails it; the reference server must pass it.
    ref: bool = False
    #: Not a WebSocket vector: run only when asked (``--http``).
    http: bool = False


VECTORS: tuple[Vector, ...] = (
    Vector("CV-01", "create with an empty init message", cv01),
    Vector("CV-02", "python exec with stdout", cv02),
    Vector("CV-03", "bash exec that fails: stderr, no exit code", cv03),
    Vector("CV-04", "create with checkpoint and handoff", cv04, needs=("checkpoints",)),
    Vector("CV-05", "checkpoint requested, server cannot", cv05, needs=("no checkpoints",)),
    Vector("CV-06", "snapshot requested, server cannot", cv06, needs=("no snapshots",)),
    Vector("CV-07", "handoff without checkpoint", cv07),
    Vector("CV-08", "idle auto-checkpoint without checkpoint", cv08),
    Vector("CV-09", "create from a snapshot that does not exist", cv09, needs=("snapshots",)),
    Vector("CV-10", "unsupported language", cv10),
    Vector("CV-11", "unknown action falls through to exec", cv11),
    Vector("CV-12", "exec request without code", cv12),
    Vector("CV-13", "second exec while the first runs", cv13),
    Vector("CV-14", "stdin feeds input()", cv14),
    Vector("CV-15", "stdin frame without data, exec unaffected", cv15),
    Vector("CV-16", "stdin with no process in a fresh sandbox", cv16),
    Vector("CV-17", "kill_process with nothing running", cv17),
    Vector("CV-18", "kill_process on a running exec, sandbox stays usable", cv18),
    Vector("CV-19", "kill_sandbox, then the id is gone", cv19),
    Vector("CV-20", "checkpoint, then restore on attach", cv20, needs=("checkpoints",)),
    Vector("CV-21", "checkpoint refused while an exec runs", cv21, needs=("checkpoints",)),
    Vector("CV-22", "checkpoint of a sandbox created without checkpointing", cv22),
    Vector("CV-23", "snapshot, then create from it", cv23, needs=("snapshots",)),
    Vector("CV-24", "snapshot on a server without snapshot storage", cv24, needs=("no snapshots",)),
    Vector("CV-25", "attach to a free sandbox; a second attach is refused", cv25),
    Vector("CV-26", "attach to an unknown id", cv26),
    Vector("CV-27", "attach with a wrong, an empty, or no token", cv27),
    Vector("CV-28", "handoff between two instances", skip="needs two instances sharing checkpoint storage and locks"),
    Vector("CV-29", "idle expiry while attached", cv29),
    Vector("CV-30", "drop and reconnect during an exec", cv30),
    Vector("CV-30(ref)", "reconnect with no exec in progress", cv30_ref, ref=True),
    Vector("HTTP", "stateless POST /execute", http_execute, http=True),
)
