"""Handoff locks between server instances that share a state directory (protocol.md 7.10, 7.13).

No lock daemon: every instance polls small JSON files in ``<state>/leases/``.

``<ID>.json`` -- the lease: ``{"owner", "nonce", "expires"}`` (wall-clock seconds).
    *Acquired* by creating it with ``O_EXCL`` (one winner when several race).
    *Renewed* by its holder, write-temp-then-rename, only while it has not
    expired. *Taken over* once it has expired (its holder crashed or hangs):
    the taker first wins ``<ID>.<nonce>.takeover`` with ``O_EXCL``, so only
    one instance replaces a given expired lease, then re-reads it to make sure
    nobody replaced it meanwhile. *Released* by unlinking it, only if the
    nonce is still the holder's.
``<ID>.waiter`` -- an instance waiting for the lock (at most one, created
    with ``O_EXCL``); the holder notices it and hands the sandbox over.

A renewal refuses an expired lease and a takeover waits a further grace
period after expiry, so a holder that was merely slow cannot overwrite the
lease of the instance that took over, short of stalling for that grace
between its check and its rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._storage import private_dir, write_json_atomic

__all__ = ["HeldLease", "LeaseError", "LeaseInfo", "LeaseStore", "Waiter"]


class LeaseError(Exception):
    """The lease is no longer ours (expired, stolen, or unreadable)."""


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease as read from its file."""

    owner: str
    nonce: str
    expires: float


@dataclass(slots=True)
class HeldLease:
    """A lease this instance holds."""

    sandbox_id: str
    nonce: str
    expires: float
    #: When it was last written, on the store's clock.
    renewed_at: float


@dataclass(frozen=True, slots=True)
class Waiter:
    sandbox_id: str
    nonce: str


class LeaseStore:
    """The lease files of one state directory, as seen by one instance."""

    def __init__(
        self,
        directory: Path,
        instance_id: str,
        *,
        duration: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.instance_id = instance_id
        self.duration = duration
        # Past expiry, how long before a takeover: covers a holder stalled mid-renewal.
        self.grace = min(1.0, duration / 10)
        self._clock = clock

    def prepare(self) -> None:
        private_dir(self.directory)

    def _lease_path(self, sandbox_id: str) -> Path:
        return self.directory / f"{sandbox_id}.json"

    def _waiter_path(self, sandbox_id: str) -> Path:
        return self.directory / f"{sandbox_id}.waiter"

    def _content(self, nonce: str, expires: float) -> dict[str, object]:
        return {"owner": self.instance_id, "nonce": nonce, "expires": expires}

    def read(self, sandbox_id: str) -> LeaseInfo | None:
        path = self._lease_path(sandbox_id)
        try:
            raw = path.read_text(encoding="utf-8")
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            obj = json.loads(raw)
            return LeaseInfo(str(obj["owner"]), str(obj["nonce"]), float(obj["expires"]))
        except (ValueError, KeyError, TypeError):
            # Being written right after its O_EXCL creation, or its writer died
            # in between: held by someone unknown until a full lease period passes.
            return LeaseInfo("unknown", "", mtime + self.duration)

    # -- acquisition -------------------------------------------------------

    def try_acquire(self, sandbox_id: str) -> HeldLease | LeaseInfo:
        """Take the lease if it is free, expired or left over by this instance; else the holder's lease."""
        path = self._lease_path(sandbox_id)
        for _ in range(5):  # a lease released between our attempts: try again
            now = self._clock()
            nonce = secrets.token_hex(8)
            expires = now + self.duration
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                current = self.read(sandbox_id)
                if current is None:
                    continue
                # A lease of this very instance is stale: callers ask only for sandboxes it does not hold.
                if now <= current.expires + self.grace and current.owner != self.instance_id:
                    return current
                taken = self._take_over(sandbox_id, current, nonce, expires)
                if taken is None:
                    continue
                return taken
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._content(nonce, expires), f)
            return HeldLease(sandbox_id, nonce, expires, now)
        current = self.read(sandbox_id)
        return current if current is not None else LeaseInfo("unknown", "", self._clock() + self.duration)

    def _take_over(self, sandbox_id: str, expired: LeaseInfo, nonce: str, expires: float) -> HeldLease | None:
        claim = self.directory / f"{sandbox_id}.{expired.nonce or 'unreadable'}.takeover"
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            # Someone else is replacing this very lease; see what it became.
            return None
        os.close(fd)
        try:
            # Still the lease we judged expired? (A slow taker may arrive after a fast one.)
            if self.read(sandbox_id) != expired:
                return None
            write_json_atomic(self._lease_path(sandbox_id), self._content(nonce, expires))
            return HeldLease(sandbox_id, nonce, expires, self._clock())
        finally:
            # Safe to drop now: the expired lease it guards is gone for good.
            claim.unlink(missing_ok=True)

    # -- holding -----------------------------------------------------------

    def renew(self, lease: HeldLease) -> None:
        """Extend our lease; :class:`LeaseError` if it expired or is someone else's now."""
        now = self._clock()
        try:
            current = self.read(lease.sandbox_id)
        except OSError as exc:
            raise LeaseError(f"cannot read the lease: {exc.strerror}") from None
        if current is None or current.nonce != lease.nonce or current.owner != self.instance_id:
            raise LeaseError("the lease is held by someone else")
        if now > current.expires:
            raise LeaseError("the lease expired before it was renewed")
        expires = now + self.duration
        try:
            write_json_atomic(self._lease_path(lease.sandbox_id), self._content(lease.nonce, expires))
        except OSError as exc:
            raise LeaseError(f"cannot write the lease: {exc.strerror}") from None
        lease.expires = expires
        lease.renewed_at = now

    def release(self, lease: HeldLease) -> None:
        """Give the lease up, unless it is no longer ours."""
        current = self.read(lease.sandbox_id)
        if current is not None and current.nonce == lease.nonce and current.owner == self.instance_id:
            self._lease_path(lease.sandbox_id).unlink(missing_ok=True)

    # -- waiting -----------------------------------------------------------

    def register_waiter(self, sandbox_id: str, ttl: float) -> Waiter | None:
        """Become the one waiter for the lock; ``None`` if another live waiter exists."""
        path = self._waiter_path(sandbox_id)
        nonce = secrets.token_hex(8)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self._live_waiter(sandbox_id) is not None:
                    return None
                # A waiter that gave up without cleaning up (crashed): replace it.
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"instance": self.instance_id, "nonce": nonce, "expires": self._clock() + ttl}, f)
            return Waiter(sandbox_id, nonce)
        return None

    def _live_waiter(self, sandbox_id: str) -> dict[str, object] | None:
        path = self._waiter_path(sandbox_id)
        try:
            raw = path.read_text(encoding="utf-8")
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            obj = json.loads(raw)
            expires = float(obj["expires"])
        except (ValueError, KeyError, TypeError):
            obj, expires = {}, mtime + self.duration  # being written: live for now
        return obj if self._clock() <= expires else None

    def has_waiter(self, sandbox_id: str) -> bool:
        return self._live_waiter(sandbox_id) is not None

    def remove_waiter(self, waiter: Waiter) -> None:
        path = self._waiter_path(waiter.sandbox_id)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(obj, dict) and obj.get("nonce") == waiter.nonce:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
