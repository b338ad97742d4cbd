"""Nothing of a sandbox outlives the server: checked on the host's process table, not inside the sandbox.

Inside bwrap ``$$`` is a pid of the sandbox's own pid namespace, so these
tests mark their processes with a unique argument and look for it in
``/proc/*/cmdline`` of the host. The server runs as a real process, killed
the way users and supervisors kill it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
from pathlib import Path

import pytest
from _support import start_server_process

from sandbox_asyncio import Sandbox
from sandbox_proto import SandboxException

pytestmark = pytest.mark.anyio

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                    if marker.encode() in cmdline.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


async def poll(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# Under bwrap a process that left the exec's process group and session (setsid) still dies:
# it is in the exec's pid namespace, and it runs as the sandbox's uid.
ESCAPES = "setsid sleep 1002.{m} >/dev/null 2>&1 < /dev/null & nohup sleep 1001.{m} >/dev/null 2>&1 &"


#: How many times each case runs; the closing measurement runs it 20 times.
ATTEMPTS = int(os.environ.get("SANDBOX_ORPHAN_ATTEMPTS", "3"))


@pytest.mark.parametrize(
    ("isolation", "how"),
    [
        pytest.param("bwrap", signal.SIGKILL, marks=needs_bwrap, id="bwrap-SIGKILL"),
        pytest.param("bwrap", signal.SIGTERM, marks=needs_bwrap, id="bwrap-SIGTERM"),
        pytest.param("none", signal.SIGKILL, id="none-SIGKILL"),
        pytest.param("none", signal.SIGTERM, id="none-SIGTERM"),
    ],
)
@pytest.mark.parametrize("attempt", range(ATTEMPTS))
async def test_a_stopped_or_killed_server_leaves_no_process_and_no_folder(
    tmp_path: Path, isolation: str, how: signal.Signals, attempt: int
) -> None:
    marker = secrets.token_hex(4)
    digits = str(int(marker, 16))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    # The temporary state dir goes under TMPDIR, where the test looks for leftovers.
    proc, url = await start_server_process("--isolation", isolation, env={**os.environ, "TMPDIR": str(tmpdir)})
    try:
        sandbox = await Sandbox.create(url, timeout=30)
        escapes = ESCAPES.format(m=digits) if isolation == "bwrap" else f"sleep 1001.{digits} &"
        await sandbox.exec("bash", f"{escapes} sleep 1000.{digits}")
        expected = 3 if isolation == "bwrap" else 2
        await poll(lambda: len(processes_with(digits)) >= expected, 15, "the sleeps on the host")
        proc.send_signal(how)
        async with asyncio.timeout(15):
            await proc.wait()
        await poll(lambda: not processes_with(digits), 10, f"no process marked {digits}")
        await poll(lambda: not any(tmpdir.iterdir()), 10, f"an empty TMPDIR (left: {list(tmpdir.iterdir())})")
        with contextlib.suppress(SandboxException):  # the server is gone: whatever the client says is fine
            await sandbox.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in processes_with(digits):
            os.kill(pid, signal.SIGKILL)
