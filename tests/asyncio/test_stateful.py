"""Stateful sandboxes end to end (GitHub issue 3): the asyncio client against real servers.

Checkpoint and restore, snapshots, idle expiry with and without
auto-checkpoint, and handoff between two ``python -m sandbox_server``
processes sharing one state directory. Every wait is bounded; nothing sleeps
to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _support import ServerThread

from sandbox_asyncio import (
    Sandbox,
    SandboxCheckpointError,
    SandboxCreationError,
    SandboxDeletedError,
    SandboxException,
    Status,
)

pytestmark = pytest.mark.anyio

#: Upper bound of any one step; the whole file runs in seconds.
DEADLINE = 15.0


async def run(sandbox: Sandbox, language: str, code: str) -> str:
    process = await sandbox.exec(language, code)
    out = await process.stdout.read_all(timeout=DEADLINE)
    await process.wait(timeout=DEADLINE)
    return out


async def test_checkpoint_then_attach_finds_the_file(url: str) -> None:
    sandbox = await Sandbox.create(url, enable_sandbox_checkpoint=True)
    await run(sandbox, "bash", "echo saved > note.txt")
    sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
    assert sandbox_id is not None and token is not None
    await sandbox.checkpoint(timeout=DEADLINE)
    assert sandbox.state == "checkpointed"
    async with Sandbox.attach(url, sandbox_id, token, timeout=DEADLINE) as restored:
        assert await run(restored, "bash", "cat note.txt") == "saved\n"


async def test_checkpoint_during_an_exec_is_refused_and_the_sandbox_keeps_working(url: str) -> None:
    async with Sandbox.create(url, enable_sandbox_checkpoint=True) as sandbox:
        process = await sandbox.exec("bash", "read line; echo got $line")
        with pytest.raises(SandboxCheckpointError) as refused:
            await sandbox.checkpoint(timeout=DEADLINE)
        assert refused.value.status is Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR
        assert refused.value.server_message == "Cannot checkpoint while an execution is in progress."
        # The exec was not disturbed, and the sandbox takes new execs.
        await process.write_to_stdin("x\n")
        assert await process.stdout.read_all(timeout=DEADLINE) == "got x\n"
        await process.wait(timeout=DEADLINE)
        assert await run(sandbox, "bash", "echo still") == "still\n"


async def test_snapshot_then_two_sandboxes_start_from_it(url: str) -> None:
    name = f"env-{uuid.uuid4().hex[:8]}"  # the server is shared by the session
    async with Sandbox.create(url) as source:
        await run(source, "bash", "mkdir -p env && echo ready > env/flag")
        await source.snapshot_filesystem(name, timeout=DEADLINE)
    async with (
        Sandbox.create(url, filesystem_snapshot_name=name) as one,
        Sandbox.create(url, filesystem_snapshot_name=name) as two,
    ):
        assert one.sandbox_id != two.sandbox_id
        assert await run(one, "bash", "cat env/flag; echo changed > env/flag") == "ready\n"
        assert await run(two, "bash", "cat env/flag") == "ready\n"  # each has its own copy


async def test_wrong_token_on_a_checkpointed_sandbox_fails_promptly(url: str) -> None:
    sandbox = await Sandbox.create(url, enable_sandbox_checkpoint=True)
    sandbox_id = sandbox.sandbox_id
    assert sandbox_id is not None
    await sandbox.checkpoint(timeout=DEADLINE)
    async with asyncio.timeout(DEADLINE):  # no hang after SANDBOX_RESTORING (10.4 item 1)
        with pytest.raises(SandboxCreationError) as refused:
            await Sandbox.attach(url, sandbox_id, "0" * 64, timeout=DEADLINE)
    assert refused.value.status is Status.SANDBOX_PERMISSION_DENIAL_ERROR
    assert refused.value.server_message == "Invalid sandbox token."


async def test_idle_expiry_without_auto_checkpoint(url: str) -> None:
    sandbox = await Sandbox.create(url, idle_timeout=1)
    sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
    assert sandbox_id is not None and token is not None
    assert await run(sandbox, "bash", "echo once") == "once\n"
    # Nothing more from us: the server deletes it about a second later, and the pending wait learns why.
    ended = await sandbox.wait_closed(timeout=DEADLINE)
    assert isinstance(ended, SandboxDeletedError)
    with pytest.raises(SandboxException):
        await sandbox.exec("bash", "echo too late")
    with pytest.raises(SandboxCreationError) as gone:
        await Sandbox.attach(url, sandbox_id, token, timeout=DEADLINE)
    assert gone.value.status is Status.SANDBOX_NOT_FOUND


async def test_idle_expiry_with_auto_checkpoint_restores_later(url: str) -> None:
    sandbox = await Sandbox.create(
        url, idle_timeout=1, enable_sandbox_checkpoint=True, enable_idle_timeout_auto_checkpoint=True
    )
    sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
    assert sandbox_id is not None and token is not None
    await run(sandbox, "bash", "echo kept > note.txt")
    assert isinstance(await sandbox.wait_closed(timeout=DEADLINE), SandboxDeletedError)
    async with Sandbox.attach(url, sandbox_id, token, timeout=DEADLINE) as restored:
        assert await run(restored, "bash", "cat note.txt") == "kept\n"


async def test_attach_after_kill_is_not_found(url: str) -> None:
    sandbox = await Sandbox.create(url, enable_sandbox_checkpoint=True)
    sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
    assert sandbox_id is not None and token is not None
    await sandbox.kill()
    with pytest.raises(SandboxCreationError) as gone:
        await Sandbox.attach(url, sandbox_id, token, timeout=DEADLINE)
    assert gone.value.status is Status.SANDBOX_NOT_FOUND


async def test_plain_server_refuses_checkpointable_sandboxes() -> None:
    with ServerThread(checkpoints=False, snapshots=False) as plain:
        with pytest.raises(SandboxCreationError) as refused:
            await Sandbox.create(plain.url, enable_sandbox_checkpoint=True, timeout=DEADLINE)
        assert refused.value.server_message == "Checkpointing is not enabled on the server."


# -- handoff between two server processes ---------------------------------------------------------


@contextlib.asynccontextmanager
async def server_process(state: Path) -> AsyncIterator[str]:
    """``python -m sandbox_server`` on a free port with short lock timings; yields its URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandbox_server",
        "--port",
        "0",
        "--state-dir",
        str(state),
        "--lease-duration",
        "5",
        "--lease-renewal-interval",
        "1",
        "--lock-wait-timeout",
        "10",
        "--log-level",
        "WARNING",
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(DEADLINE):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("listening on http://"), line
        yield line.split()[-1]
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(DEADLINE):
                    await proc.wait()
            except TimeoutError:
                os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()


async def test_handoff_between_two_server_processes(tmp_path: Path) -> None:
    async with server_process(tmp_path) as url_a, server_process(tmp_path) as url_b:
        first = await Sandbox.create(url_a, enable_sandbox_checkpoint=True, enable_sandbox_handoff=True)
        sandbox_id, token = first.sandbox_id, first.sandbox_token
        assert sandbox_id is not None and token is not None
        await run(first, "bash", "echo from-a > note.txt")
        running = await first.exec("python", "import time; print('A running', flush=True); time.sleep(30)")
        assert await running.stdout.readline(timeout=DEADLINE) == "A running\n"
        # Client 2 through instance B: A checkpoints, releases, B restores.
        async with Sandbox.attach(url_b, sandbox_id, token, timeout=DEADLINE) as second:
            assert await run(second, "bash", "cat note.txt") == "from-a\n"
            # Client 1 learns that its sandbox left: its process and its session end.
            with pytest.raises(SandboxDeletedError):
                await running.wait(timeout=DEADLINE)
            assert isinstance(await first.wait_closed(timeout=DEADLINE), SandboxDeletedError)
            with pytest.raises(SandboxException):
                await first.exec("bash", "echo stale")
        await first.close()
