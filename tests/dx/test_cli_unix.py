"""The `sandbox` command as a Unix tool: pipes, errors that say why, one log line each, end of input.

Each test runs the installed ``sandbox`` console script (the entry point users
get) in a real process, against a real local server on loopback.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import ServerThread

from sandbox_cli._cli import STDIN_NOTE

TIMEOUT = 60
#: The console script pip installed next to this interpreter.
SANDBOX = shutil.which("sandbox", path=os.path.dirname(sys.executable)) or "sandbox"


def env(tmpdir: Path | None = None) -> dict[str, str]:
    environ = {key: value for key, value in os.environ.items() if key != "CLOUD_RUN_URL"}
    if tmpdir is not None:
        environ["TMPDIR"] = str(tmpdir)
    return environ


def sandbox(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SANDBOX, *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        env=env(),
        timeout=TIMEOUT,
    )


@pytest.fixture(scope="module")
def extended() -> Iterator[str]:
    with ServerThread(protocol="extended") as server:
        yield server.url


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """A server without close_stdin (nor any other extension)."""
    with ServerThread(protocol="upstream") as server:
        yield server.url


def test_the_entry_point_is_installed() -> None:
    assert os.path.isfile(SANDBOX), "pip install -e '.[test]' installs the sandbox command"


# -- a reader that leaves -----------------------------------------------------------


def test_into_head_it_exits_quietly_with_the_status_of_sigpipe(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    # Endless output: only the reader's leaving can end it.
    command = f'{shlex.quote(SANDBOX)} exec --isolation none bash yes | head -1; echo "status ${{PIPESTATUS[0]}}"'
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env(tmpdir), timeout=TIMEOUT)
    # As `yes | head -1`: 141 (128 + SIGPIPE), and no BrokenPipeError traceback.
    assert (done.stdout, done.stderr) == ("y\nstatus 141\n", "")
    # Stopped the way Ctrl-C stops it: the embedded server's folder with the code is gone.
    assert list(tmpdir.iterdir()) == []


# -- errors that say why ----------------------------------------------------------------


def test_https_to_a_plain_server_says_the_tls_handshake_failed(extended: str) -> None:
    port = extended.rsplit(":", 1)[1]
    done = sandbox("exec", "--url", f"https://127.0.0.1:{port}", "--timeout", "30", "python", "print(1)")
    assert done.returncode == 1
    assert done.stderr.startswith("sandbox: "), done.stderr
    assert "TLS handshake failed" in done.stderr
    assert f"use http://127.0.0.1:{port}" in done.stderr
    assert not done.stderr.rstrip().endswith(":")


def test_a_wrong_path_is_named_without_a_cloud_run_iam_hint(extended: str) -> None:
    done = sandbox("exec", "--url", f"{extended}/nope", "--timeout", "30", "python", "print(1)")
    assert done.returncode == 1
    assert "'/nope'" in done.stderr and "root URL" in done.stderr
    assert "IAM" not in done.stderr


# -- logging -------------------------------------------------------------------------------


def test_debug_prints_each_log_line_once(extended: str) -> None:
    done = sandbox("exec", "--debug", "--url", extended, "python", "print(6*7)")
    assert (done.returncode, done.stdout) == (0, "42\n")
    lines = done.stderr.splitlines()
    assert len([line for line in lines if "connecting to ws://" in line]) == 1, done.stderr
    # The library's own handler (timestamped) is not added next to the command's.
    assert not [line for line in lines if re.match(r"\d{4}-\d\d-\d\d ", line)]


# -- sandbox serve ---------------------------------------------------------------------------


def test_serve_help_names_the_command_it_was_run_as() -> None:
    done = sandbox("serve", "--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: sandbox serve "), done.stdout[:80]
    module = subprocess.run(
        [sys.executable, "-m", "sandbox_server", "--help"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert module.stdout.startswith("usage: python -m sandbox_server "), module.stdout[:80]


# -- end of input -----------------------------------------------------------------------------


def test_without_close_stdin_a_waiting_program_is_explained_and_ctrl_c_ends_it(upstream: str) -> None:
    cli = subprocess.Popen(
        [SANDBOX, "exec", "--url", upstream, "python", "import sys; sys.stdin.read()"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    watchdog = threading.Timer(TIMEOUT, cli.kill)  # a deadline: a missing note must not hang the suite
    watchdog.start()
    try:
        assert cli.stderr is not None
        assert cli.stderr.readline() == STDIN_NOTE
        cli.send_signal(signal.SIGINT)
        stdout, stderr = cli.communicate(timeout=TIMEOUT)
    finally:
        watchdog.cancel()
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert (cli.returncode, stdout, stderr) == (128 + signal.SIGINT, "", "")


def test_without_close_stdin_timeout_ends_the_wait(upstream: str) -> None:
    done = sandbox("exec", "--url", upstream, "--timeout", "3", "python", "import sys; sys.stdin.read()")
    assert done.returncode == 124
    assert done.stderr.endswith("sandbox: gave up after 3s\n"), done.stderr


def test_without_close_stdin_a_program_that_ignores_stdin_gets_no_note(upstream: str) -> None:
    done = sandbox("exec", "--url", upstream, "bash", "echo hi")
    assert (done.returncode, done.stdout, done.stderr) == (0, "hi\n", "")


def test_forwarded_input_reaches_a_program_without_close_stdin(upstream: str) -> None:
    done = sandbox("exec", "--url", upstream, "python", "print(input().upper())", stdin="hello\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "HELLO\n", "")


def test_code_from_stdin_leaves_the_program_at_end_of_input(extended: str) -> None:
    # Our stdin held the code: the program's stdin is closed at once, so `cat` ends.
    done = sandbox("exec", "--url", extended, "bash", "-", stdin="cat; echo done")
    assert (done.returncode, done.stdout, done.stderr) == (0, "done\n", "")
