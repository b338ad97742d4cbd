"""What only trio has: nurseries, and cancellation by trio's rules."""

from __future__ import annotations

import pytest
import trio

from sandbox_proto import SandboxStateError
from sandbox_trio import Sandbox

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def test_await_without_a_nursery_says_how_to_do_it(url: str) -> None:
    with pytest.raises(SandboxStateError, match="nursery"):
        await Sandbox.create(url)


async def test_async_with_brings_its_own_nursery(url: str) -> None:
    async with Sandbox.create(url) as sandbox:
        process = await sandbox.exec("python", "print(6 * 7)")
        assert await process.stdout.read_all() == "42\n"


async def test_a_sandbox_outlives_the_block_in_the_callers_nursery(url: str) -> None:
    async with trio.open_nursery() as nursery:
        sandbox = await Sandbox.create(url, nursery=nursery)
        process = await sandbox.exec("bash", "echo kept")
        assert await process.stdout.read_all() == "kept\n"
        await sandbox.kill()
    # The nursery closed by itself: the sandbox left no task behind.


async def test_cancelled_wait_leaves_sandbox_usable(url: str) -> None:
    async with Sandbox.create(url) as sandbox:
        process = await sandbox.exec("bash", "sleep 30")
        with trio.move_on_after(0.2) as scope:
            await process.wait()
        assert scope.cancelled_caught
        with trio.move_on_after(0.2):
            await process.stdout.read_all()
        await process.kill()
        again = await sandbox.exec("bash", "echo usable")
        assert await again.stdout.read_all() == "usable\n"


async def test_cancelled_exec_is_killed_once_it_starts(url: str) -> None:
    async with Sandbox.create(url) as sandbox:
        with trio.CancelScope() as scope:
            scope.cancel()
            await sandbox.exec("bash", "sleep 30")
        # The cancelled exec is killed as soon as it starts; then the sandbox takes the next one.
        with trio.fail_after(10):
            while True:
                try:
                    process = await sandbox.exec("bash", "echo next")
                    break
                except SandboxStateError:
                    await trio.sleep(0.05)
        assert await process.stdout.read_all() == "next\n"
