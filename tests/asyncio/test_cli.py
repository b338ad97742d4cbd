"""The `sandbox` command, run as a user would: a subprocess, with no server configured."""

from __future__ import annotations

import os
import subprocess
import sys

SANDBOX = [sys.executable, "-m", "sandbox_cli"]


def _run(*args: str, stdin: str = "", env_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CLOUD_RUN_URL"}
    if env_url:
        env["CLOUD_RUN_URL"] = env_url
    return subprocess.run([*SANDBOX, *args], input=stdin, capture_output=True, text=True, timeout=60, env=env)


def test_exec_with_embedded_server_prints_result() -> None:
    done = _run("exec", "python", "print(6*7)")
    assert (done.returncode, done.stdout, done.stderr) == (0, "42\n", "")


def test_exit_code_and_streams_are_kept_apart() -> None:
    done = _run("exec", "bash", "echo out; echo err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, "out\n", "err\n")


def test_stdin_is_forwarded_and_closed_at_end() -> None:
    done = _run("exec", "python", "import sys; print(sys.stdin.read().upper(), end='')", stdin="hello\nworld\n")
    assert (done.returncode, done.stdout) == (0, "HELLO\nWORLD\n")


def test_code_from_stdin() -> None:
    done = _run("exec", "bash", "-", stdin="echo from stdin")
    assert (done.returncode, done.stdout) == (0, "from stdin\n")


def test_url_from_environment(url: str) -> None:
    done = _run("exec", "python", "print('remote')", env_url=url)
    assert (done.returncode, done.stdout) == (0, "remote\n")


def test_unreachable_server_fails_with_a_message() -> None:
    done = _run("exec", "python", "print(1)", "--url", "http://127.0.0.1:9", "--timeout", "10")
    assert done.returncode == 1
    assert "cannot connect" in done.stderr
