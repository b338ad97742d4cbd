"""The runtimes' native deadlines and events, and how they nest with other cancellations.

On asyncio the deadline cancels the task natively (``Task.cancel``/``uncancel``, as
``asyncio.timeout``): it must turn only its own cancellation into
:class:`SandboxTimeoutError`, and leave anyio's scopes, ``asyncio.timeout`` and task
groups around or inside it working as they do with each other.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest
import trio

from _sandbox_anyio._process import Flag, Outcome, Wakeup
from _sandbox_anyio._runtime import ANYIO, Runtime
from sandbox_asyncio._runtime import ASYNCIO
from sandbox_proto import SandboxStateError, SandboxTimeoutError
from sandbox_trio._runtime import TRIO

pytestmark = pytest.mark.anyio

MESSAGE = "starting the exec took longer than 0.05s"


def _current() -> asyncio.Task[object]:
    task = asyncio.current_task()
    assert task is not None
    return task


# -- asyncio


async def test_asyncio_deadline_raises_the_timeout_and_leaves_no_cancellation() -> None:
    with pytest.raises(SandboxTimeoutError, match=f"^{MESSAGE}$"), ASYNCIO.deadline(0.05, "starting the exec"):
        await asyncio.sleep(5)
    assert _current().cancelling() == 0
    await asyncio.sleep(0)  # no cancellation left pending either


async def test_asyncio_deadline_that_does_not_fire_changes_nothing() -> None:
    with ASYNCIO.deadline(5, "waiting"):
        await asyncio.sleep(0)
    with ASYNCIO.deadline(None, "waiting"):
        await asyncio.sleep(0)
    assert _current().cancelling() == 0


async def test_an_outer_anyio_scope_cancelling_the_wait_is_not_a_timeout() -> None:
    with anyio.move_on_after(0.05) as outer:
        with ASYNCIO.deadline(5, "waiting"):
            await asyncio.sleep(5)
    assert outer.cancelled_caught
    assert _current().cancelling() == 0


async def test_an_outer_asyncio_timeout_is_its_own_timeout() -> None:
    with pytest.raises(TimeoutError) as raised:
        async with asyncio.timeout(0.05):
            with ASYNCIO.deadline(5, "waiting"):
                await asyncio.sleep(5)
    assert not isinstance(raised.value, SandboxTimeoutError)
    assert _current().cancelling() == 0


async def test_when_both_fire_in_one_turn_either_ends_the_wait_and_nothing_leaks() -> None:
    """The race of any two native cancellations (``asyncio.timeout`` has it too): one wins, cleanly."""
    loop = asyncio.get_running_loop()
    timed_out = False
    with anyio.CancelScope() as outer:
        try:
            with ASYNCIO.deadline(0.05, "waiting"):
                loop.call_later(0.05, outer.cancel)  # due in the same loop turn as the deadline
                await asyncio.sleep(5)
        except SandboxTimeoutError:
            timed_out = True
    assert timed_out != outer.cancelled_caught
    assert _current().cancelling() == 0
    await asyncio.sleep(0.01)  # and no cancellation is left to land later


async def test_a_task_group_inside_the_deadline_times_out_cleanly() -> None:
    """As in ``run()``: the deadline cancels the host of an anyio task group."""
    children_cancelled = 0

    async def child() -> None:
        nonlocal children_cancelled
        try:
            await anyio.sleep(5)
        except anyio.get_cancelled_exc_class():
            children_cancelled += 1
            raise

    with pytest.raises(SandboxTimeoutError, match=f"^{MESSAGE}$"), ASYNCIO.deadline(0.05, "starting the exec"):
        async with anyio.create_task_group() as group:
            group.start_soon(child)
            group.start_soon(child)
            await anyio.sleep(5)
    assert children_cancelled == 2
    assert _current().cancelling() == 0


async def test_an_anyio_deadline_inside_the_native_one_keeps_its_own_timeout() -> None:
    with ASYNCIO.deadline(5, "waiting"), pytest.raises(TimeoutError):
        with anyio.fail_after(0.05):
            await asyncio.sleep(5)
    assert _current().cancelling() == 0


async def test_asyncio_event_forgets_a_cancelled_waiter() -> None:
    event = ASYNCIO.event()
    for _ in range(3):
        with anyio.move_on_after(0.01):
            await event.wait()
    assert event._waiters == []  # retried waits do not pile up futures
    waiter = asyncio.ensure_future(event.wait())
    await asyncio.sleep(0)
    event.set()
    await asyncio.wait_for(waiter, 1)
    await event.wait()  # set: returns at once


# -- trio


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_deadline_raises_the_timeout() -> None:
    with pytest.raises(SandboxTimeoutError, match=f"^{MESSAGE}$"), TRIO.deadline(0.05, "starting the exec"):
        await trio.sleep(5)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_outer_cancellation_is_not_a_timeout() -> None:
    with trio.move_on_after(0.05) as outer:
        with TRIO.deadline(5, "waiting"):
            await trio.sleep(5)
    assert outer.cancelled_caught


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_waiting_on_a_set_flag_still_checks_for_cancellation() -> None:
    flag = Flag(TRIO)
    flag.set()
    with trio.CancelScope() as scope:
        scope.cancel()
        await flag.wait()
        pytest.fail("a cancelled wait on a set flag returned")


# -- every runtime: the driver's own primitives on top


@pytest.mark.parametrize(
    ("anyio_backend", "runtime"),
    [("asyncio", ASYNCIO), ("trio", TRIO), ("asyncio", ANYIO), ("trio", ANYIO)],
    ids=["asyncio", "trio", "anyio-asyncio", "anyio-trio"],
)
async def test_flag_outcome_and_wakeup(runtime: Runtime) -> None:
    flag, outcome, wakeup = Flag(runtime), Outcome(runtime), Wakeup(runtime)
    woken: list[str] = []

    async def wait_for(name: str, waiting: Flag | Outcome | Wakeup) -> None:
        try:
            await waiting.wait()
        except SandboxStateError:
            woken.append(f"{name} failed")
        else:
            woken.append(name)

    async with anyio.create_task_group() as group:
        for name, waiting in (("flag", flag), ("outcome", outcome), ("wakeup", wakeup)):
            group.start_soon(wait_for, name, waiting)
        await anyio.sleep(0.01)
        flag.set()
        outcome.resolve(SandboxStateError("no"))
        wakeup.set()
    assert sorted(woken) == ["flag", "outcome failed", "wakeup"]
    assert flag.is_set and outcome.is_set
    with pytest.raises(SandboxStateError):
        await outcome.wait()  # resolved: the error at once
    with anyio.move_on_after(0.01) as scope:
        await wakeup.wait()  # a wake-up is for the waits of its time only
    assert scope.cancelled_caught
