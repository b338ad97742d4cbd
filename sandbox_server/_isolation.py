"""How an exec's process is confined: bubblewrap namespaces, resource limits, per-sandbox users.

Two backends build the command line of every exec:

* :class:`BwrapIsolation` runs it under ``bwrap`` with no network, private
  pid/ipc/uts namespaces and the sandbox's own directory as its root
  filesystem: writable and persistent like the real service's, with the
  system (``/usr``, a few files of ``/etc``, the Python installation) bound
  read-only on mount points the server lays out (:meth:`prepare_directory`).
  The root is sticky and owned by root, so the sandbox can create files
  anywhere in it but cannot replace a mount point: bwrap never follows a
  path the sandbox made. As root, each sandbox also gets its own
  unprivileged uid (``setpriv`` inside the sandbox), which is what makes
  ``RLIMIT_NPROC`` count that sandbox's processes only (the kernel never
  enforces it for uid 0) and lets the server find every one of its
  processes. Without root, bwrap makes a user namespace instead and the
  process limit is left off (it would count every process of the server's user).
* :class:`NoIsolation` runs plain processes of the server's user.

Both apply rlimits through ``prlimit(1)``, which sets them and execs the
next program in place: no ``preexec_fn`` (unsafe with threads, and the
server runs storage work in threads), and the exec's pid stays the process
group leader that ``kill_process`` signals.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "BwrapIsolation",
    "Isolation",
    "IsolationError",
    "IsolationMode",
    "Limits",
    "NoIsolation",
    "select_isolation",
]

logger = logging.getLogger("sandbox_server")

IsolationMode = Literal["auto", "bwrap", "none"]

MiB = 2**20

#: The working directory and HOME of every exec inside bwrap, owned by the sandbox.
SANDBOX_HOME = "/sandbox"
#: Where the code bundle appears, so that tracebacks show no server path.
BUNDLE_MOUNT = "/run/sandbox"
#: Uid (and gid) inside the user namespace used when the server is not root.
_INNER_ID = 1000
#: Per-sandbox uids (root only) are taken from [base, base + span): far above real accounts.
_UID_BASE = 1_000_000_000
_UID_SPAN = 2**28
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: What programs need from /etc; the rest (users, keys, host names) stays hidden.
_ETC_FILES = (
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "nsswitch.conf",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "mime.types",
    "hosts",
)
_STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class IsolationError(Exception):
    """The requested isolation cannot be provided on this machine."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of every sandbox; 0 switches one off.

    ``memory`` (bytes of address space, RLIMIT_AS) and ``cpu_seconds``
    (RLIMIT_CPU) bind each process; ``processes`` (RLIMIT_NPROC) binds all
    processes of one sandbox together, and only under bwrap as root;
    ``output`` is per exec (both streams), ``code`` per exec request,
    ``stdin_rate`` per exec in bytes per second.
    """

    memory: int = 1024 * MiB
    cpu_seconds: int = 60
    processes: int = 256
    output: int = 64 * MiB
    code: int = 4 * MiB
    stdin_rate: int = 4 * MiB

    def __post_init__(self) -> None:
        for name in ("memory", "cpu_seconds", "processes", "output", "code", "stdin_rate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"limit {name} must be a non-negative integer, not {value!r}")

    def rlimit_args(self, *, processes: bool) -> list[str]:
        """``prlimit`` options; soft and hard alike, so the sandbox cannot raise them."""
        args: list[str] = []
        if self.memory:
            args.append(f"--as={self.memory}")
        if self.cpu_seconds:
            # SIGXCPU at the soft limit (reported), SIGKILL a second later if it is ignored.
            args.append(f"--cpu={self.cpu_seconds}:{self.cpu_seconds + 1}")
        if processes and self.processes:
            args.append(f"--nproc={self.processes}")
        return args


@dataclass(frozen=True, slots=True)
class Command:
    """What to spawn for one exec."""

    argv: list[str]
    env: dict[str, str]
    #: The exec's script as the process sees it.
    script: str
    #: bwrap options read from a pipe (``--args FD``, inserted after ``argv[:options_at]``):
    #: they name host paths, which the sandbox would otherwise read in its /proc/1/cmdline.
    piped_args: list[str] | None = None
    options_at: int = 0

    def spawn_argv(self, args_fd: int, info_fd: int) -> list[str]:
        if self.piped_args is None:
            return self.argv
        # --info-fd: bwrap writes the pid of the namespace's init there, which the kill needs (see Execution).
        options = ["--args", str(args_fd), "--info-fd", str(info_fd)]
        return [*self.argv[: self.options_at], *options, *self.argv[self.options_at :]]


class Isolation:
    """The way execs are confined; one instance per server."""

    name = "none"
    #: Whether ``Limits.processes`` is applied.
    enforces_processes = False
    #: A signal that ended the exec shows as ``128 + N`` (bwrap reports it so), not ``-N``.
    shell_style_signals = False

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        #: Mixed into per-sandbox uids: the id of the server instance using this isolation.
        self.uid_salt = ""
        self._prlimit = shutil.which("prlimit")
        #: The interpreter of ``python`` execs.
        self.python = _sandbox_python()

    def describe(self) -> str:
        return self.name

    def sandbox_uid(self, sandbox_id: str) -> int | None:
        """The host uid the sandbox's processes run as, when it is not the server's."""
        return None

    def workdir(self, directory: Path) -> Path:
        """Where, on the host, the working directory of the sandbox whose files are in ``directory`` is."""
        return directory

    def command(self, sandbox_id: str, program: list[str], script: Path, directory: Path, bundle: Path) -> Command:
        raise NotImplementedError

    def _with_limits(self, argv: list[str], *, processes: bool) -> list[str]:
        args = self.limits.rlimit_args(processes=processes)
        if not args:
            return argv
        if self._prlimit is None:
            # The fallback costs a Python start per exec; prlimit is in util-linux almost everywhere.
            return [sys.executable, "-S", "-c", _LAUNCHER, *args, "--", *argv]
        return [self._prlimit, *args, "--", *argv]

    def prepare_directory(self, sandbox_id: str, directory: Path) -> None:
        """Make ``directory`` (and everything in it) the sandbox's, after a create or a restore. Blocking.

        No process of the sandbox runs while this is called, so nothing in the
        tree changes under it.
        """
        directory.mkdir(parents=True, exist_ok=True)
        uid = self.sandbox_uid(sandbox_id)
        if uid is None:
            return
        # A snapshot or checkpoint may come from another sandbox, whose files had another uid.
        os.lchown(directory, uid, uid)
        for root, dirs, files in os.walk(directory):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), uid, uid)


class NoIsolation(Isolation):
    """Plain processes of the server's user, in the sandbox's directory."""

    def command(self, sandbox_id: str, program: list[str], script: Path, directory: Path, bundle: Path) -> Command:
        env = {
            "PATH": os.pathsep.join([str(directory / ".local/bin"), os.path.dirname(self.python), _STANDARD_PATH]),
            "HOME": str(directory),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }
        # RLIMIT_NPROC would count every process of the server's user: left off.
        return Command(self._with_limits([*program, str(script)], processes=False), env, str(script))


class BwrapIsolation(Isolation):
    """Every exec in a fresh set of namespaces made by bubblewrap."""

    name = "bwrap"
    shell_style_signals = True

    def __init__(self, limits: Limits, bwrap: str) -> None:
        super().__init__(limits)
        self.bwrap = bwrap
        self.as_root = os.geteuid() == 0
        self.enforces_processes = self.as_root
        self._setpriv = shutil.which("setpriv") if self.as_root else None
        #: Host directories the sandbox sees (read-only) besides /usr and a few files of /etc.
        self.prefixes = _python_prefixes()
        if self.as_root and self._setpriv is None:
            raise IsolationError("bwrap as root needs setpriv (util-linux) to run sandboxes as their own users")
        self._mount_points = self._system_mount_points()
        self._static = self._static_args()

    def describe(self) -> str:
        if self.as_root:
            how = "per-sandbox uid, process limit on" if self.limits.processes else "per-sandbox uid"
        else:
            how = "user namespace, no process limit"
        return f"bwrap ({how})"

    def sandbox_uid(self, sandbox_id: str) -> int | None:
        if not self.as_root:
            return None
        # Per instance too: two servers sharing a state dir may each run a copy of one sandbox,
        # and killing one copy's processes by uid must not touch the other's.
        digest = hashlib.sha256(f"{self.uid_salt}/{sandbox_id}".encode("utf-8", "surrogatepass")).digest()
        return _UID_BASE + int.from_bytes(digest[:8], "big") % _UID_SPAN

    def _system_mount_points(self) -> list[_MountPoint]:
        """What the root of every sandbox holds for the read-only system, parents first."""
        points = [_MountPoint("/etc", "dir")]
        binds: list[str] = ["/usr"]
        for path in _SYSTEM_LINKS:
            if os.path.islink(path):
                points.append(_MountPoint(path, "link", os.readlink(path)))
            elif os.path.isdir(path):
                binds.append(path)
        for name in _ETC_FILES:
            if os.path.exists(f"/etc/{name}"):
                binds.append(f"/etc/{name}")
        binds += [str(p) for p in self.prefixes]
        for path in binds:
            for parent in reversed(Path(path).parents):
                if parent != Path("/"):
                    points.append(_MountPoint(str(parent), "dir"))
            points.append(_MountPoint(path, "dir" if os.path.isdir(path) else "file", bind=True))
        points += [_MountPoint(p, "dir") for p in ("/proc", "/dev", "/run", BUNDLE_MOUNT)]
        points += [_MountPoint(p, "file") for p in ("/etc/passwd", "/etc/group")]
        unique: dict[str, _MountPoint] = {}
        for point in points:
            unique.setdefault(point.path, point)  # a bind wins over the same path as a mere parent
        return list(unique.values())

    def _static_args(self) -> list[str]:
        args = [
            "--unshare-net",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            # Its own session: no TIOCSTI into a terminal; kill_process still ends everything,
            # because killing bwrap takes its pid namespace down with it.
            "--new-session",
        ]
        if self.as_root:
            # setpriv needs these two to drop to the sandbox's uid; they are gone once it has.
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            args += ["--unshare-user", "--disable-userns", "--uid", str(_INNER_ID), "--gid", str(_INNER_ID)]
        return args

    def _system_args(self) -> list[str]:
        """The read-only system on the mount points of the sandbox's root (after ``--bind root /``)."""
        args: list[str] = []
        for point in self._mount_points:
            if point.bind:
                args += ["--ro-bind", point.path, point.path]
        return [*args, "--proc", "/proc", "--dev", "/dev"]

    def workdir(self, directory: Path) -> Path:
        return directory / SANDBOX_HOME.lstrip("/")

    def prepare_directory(self, sandbox_id: str, directory: Path) -> None:
        super().prepare_directory(sandbox_id, directory)
        for point in self._mount_points:
            _lay_mount_point(directory, point)
        home = self.workdir(directory)
        if home.is_symlink() or (home.exists() and not home.is_dir()):
            home.unlink()
        if not home.exists():
            home.mkdir(mode=0o755)
            home.chmod(0o755)  # whatever the umask
        tmp = directory / "tmp"
        if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
            tmp.unlink()
        tmp.mkdir(exist_ok=True)
        uid = self.sandbox_uid(sandbox_id)
        if uid is not None:
            os.chown(home, uid, uid)
            # Root-owned and sticky, like /tmp: the sandbox writes anywhere in it, and
            # cannot remove or replace the root-owned mount points bwrap mounts on.
            for path in (directory, tmp):
                os.chown(path, 0, 0)
        os.chmod(tmp, 0o1777)
        os.chmod(directory, 0o1777 if uid is not None else 0o755)

    def command(self, sandbox_id: str, program: list[str], script: Path, directory: Path, bundle: Path) -> Command:
        inner_script = f"{BUNDLE_MOUNT}/{script.name}"
        args = [
            *self._static,
            "--hostname",
            sandbox_id,
            "--bind",
            str(directory),
            "/",
            *self._system_args(),
            "--ro-bind",
            str(bundle),
            BUNDLE_MOUNT,
            "--ro-bind",
            str(bundle / "passwd"),
            "/etc/passwd",
            "--ro-bind",
            str(bundle / "group"),
            "/etc/group",
            "--chdir",
            SANDBOX_HOME,
        ]
        uid = self.sandbox_uid(sandbox_id)
        inner = ["--"]
        if uid is not None:
            assert self._setpriv is not None
            inner += [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all", "--"]
        inner += [*program, inner_script]
        env = {
            "PATH": os.pathsep.join([f"{SANDBOX_HOME}/.local/bin", os.path.dirname(self.python), _STANDARD_PATH]),
            "HOME": SANDBOX_HOME,
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "USER": "sandbox",
        }
        argv = self._with_limits([self.bwrap], processes=uid is not None)
        return Command([*argv, *inner], env, inner_script, args, options_at=len(argv))

    def exposes(self, path: Path) -> bool:
        """Whether the sandbox can see ``path`` through one of its read-only binds."""
        resolved = path.resolve()
        return any(resolved.is_relative_to(p) for p in [Path("/usr"), *self.prefixes])

    def account_files(self, sandbox_id: str) -> tuple[str, str]:
        """``/etc/passwd`` and ``/etc/group`` as the sandbox sees them."""
        uid = self.sandbox_uid(sandbox_id) or _INNER_ID
        passwd = f"root:x:0:0:root:/root:/bin/sh\nsandbox:x:{uid}:{uid}:sandbox:{SANDBOX_HOME}:/bin/bash\n"
        group = f"root:x:0:\nsandbox:x:{uid}:\n"
        return passwd, group

    async def check(self) -> None:
        """Run one confined ``true``: fails here, at startup, rather than at the first exec."""
        with tempfile.TemporaryDirectory(prefix="sandbox-check-") as scratch:
            await asyncio.to_thread(self.prepare_directory, "sandbox-check", Path(scratch))
            await self._run_check(Path(scratch))

    async def _run_check(self, root: Path) -> None:
        argv = [self.bwrap, *self._static, "--hostname", "sandbox-check", "--bind", str(root), "/"]
        argv += self._system_args()
        if self.as_root:
            assert self._setpriv is not None
            uid = str(_UID_BASE + _UID_SPAN)
            argv += ["--", self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        else:
            argv += ["--"]
        argv += [self.python, "-S", "-c", "pass"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _, stderr = await proc.communicate()
        if proc.returncode != 0:
            reason = stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
            raise IsolationError(f"bubblewrap does not work here: {reason}")


def _sandbox_python() -> str:
    """The base interpreter when it has pip, else ours.

    A venv's interpreter (the server's, often) has no user site, so ``pip
    install`` in a sandbox could only write into the venv, which is read-only
    there. The base interpreter installs into ``$HOME/.local``, which is the
    sandbox's own and persists like the rest of its files.
    """
    base = getattr(sys, "_base_executable", sys.executable)
    if sys.prefix == sys.base_prefix or not os.path.exists(base):
        return sys.executable
    purelib = sysconfig.get_path("purelib", vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    return base if os.path.isdir(os.path.join(purelib, "pip")) else sys.executable


@dataclass(frozen=True, slots=True)
class _MountPoint:
    """An entry of a sandbox's root that the server owns: a mount point, or a link of the system's."""

    path: str
    kind: Literal["dir", "file", "link"]
    target: str = ""
    #: The host's path of the same name is bound here (read-only).
    bind: bool = False


def _lay_mount_point(root: Path, point: _MountPoint) -> None:
    """Make ``point`` exist under ``root`` as the server's (root-owned when we are root), whatever is in the way."""
    path = root / point.path.lstrip("/")
    if path.is_symlink() and (point.kind != "link" or os.readlink(path) != point.target):
        path.unlink()
    elif path.exists() and not path.is_symlink() and (point.kind == "link" or (point.kind == "dir") != path.is_dir()):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if point.kind == "link":
        if not path.is_symlink():
            path.symlink_to(point.target)
    elif point.kind == "dir":
        path.mkdir(mode=0o755, exist_ok=True)
    else:
        path.touch(mode=0o644, exist_ok=True)
    if os.geteuid() == 0:
        os.lchown(path, 0, 0)
    if point.kind != "link":
        path.chmod(0o755 if point.kind == "dir" else 0o644)


def _python_prefixes() -> list[Path]:
    """Directories the sandbox needs for ``sys.executable`` (a venv, pyenv, ...), outside /usr."""
    candidates: set[Path] = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        if p and os.path.isdir(p):
            # Both spellings: sys.executable may use the one that goes through a symlink.
            candidates |= {Path(os.path.abspath(p)), Path(p).resolve()}
    candidates.add(Path(sys.executable).resolve().parent.parent)
    result: list[Path] = []
    for path in sorted(candidates, key=lambda p: len(p.parts)):
        if path == Path("/") or path.is_relative_to("/usr") or any(path.is_relative_to(r) for r in result):
            continue
        result.append(path)
    return result


#: Sets rlimits given as prlimit-style options, then execs the rest (used when prlimit is missing).
_LAUNCHER = """\
import os, resource, sys
names = {"--as": resource.RLIMIT_AS, "--cpu": resource.RLIMIT_CPU, "--nproc": resource.RLIMIT_NPROC}
args = sys.argv[1:]
while args[0] != "--":
    name, _, value = args.pop(0).partition("=")
    soft, _, hard = value.partition(":")
    resource.setrlimit(names[name], (int(soft), int(hard or soft)))
os.execvp(args[1], args[1:])
"""


async def select_isolation(mode: IsolationMode, limits: Limits) -> Isolation:
    """The backend for ``mode``; ``auto`` falls back to none (loudly) when bwrap is missing or broken."""
    if mode not in ("auto", "bwrap", "none"):
        raise ValueError(f"isolation must be 'auto', 'bwrap' or 'none', not {mode!r}")
    if mode == "none":
        return NoIsolation(limits)
    bwrap = shutil.which("bwrap")
    try:
        if bwrap is None:
            raise IsolationError("bubblewrap (bwrap) is not installed")
        isolation = BwrapIsolation(limits, bwrap)
        await isolation.check()
    except IsolationError as exc:
        if mode == "bwrap":
            raise
        logger.warning("%s: falling back to isolation: none", exc)
        return NoIsolation(limits)
    return isolation
