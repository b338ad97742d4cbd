"""`sandbox exec --isolation`: without bubblewrap the code runs unconfined, and the user is told so.

"No bubblewrap" is made on any machine by running the CLI with a PATH that
holds a few tools but not ``bwrap``: the server looks it up with
``shutil.which``, as it does ``bash`` and ``prlimit``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 60
#: What the CLI's local server looks up on PATH, besides bwrap.
TOOLS = ("bash", "sh", "prlimit", "setpriv")


def run_cli(*args: str, path: str | None, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "CLOUD_RUN_URL"}
    env["TMPDIR"] = str(tmpdir)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "sandbox_cli", "exec", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
    )


@pytest.fixture
def tmpdir_(tmp_path: Path) -> Path:
    """TMPDIR of the CLI: it must be empty once the CLI has exited."""
    path = tmp_path / "tmp"
    path.mkdir()
    return path


@pytest.fixture
def path_without_bwrap(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        if (found := shutil.which(tool)) is not None:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line]


def test_auto_without_bwrap_warns_once(path_without_bwrap: str, tmpdir_: Path) -> None:
    result = run_cli("bash", "echo ran", path=path_without_bwrap, tmpdir=tmpdir_)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ran\n"
    assert warnings(result.stderr) == [
        f"sandbox: warning: bubblewrap not found; code runs unisolated as {user()} "
        "(install bubblewrap, or --isolation none to silence)"
    ]
    assert list(tmpdir_.iterdir()) == []


def test_none_is_silent(path_without_bwrap: str, tmpdir_: Path) -> None:
    result = run_cli("--isolation", "none", "bash", "echo ran", path=path_without_bwrap, tmpdir=tmpdir_)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ran\n"
    assert result.stderr == ""


def test_bwrap_required_but_missing_is_an_error(path_without_bwrap: str, tmpdir_: Path) -> None:
    result = run_cli("--isolation", "bwrap", "bash", "echo ran", path=path_without_bwrap, tmpdir=tmpdir_)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("sandbox: error: --isolation bwrap: bubblewrap (bwrap) is not installed")
    assert len(result.stderr.splitlines()) == 1  # no traceback
    assert list(tmpdir_.iterdir()) == []


def test_isolation_is_refused_with_a_url(tmpdir_: Path) -> None:
    result = run_cli("--url", "http://127.0.0.1:9", "--isolation", "none", "bash", "true", path=None, tmpdir=tmpdir_)
    assert result.returncode == 2
    assert "--isolation applies to the local server only" in result.stderr


def test_auto_with_bwrap(tmpdir_: Path) -> None:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("bubblewrap (bwrap) is not installed")
    # Whether bwrap can make namespaces here at all (containers often forbid it).
    works = subprocess.run([bwrap, "--ro-bind", "/", "/", "--unshare-pid", "true"], capture_output=True).returncode == 0
    result = run_cli("bash", "echo ran", path=None, tmpdir=tmpdir_)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ran\n"
    if works:
        assert warnings(result.stderr) == []
    else:
        assert len(warnings(result.stderr)) == 1
        assert "bubblewrap does not work here" in result.stderr
