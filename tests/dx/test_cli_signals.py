"""SIGTERM and SIGINT stop `sandbox exec` cleanly: no program left running, no folder left behind.

The CLI's local server keeps the user's code in a temporary folder under
$TMPDIR and runs the program in its own session, out of reach of the
terminal's (or timeout(1)'s) signals: only the CLI's cleanup ends it. Each
test runs the CLI with a fresh TMPDIR, finds the program in the host's
process table by an argv no other process has (a pid printed from inside
would be one of bwrap's pid namespace), signals the CLI, and then checks
the three promises within a deadline.

``python tests/dx/test_cli_signals.py [RUNS [SIGNAL]]`` repeats the case
RUNS times (default 20, SIGNAL default TERM) per isolation mode and prints
the counts: a measurement, not part of CI.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

DEADLINE = 20.0
#: Iterations per test: enough to catch an ordering race now and then, cheap enough for CI.
ITERATIONS = 3


def marker() -> str:
    """A sleep duration no other process on the machine uses: the program's argv is ``sleep <it>``."""
    return str(10_000_000 + secrets.randbelow(80_000_000))


def processes_with(mark: str) -> list[int]:
    """Host pids whose argv is ``sleep <mark>`` (zombies have an empty cmdline and do not count)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if os.path.basename(argv[0]) == b"sleep" and argv[1:2] == [mark.encode()]:
            found.append(int(entry.name))
    return found


def wait_for(condition: str, check: Callable[[], object], deadline: float = DEADLINE) -> None:
    """Poll ``check()`` until it is true, or fail naming ``condition``."""
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline}s: {condition}")
        time.sleep(0.02)  # a poll interval, not a synchronisation


def start_cli(isolation: str, code: str, tmpdir: Path, *extra: str) -> subprocess.Popen[str]:
    env = {key: value for key, value in os.environ.items() if key != "CLOUD_RUN_URL"}
    env["TMPDIR"] = str(tmpdir)
    return subprocess.Popen(
        [sys.executable, "-m", "sandbox_cli", "exec", "--isolation", isolation, *extra, "bash", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


class Outcome:
    def __init__(self, returncode: int | None, survivors: list[int], leftovers: list[str], stderr: str) -> None:
        self.returncode = returncode
        self.survivors = survivors
        self.leftovers = leftovers
        self.stderr = stderr


def stop_once(isolation: str, signum: int, tmpdir: Path, deadline: float = DEADLINE) -> Outcome:
    """Start a sleeping program (one in the foreground, one in the background), signal the CLI, observe.

    Whatever it finds is killed afterwards, so that a failure leaks nothing.
    """
    mark = marker()
    cli = start_cli(isolation, f"sleep {mark} & sleep {mark}; wait", tmpdir)
    try:
        end = time.monotonic() + deadline
        while len(processes_with(mark)) < 2:
            if cli.poll() is not None or time.monotonic() > end:
                _, stderr = cli.communicate(timeout=deadline)
                raise AssertionError(f"the program did not start (CLI status {cli.returncode}):\n{stderr}")
            time.sleep(0.02)
        cli.send_signal(signum)
        try:
            _, stderr = cli.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            stderr = "(the CLI did not exit)"
        end = time.monotonic() + deadline
        while (survivors := processes_with(mark)) and time.monotonic() < end:
            time.sleep(0.02)
        return Outcome(cli.poll(), survivors, sorted(os.listdir(tmpdir)), stderr)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
        for pid in processes_with(mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in os.listdir(tmpdir):
            shutil.rmtree(tmpdir / name, ignore_errors=True)


def bwrap_works() -> bool:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False
    return subprocess.run([bwrap, "--ro-bind", "/", "/", "--unshare-pid", "true"], capture_output=True).returncode == 0


ISOLATIONS = [
    "none",
    pytest.param("bwrap", marks=pytest.mark.skipif(not bwrap_works(), reason="bubblewrap is missing or unusable")),
]


@pytest.fixture
def tmpdir_(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "tmp"
    path.mkdir()
    yield path


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_everything(isolation: str, signum: int, tmpdir_: Path) -> None:
    for _ in range(ITERATIONS):
        outcome = stop_once(isolation, signum, tmpdir_)
        assert outcome.returncode == 128 + signum, outcome.stderr
        assert outcome.survivors == [], "the program outlived the CLI"
        assert outcome.leftovers == [], "the server's folder (the user's code) was left behind"
        assert "Traceback" not in outcome.stderr, outcome.stderr


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_timeout_exits_124_and_cleans_up(isolation: str, tmpdir_: Path) -> None:
    mark = marker()
    cli = start_cli(isolation, f"sleep {mark}", tmpdir_, "--timeout", "1")
    try:
        _, stderr = cli.communicate(timeout=DEADLINE)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 124, stderr
    assert "gave up after 1s" in stderr
    wait_for("no program left running", lambda: not processes_with(mark))
    assert os.listdir(tmpdir_) == []


def _measure(runs: int, signum: int) -> None:
    """Not a test: the ``signum`` case ``runs`` times per isolation mode, with counts."""
    import tempfile

    modes = ["none", "bwrap"] if bwrap_works() else ["none"]
    for isolation in modes:
        counts = {"runs": 0, "wrong status": 0, "survivors": 0, "leftover folders": 0}
        started = time.monotonic()
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as directory:
                outcome = stop_once(isolation, signum, Path(directory))
            counts["runs"] += 1
            counts["wrong status"] += outcome.returncode != 128 + signum
            counts["survivors"] += bool(outcome.survivors)
            counts["leftover folders"] += bool(outcome.leftovers)
        elapsed = time.monotonic() - started
        print(f"{signal.Signals(signum).name} isolation {isolation}: {counts} in {elapsed:.1f}s")  # noqa: T201


if __name__ == "__main__":
    _measure(
        int(sys.argv[1]) if len(sys.argv) > 1 else 20,
        signal.Signals["SIG" + sys.argv[2]] if len(sys.argv) > 2 else signal.SIGTERM,
    )
