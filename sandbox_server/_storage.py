"""Persistent state shared by every server instance using the same state directory.

Layout under the state directory (protocol.md 9.5, adapted to a server without gVisor)::

    metadata/<ID>.json                 what a restore needs: token hash, options, latest checkpoint
    checkpoints/<ID>/ckpt_<ns>_<x>/    one checkpoint of a sandbox: files/ and manifest.json
    snapshots/<NAME>/                  the files of a filesystem snapshot
    snapshot-locks/<NAME>.lock         readers of a snapshot share it, its replacer takes it alone
    instances/<INSTANCE>.lock          held (flock) by that instance for its lifetime
    instances/<INSTANCE>/              that instance's live sandboxes
    leases/                            handoff locks (see ``_lease``)

Only files persist: without gVisor there is no way to save a process, so a
checkpoint holds the sandbox directory (the execs' working directory) and a
restore starts with no process running. Every write that another instance
may read is atomic (a temporary name, then a rename), so a reader sees the
old state or the new one, never a half-written file or directory.

Deletion is the other hazard: an instance prunes old checkpoints and
replaces snapshots while others may be copying them. A reader holds a
shared ``flock`` on the checkpoint's manifest (or the snapshot's lock file)
for the whole copy; the pruner skips a checkpoint it cannot lock alone (a
later prune or the start-up sweep removes it), and the replacer of a
snapshot waits for its readers. A restore also compares what it copied
with the checkpoint's manifest, so it never passes a partial copy off as the
sandbox. Temporary folders carry their writer's instance id and are swept
once that instance is gone; the state directory and everything the server
creates in it are private to the server's user (0700).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox_proto import CreateOptions, valid_snapshot_name

__all__ = [
    "CopyStats",
    "IncompleteCopyError",
    "MetadataError",
    "SandboxRecord",
    "Storage",
    "copy_files",
    "private_dir",
    "write_json_atomic",
]

logger = logging.getLogger("sandbox_server")

_FORMAT = 1
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


#: How often a restore re-reads the metadata after its checkpoint vanished or changed under it.
_RESTORE_ATTEMPTS = 5
#: How long a snapshot's replacer waits for the snapshot's readers, and a reader for a replacement.
SNAPSHOT_LOCK_WAIT = 120.0
#: Temporary files and folders of the previous naming (no owner in the name): swept after this age.
_ANONYMOUS_TEMP_AGE = 600.0
_OWNER = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MANIFEST = "manifest.json"


class MetadataError(Exception):
    """Persisted metadata that cannot be parsed; the text names no path."""


class IncompleteCopyError(OSError):
    """A restore copied less than the checkpoint's manifest lists, however often it tried."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "the checkpoint changed while it was read")


def private_dir(path: Path, *, existing_too: bool = True) -> None:
    """Create ``path`` (its parents as the umask says) readable by the server's user only.

    With ``existing_too`` an existing folder is made private as well (for the
    server's own folders, which older versions created 0755).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    if existing_too and stat.S_IMODE(path.stat().st_mode) != 0o700:
        with contextlib.suppress(PermissionError):
            path.chmod(0o700)


def _lock(fd: int, operation: int, deadline: float) -> bool:
    """``flock`` with a deadline (polled: flock itself has none); whether it was taken."""
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _checkpoint_time(name: str) -> int:
    """The nanoseconds in ``ckpt_<ns>_<x>``; 0 when there are none."""
    parts = name.split("_")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Replace ``path`` with ``obj`` as JSON so that readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOFOLLOW_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
#: Copies belong to the server's user (maybe root) until the isolation layer hands them over:
#: never set-user/group-id bits on them.
_SETID = stat.S_ISUID | stat.S_ISGID


@dataclass(frozen=True, slots=True)
class CopyStats:
    """What one copy copied: written with a checkpoint, compared with what a restore copied."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, int]:
        return {"files": self.files, "dirs": self.dirs, "symlinks": self.symlinks, "bytes": self.bytes}

    @classmethod
    def from_json(cls, obj: object) -> CopyStats:
        if not isinstance(obj, dict):
            raise MetadataError("not a manifest")
        values = [obj.get(k) for k in ("files", "dirs", "symlinks", "bytes")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise MetadataError("a manifest field is missing or has the wrong type")
        return cls(*values)  # type: ignore[arg-type]


class _Counter:
    def __init__(self) -> None:
        self.files = self.dirs = self.symlinks = self.bytes = 0

    def stats(self) -> CopyStats:
        return CopyStats(self.files, self.dirs, self.symlinks, self.bytes)


def copy_files(source: Path, target: Path) -> CopyStats:
    """Copy a sandbox directory tree: regular files, directories, symlinks as links; returns what it copied.

    Modes and modification times of files, directories and links are kept
    (set-id bits excepted); ownership is the caller's (the isolation layer
    resets it). Sandbox code may run while this copies (snapshots) and can
    swap any entry for a symlink at any moment; the server may be root. So
    every step goes through a directory descriptor opened with
    ``O_NOFOLLOW``: a swapped entry fails or is copied as the link it now is,
    never followed to a host file. FIFOs, sockets and devices are skipped
    (opening a FIFO would block).
    """
    target.mkdir(parents=True, exist_ok=True)
    counter = _Counter()
    fd = os.open(source, _NOFOLLOW_DIR)
    try:
        _copy_dir(fd, target, counter)
        _copy_attributes(os.fstat(fd), target)
    finally:
        os.close(fd)
    return counter.stats()


def _copy_attributes(info: os.stat_result, dest: Path) -> None:
    # After the contents: adding entries changes a directory's mtime, and a read-only
    # directory could not receive them.
    os.chmod(dest, stat.S_IMODE(info.st_mode))
    os.utime(dest, ns=(info.st_atime_ns, info.st_mtime_ns))


def _copy_dir(dir_fd: int, target: Path, counter: _Counter) -> None:
    for entry in os.scandir(dir_fd):
        name, dest = entry.name, target / entry.name
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                if dest.is_symlink() or dest.exists():
                    dest.unlink()
                os.symlink(os.readlink(name, dir_fd=dir_fd), dest)
                with contextlib.suppress(NotImplementedError, OSError):
                    os.utime(dest, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)
                counter.symlinks += 1
            elif stat.S_ISDIR(info.st_mode):
                child = os.open(name, _NOFOLLOW_DIR, dir_fd=dir_fd)
                try:
                    # Private while it fills; its own mode comes last.
                    dest.mkdir(mode=0o700, exist_ok=True)
                    _copy_dir(child, dest, counter)
                    _copy_attributes(os.fstat(child), dest)
                finally:
                    os.close(child)
                counter.dirs += 1
            elif stat.S_ISREG(info.st_mode):
                _copy_file(dir_fd, name, dest, counter)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed or swapped while we looked: skip it
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # became a symlink after the stat: skip it
                continue
            raise


def _copy_file(dir_fd: int, name: str, dest: Path, counter: _Counter) -> None:
    src = os.open(name, _NOFOLLOW_FILE, dir_fd=dir_fd)
    try:
        info = os.fstat(src)
        if not stat.S_ISREG(info.st_mode):
            return
        os.set_blocking(src, True)
        out = os.open(dest, _NEW_FILE, 0o600)
        size = 0
        try:
            while chunk := os.read(src, 2**20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
                size += len(chunk)
            os.fchmod(out, stat.S_IMODE(info.st_mode) & ~_SETID)
            os.utime(out, ns=(info.st_atime_ns, info.st_mtime_ns))
        finally:
            os.close(out)
        counter.files += 1
        counter.bytes += size
    finally:
        os.close(src)


@dataclass(frozen=True, slots=True)
class SandboxRecord:
    """The persisted metadata of a checkpoint-enabled sandbox."""

    sandbox_id: str
    #: SHA-256 of the token, hex: the token itself is never stored (S4).
    token_sha256: str
    options: CreateOptions
    #: Directory name of the latest checkpoint, or ``None`` if never checkpointed.
    checkpoint: str | None = None

    def to_json(self) -> dict[str, Any]:
        o = self.options
        return {
            "format": _FORMAT,
            "sandbox_id": self.sandbox_id,
            "token_sha256": self.token_sha256,
            "options": {
                "idle_timeout": o.idle_timeout,
                "enable_checkpoint": o.enable_checkpoint,
                "enable_idle_timeout_auto_checkpoint": o.enable_idle_timeout_auto_checkpoint,
                "enable_sandbox_handoff": o.enable_sandbox_handoff,
                "filesystem_snapshot_name": o.filesystem_snapshot_name,
            },
            "checkpoint": self.checkpoint,
        }

    @classmethod
    def from_json(cls, obj: object) -> SandboxRecord:
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
            raise MetadataError("unknown metadata format")
        opts = obj.get("options")
        if not isinstance(opts, dict):
            raise MetadataError("'options' is missing")
        idle = opts.get("idle_timeout")
        snapshot = opts.get("filesystem_snapshot_name")
        checkpoint = obj.get("checkpoint")
        fields_ok = (
            isinstance(obj.get("sandbox_id"), str)
            and isinstance(obj.get("token_sha256"), str)
            and _SHA256_HEX.fullmatch(obj["token_sha256"]) is not None
            and (idle is None or (isinstance(idle, int | float) and not isinstance(idle, bool)))
            and (snapshot is None or isinstance(snapshot, str))
            and (checkpoint is None or (isinstance(checkpoint, str) and valid_snapshot_name(checkpoint)))
            and all(
                isinstance(opts.get(k), bool)
                for k in ("enable_checkpoint", "enable_idle_timeout_auto_checkpoint", "enable_sandbox_handoff")
            )
        )
        if not fields_ok:
            raise MetadataError("a field is missing or has the wrong type")
        return cls(
            sandbox_id=obj["sandbox_id"],
            token_sha256=obj["token_sha256"],
            options=CreateOptions(
                idle_timeout=float(idle) if idle is not None else None,
                enable_checkpoint=opts["enable_checkpoint"],
                enable_idle_timeout_auto_checkpoint=opts["enable_idle_timeout_auto_checkpoint"],
                enable_sandbox_handoff=opts["enable_sandbox_handoff"],
                filesystem_snapshot_name=snapshot,
            ),
            checkpoint=checkpoint,
        )


class Storage:
    """Metadata, checkpoints and snapshots under one state directory. Blocking: call from a thread.

    ``owner`` (the instance id) goes into the names of temporary folders, so
    that the sweep can tell a live writer's from a dead one's.
    """

    def __init__(self, root: Path, owner: str = "") -> None:
        if owner and _OWNER.fullmatch(owner) is None:
            raise ValueError("an instance id is 1-64 of A-Z a-z 0-9 _ -")
        self.root = root
        self.owner = owner
        self.metadata_dir = root / "metadata"
        self.checkpoints_dir = root / "checkpoints"
        self.snapshots_dir = root / "snapshots"
        self.snapshot_locks_dir = root / "snapshot-locks"
        self.instances_dir = root / "instances"
        self._instance_lock: int | None = None

    def prepare(self) -> None:
        # The state holds users' files and token hashes: the server's user only (0700).
        private_dir(self.root, existing_too=False)
        for directory in (
            self.metadata_dir,
            self.checkpoints_dir,
            self.snapshots_dir,
            self.snapshot_locks_dir,
            self.instances_dir,
        ):
            private_dir(directory)

    def _temp_name(self, kind: str, rest: str) -> str:
        return f".{kind}.{self.owner}.{rest}" if self.owner else f".{kind}-{rest}"

    # -- instances -----------------------------------------------------------

    def _instance_lock_path(self, instance_id: str) -> Path:
        return self.instances_dir / f"{instance_id}.lock"

    def claim_instance(self) -> None:
        """Hold this instance's lock file until :meth:`release_instance`: the mark of a live instance.

        Taken before the instance's folder exists, so the sweep of another
        instance never finds the folder of a live instance without its lock.
        """
        if not self.owner:
            raise ValueError("claiming an instance needs an owner")
        path = self._instance_lock_path(self.owner)
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OSError(errno.EBUSY, "another live instance has this instance id") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._instance_lock = fd
                return
            # A sweep removed the file between our open and our lock: lock a fresh one.
            os.close(fd)
        raise OSError(errno.EAGAIN, "cannot create the instance lock file")

    def release_instance(self) -> None:
        fd, self._instance_lock = self._instance_lock, None
        if fd is not None:
            # Unlinked while still held, so no sweeper can mistake the name for a dead instance's.
            self._instance_lock_path(self.owner).unlink(missing_ok=True)
            os.close(fd)

    def instance_alive(self, instance_id: str) -> bool:
        """Whether an instance holds its lock file (this instance is alive by definition)."""
        if instance_id == self.owner:
            return True
        try:
            fd = os.open(self._instance_lock_path(instance_id), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the lock if we took it
        return False

    # -- metadata ----------------------------------------------------------

    def _metadata_path(self, sandbox_id: str) -> Path:
        # Ids come from URLs: only names that are one safe path component reach the disk.
        if not valid_snapshot_name(sandbox_id):
            raise ValueError("not a valid sandbox id")
        return self.metadata_dir / f"{sandbox_id}.json"

    def has_metadata(self, sandbox_id: str) -> bool:
        return valid_snapshot_name(sandbox_id) and self._metadata_path(sandbox_id).exists()

    def read_metadata(self, sandbox_id: str) -> SandboxRecord | None:
        """The record, ``None`` if there is none; :class:`MetadataError` if it is corrupt."""
        if not valid_snapshot_name(sandbox_id):
            return None
        try:
            text = self._metadata_path(sandbox_id).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MetadataError(exc.strerror or "cannot read") from None
        try:
            record = SandboxRecord.from_json(json.loads(text))
        except ValueError as exc:  # JSONDecodeError included
            raise MetadataError(str(exc).split(":")[0]) from None
        if record.sandbox_id != sandbox_id:
            raise MetadataError("the record belongs to another sandbox")
        return record

    def write_metadata(self, record: SandboxRecord) -> None:
        write_json_atomic(self._metadata_path(record.sandbox_id), record.to_json())

    def forget(self, sandbox_id: str) -> None:
        """Delete a sandbox's metadata and checkpoints (kill_sandbox: a later attach finds nothing)."""
        if not valid_snapshot_name(sandbox_id):
            return
        self._metadata_path(sandbox_id).unlink(missing_ok=True)
        shutil.rmtree(self.checkpoints_dir / sandbox_id, ignore_errors=True)

    # -- checkpoints -------------------------------------------------------

    def save_checkpoint(self, sandbox_id: str, source: Path) -> str:
        """Copy ``source`` as a new checkpoint; returns its name. Metadata is the caller's commit.

        The checkpoint is ``files/`` plus a manifest of what was copied, which a
        restore compares with what it copies.
        """
        if not valid_snapshot_name(sandbox_id):
            raise ValueError("not a valid sandbox id")
        base = self.checkpoints_dir / sandbox_id
        private_dir(base, existing_too=False)
        name = f"ckpt_{time.time_ns()}_{secrets.token_hex(2)}"
        tmp = base / self._temp_name("tmp", name)
        try:
            tmp.mkdir(mode=0o700)
            files = tmp / "files"
            stats = copy_files(source, files) if source.is_dir() else CopyStats()
            if not source.is_dir():
                files.mkdir(mode=0o700)
            write_json_atomic(tmp / _MANIFEST, {"format": _FORMAT, **stats.to_json()})
            tmp.rename(base / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name

    def prune_checkpoints(self, sandbox_id: str, keep: str) -> None:
        """Delete the checkpoints older than ``keep``, except those being restored right now.

        Newer ones are left alone: another instance may have written one it has
        not committed yet; its own prune deletes ``keep`` later.
        """
        base = self.checkpoints_dir / sandbox_id
        newest = _checkpoint_time(keep)
        for entry in base.iterdir() if base.is_dir() else ():
            if entry.name != keep and entry.name.startswith("ckpt_") and _checkpoint_time(entry.name) < newest:
                self._delete_checkpoint(entry)

    def _delete_checkpoint(self, directory: Path) -> bool:
        """Delete a checkpoint unless a restore holds it; whether it is gone."""
        try:
            fd: int | None = os.open(directory / _MANIFEST, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None  # written before manifests existed: nothing to lock
        except NotADirectoryError:
            return False
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.debug("checkpoint %s is being restored: pruned later", directory.name)
                    return False
            # Out of the way first, in one step: a restore never finds a half-deleted checkpoint.
            doomed = directory.with_name(self._temp_name("del", f"{directory.name}-{secrets.token_hex(2)}"))
            try:
                directory.rename(doomed)
            except FileNotFoundError:
                return True
            shutil.rmtree(doomed, ignore_errors=True)
            return True
        finally:
            if fd is not None:
                os.close(fd)

    def restore_checkpoint(self, sandbox_id: str, name: str, target: Path) -> bool:
        """Copy checkpoint ``name`` (or a newer one, see below) into ``target``; ``False`` if there is none.

        All or nothing: when the checkpoint vanishes (pruned by an instance that
        wrote a newer one) or the copy does not match its manifest, ``target``
        is emptied and the checkpoint the metadata names now is copied instead,
        a few times at most; then :class:`IncompleteCopyError`.
        """
        for _ in range(_RESTORE_ATTEMPTS):
            outcome = self._copy_checkpoint(sandbox_id, name, target)
            if outcome == "copied":
                return True
            _empty(target)
            try:
                record = self.read_metadata(sandbox_id)
            except MetadataError:
                record = None
            if record is None or record.checkpoint is None:
                return False
            if record.checkpoint == name and outcome == "missing":
                return False
            logger.info(
                "sandbox %s: checkpoint %s %s while restoring; trying %s", sandbox_id, name, outcome, record.checkpoint
            )
            name = record.checkpoint
        raise IncompleteCopyError

    def _copy_checkpoint(self, sandbox_id: str, name: str, target: Path) -> str:
        """``copied``, ``missing`` (gone, or being pruned) or ``incomplete`` (less than its manifest)."""
        if not valid_snapshot_name(sandbox_id) or not valid_snapshot_name(name):
            return "missing"
        directory = self.checkpoints_dir / sandbox_id / name
        try:
            fd = os.open(directory / _MANIFEST, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            if not directory.is_dir():
                return "missing"
            # Written before manifests existed: the folder is the files, nothing to verify.
            copy_files(directory, target)
            return "copied"
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return "missing"  # a pruner holds it: it is going away
            if os.fstat(fd).st_nlink == 0:
                return "missing"  # pruned between our open and our lock
            with os.fdopen(os.dup(fd), "rb") as f:
                try:
                    expected = CopyStats.from_json(json.load(f))
                except (ValueError, MetadataError):
                    return "incomplete"
            try:
                copied = copy_files(directory / "files", target)
            except FileNotFoundError:
                return "missing"
            if copied != expected:
                logger.warning(
                    "sandbox %s: checkpoint %s: copied %s, its manifest says %s", sandbox_id, name, copied, expected
                )
                return "incomplete"
            return "copied"
        finally:
            os.close(fd)  # drops the shared lock

    # -- snapshots ---------------------------------------------------------

    def _snapshot_lock(self, name: str, *, create: bool) -> int:
        flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_CLOEXEC
        return os.open(self.snapshot_locks_dir / f"{name}.lock", flags, 0o600)

    def save_snapshot(self, name: str, source: Path) -> None:
        """Store ``source``'s files as snapshot ``name`` (replacing one of that name).

        The copy is made aside; the swap waits until no instance is copying the
        old version (they share its lock), so none copies a folder being deleted,
        and none finds no snapshot at all during the swap.
        """
        target = self.snapshots_dir / name
        tmp = self.snapshots_dir / self._temp_name("tmp", secrets.token_hex(8))
        old: Path | None = None
        try:
            tmp.mkdir(mode=0o700)
            if source.is_dir():
                copy_files(source, tmp)
            lock = self._snapshot_lock(name, create=True)
            try:
                if not _lock(lock, fcntl.LOCK_EX, time.monotonic() + SNAPSHOT_LOCK_WAIT):
                    raise OSError(errno.EBUSY, "the snapshot is being read for too long")
                # A directory cannot be replaced in one rename: move the old one aside first.
                aside = self.snapshots_dir / self._temp_name("old", secrets.token_hex(8))
                try:
                    target.rename(aside)
                    old = aside
                except FileNotFoundError:
                    pass
                tmp.rename(target)
            finally:
                os.close(lock)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def load_snapshot(self, name: str, target: Path) -> bool:
        """Copy snapshot ``name`` into ``target``; ``False`` if there is no such snapshot."""
        if not valid_snapshot_name(name):
            return False
        source = self.snapshots_dir / name
        try:
            lock = self._snapshot_lock(name, create=False)
        except FileNotFoundError:
            if not source.is_dir():
                return False  # no lock file made for names that do not exist
            lock = self._snapshot_lock(name, create=True)  # a snapshot older than the locks
        try:
            if not _lock(lock, fcntl.LOCK_SH, time.monotonic() + SNAPSHOT_LOCK_WAIT):
                raise OSError(errno.EBUSY, "the snapshot is being replaced for too long")
            if not source.is_dir():
                return False
            copy_files(source, target)
            return True
        finally:
            os.close(lock)

    # -- sweeping ------------------------------------------------------------

    def sweep(self) -> None:
        """Remove what crashed instances left: their folders, temporary folders, skipped prunes.

        Safe while other instances run: a live instance holds its lock file,
        and temporary folders name the instance writing them.
        """
        steps: list[tuple[Callable[[Path], None], Path]] = [(self._sweep_instances, self.instances_dir)]
        steps += [(self._sweep_temporaries, base) for base in [*_subdirs(self.checkpoints_dir), self.snapshots_dir]]
        steps += [(self._sweep_checkpoints, base) for base in _subdirs(self.checkpoints_dir)]
        steps += [(_sweep_json_temporaries, d) for d in (self.metadata_dir, self.root / "leases")]
        for step, directory in steps:
            try:
                step(directory)
            except OSError as exc:  # one folder changing under us must not stop the rest
                logger.warning("sweep of %s: %s", directory.name, exc)

    def _sweep_instances(self, directory: Path) -> None:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return
        for entry in entries:
            name = entry.name
            instance = name.removesuffix(".lock")
            if instance == self.owner:
                continue
            if name.endswith(".lock") and (self.instances_dir / instance).is_dir():
                continue  # looked at with its folder
            path = self._instance_lock_path(instance)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                logger.warning("sweep: instance %s: %s", instance, exc)
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive
                if entry.is_dir(follow_symlinks=False):
                    logger.info("sweep: removing the folder of dead instance %s", instance)
                    # As root this also removes files its sandboxes' uids made.
                    shutil.rmtree(entry.path, ignore_errors=True)
                # Unlinked while held: an instance starting with this id locks a fresh file.
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)

    def _sweep_temporaries(self, base: Path) -> None:
        now = time.time()
        try:
            entries = list(os.scandir(base))
        except FileNotFoundError:
            return
        for entry in entries:
            name = entry.name
            parts = name.split(".", 3)
            if len(parts) == 4 and parts[0] == "" and parts[1] in ("tmp", "old", "del"):
                # Nobody reads .old/.del folders; a .tmp folder is being written while its owner lives.
                dead = parts[1] != "tmp" or not self.instance_alive(parts[2])
            elif name.startswith((".tmp-", ".old-", ".del-")):
                try:
                    dead = now - entry.stat(follow_symlinks=False).st_mtime > _ANONYMOUS_TEMP_AGE
                except FileNotFoundError:
                    continue
            else:
                continue
            if dead:
                logger.info("sweep: removing %s", name)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    Path(entry.path).unlink(missing_ok=True)

    def _sweep_checkpoints(self, base: Path) -> None:
        """Old checkpoints a prune skipped (being restored then); a forgotten sandbox's checkpoints."""
        try:
            record = self.read_metadata(base.name)
        except MetadataError:
            return  # leave it for someone to look at
        if record is not None:
            if record.checkpoint is not None:
                self.prune_checkpoints(base.name, keep=record.checkpoint)
            return
        # No metadata: killed while a checkpoint was being written, or never had any.
        if any(e.name.startswith(".tmp") for e in os.scandir(base)):
            return
        for entry in os.scandir(base):
            if entry.name.startswith("ckpt_"):
                self._delete_checkpoint(Path(entry.path))
        with contextlib.suppress(OSError):
            base.rmdir()


def _subdirs(directory: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _sweep_json_temporaries(directory: Path) -> None:
    """Temporary files of :func:`write_json_atomic` whose writer died (a write takes milliseconds)."""
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime > _ANONYMOUS_TEMP_AGE:
                    Path(entry.path).unlink()


def _empty(directory: Path) -> None:
    """Remove everything in ``directory``, keeping the folder itself."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
