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
