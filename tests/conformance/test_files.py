"""File helpers, built on exec and stdin, on every transport and both protocol modes."""

from __future__ import annotations

import os

import pytest
from _support import Client

from sandbox_proto import SandboxExecutionError

pytestmark = pytest.mark.anyio


async def test_write_read_and_list(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        await sandbox.write_file("hello.txt", "héllo\n")
        await sandbox.write_file("data.bin", bytes(range(256)) * 3)
        assert await sandbox.read_text("hello.txt") == "héllo\n"
        assert await sandbox.read_file("data.bin") == bytes(range(256)) * 3
        assert {"hello.txt", "data.bin"} <= set(await sandbox.list_dir("."))
        # The files are ordinary files to the code that runs there.
        process = await sandbox.exec("bash", "wc -c < data.bin")
        assert await process.stdout.read_all() == "768\n"


async def test_large_file_round_trip_in_chunks(client: Client, url: str) -> None:
    content = os.urandom(3 * 2**20 + 17)
    async with client.create(url) as sandbox:
        await sandbox.write_file("big.bin", content)
        chunks = [chunk async for chunk in sandbox.iter_file("big.bin")]
        assert len(chunks) > 1
        assert b"".join(chunks) == content


async def test_missing_file_says_so_and_leaves_the_sandbox_usable(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        with pytest.raises(SandboxExecutionError, match="No such file"):
            await sandbox.read_file("absent.txt")
        with pytest.raises(SandboxExecutionError, match="No such file"):
            await sandbox.write_file("no/such/dir/f.txt", b"x")
        with pytest.raises(SandboxExecutionError):
            await sandbox.list_dir("absent")
        assert await sandbox.list_dir(".") == []


async def test_path_is_data_not_code(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        tricky = "x'); import os; os.system('touch pwned'); ('"
        await sandbox.write_file(tricky, "content")
        assert await sandbox.read_text(tricky) == "content"
        assert "pwned" not in await sandbox.list_dir(".")
