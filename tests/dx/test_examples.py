"""Every program in examples/ runs, as a user would run it, and says what it should.

Each example starts its own local server (``CLOUD_RUN_URL`` is removed from
the environment). They are independent processes, so they are all started at
once and each test then waits for its own: the module takes about as long as
the slowest example.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIMEOUT = 60

#: example -> (stdin, lines its output must contain)
EXPECTED: dict[str, tuple[str, list[str]]] = {
    "basic": ("", ["Hello from the sandbox!", "got: line 2", "exit code: 2"]),
    "basic_trio": ("", ["Hello from the sandbox!", "6 * 7 = 42"]),
    "checkpoint": ("", ["restored: state before the checkpoint"]),
    "filesystem_snapshot": ("", ["new sandbox sees: prepared once"]),
    "handoff": ("", ["instance B sees: written on instance A", "first client ended: SandboxDeletedError"]),
    "lifecycle": ("", ["attached again, file says: kept", "attach after kill refused: SANDBOX_NOT_FOUND"]),
    "reconnect": ("", ["read after the drop: 2 3 4 5", "reconnects: 1", "output may be incomplete: False"]),
    "shell": ("echo hello from the shell\ncd /tmp\npwd\nfalse\n", ["hello from the shell", "/tmp", "[exit 1]"]),
}


def test_every_example_is_covered() -> None:
    programs = {path.stem for path in EXAMPLES.glob("*.py") if not path.name.startswith("_")}
    assert programs == set(EXPECTED)


@pytest.fixture(scope="module")
def running() -> Iterator[dict[str, subprocess.Popen[str]]]:
    env = {key: value for key, value in os.environ.items() if key != "CLOUD_RUN_URL"}
    processes: dict[str, subprocess.Popen[str]] = {}
    for name, (stdin, _) in EXPECTED.items():
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / f"{name}.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=EXAMPLES.parent,
        )
        assert process.stdin is not None
        process.stdin.write(stdin)
        process.stdin.close()  # end of input: the shell example finishes at EOF
        process.stdin = None  # so communicate() does not touch the closed pipe
        processes[name] = process
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example(name: str, running: dict[str, subprocess.Popen[str]]) -> None:
    process = running[name]
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{name}.py did not finish within {TIMEOUT}s\n{stdout}\n{stderr}")
    assert process.returncode == 0, f"{name}.py exited with {process.returncode}\n{stdout}\n{stderr}"
    lines = stdout.splitlines()
    for expected in EXPECTED[name][1]:
        assert expected in lines, f"{name}.py did not print {expected!r}:\n{stdout}\n{stderr}"
