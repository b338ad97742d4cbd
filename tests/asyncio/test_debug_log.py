"""``enable_debug=True``: the protocol log on stderr when the application logs nothing, once when it does."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys
if sys.argv[1] == "configured":
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="app %(message)s")
from _sandbox_anyio._sandbox import debug_log
debug_log(True).debug("hello")
"""


@pytest.mark.parametrize(
    ("setup", "stdout", "stderr"),
    [
        ("unconfigured", "", ["hello"]),
        # The application's handler shows it; ours stays quiet rather than print it a second time.
        ("configured", "app hello\n", []),
    ],
)
def test_debug_lines_are_printed_once(setup: str, stdout: str, stderr: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, setup], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == stdout
    assert [line.rsplit(" ", 1)[-1] for line in done.stderr.splitlines()] == stderr
