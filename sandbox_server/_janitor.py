"""A process that outlives the server to clean up after it.

A server killed with SIGKILL runs no cleanup code: its sandboxes' processes
would be left running and its temporary folders (which hold users' code)
on disk. So every server starts a small janitor in its own session and
tells it, line by line on a pipe, what to clean up: process groups,
namespace inits, sandbox uids, folders. When the pipe reaches end-of-file
(the server stopped, or died however it died) the janitor kills and
removes whatever is still listed, then exits. After a clean stop the
server has already done it all, and the janitor finds nothing left.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

__all__ = ["Janitor", "is_bwrap", "kill_processes_of"]

logger = logging.getLogger("sandbox_server")

#: ``pg``: a process group; ``ns``: bwrap's init of a pid namespace (killed only while it is still bwrap);
#: ``uid``: every process of a sandbox's own uid; ``dir``: a folder to remove.
Kind = Literal["pg", "ns", "uid", "dir"]

#: How long the server waits for the janitor at a clean stop.
_EXIT_WAIT = 5.0


def processes_of(uids: set[int]) -> list[int]:
    """Pids of every live (not zombie) process whose real uid is in ``uids`` (Linux ``/proc``)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="ascii", errors="replace") as status:
                fields = dict(row.split(":", 1) for row in status if row.startswith(("State:", "Uid:")))
            if not fields["State"].strip().startswith("Z") and int(fields["Uid"].split()[0]) in uids:
                found.append(int(name))
        except (OSError, ValueError, KeyError):
            pass  # gone meanwhile
    return found


def kill_processes_of(uids: set[int], timeout: float) -> bool:
    """SIGKILL every process of ``uids`` until none is left (they may fork meanwhile); whether none is."""
    deadline = time.monotonic() + timeout
    while uids:
        victims = processes_of(uids)
        if not victims:
            return True
        for pid in victims:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def is_bwrap(pid: int) -> bool:
    """Whether ``pid`` is (still) a bwrap process: a pid that is not our child may have been reused."""
    try:
        with open(f"/proc/{pid}/comm", encoding="ascii", errors="replace") as comm:
            return comm.read().strip() == "bwrap"
    except OSError:
        return False


def main() -> None:
    """The janitor process: read entries until end-of-file, then clean up what is still listed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listed: dict[str, set[str]] = {"pg": set(), "ns": set(), "uid": set(), "dir": set()}
    for line in io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape"):
        kind, _, value = line[1:].rstrip("\n").partition(" ")
        entries = listed.get(kind)
        if entries is not None:
            (entries.add if line[0] == "+" else entries.discard)(value)
    for pgid in listed["pg"]:
        with contextlib.suppress(OSError):
            os.killpg(int(pgid), signal.SIGKILL)
    for pid in map(int, listed["ns"]):
        if is_bwrap(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    kill_processes_of({int(uid) for uid in listed["uid"]}, timeout=5.0)
    for path in listed["dir"]:
        shutil.rmtree(path, ignore_errors=True)


class Janitor:
    """The server's side of the janitor: say what to clean up, and what no longer needs it."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Its own session: a signal to the server's process group (Ctrl-C, a supervisor) leaves it
        # alive to clean up after the server.
        self._process = subprocess.Popen(
            # This file, run as a script: stdlib only, so no site and no package import (fast start).
            [sys.executable, "-S", __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )

    def track(self, kind: Kind, value: int | str | Path) -> None:
        self._say("+", kind, value)

    def forget(self, kind: Kind, value: int | str | Path) -> None:
        self._say("-", kind, value)

    def _say(self, sign: str, kind: Kind, value: int | str | Path) -> None:
        process = self._process
        if process is None or process.stdin is None:
            return
        text = str(value)
        if "\n" in text:
            raise ValueError("a janitor entry cannot contain a newline")
        try:
            # One short line, read at once by the janitor: the pipe never fills.
            process.stdin.write(f"{sign}{kind} {text}\n".encode("utf-8", "surrogateescape"))
            process.stdin.flush()
        except OSError:
            logger.error("the janitor is gone: what it was told to clean up after a crash will not be")
            self._process = None

    def stop(self) -> None:
        """End of the pipe: the janitor cleans up what is still listed, and exits. Blocking, bounded."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            logger.warning("the janitor did not finish within %s s; leaving it to finish alone", _EXIT_WAIT)


if __name__ == "__main__":
    main()
