"""Checkpoints, restores, snapshots, idle auto-checkpoint and handoff (protocol.md 7.7-7.10, 7.13).

Vectors CV-04, 20, 21, 23, 28 over a real socket, the reference server's
fixes S4, S5, S7, S9 on these paths, and unit tests of the lease files.
Instances of one service are two :class:`LocalServer` objects sharing a state
directory (the wire is the same as with two processes; test_stateful.py in
tests/asyncio covers processes).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import pytest
from server._server_wire import Wire, err, pid_alive, st

from sandbox_server import LocalServer
from sandbox_server._lease import HeldLease, LeaseError, LeaseInfo, LeaseStore

pytestmark = pytest.mark.anyio

CKPT = '{"idle_timeout":60,"enable_checkpoint":true}'
HANDOFF = (
    '{"idle_timeout":60,"enable_checkpoint":true,"enable_sandbox_handoff":true,'
    '"enable_idle_timeout_auto_checkpoint":false}'
)
#: Short lock timings so that handoff and lock loss happen within a second or two.
FAST_LOCKS: dict[str, Any] = {
    "lease_duration": 3.0,
    "lease_renewal_interval": 0.2,
    "handoff_poll_interval": 0.1,
    "lock_wait_timeout": 5.0,
}


@asynccontextmanager
async def instances(
    state: Path, protocol: Literal["extended", "upstream"] = "extended", **options: Any
) -> AsyncIterator[tuple[LocalServer, ...]]:
    """Two instances of one service: servers sharing ``state``."""
    settings = {**FAST_LOCKS, **options}
    async with (
        LocalServer(port=0, state_dir=state, protocol=protocol, **settings) as a,
        LocalServer(port=0, state_dir=state, protocol=protocol, **settings) as b,
    ):
        yield a, b


async def eventually(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll a condition with a deadline: files give no event to wait on."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while True:
        if condition():
            return
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.02)


async def read_stdout(wire: Wire, want: str) -> None:
    got = ""
    while len(got) < len(want):
        frame = await wire.frame()
        assert frame["event"] == "stdout", frame
        got += frame["data"]
    assert got == want


async def checkpointed(url: str, protocol: str, init: str = CKPT, setup: str = "printf 'v1\\n' > note.txt") -> Wire:
    """A sandbox with a file, checkpointed (CV-20's first connection)."""
    wire = await Wire.create(url, protocol, init)
    assert (await wire.run("bash", setup)).statuses == [st("SANDBOX_EXECUTION_DONE")]
    await wire.send({"action": "checkpoint"})
    lock = [st("SANDBOX_LOCK_RELEASING"), st("SANDBOX_LOCK_RELEASED")] if "handoff" in init else []
    await wire.expect(
        st("SANDBOX_CHECKPOINTING"), st("SANDBOX_DELETING"), *lock, st("SANDBOX_DELETED"), st("SANDBOX_CHECKPOINTED")
    )
    await wire.expect_close(1000)
    return wire


# -- checkpoint and restore (CV-20, 21) -------------------------------------------------


async def test_cv20_checkpoint_then_restore_on_attach(any_local: LocalServer) -> None:
    first = await checkpointed(any_local.url, any_local.protocol)
    assert any_local.manager.get(first.sandbox_id) is None
    metadata = (any_local.state_dir / "metadata" / f"{first.sandbox_id}.json").read_text()
    assert first.token not in metadata  # only its hash (S4)
    second = await Wire.attach(any_local.url, any_local.protocol, first.sandbox_id, first.token)
    await second.expect(st("SANDBOX_RESTORING"), st("SANDBOX_RUNNING"))
    result = await second.run("bash", "cat note.txt")
    assert (result.stdout, result.statuses) == ("v1\n", [st("SANDBOX_EXECUTION_DONE")])
    # A restored sandbox checkpoints again; the older checkpoint is pruned.
    await second.run("bash", "printf 'v2\\n' > note.txt")
    await second.send({"action": "checkpoint"})
    await second.expect(
        st("SANDBOX_CHECKPOINTING"), st("SANDBOX_DELETING"), st("SANDBOX_DELETED"), st("SANDBOX_CHECKPOINTED")
    )
    await second.expect_close(1000)
    assert len(list((any_local.state_dir / "checkpoints" / first.sandbox_id).iterdir())) == 1
    third = await Wire.attach(any_local.url, any_local.protocol, first.sandbox_id, first.token)
    await third.expect(st("SANDBOX_RESTORING"), st("SANDBOX_RUNNING"))
    assert (await third.run("bash", "cat note.txt")).stdout == "v2\n"


async def test_checkpoint_kills_background_processes(plain_local: LocalServer) -> None:
    wire = await Wire.create(plain_local.url, "extended", CKPT)
    result = await wire.run("bash", "sleep 1000 > /dev/null 2>&1 & echo $!")
    background = int(result.stdout)
    await wire.send({"action": "checkpoint"})
    await wire.expect(
        st("SANDBOX_CHECKPOINTING"), st("SANDBOX_DELETING"), st("SANDBOX_DELETED"), st("SANDBOX_CHECKPOINTED")
    )
    await wire.expect_close(1000)
    await eventually(lambda: not pid_alive(background))


async def test_cv21_checkpoint_refused_while_an_exec_runs(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol, CKPT)
    await wire.send({"language": "bash", "code": "sleep 0.5; echo finished"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await wire.send({"action": "checkpoint"})
    await wire.expect(
        st("SANDBOX_CHECKPOINTING"),
        st("SANDBOX_EXECUTION_IN_PROGRESS_ERROR"),
        err("Cannot checkpoint while an execution is in progress."),
    )
    result = await wire.collect()
    assert (result.stdout, result.statuses) == ("finished\n", [st("SANDBOX_EXECUTION_DONE")])
    # Still open, and the sandbox can be checkpointed now.
    await wire.send({"action": "checkpoint"})
    await wire.expect(
        st("SANDBOX_CHECKPOINTING"), st("SANDBOX_DELETING"), st("SANDBOX_DELETED"), st("SANDBOX_CHECKPOINTED")
    )
    await wire.expect_close(1000)


# -- restore failures (7.2, S4) ---------------------------------------------------------------


@pytest.mark.parametrize("init", [CKPT, HANDOFF], ids=["ckpt", "handoff"])
async def test_wrong_token_is_refused_before_restore_or_lock(any_local: LocalServer, init: str) -> None:
    first = await checkpointed(any_local.url, any_local.protocol, init)
    wrong = await Wire.attach(any_local.url, any_local.protocol, first.sandbox_id, "0" * 64)
    # No LOCK_ACQUIRING: a stranger cannot move a sandbox (S4).
    await wrong.expect(st("SANDBOX_RESTORING"), st("SANDBOX_PERMISSION_DENIAL_ERROR"), err("Invalid sandbox token."))
    await wrong.expect_close(4000)
    assert any_local.manager.get(first.sandbox_id) is None
    assert not (any_local.state_dir / "leases" / f"{first.sandbox_id}.json").exists()


async def test_never_checkpointed_sandbox_gives_restore_error(tmp_path: Path) -> None:
    async with instances(tmp_path) as (a, b):
        wire = await Wire.create(a.url, "extended", CKPT)
        sid = wire.sandbox_id
        # Not in B's memory, metadata but no checkpoint (7.2).
        other = await Wire.attach(b.url, "extended", sid, wire.token)
        await other.expect(
            st("SANDBOX_RESTORING"),
            st("SANDBOX_RESTORE_ERROR"),
            err(f"Failed to restore sandbox {sid}: Latest checkpoint not found for sandbox {sid}"),
        )
        await other.expect_close(4000)
        # A's sandbox is unaffected.
        assert (await wire.run("bash", "echo still")).stdout == "still\n"


async def test_corrupt_metadata_gives_restore_error_without_paths(local: LocalServer) -> None:
    first = await checkpointed(local.url, "extended")
    sid = first.sandbox_id
    (local.state_dir / "metadata" / f"{sid}.json").write_text("{not json")
    wire = await Wire.attach(local.url, "extended", sid, first.token)
    await wire.expect(st("SANDBOX_RESTORING"), st("SANDBOX_RESTORE_ERROR"))
    frame = await wire.frame()
    assert frame["message"].startswith(f"Failed to restore sandbox {sid}: Failed to parse or validate metadata")
    assert str(local.state_dir) not in frame["message"]
    await wire.expect_close(4000)


async def test_concurrent_attaches_restore_once(local: LocalServer) -> None:
    first = await checkpointed(local.url, "extended")
    wires = await asyncio.gather(*(Wire.attach(local.url, "extended", first.sandbox_id, first.token) for _ in range(3)))
    outcomes = []
    for wire in wires:
        await wire.expect(st("SANDBOX_RESTORING"))
        outcomes.append(await wire.text())
    assert sorted(outcomes) == sorted([st("SANDBOX_RUNNING")] + [st("SANDBOX_IN_USE")] * 2)
    assert len(list(local.manager.sandboxes_dir.iterdir())) == 1


# -- idle expiry with storage (7.9, S5) ---------------------------------------------------------


async def test_idle_auto_checkpoint_then_restore(any_local: LocalServer) -> None:
    init = '{"idle_timeout":1,"enable_checkpoint":true,"enable_idle_timeout_auto_checkpoint":true}'
    wire = await Wire.create(any_local.url, any_local.protocol, init)
    await wire.run("bash", "echo kept > note.txt")
    # No CHECKPOINTING/CHECKPOINTED on this path; the connection stays open.
    await wire.expect(st("SANDBOX_DELETING"), st("SANDBOX_DELETED"))
    again = await Wire.attach(any_local.url, any_local.protocol, wire.sandbox_id, wire.token)
    await again.expect(st("SANDBOX_RESTORING"), st("SANDBOX_RUNNING"))
    assert (await again.run("bash", "cat note.txt")).stdout == "kept\n"


async def test_idle_delete_keeps_the_last_explicit_checkpoint(local: LocalServer) -> None:
    first = await checkpointed(local.url, "extended", '{"idle_timeout":1,"enable_checkpoint":true}')
    second = await Wire.attach(local.url, "extended", first.sandbox_id, first.token)
    await second.expect(st("SANDBOX_RESTORING"), st("SANDBOX_RUNNING"))
    await second.run("bash", "echo lost > note.txt")
    await second.expect(st("SANDBOX_DELETING"), st("SANDBOX_DELETED"))
    third = await Wire.attach(local.url, "extended", first.sandbox_id, first.token)
    await third.expect(st("SANDBOX_RESTORING"), st("SANDBOX_RUNNING"))
    assert (await third.run("bash", "cat note.txt")).stdout == "v1\n"  # stale, as upstream


# -- snapshots (CV-23, CV-09, S7) -----------------------------------------------------------------


async def test_cv23_snapshot_then_create_from_it(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    await wire.run("bash", "mkdir -p opt/env && echo ready > opt/env/flag")
    await wire.send({"action": "snapshot_filesystem", "name": "env-v1"})
    await wire.expect(st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"), st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATED"))
    for _ in range(2):
        other = await Wire.create(any_local.url, any_local.protocol, '{"filesystem_snapshot_name":"env-v1"}')
        assert other.sandbox_id != wire.sandbox_id
        result = await other.run("bash", "cat opt/env/flag")
        assert (result.stdout, result.statuses) == ("ready\n", [st("SANDBOX_EXECUTION_DONE")])
        await other.run("bash", "echo mine > opt/env/flag")  # a copy: the snapshot is unchanged
    # Same name again: replaced.
    await wire.run("bash", "echo v2 > opt/env/flag")
    await wire.send({"action": "snapshot_filesystem", "name": "env-v1"})
    await wire.expect(st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"), st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATED"))
    newest = await Wire.create(any_local.url, any_local.protocol, '{"filesystem_snapshot_name":"env-v1"}')
    assert (await newest.run("bash", "cat opt/env/flag")).stdout == "v2\n"
    assert sorted(p.name for p in (any_local.state_dir / "snapshots").iterdir()) == ["env-v1"]


async def test_snapshot_during_an_exec(local: LocalServer) -> None:
    wire = await Wire.create(local.url, "extended")
    await wire.send({"language": "bash", "code": "echo a > f; echo started; sleep 0.5; echo end"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await wire.send({"action": "snapshot_filesystem", "name": "during"})
    result = await wire.collect()
    assert st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATED") in result.statuses
    assert result.stdout == "started\nend\n"


@pytest.mark.parametrize("name", ["../escape", ".hidden", "", "a/b", "x" * 129, None, 5])
async def test_invalid_snapshot_name_is_a_snapshot_error(any_local: LocalServer, name: object) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    frame: dict[str, object] = {"action": "snapshot_filesystem"}
    if name is not None:
        frame["name"] = name
    await wire.send(frame)
    await wire.expect(st("SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"), st("SANDBOX_FILESYSTEM_SNAPSHOT_ERROR"))
    message = (await wire.frame())["message"]
    assert message.startswith(f"Failed to snapshot filesystem for sandbox {wire.sandbox_id}: Invalid snapshot name")
    # No close (S7).
    assert (await wire.run("bash", "echo open")).stdout == "open\n"
    assert not any((any_local.state_dir / "snapshots").iterdir())


async def test_cv09_create_from_a_missing_snapshot(any_local: LocalServer) -> None:
    wire = await Wire.open(any_local.url, "/create", any_local.protocol)
    await wire.send('{"filesystem_snapshot_name":"no-such-snapshot"}')
    await wire.expect(st("SANDBOX_CREATING"), st("SANDBOX_CREATION_ERROR"))
    message = (await wire.frame())["message"]
    assert "no-such-snapshot" in message and str(any_local.state_dir) not in message and "/" not in message
    await wire.expect_close(4000)
    assert not any_local.manager.sandboxes
    assert not any(any_local.manager.sandboxes_dir.iterdir())


# -- handoff (CV-04, CV-28, 7.13) ----------------------------------------------------------------


async def test_cv04_create_with_checkpoint_and_handoff(any_local: LocalServer) -> None:
    wire = await Wire.open(any_local.url, "/create", any_local.protocol)
    await wire.send(HANDOFF)
    await wire.expect(st("SANDBOX_CREATING"), st("SANDBOX_LOCK_ACQUIRING"), st("SANDBOX_LOCK_ACQUIRED"))
    frame = await wire.frame()
    assert frame["event"] == "sandbox_id"
    await wire.expect(st("SANDBOX_RUNNING"))
    lease = json.loads((any_local.state_dir / "leases" / f"{frame['sandbox_id']}.json").read_text())
    assert lease["owner"] == any_local.instance_id and lease["expires"] > time.time()
    # kill_sandbox releases it (7.6).
    await wire.send({"action": "kill_sandbox"})
    await wire.expect(
        st("SANDBOX_KILLING"),
        st("SANDBOX_DELETING"),
        st("SANDBOX_LOCK_RELEASING"),
        st("SANDBOX_LOCK_RELEASED"),
        st("SANDBOX_DELETED"),
        st("SANDBOX_KILLED"),
    )
    await wire.expect_close(1000)
    assert not (any_local.state_dir / "leases" / f"{frame['sandbox_id']}.json").exists()


async def test_failed_create_releases_the_lock_first(local: LocalServer) -> None:
    wire = await Wire.open(local.url, "/create", "extended")
    init = json.loads(HANDOFF) | {"filesystem_snapshot_name": "missing"}
    await wire.send(init)
    await wire.expect(
        st("SANDBOX_CREATING"),
        st("SANDBOX_LOCK_ACQUIRING"),
        st("SANDBOX_LOCK_ACQUIRED"),
        st("SANDBOX_LOCK_RELEASING"),
        st("SANDBOX_LOCK_RELEASED"),
        st("SANDBOX_CREATION_ERROR"),
    )
    await wire.frame()
    await wire.expect_close(4000)
    assert not any((local.state_dir / "leases").iterdir())
    assert not any((local.state_dir / "metadata").iterdir())


async def test_cv28_handoff_between_instances(tmp_path: Path, protocol: Literal["extended", "upstream"]) -> None:
    async with instances(tmp_path, protocol) as (a, b):
        c1 = await Wire.create(a.url, protocol, HANDOFF)
        await c1.run("bash", "echo from-a > note.txt")
        await c1.send({"language": "python", "code": "import time; print('A running', flush=True); time.sleep(30)"})
        await c1.expect(st("SANDBOX_EXECUTION_RUNNING"))
        await read_stdout(c1, "A running\n")  # chunks may be split (section 12's rules)
        c2 = await Wire.attach(b.url, protocol, c1.sandbox_id, c1.token)
        await c2.expect(st("SANDBOX_RESTORING"), st("SANDBOX_LOCK_ACQUIRING"))
        await c1.expect(
            st("SANDBOX_LOCK_RELEASE_REQUESTED"),
            st("SANDBOX_CHECKPOINTING"),
            st("SANDBOX_EXECUTION_FORCE_KILLED"),
            st("SANDBOX_EXECUTION_DONE"),
            st("SANDBOX_DELETING"),
            st("SANDBOX_LOCK_RELEASING"),
            st("SANDBOX_LOCK_RELEASED"),
            st("SANDBOX_DELETED"),
            st("SANDBOX_CHECKPOINTED"),
        )
        await c2.expect(st("SANDBOX_LOCK_ACQUIRED"), st("SANDBOX_RUNNING"))
        result = await c2.run("python", "print('B ok'); print(open('note.txt').read(), end='')")
        assert (result.stdout, result.statuses) == ("B ok\nfrom-a\n", [st("SANDBOX_EXECUTION_DONE")])
        assert a.manager.get(c1.sandbox_id) is None and b.manager.get(c1.sandbox_id) is not None
        lease = json.loads((tmp_path / "leases" / f"{c1.sandbox_id}.json").read_text())
        assert lease["owner"] == b.instance_id
        assert not (tmp_path / "leases" / f"{c1.sandbox_id}.waiter").exists()
        # The old connection is open (S15) but its sandbox is gone (7.10).
        await c1.send({"language": "bash", "code": "echo hi"})
        await c1.expect(st("SANDBOX_EXECUTION_ERROR"))
        await c1.frame()
        await c1.expect(st("SANDBOX_EXECUTION_DONE"))
        await c1.send({"action": "kill_sandbox"})
        await c1.expect_close(1000)
        assert (await c2.run("bash", "echo survives")).stdout == "survives\n"
        # And back again, without an exec running: no FORCE_KILLED / DONE.
        c3 = await Wire.attach(a.url, protocol, c1.sandbox_id, c1.token)
        await c3.expect(st("SANDBOX_RESTORING"), st("SANDBOX_LOCK_ACQUIRING"))
        await c2.expect(
            st("SANDBOX_LOCK_RELEASE_REQUESTED"),
            st("SANDBOX_CHECKPOINTING"),
            st("SANDBOX_DELETING"),
            st("SANDBOX_LOCK_RELEASING"),
            st("SANDBOX_LOCK_RELEASED"),
            st("SANDBOX_DELETED"),
            st("SANDBOX_CHECKPOINTED"),
        )
        await c3.expect(st("SANDBOX_LOCK_ACQUIRED"), st("SANDBOX_RUNNING"))
        assert (await c3.run("bash", "cat note.txt")).stdout == "from-a\n"


async def test_handoff_lock_wait_times_out_and_second_waiter_is_refused(tmp_path: Path) -> None:
    # A never looks for waiters: B must give up after its wait.
    async with (
        LocalServer(port=0, state_dir=tmp_path, **{**FAST_LOCKS, "handoff_poll_interval": 60.0}) as a,
        LocalServer(port=0, state_dir=tmp_path, **{**FAST_LOCKS, "lock_wait_timeout": 1.0}) as b,
        LocalServer(port=0, state_dir=tmp_path, **FAST_LOCKS) as c,
    ):
        c1 = await Wire.create(a.url, "extended", HANDOFF)
        sid = c1.sandbox_id
        c2 = await Wire.attach(b.url, "extended", sid, c1.token)
        await c2.expect(st("SANDBOX_RESTORING"), st("SANDBOX_LOCK_ACQUIRING"))
        await eventually(lambda: (tmp_path / "leases" / f"{sid}.waiter").exists())
        c3 = await Wire.attach(c.url, "extended", sid, c1.token)
        await c3.expect(
            st("SANDBOX_RESTORING"),
            st("SANDBOX_LOCK_ACQUIRING"),
            st("SANDBOX_RESTORE_ERROR"),
            err(f"Failed to restore sandbox {sid}: Lock is held by {a.instance_id} and already has a waiter."),
        )
        await c3.expect_close(4000)
        await c2.expect(
            st("SANDBOX_RESTORE_ERROR"),
            err(f"Failed to restore sandbox {sid}: Timed out waiting for lock release by {a.instance_id}."),
        )
        await c2.expect_close(4000)
        assert not (tmp_path / "leases" / f"{sid}.waiter").exists()
        assert (await c1.run("bash", "echo still-on-a")).stdout == "still-on-a\n"


async def test_sandbox_of_a_crashed_instance_is_taken_over_after_its_lease_expires(tmp_path: Path) -> None:
    async with instances(tmp_path) as (a, b):
        first = await checkpointed(a.url, "extended", HANDOFF)
        sid = first.sandbox_id
        # A crashed instance's lease, just expired: nobody renews it, nobody answers a waiter.
        lease_file = tmp_path / "leases" / f"{sid}.json"
        lease_file.write_text(json.dumps({"owner": "crashed", "nonce": "n1", "expires": time.time() - 5}))
        wire = await Wire.attach(b.url, "extended", sid, first.token)
        await wire.expect(
            st("SANDBOX_RESTORING"), st("SANDBOX_LOCK_ACQUIRING"), st("SANDBOX_LOCK_ACQUIRED"), st("SANDBOX_RUNNING")
        )
        assert (await wire.run("bash", "cat note.txt")).stdout == "v1\n"
        assert json.loads(lease_file.read_text())["owner"] == b.instance_id


async def test_lease_is_renewed_while_held(tmp_path: Path) -> None:
    async with LocalServer(port=0, state_dir=tmp_path, **FAST_LOCKS) as server:
        wire = await Wire.create(server.url, "extended", HANDOFF)
        lease_file = tmp_path / "leases" / f"{wire.sandbox_id}.json"
        before = json.loads(lease_file.read_text())["expires"]
        await eventually(lambda: json.loads(lease_file.read_text())["expires"] > before)
        assert json.loads(lease_file.read_text())["owner"] == server.instance_id


async def test_lock_renewal_error_deletes_the_sandbox(tmp_path: Path) -> None:
    async with LocalServer(port=0, state_dir=tmp_path, **FAST_LOCKS) as server:
        wire = await Wire.create(server.url, "extended", HANDOFF)
        await wire.send({"language": "bash", "code": "echo go; sleep 30"})
        await wire.expect(st("SANDBOX_EXECUTION_RUNNING"), '{"event":"stdout","data":"go\\n"}')
        # Someone else's lease now (stolen, or ours expired and taken over).
        lease_file = tmp_path / "leases" / f"{wire.sandbox_id}.json"
        stolen = {"owner": "thief", "nonce": "other", "expires": time.time() + 60}
        lease_file.write_text(json.dumps(stolen))
        await wire.expect(
            st("SANDBOX_LOCK_RENEWAL_ERROR"),
            st("SANDBOX_DELETING"),
            st("SANDBOX_EXECUTION_DONE"),
            st("SANDBOX_LOCK_RELEASING"),
            st("SANDBOX_LOCK_RELEASED"),
            st("SANDBOX_DELETED"),
        )
        assert server.manager.get(wire.sandbox_id) is None
        assert json.loads(lease_file.read_text()) == stolen  # not ours to release


# -- lease files, unit tests -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(path: Path, owner: str, clock: FakeClock, duration: float = 10.0) -> LeaseStore:
    store = LeaseStore(path, owner, duration=duration, clock=clock)
    store.prepare()
    return store


def test_lease_expiry_allows_takeover_only_after_grace(tmp_path: Path) -> None:
    clock = FakeClock()
    a, b = _store(tmp_path, "a", clock), _store(tmp_path, "b", clock)
    held = a.try_acquire("s1")
    assert isinstance(held, HeldLease)
    assert b.try_acquire("s1") == LeaseInfo("a", held.nonce, 1010.0)
    clock.now = 1010.5  # expired, but within the grace of a holder stalled mid-renewal
    assert isinstance(b.try_acquire("s1"), LeaseInfo)
    with pytest.raises(LeaseError):
        a.renew(held)  # an expired lease is not renewed
    clock.now = 1012.0
    taken = b.try_acquire("s1")
    assert isinstance(taken, HeldLease)
    assert b.read("s1") == LeaseInfo("b", taken.nonce, 1022.0)
    # The old holder cannot renew or release what is now b's.
    with pytest.raises(LeaseError):
        a.renew(held)
    a.release(held)
    assert b.read("s1") is not None
    assert not list(tmp_path.glob("*.takeover"))


def test_lease_renewal_extends_and_release_frees(tmp_path: Path) -> None:
    clock = FakeClock()
    a, b = _store(tmp_path, "a", clock), _store(tmp_path, "b", clock)
    held = a.try_acquire("s1")
    assert isinstance(held, HeldLease)
    clock.now = 1008.0
    a.renew(held)
    assert held.expires == 1018.0 and a.read("s1") == LeaseInfo("a", held.nonce, 1018.0)
    clock.now = 1015.0  # past the first expiry: still a's
    assert isinstance(b.try_acquire("s1"), LeaseInfo)
    a.release(held)
    assert a.read("s1") is None
    assert isinstance(b.try_acquire("s1"), HeldLease)


def test_unreadable_lease_counts_as_held_for_one_duration(tmp_path: Path) -> None:
    clock = FakeClock()
    store = _store(tmp_path, "b", clock)
    (tmp_path / "s1.json").write_text("")  # its creator died between O_EXCL and the write
    clock.now = time.time()
    assert isinstance(store.try_acquire("s1"), LeaseInfo)
    clock.now = time.time() + 12
    assert isinstance(store.try_acquire("s1"), HeldLease)


@pytest.mark.parametrize("expired", [False, True], ids=["free", "expired"])
def test_only_one_of_many_racing_instances_gets_the_lease(tmp_path: Path, expired: bool) -> None:
    if expired:
        (tmp_path / "s1.json").write_text(json.dumps({"owner": "dead", "nonce": "n0", "expires": time.time() - 60}))
    stores = [LeaseStore(tmp_path, f"i{n}", duration=30) for n in range(8)]
    barrier = threading.Barrier(len(stores))
    results: list[HeldLease | LeaseInfo] = []

    def contend(store: LeaseStore) -> None:
        barrier.wait()
        results.append(store.try_acquire("s1"))

    threads = [threading.Thread(target=contend, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    winners = [r for r in results if isinstance(r, HeldLease)]
    assert len(results) == 8 and len(winners) == 1
    owner = LeaseStore(tmp_path, "reader").read("s1")
    assert owner is not None and owner.nonce == winners[0].nonce


def test_one_waiter_at_a_time_and_stale_waiters_are_replaced(tmp_path: Path) -> None:
    clock = FakeClock()
    b, c = _store(tmp_path, "b", clock), _store(tmp_path, "c", clock)
    waiter = b.register_waiter("s1", ttl=5)
    assert waiter is not None and c.has_waiter("s1")
    assert c.register_waiter("s1", ttl=5) is None
    b.remove_waiter(waiter)
    assert not c.has_waiter("s1")
    waiter = b.register_waiter("s1", ttl=5)
    assert waiter is not None
    clock.now += 6  # b gave up without cleaning up
    assert not c.has_waiter("s1")
    assert c.register_waiter("s1", ttl=5) is not None
    b.remove_waiter(waiter)  # a stale nonce removes nothing
    assert c.has_waiter("s1")
