"""Tokens: long, random, never logged, never stored, never echoed in an error frame."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import pytest
import websockets
from _support import ServerThread

from sandbox_asyncio import Sandbox
from sandbox_proto import SandboxConnectionError, SandboxException

pytestmark = pytest.mark.anyio


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and needle in path.read_bytes()]


async def test_ids_and_tokens_are_long_and_random(isolated: ServerThread) -> None:
    seen: set[str] = set()
    for _ in range(3):
        async with Sandbox.create(isolated.url) as sandbox:
            assert re.fullmatch(r"sandbox-[0-9a-f]{12}", sandbox.sandbox_id)  # 48 random bits
            assert re.fullmatch(r"[0-9a-f]{64}", sandbox.sandbox_token)  # 256 random bits
            seen |= {sandbox.sandbox_id, sandbox.sandbox_token}
    assert len(seen) == 6


async def test_tokens_stay_out_of_logs_state_files_and_error_frames(
    isolated: ServerThread, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sandbox = await Sandbox.create(isolated.url, enable_sandbox_checkpoint=True)
    token, sandbox_id = sandbox.sandbox_token, sandbox.sandbox_id
    process = await sandbox.exec("bash", "echo hi")
    await process.wait()
    await sandbox.checkpoint()
    # A restore (the attach reads the persisted hash), then wrong tokens, on the raw wire.
    again = await Sandbox.attach(isolated.url, sandbox_id, token)
    await again.close()
    ws_url = isolated.url.replace("http", "ws", 1)
    frames: list[str] = []
    for wrong in (token[:-1] + ("0" if token[-1] != "0" else "1"), token.upper(), ""):
        async with websockets.connect(f"{ws_url}/attach/{sandbox_id}?sandbox_token={wrong}") as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    frames.append(str(await ws.recv()))
    assert any("Invalid sandbox token" in f or "token" in f.lower() for f in frames)
    with pytest.raises((SandboxConnectionError, SandboxException)):
        await Sandbox.attach(isolated.url, sandbox_id, token[::-1])
    for frame in frames:
        assert token not in frame and token.upper() not in frame
    for record in caplog.records:
        assert token not in record.getMessage()
    assert token not in caplog.text
    assert not files_containing(state_dir, token.encode())
    record = json.loads((state_dir / "metadata" / f"{sandbox_id}.json").read_text())
    assert record["token_sha256"] != token and len(record["token_sha256"]) == 64
    final = await Sandbox.attach(isolated.url, sandbox_id, token)
    await final.kill()
