"""The sandboxes of one server instance: create, restore, checkpoint, snapshot, expire, shut down."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable
from pathlib import Path

from sandbox_proto import MSG_CHECKPOINT_IN_PROGRESS, MSG_SNAPSHOT_DISABLED, CreateOptions, Status, valid_snapshot_name

from ._errors import (
    CheckpointError,
    CheckpointInProgressError,
    CreationError,
    PermissionDeniedError,
    RestoreError,
    SandboxNotFoundError,
    SnapshotError,
)
from ._execution import KILL_PIPE_GRACE
from ._isolation import BwrapIsolation, Isolation, Limits, NoIsolation
from ._janitor import Janitor
from ._lease import HeldLease, LeaseError, LeaseStore, Waiter
from ._observer import Notify, quietly, tell
from ._sandbox import Sandbox, hash_token
from ._storage import MetadataError, SandboxRecord, Storage, private_dir

__all__ = ["DEFAULT_OUTPUT_LIMIT", "SandboxManager"]

logger = logging.getLogger("sandbox_server")

DEFAULT_OUTPUT_LIMIT = 16 * 2**20


def _has_processes(sandbox: Sandbox) -> bool:
    """A running exec, or a live process group of an earlier one (background processes)."""
    if sandbox.busy:
        return True
    for pgid in sandbox.process_groups:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        return True
    return False


def _new_sandbox_id() -> str:
    return "sandbox-" + secrets.token_hex(6)  # 48 random bits (S4)


class SandboxManager:
    """The sandboxes of one server instance, their directories, the idle sweep and the handoff locks.

    Several managers (server processes) may share one state directory: they
    share metadata, checkpoints, snapshots and leases, and each keeps its live
    sandboxes under ``instances/<instance id>/`` so two copies of a restored
    sandbox never share a directory.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        instance_id: str | None = None,
        checkpoint_enabled: bool = False,
        snapshots_enabled: bool = False,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        idle_sweep_interval: float = 0.25,
        lease_duration: float = 60.0,
        lease_renewal_interval: float = 20.0,
        lock_wait_timeout: float = 30.0,
        handoff_poll_interval: float = 1.0,
        lock_poll_interval: float = 0.25,
        isolation: Isolation | None = None,
        detached_timeout: float | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.isolation = isolation if isolation is not None else NoIsolation(Limits())
        self.instance_id = instance_id or secrets.token_hex(8)
        self.isolation.uid_salt = self.instance_id
        self.janitor = Janitor()
        self.checkpoint_enabled = checkpoint_enabled
        self.snapshots_enabled = snapshots_enabled
        self.output_limit = output_limit
        self.idle_sweep_interval = idle_sweep_interval
        self.lease_renewal_interval = lease_renewal_interval
        self.lock_wait_timeout = lock_wait_timeout
        self.handoff_poll_interval = handoff_poll_interval
        self.lock_poll_interval = lock_poll_interval
        self.storage = Storage(state_dir, owner=self.instance_id)
        #: Seconds an exec may run with no client attached before it is killed; ``None``: forever (upstream).
        self.detached_timeout = detached_timeout
        #: Since when (loop time) each sandbox has had an exec running and no client attached.
        self._detached_since: dict[str, float] = {}
        self.leases = LeaseStore(state_dir / "leases", self.instance_id, duration=lease_duration)
        self.sandboxes: dict[str, Sandbox] = {}
        self.bash = shutil.which("bash") or "/bin/bash"
        self._sweeper: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Restores in progress on this instance, so two attaches do not restore one sandbox twice.
        self._restoring: dict[str, asyncio.Future[None]] = {}

    @property
    def instance_dir(self) -> Path:
        return self.state_dir / "instances" / self.instance_id

    @property
    def sandboxes_dir(self) -> Path:
        return self.instance_dir / "sandboxes"

    @property
    def bundles_dir(self) -> Path:
        return self.instance_dir / "bundles"

    def prepare_bundle(self, sandbox: Sandbox) -> None:
        """The bundle directory, with the account files a bwrap sandbox mounts over /etc."""
        bundle = sandbox.bundle_dir
        bundle.mkdir(parents=True, exist_ok=True)
        isolation = self.isolation
        if isinstance(isolation, BwrapIsolation) and not (bundle / "group").exists():
            # Read by the sandbox's own uid, whatever the server's umask; the state directory
            # above stays private to the server.
            bundle.chmod(0o755)
            passwd, group = isolation.account_files(sandbox.id)
            for name, text in (("passwd", passwd), ("group", group)):
                (bundle / name).write_text(text, encoding="utf-8")
                (bundle / name).chmod(0o644)

    async def start(self) -> None:
        isolation = self.isolation
        limits = isolation.limits
        logger.info(
            "isolation: %s; limits: memory %s, cpu %s s, processes %s, output %s, code %s, stdin %s B/s",
            isolation.describe(),
            limits.memory or "off",
            limits.cpu_seconds or "off",
            (limits.processes or "off") if isolation.enforces_processes else "not enforced",
            limits.output or "off",
            limits.code or "off",
            limits.stdin_rate or "off",
        )
        if not isinstance(isolation, BwrapIsolation):
            logger.warning(
                "isolation: none -- sandboxes run as plain processes of this user: code is NOT isolated "
                "from this machine (isolation needs bubblewrap and --isolation auto or bwrap)"
            )
        elif isolation.exposes(self.state_dir):
            logger.warning("the state directory is inside a directory that sandboxes can read: they can see each other")
        if self.checkpoint_enabled:
            logger.info("checkpoints keep a sandbox's files only: its processes cannot be saved without gVisor")
        self.janitor.start()
        self.janitor.track("dir", self.instance_dir)
        await asyncio.to_thread(self._prepare_state)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="sandbox-idle-sweep")
        if self.checkpoint_enabled:
            self._keeper = asyncio.create_task(self._keep_leases_forever(), name="sandbox-lease-keeper")

    def _prepare_state(self) -> None:
        """Private folders (0700), this instance's liveness lock, then the sweep of dead instances' leftovers."""
        self.storage.prepare()
        self.leases.prepare()
        # The lock before the folder: another instance's sweep never takes a live folder for a dead one's.
        self.storage.claim_instance()
        for directory in (self.instance_dir, self.sandboxes_dir, self.bundles_dir):
            private_dir(directory)
        try:
            self.storage.sweep()
        except OSError:
            logger.exception("sweeping the state directory failed; carrying on")

    def get(self, sandbox_id: str) -> Sandbox | None:
        return self.sandboxes.get(sandbox_id)

    def _unused_id(self) -> str:
        while True:
            sandbox_id = _new_sandbox_id()
            # Other instances share the state directory: their ids are taken too (S13).
            if (
                sandbox_id not in self.sandboxes
                and not self.storage.has_metadata(sandbox_id)
                and self.leases.read(sandbox_id) is None
            ):
                return sandbox_id

    def _new_sandbox(self, sandbox_id: str, token_hash: bytes, options: CreateOptions) -> Sandbox:
        return Sandbox(
            self, sandbox_id, token_hash, options, self.sandboxes_dir / sandbox_id, self.bundles_dir / sandbox_id
        )

    # -- create and restore ------------------------------------------------

    async def create(self, options: CreateOptions, notify: Notify) -> tuple[Sandbox, str]:
        """Set up a new sandbox; returns it and its token (the only time the token exists in clear).

        ``notify`` sends the lock statuses of a handoff-enabled create (7.1);
        failures raise :class:`CreationError` with the text for the client.
        """
        sandbox_id = self._unused_id()
        lease: HeldLease | None = None
        if options.enable_sandbox_handoff:
            await notify(Status.SANDBOX_LOCK_ACQUIRING)
            try:
                got = self.leases.try_acquire(sandbox_id)
            except OSError as exc:
                logger.error("sandbox %s: cannot take the lock: %s", sandbox_id, exc)
                got = None
            if not isinstance(got, HeldLease):
                raise CreationError(f"Failed to acquire lock for sandbox {sandbox_id}")
            lease = got
            await notify(Status.SANDBOX_LOCK_ACQUIRED)
        token = secrets.token_hex(32)
        sandbox = self._new_sandbox(sandbox_id, hash_token(token), options)
        try:
            await asyncio.to_thread(self._prepare_new, sandbox)
        except BaseException as exc:
            await asyncio.to_thread(self._remove_directories, sandbox)
            if lease is not None:
                await self._release(lease, notify)
            if isinstance(exc, OSError):
                logger.error("sandbox %s: cannot create: %s", sandbox_id, exc)
                raise CreationError(f"Failed to create sandbox: {exc.strerror or 'OS error'}") from None
            raise
        sandbox.lease = lease
        self.sandboxes[sandbox_id] = sandbox
        logger.info("sandbox %s created", sandbox_id)
        return sandbox, token

    def _prepare_new(self, sandbox: Sandbox) -> None:
        sandbox.directory.mkdir(parents=True)
        self.prepare_bundle(sandbox)
        name = sandbox.options.filesystem_snapshot_name
        if name and not self.storage.load_snapshot(name, sandbox.directory):
            # The name only, never where snapshots live (CV-09).
            raise CreationError(f"Failed to create sandbox: Filesystem snapshot not found: {name}")
        self.isolation.prepare_directory(sandbox.id, sandbox.directory)
        if sandbox.options.enable_checkpoint:
            # Metadata from the start: a later attach then restores, or says the checkpoint is missing (7.2).
            self.storage.write_metadata(sandbox.record(None))

    async def restore(self, sandbox_id: str, token: str, notify: Notify) -> Sandbox:
        """Bring back a sandbox that is not in memory, after ``SANDBOX_RESTORING`` was sent (7.2).

        Returns the sandbox registered under the id (restored here, or by a
        concurrent attach, whose token and use the caller still checks).
        Raises :class:`SandboxNotFoundError`, :class:`PermissionDeniedError`
        or :class:`RestoreError`.
        """
        while (pending := self._restoring.get(sandbox_id)) is not None:
            await asyncio.wait([pending])
        if (sandbox := self.sandboxes.get(sandbox_id)) is not None:
            return sandbox
        done = asyncio.get_running_loop().create_future()
        self._restoring[sandbox_id] = done
        try:
            return await self._restore(sandbox_id, token, notify)
        finally:
            del self._restoring[sandbox_id]
            done.set_result(None)

    async def _read_record(self, sandbox_id: str) -> SandboxRecord | None:
        try:
            return await asyncio.to_thread(self.storage.read_metadata, sandbox_id)
        except MetadataError as exc:
            raise RestoreError(f"Failed to parse or validate metadata for sandbox {sandbox_id}: {exc}") from None

    async def _restore(self, sandbox_id: str, token: str, notify: Notify) -> Sandbox:
        record = await self._read_record(sandbox_id)
        if record is None:
            raise SandboxNotFoundError(sandbox_id)
        # The token before any restore or lock request, so a stranger cannot move a sandbox (S4).
        if not hmac.compare_digest(record.token_sha256, hash_token(token).hex()):
            raise PermissionDeniedError(sandbox_id)
        lease: HeldLease | None = None
        if record.options.enable_sandbox_handoff:
            await notify(Status.SANDBOX_LOCK_ACQUIRING)
            lease = await self._wait_for_lease(sandbox_id)
            await notify(Status.SANDBOX_LOCK_ACQUIRED)
        sandbox: Sandbox | None = None
        try:
            if lease is not None:
                # The previous holder has just written a newer checkpoint.
                record = await self._read_record(sandbox_id)
                if record is None:
                    raise RestoreError(f"Sandbox {sandbox_id} was deleted while waiting for its lock.")
            if record.checkpoint is None:
                raise RestoreError(f"Latest checkpoint not found for sandbox {sandbox_id}")
            sandbox = self._new_sandbox(sandbox_id, bytes.fromhex(record.token_sha256), record.options)
            try:
                found = await asyncio.to_thread(self._restore_files, sandbox, record.checkpoint)
            except OSError as exc:
                logger.error("sandbox %s: cannot restore: %s", sandbox_id, exc)
                raise RestoreError(f"Failed to restore the checkpoint: {exc.strerror or 'OS error'}") from None
            if not found:
                raise RestoreError(f"Latest checkpoint not found for sandbox {sandbox_id}")
        except BaseException:
            if sandbox is not None:
                await asyncio.to_thread(self._remove_directories, sandbox)
            if lease is not None:
                await self._release(lease, notify)
            raise
        sandbox.lease = lease
        self.sandboxes[sandbox_id] = sandbox
        logger.info("sandbox %s restored", sandbox_id)
        return sandbox

    def _restore_files(self, sandbox: Sandbox, checkpoint: str) -> bool:
        sandbox.directory.mkdir(parents=True, exist_ok=True)
        self.prepare_bundle(sandbox)
        found = self.storage.restore_checkpoint(sandbox.id, checkpoint, sandbox.directory)
        self.isolation.prepare_directory(sandbox.id, sandbox.directory)
        return found

    async def _wait_for_lease(self, sandbox_id: str) -> HeldLease:
        """Take the handoff lock, as the one waiter if another instance holds it (7.10)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_wait_timeout
        waiter: Waiter | None = None
        try:
            while True:
                got = self.leases.try_acquire(sandbox_id)
                if isinstance(got, HeldLease):
                    return got
                if waiter is None:
                    # The holder polls for this file and hands the sandbox over.
                    waiter = self.leases.register_waiter(sandbox_id, self.lock_wait_timeout + 5)
                    if waiter is None:
                        raise RestoreError(f"Lock is held by {got.owner} and already has a waiter.")
                if loop.time() >= deadline:
                    raise RestoreError(f"Timed out waiting for lock release by {got.owner}.")
                await asyncio.sleep(self.lock_poll_interval)
        except OSError as exc:
            logger.error("sandbox %s: lock files: %s", sandbox_id, exc)
            raise RestoreError(f"Failed to acquire lock for sandbox {sandbox_id}") from None
        finally:
            if waiter is not None:
                with contextlib.suppress(OSError):
                    self.leases.remove_waiter(waiter)

    async def _release(self, lease: HeldLease, notify: Notify) -> None:
        await notify(Status.SANDBOX_LOCK_RELEASING)
        try:
            self.leases.release(lease)
        except OSError as exc:
            # It expires on its own; another instance can take over then.
            logger.error("sandbox %s: cannot release the lock: %s", lease.sandbox_id, exc)
        await notify(Status.SANDBOX_LOCK_RELEASED)

    # -- removal -------------------------------------------------------------

    async def delete(self, sandbox: Sandbox, *, forget: bool = False) -> None:
        """Remove a sandbox from this instance, telling its attached connection (7.6, 7.9, 7.13).

        Frames: DELETING, [DONE], [LOCK_RELEASING, LOCK_RELEASED], DELETED.
        ``forget`` (kill_sandbox) also deletes its metadata and checkpoints.
        """
        if sandbox.deleted:
            return
        sandbox.deleted = sandbox.leaving = True
        if self.sandboxes.get(sandbox.id) is sandbox:
            del self.sandboxes[sandbox.id]
        observer = sandbox.observer

        async def notify(status: Status) -> None:
            await tell(observer, status)

        await notify(Status.SANDBOX_DELETING)
        sandbox.kill_all()
        await sandbox.wait_execution_end()
        if observer is not None:
            await quietly(observer.wait_stream_end)
        await asyncio.to_thread(self._remove_directories, sandbox)
        if forget:
            await asyncio.to_thread(self.storage.forget, sandbox.id)
        if sandbox.lease is not None:
            lease, sandbox.lease = sandbox.lease, None
            await self._release(lease, notify)
        await notify(Status.SANDBOX_DELETED)
        logger.info("sandbox %s deleted", sandbox.id)

    def _remove_directories(self, sandbox: Sandbox) -> None:
        shutil.rmtree(sandbox.directory, ignore_errors=True)
        shutil.rmtree(sandbox.bundle_dir, ignore_errors=True)

    # -- checkpoints and snapshots -------------------------------------------

    async def _save(self, sandbox: Sandbox) -> None:
        """Persist the sandbox's files as its latest checkpoint; raises OSError.

        Processes cannot be saved without gVisor: they are killed first, so
        that none changes a file while it is copied.
        """
        sandbox.checkpointing = True
        try:
            sandbox.kill_all()
            await sandbox.wait_execution_end()
            await asyncio.to_thread(self._write_checkpoint, sandbox)
        finally:
            sandbox.checkpointing = False

    def _write_checkpoint(self, sandbox: Sandbox) -> None:
        name = self.storage.save_checkpoint(sandbox.id, sandbox.directory)
        # The metadata switch is the commit: until then a restore uses the previous checkpoint.
        self.storage.write_metadata(sandbox.record(name))
        self.storage.prune_checkpoints(sandbox.id, keep=name)

    async def checkpoint(self, sandbox: Sandbox) -> None:
        """Checkpoint and delete; raises :class:`CheckpointError` with upstream's texts (7.7)."""
        if sandbox.deleted or sandbox.leaving:
            raise CheckpointError(f"Sandbox not found: {sandbox.id}")
        if not sandbox.checkpointable:
            raise CheckpointError(f"Sandbox {sandbox.id} is not configured for checkpointing.")
        if sandbox.busy:
            raise CheckpointInProgressError(MSG_CHECKPOINT_IN_PROGRESS)
        sandbox.leaving = True
        try:
            await self._save(sandbox)
        except OSError as exc:
            # S11: the sandbox is kept (without its background processes).
            sandbox.leaving = False
            logger.error("sandbox %s: checkpoint failed: %s", sandbox.id, exc)
            raise CheckpointError(
                f"Failed to checkpoint sandbox {sandbox.id}: {exc.strerror or 'cannot write the checkpoint'}"
            ) from None
        await self.delete(sandbox)
        logger.info("sandbox %s checkpointed", sandbox.id)

    async def snapshot(self, sandbox: Sandbox, name: object) -> None:
        """Snapshot the sandbox's files; raises :class:`SnapshotError` (7.8). May run during an exec."""
        # Storage is checked before the name, as upstream does.
        if not self.snapshots_enabled:
            raise SnapshotError(MSG_SNAPSHOT_DISABLED)
        if not valid_snapshot_name(name):
            raise SnapshotError("Invalid snapshot name: use 1-128 of A-Z a-z 0-9 . _ - not starting with '.'.")
        assert isinstance(name, str)
        if sandbox.deleted:
            raise SnapshotError(f"Sandbox not found: {sandbox.id}")
        try:
            await asyncio.to_thread(self.storage.save_snapshot, name, sandbox.directory)
        except OSError as exc:
            logger.error("sandbox %s: snapshot %s failed: %s", sandbox.id, name, exc)
            raise SnapshotError(f"Failed to store the snapshot: {exc.strerror or 'OS error'}") from None
        logger.info("sandbox %s: snapshot %s written", sandbox.id, name)

    # -- handoff and lock loss -----------------------------------------------

    async def _hand_off(self, sandbox: Sandbox) -> None:
        """Another instance waits for this sandbox: checkpoint it and let the lock go (7.10).

        The old connection is told but not closed (S15).
        """
        observer = sandbox.observer
        logger.info("sandbox %s: another instance asks for it; handing it off", sandbox.id)
        await tell(observer, Status.SANDBOX_LOCK_RELEASE_REQUESTED)
        await tell(observer, Status.SANDBOX_CHECKPOINTING)
        sandbox.checkpointing = True  # no exec may start from here on
        ex = sandbox.execution
        if ex is not None and ex.running:
            await tell(observer, Status.SANDBOX_EXECUTION_FORCE_KILLED)  # before the kill, as upstream
            ex.kill()
            await sandbox.wait_execution_end()
            if observer is not None:
                await quietly(observer.wait_stream_end)  # its DONE
        try:
            await self._save(sandbox)
        except OSError as exc:
            logger.error("sandbox %s: handoff checkpoint failed: %s", sandbox.id, exc)
            saved = False
        else:
            saved = True
        await self.delete(sandbox)
        # S9: a failed handoff checkpoint is reported as such, not as CHECKPOINTED.
        await tell(observer, Status.SANDBOX_CHECKPOINTED if saved else Status.SANDBOX_CHECKPOINT_ERROR)

    async def _lose_lock(self, sandbox: Sandbox) -> None:
        logger.warning("sandbox %s: its lock was lost; deleting it here", sandbox.id)
        await tell(sandbox.observer, Status.SANDBOX_LOCK_RENEWAL_ERROR)
        await self.delete(sandbox)

    async def _keep_leases_forever(self) -> None:
        """Renew this instance's leases and notice waiting instances, by polling the lease files."""
        loop = asyncio.get_running_loop()
        interval = min(self.handoff_poll_interval, self.lease_renewal_interval)
        next_waiter_check = loop.time() + self.handoff_poll_interval
        while True:
            await asyncio.sleep(interval)
            check_waiters = loop.time() >= next_waiter_check
            if check_waiters:
                next_waiter_check = loop.time() + self.handoff_poll_interval
            for sandbox in list(self.sandboxes.values()):
                lease = sandbox.lease
                if lease is None or sandbox.deleted:
                    continue
                try:
                    if check_waiters and not sandbox.leaving and self.leases.has_waiter(sandbox.id):
                        sandbox.leaving = True
                        self.spawn(self._hand_off(sandbox))
                    elif time.time() - lease.renewed_at >= self.lease_renewal_interval:
                        self.leases.renew(lease)
                except LeaseError as exc:
                    logger.warning("sandbox %s: lease renewal failed: %s", sandbox.id, exc)
                    if not sandbox.leaving:
                        sandbox.leaving = True
                        self.spawn(self._lose_lock(sandbox))
                except OSError:
                    logger.exception("sandbox %s: lease files", sandbox.id)  # try again at the next poll

    # -- idle expiry ---------------------------------------------------------

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.idle_sweep_interval)
            now = loop.time()
            for sandbox in list(self.sandboxes.values()):
                try:
                    expired = sandbox.idle_expired(now)
                except Exception:  # one bad sandbox must not stop expiry of the others (7.9's defect)
                    logger.exception("sandbox %s: idle check failed", sandbox.id)
                    continue
                if expired:
                    logger.info("sandbox %s idle for %ss: expiring", sandbox.id, sandbox.options.idle_timeout)
                    sandbox.leaving = True
                    # Its own task: a connection slow to accept frames must not hold up the sweep.
                    self.spawn(self._expire(sandbox))
            if self.detached_timeout is not None:
                self._kill_detached(now, self.detached_timeout)

    def _kill_detached(self, now: float, timeout: float) -> None:
        """Kill the processes of sandboxes nobody has been attached to for ``timeout`` seconds.

        Upstream, a running exec blocks idle expiry: one that never ends, whose
        client went away, would run forever. After the kill the exec ends and
        the ordinary idle rules apply.
        """
        for sandbox_id in [s for s in self._detached_since if s not in self.sandboxes]:
            del self._detached_since[sandbox_id]
        for sandbox in list(self.sandboxes.values()):
            if sandbox.deleted or sandbox.leaving or sandbox.observer is not None or not _has_processes(sandbox):
                self._detached_since.pop(sandbox.id, None)
                continue
            since = self._detached_since.setdefault(sandbox.id, now)
            if now - since >= timeout:
                logger.info("sandbox %s: no client attached for %ss: killing its processes", sandbox.id, timeout)
                del self._detached_since[sandbox.id]
                sandbox.kill_all()

    async def _expire(self, sandbox: Sandbox) -> None:
        """Idle expiry (7.9): auto-checkpoint if asked for, then the deletion frames only."""
        if sandbox.options.enable_idle_timeout_auto_checkpoint and sandbox.checkpointable:
            try:
                await self._save(sandbox)
            except OSError as exc:
                logger.error("sandbox %s: idle checkpoint failed, deleting it anyway: %s", sandbox.id, exc)
        await self.delete(sandbox)

    def spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                logger.exception("background sandbox task failed")

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        """Kill every process of every sandbox, remove their directories, let the locks go (7.11)."""
        for background in (self._sweeper, self._keeper):
            if background is not None:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
        for task in list(self._tasks):
            task.cancel()
        sandboxes = list(self.sandboxes.values())
        self.sandboxes.clear()
        for sandbox in sandboxes:
            sandbox.deleted = True
            sandbox.kill_all()
        executions = [ex for s in sandboxes if (ex := s.execution) is not None]
        if executions:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_PIPE_GRACE + 2):
                    await asyncio.gather(*(ex.finished.wait() for ex in executions))
            await asyncio.gather(*(ex.wait_stdin_writer() for ex in executions))
        for sandbox in sandboxes:
            if sandbox.options.enable_idle_timeout_auto_checkpoint and sandbox.checkpointable:
                # S10: a sandbox meant to survive idleness survives a restart too.
                try:
                    self._write_checkpoint(sandbox)
                except OSError as exc:
                    logger.error("sandbox %s: checkpoint at shutdown failed: %s", sandbox.id, exc)
            self._remove_directories(sandbox)
            if sandbox.lease is not None:
                with contextlib.suppress(OSError):
                    self.leases.release(sandbox.lease)
        shutil.rmtree(self.instance_dir, ignore_errors=True)
        self.storage.release_instance()
        await asyncio.to_thread(self.janitor.stop)
