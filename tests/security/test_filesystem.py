"""The real service's filesystem model under bwrap: a writable root that persists, travels, and stays private.

The upstream examples (checkpoint.py, filesystem_snapshot.py) write files
anywhere and read them back in a later exec, after a checkpoint, and in a
sandbox created from a snapshot; ``pip install`` in one exec is importable
in the next.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import textwrap
from collections.abc import Iterator

import pytest
from _support import ServerThread
from security._limits import LIMITS
from security.test_escape import run

from sandbox_asyncio import Sandbox

pytestmark = pytest.mark.anyio

WRITE = """\
set -e
echo tmp > /tmp/x
echo cwd > here.txt
echo home > ~/home.txt
echo root > /top.txt
mkdir -p /opt/data && echo opt > /opt/data/file
echo secret > /tmp/private && chmod 600 /tmp/private
mkdir -m 700 ~/closet
chmod 751 ~
"""

READ = """\
cat /tmp/x here.txt ~/home.txt /top.txt /opt/data/file
stat -c '%a %n' /tmp/private ~/closet ~
"""

EXPECTED = "tmp\ncwd\nhome\nroot\nopt\n600 /tmp/private\n700 /sandbox/closet\n751 /sandbox\n"

#: A wheel built inside the sandbox (it has no network), installed with pip in a later exec.
MAKE_WHEEL = textwrap.dedent(
    """\
    import base64, hashlib, zipfile
    files = {
        "tinypkg/__init__.py": "VALUE = 42\\n",
        "tinypkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\\nName: tinypkg\\nVersion: 1.0\\n",
        "tinypkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }
    record = []
    with zipfile.ZipFile("tinypkg-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(text)}")
        wheel.writestr("tinypkg-1.0.dist-info/RECORD", "\\n".join([*record, "tinypkg-1.0.dist-info/RECORD,,"]) + "\\n")
    """
)


async def test_files_anywhere_persist_across_execs_checkpoints_and_snapshots(isolated: ServerThread) -> None:
    name = f"fs-{secrets.token_hex(4)}"
    sandbox = await Sandbox.create(isolated.url, enable_sandbox_checkpoint=True)
    try:
        assert await run(sandbox, "bash", WRITE) == ("", "", 0)
        assert await run(sandbox, "bash", READ) == (EXPECTED, "", 0)
        sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
        await sandbox.checkpoint()
    finally:
        await sandbox.close()
    async with Sandbox.attach(isolated.url, sandbox_id, token) as restored:
        assert await run(restored, "bash", READ) == (EXPECTED, "", 0)
        await restored.snapshot_filesystem(name)
        await restored.kill()
    async with Sandbox.create(isolated.url, filesystem_snapshot_name=name) as copy:
        # Another sandbox (another uid) owns the copied files: it can change them.
        assert await run(copy, "bash", READ) == (EXPECTED, "", 0)
        assert await run(copy, "bash", "echo more >> /tmp/private && rm here.txt && echo ok") == ("ok\n", "", 0)


@pytest.fixture
def roomy() -> Iterator[ServerThread]:
    """bwrap with the attack limits but CPU for pip: it needs about 2 s of CPU, more on a loaded machine."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap (CI installs it)")
    with ServerThread(isolation="bwrap", limits=dataclasses.replace(LIMITS, cpu_seconds=60)) as running:
        yield running


async def test_pip_install_persists(roomy: ServerThread) -> None:
    async with Sandbox.create(roomy.url) as sandbox:
        assert (await run(sandbox, "python", MAKE_WHEEL))[2] == 0
        out, err, code = await run(sandbox, "bash", "pip install --no-index ./tinypkg-1.0-py3-none-any.whl")
        assert code == 0, out + err
        assert await run(sandbox, "python", "import tinypkg; print(tinypkg.VALUE)") == ("42\n", "", 0)


async def test_the_system_and_its_mount_points_cannot_be_changed(isolated: ServerThread) -> None:
    # The root is the sandbox's, but bwrap mounts on entries it cannot remove or replace,
    # so no later exec can be made to mount somewhere else.
    attempts = "mv /usr /usr2; rm -rf /etc; ln -sfn / /run/sandbox; rmdir /proc; mv /tmp /tmp2; touch /usr/x"
    async with Sandbox.create(isolated.url) as sandbox:
        out, err, code = await run(sandbox, "bash", attempts + "; echo done")
        assert (out, code) == ("done\n", 0)
        refusals = ("Permission denied", "Read-only file system", "Device or resource busy")
        assert sum(err.count(reason) for reason in refusals) >= 6, err
        assert await run(sandbox, "bash", "ls /usr/bin/env /etc/passwd && echo x > /tmp/y && cat /tmp/y") == (
            "/etc/passwd\n/usr/bin/env\nx\n",
            "",
            0,
        )


async def test_sandboxes_do_not_share_files(isolated: ServerThread) -> None:
    async with Sandbox.create(isolated.url) as first, Sandbox.create(isolated.url) as second:
        assert await run(first, "bash", "echo one > /tmp/shared; echo one > /top") == ("", "", 0)
        out, _, _ = await run(second, "bash", "cat /tmp/shared /top 2>&1; ls /tmp")
        assert "one" not in out
