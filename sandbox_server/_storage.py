"""Persistent state shared by every server instance using the same state directory.

Layout under the state directory (protocol.md 9.5, adapted to a server without gVisor)::

    metadata/<ID>.json                 what a restore needs: token hash, options, latest checkpoint
    checkpoints/<ID>/ckpt_<ns>/        the files of one checkpoint of a sandbox
    snapshots/<NAME>/                  the files of a filesystem snapshot
    leases/                            handoff locks (see ``_lease``)

Only files persist: without gVisor there is no way to save a process, so a
checkpoint holds the sandbox directory (the execs' working directory) and a
restore starts with no process running. Every write that another instance
may read is atomic (a temporary name, then a rename), so a reader sees the
old state or the new one, never a half-written file or directory.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox_proto import CreateOptions, valid_snapshot_name

__all__ = ["MetadataError", "SandboxRecord", "Storage", "write_json_atomic"]

_FORMAT = 1
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class MetadataError(Exception):
    """Persisted metadata that cannot be parsed; the text names no path."""


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


def copy_files(source: Path, target: Path) -> None:
    """Copy a sandbox directory tree: regular files, directories, symlinks as links.

    Sandbox code may run while this copies (snapshots) and can swap any entry
    for a symlink at any moment; the server may be root. So every step goes
    through a directory descriptor opened with ``O_NOFOLLOW``: a swapped entry
    fails or is copied as the link it now is, never followed to a host file.
    FIFOs, sockets and devices are skipped (opening a FIFO would block).
    """
    target.mkdir(parents=True, exist_ok=True)
    fd = os.open(source, _NOFOLLOW_DIR)
    try:
        _copy_dir(fd, target)
    finally:
        os.close(fd)


def _copy_dir(dir_fd: int, target: Path) -> None:
    for entry in os.scandir(dir_fd):
        name, dest = entry.name, target / entry.name
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                if dest.is_symlink() or dest.exists():
                    dest.unlink()
                os.symlink(os.readlink(name, dir_fd=dir_fd), dest)
            elif stat.S_ISDIR(info.st_mode):
                child = os.open(name, _NOFOLLOW_DIR, dir_fd=dir_fd)
                try:
                    dest.mkdir(exist_ok=True)
                    _copy_dir(child, dest)
                finally:
                    os.close(child)
            elif stat.S_ISREG(info.st_mode):
                _copy_file(dir_fd, name, dest)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed or swapped while we looked: skip it
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # became a symlink after the stat: skip it
                continue
            raise


def _copy_file(dir_fd: int, name: str, dest: Path) -> None:
    src = os.open(name, _NOFOLLOW_FILE, dir_fd=dir_fd)
    try:
        info = os.fstat(src)
        if not stat.S_ISREG(info.st_mode):
            return
        os.set_blocking(src, True)
        with open(dest, "wb") as out:
            while chunk := os.read(src, 2**20):
                out.write(chunk)
        os.chmod(dest, stat.S_IMODE(info.st_mode))
        os.utime(dest, ns=(info.st_atime_ns, info.st_mtime_ns))
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
    """Metadata, checkpoints and snapshots under one state directory. Blocking: call from a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.metadata_dir = root / "metadata"
        self.checkpoints_dir = root / "checkpoints"
        self.snapshots_dir = root / "snapshots"

    def prepare(self) -> None:
        for directory in (self.metadata_dir, self.checkpoints_dir, self.snapshots_dir):
            directory.mkdir(parents=True, exist_ok=True)

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
        """Copy ``source`` as a new checkpoint; returns its name. Metadata is the caller's commit."""
        base = self.checkpoints_dir / sandbox_id
        base.mkdir(parents=True, exist_ok=True)
        name = f"ckpt_{time.time_ns()}_{secrets.token_hex(2)}"
        tmp = base / f".tmp-{name}"
        try:
            tmp.mkdir()
            if source.is_dir():
                copy_files(source, tmp)
            tmp.rename(base / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name

    def prune_checkpoints(self, sandbox_id: str, keep: str) -> None:
        base = self.checkpoints_dir / sandbox_id
        for entry in base.iterdir() if base.is_dir() else ():
            if entry.name != keep and entry.name.startswith("ckpt_"):
                shutil.rmtree(entry, ignore_errors=True)

    def restore_checkpoint(self, sandbox_id: str, name: str, target: Path) -> bool:
        """Copy checkpoint ``name`` into ``target``; ``False`` if it does not exist."""
        source = self.checkpoints_dir / sandbox_id / name
        if not source.is_dir():
            return False
        copy_files(source, target)
        return True

    # -- snapshots ---------------------------------------------------------

    def save_snapshot(self, name: str, source: Path) -> None:
        """Store ``source``'s files as snapshot ``name`` (replacing one of that name)."""
        target = self.snapshots_dir / name
        tmp = self.snapshots_dir / f".tmp-{secrets.token_hex(8)}"
        try:
            tmp.mkdir()
            if source.is_dir():
                copy_files(source, tmp)
            # A directory cannot be replaced in one rename: move the old one aside first.
            # Readers may find no snapshot during that instant, never a half-copied one.
            for _ in range(10):
                aside = self.snapshots_dir / f".old-{secrets.token_hex(8)}"
                old: Path | None = aside
                try:
                    target.rename(aside)
                except FileNotFoundError:
                    old = None
                try:
                    tmp.rename(target)
                except OSError:
                    # Another instance put its own version in between: try again.
                    if old is not None:
                        shutil.rmtree(old, ignore_errors=True)
                    continue
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                return
            raise OSError(0, "the snapshot is being replaced concurrently")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_snapshot(self, name: str, target: Path) -> bool:
        """Copy snapshot ``name`` into ``target``; ``False`` if there is no such snapshot."""
        if not valid_snapshot_name(name):
            return False
        source = self.snapshots_dir / name
        if not source.is_dir():
            return False
        copy_files(source, target)
        return True
