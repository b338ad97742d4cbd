"""What only trio has: nurseries, and cancellation by trio's rules."""

from __future__ import annotations

import logging

import pytest
import trio

from sandbox_proto import SandboxStateError, SandboxTimeoutError
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


async def test_an_error_in_the_block_arrives_bare(url: str) -> None:
    """As on asyncio: the block's own exception, not an exception group from the block's nursery."""
    with pytest.raises(ValueError, match="from the block") as raised:
        async with Sandbox.create(url) as sandbox:
            process = await sandbox.exec("bash", "echo hi")
            await process.wait()
            raise ValueError("from the block")
    assert raised.traceback[-1].name == "test_an_error_in_the_block_arrives_bare"


async def test_a_timeout_in_the_block_arrives_bare(url: str) -> None:
    with pytest.raises(SandboxTimeoutError):
        async with Sandbox.create(url) as sandbox:
            process = await sandbox.exec("bash", "sleep 5")
            await process.wait(timeout=0.01)


async def test_the_blocks_error_wins_over_a_failure_in_the_background(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    with pytest.raises(ValueError, match="from the block"):
        async with Sandbox.create(url) as sandbox:
            failed = trio.Event()

            async def fail() -> None:
                failed.set()
                raise RuntimeError("a bug in the background")

            sandbox._transport.nursery.start_soon(fail)  # where the sandbox's own tasks run
            await failed.wait()  # no checkpoint after it: the nursery's cancel has not reached us
            raise ValueError("from the block")
    assert "a bug in the background" in caplog.text
