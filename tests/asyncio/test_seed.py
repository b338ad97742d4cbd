"""The seed README's examples run unchanged through the `sandbox` compatibility alias."""

from __future__ import annotations

import pytest

from sandbox import Sandbox
from sandbox.sandbox import Sandbox as SandboxFromModule

pytestmark = pytest.mark.anyio


async def test_seed_basic_usage_as_written(url: str) -> None:
    # "Basic Usage", with the URL of our server and no TLS context.
    async with await Sandbox.create(url) as sandbox:
        process = await sandbox.exec("bash", "echo 'Hello from the sandbox!'")
        output = await process.stdout.read_all()
        assert output == "Hello from the sandbox!\n"
        await process.wait()


async def test_upstream_module_paths_name_the_same_class() -> None:
    assert SandboxFromModule is Sandbox


async def test_seed_checkpoint_example_as_written(url: str) -> None:
    # "Checkpointing and Attaching", TLS context included: it is ignored for a ws:// URL.
    import ssl

    import certifi

    ssl_context = ssl.create_default_context(cafile=certifi.where())
    sandbox1 = await Sandbox.create(url, enable_sandbox_checkpoint=True, ssl=ssl_context)
    sandbox_id = sandbox1.sandbox_id
    sandbox_token = sandbox1.sandbox_token
    process = await sandbox1.exec("bash", "echo work > state.txt")
    await process.wait()
    await sandbox1.checkpoint()
    async with await Sandbox.attach(url, sandbox_id, sandbox_token, ssl=ssl_context) as sandbox2:
        process = await sandbox2.exec("bash", "cat state.txt")
        assert await process.stdout.read_all() == "work\n"
