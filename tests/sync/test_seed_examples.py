"""The seed README's two examples, rewritten for ``sandbox_sync``, run as written.

As a plain script (a subprocess running a file), and as the body of a
coroutine under ``asyncio.run`` (a notebook cell: the caller's thread already
runs an event loop). ``docs/sync.md`` shows the same programs, word for word.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60

BASIC = """\
import os
import ssl

import certifi
from sandbox_sync import Sandbox


def main():
    # The URL should be the WebSocket endpoint of your deployed service,
    # typically "wss://<your-cloud-run-url>"
    url = os.environ.get("CLOUD_RUN_URL")
    ssl_context = ssl.create_default_context(cafile=certifi.where())

    with Sandbox.create(url, ssl=ssl_context) as sandbox:
        # Execute a command
        process = sandbox.exec("bash", "echo 'Hello from the sandbox!'")

        # Read the output
        output = process.stdout.read_all()
        print(output)

        # Wait for the process to finish
        process.wait()


if __name__ == "__main__":
    main()
"""

CHECKPOINT = """\
import os
import ssl

import certifi
from sandbox_sync import Sandbox


def main():
    url = os.environ.get("CLOUD_RUN_URL")
    ssl_context = ssl.create_default_context(cafile=certifi.where())

    # Create a sandbox with checkpointing enabled
    sandbox1 = Sandbox.create(url, enable_sandbox_checkpoint=True, ssl=ssl_context)

    sandbox_id = sandbox1.sandbox_id
    sandbox_token = sandbox1.sandbox_token
    print(f"Created sandbox with ID: {sandbox_id}")

    # ... do some work ...
    sandbox1.exec("bash", "echo work > state.txt").wait()

    # Checkpoint the sandbox
    sandbox1.checkpoint()
    print("Sandbox checkpointed.")

    # Attach to the checkpointed sandbox
    with Sandbox.attach(url, sandbox_id, sandbox_token, ssl=ssl_context) as sandbox2:
        print("Attached to sandbox.")
        # ... continue work ...
        print(sandbox2.exec("bash", "cat state.txt").stdout.read_all())


if __name__ == "__main__":
    main()
"""

#: Runs a program as the body of a coroutine, as a Jupyter cell runs: inside a running loop.
IN_A_RUNNING_LOOP = """\
import asyncio, runpy, sys

async def cell():
    asyncio.get_running_loop()  # there is one, as in a notebook
    runpy.run_path(sys.argv[1], run_name="__main__")

asyncio.run(cell())
"""

EXPECTED = {
    "basic": ["Hello from the sandbox!"],
    "checkpoint": ["Created sandbox with ID: sandbox-", "Sandbox checkpointed.", "Attached to sandbox.", "work"],
}


def run_python(args: list[str], url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLOUD_RUN_URL": url}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


@pytest.mark.parametrize("where", ["script", "running-loop"])
@pytest.mark.parametrize("example", ["basic", "checkpoint"])
def test_seed_example_as_written(example: str, where: str, local_url: str, tmp_path: Path) -> None:
    program = tmp_path / f"{example}.py"
    program.write_text(BASIC if example == "basic" else CHECKPOINT)
    args = [str(program)]
    if where == "running-loop":
        (tmp_path / "cell.py").write_text(IN_A_RUNNING_LOOP)
        args = [str(tmp_path / "cell.py"), str(program)]
    done = run_python(args, local_url, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for expected in EXPECTED[example]:
        assert any(line.startswith(expected) for line in lines), (expected, done.stdout)
    assert "event loop is running" not in done.stderr


def test_docs_show_the_same_programs() -> None:
    page = (ROOT / "docs" / "sync.md").read_text()
    assert BASIC in page
    assert CHECKPOINT in page


def test_a_script_that_leaves_a_sandbox_open_still_exits(local_url: str, tmp_path: Path) -> None:
    # Nothing closed, nothing killed: the loop thread must not keep the interpreter alive.
    program = tmp_path / "forgetful.py"
    program.write_text(
        "import os\nfrom sandbox_sync import Sandbox\n"
        "sandbox = Sandbox.create(os.environ['CLOUD_RUN_URL'])\n"
        "process = sandbox.exec('bash', 'sleep 600')\n"
        "print('started', flush=True)\n"
    )
    done = run_python([str(program)], local_url, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "started\n"


def test_ctrl_c_cancels_the_waiting_call_and_the_sandbox_stays_usable(local_url: str, tmp_path: Path) -> None:
    program = tmp_path / "interrupted.py"
    program.write_text(
        "import os\nfrom sandbox_sync import Sandbox\n"
        "with Sandbox.create(os.environ['CLOUD_RUN_URL']) as sandbox:\n"
        "    process = sandbox.exec('bash', 'sleep 600')\n"
        "    try:\n"
        "        print('waiting', flush=True)  # in the try: a signal from here on is caught\n"
        "        process.wait()\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted', flush=True)\n"
        "    process.kill()\n"
        "    print(sandbox.run('bash', 'echo usable').stdout, end='', flush=True)\n"
    )
    env = {**os.environ, "CLOUD_RUN_URL": local_url}
    with subprocess.Popen(
        [sys.executable, str(program)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        try:
            assert child.stdout.readline() == "waiting\n"  # it is blocked in wait() now, or about to be
            child.send_signal(signal.SIGINT)
            out, err = child.communicate(timeout=TIMEOUT)
        finally:
            child.kill()
    assert child.returncode == 0, err
    assert out == "interrupted\nusable\n"
