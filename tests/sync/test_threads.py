"""A sandbox belongs to no thread: made in one, used from others, also while their loop runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from sandbox_sync import Sandbox, SandboxStateError, SandboxTimeoutError


def in_thread(function: Callable[[], Any]) -> Any:
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function).result(timeout=60)


def test_created_in_one_thread_used_from_another(local_url: str) -> None:
    sandbox = in_thread(lambda: Sandbox.create(local_url))
    try:
        assert in_thread(lambda: sandbox.run("python", "print(6 * 7)")).stdout == "42\n"
        process = sandbox.exec("bash", "read x; echo got $x")
        in_thread(lambda: process.write_to_stdin("it\n"))
        assert process.stdout.read_all() == "got it\n"
        assert in_thread(process.wait) == 0
    finally:
        in_thread(sandbox.kill)
    assert sandbox.state == "killed"


def test_two_threads_read_stdout_and_stderr_at_once(local_url: str) -> None:
    code = "import sys\nfor i in range(2000):\n    print('out', i)\n    print('err', i, file=sys.stderr)"
    with Sandbox.create(local_url, stream_buffer_size=4096) as sandbox:
        process = sandbox.exec("python", code)
        # Small buffers: neither stream can be read to its end without the other being read too.
        with ThreadPoolExecutor(2) as pool:
            err = pool.submit(process.stderr.read_all)
            out = pool.submit(process.stdout.read_all)
            assert out.result(timeout=60) == "".join(f"out {i}\n" for i in range(2000))
            assert err.result(timeout=60) == "".join(f"err {i}\n" for i in range(2000))


def test_from_a_coroutine_under_asyncio_run(local_url: str) -> None:
    # What a notebook cell does: the sync API called while this thread's event loop runs.
    async def cell() -> str:
        with Sandbox.create(local_url) as sandbox:
            lines = list(sandbox.exec("bash", "echo a; echo b").stdout)
            return "".join(lines) + sandbox.run("bash", "echo c").stdout

    assert asyncio.run(cell()) == "a\nb\nc\n"


def test_streams_iterate_lines_and_honour_read_timeout(local_url: str) -> None:
    with Sandbox.create(local_url) as sandbox:
        process = sandbox.exec("bash", "for i in 1 2 3; do echo line $i; done")
        assert [line for line in process.stdout] == ["line 1\n", "line 2\n", "line 3\n"]
        assert process.wait() == 0 and process.done and process.returncode == 0
        process = sandbox.exec("bash", "sleep 600")
        process.stdout.read_timeout = 0.2
        with pytest.raises(SandboxTimeoutError):
            next(iter(process.stdout))
        with pytest.raises(SandboxStateError):
            sandbox.exec("bash", "true")  # the sleep still runs
        process.kill()


def test_files_and_leaving_iter_file_early(local_url: str) -> None:
    with Sandbox.create(local_url) as sandbox:
        content = bytes(range(256)) * 4000  # several chunks
        sandbox.write_file("data.bin", content)
        assert sandbox.read_file("data.bin") == content
        assert sandbox.list_dir() == ["data.bin"]
        for chunk in sandbox.iter_file("data.bin"):
            assert chunk
            break
        # Leaving the loop ended the reading process at once: the sandbox is free.
        assert sandbox.run("bash", "echo free").stdout == "free\n"
        sandbox.write_file("t.txt", "héllo")
        assert sandbox.read_text("t.txt") == "héllo"


def test_run_with_env_cwd_stdin_and_check(local_url: str) -> None:
    with Sandbox.create(local_url) as sandbox:
        code = 'read x; echo "$GREETING $x from $(pwd)"'
        result = sandbox.run("bash", code, stdin="Ada\n", env={"GREETING": "hi"}, cwd="/tmp")
        assert (result.stdout, result.exit_code) == ("hi Ada from /tmp\n", 0)
        process = sandbox.exec("python", "import os; print(os.environ['X'], os.getcwd())", env={"X": "1"}, cwd="/tmp")
        assert process.stdout.read_all() == "1 /tmp\n"
        from sandbox_sync import SandboxProcessError

        with pytest.raises(SandboxProcessError):
            sandbox.run("bash", "exit 3", check=True)


def test_close_then_attach_from_another_thread(local_url: str) -> None:
    sandbox = Sandbox.create(local_url)
    sandbox.write_file("kept.txt", "kept")
    sandbox.close()
    assert sandbox.state == "closed"
    assert sandbox.sandbox_id and sandbox.sandbox_token

    def attach_and_read() -> str:
        assert sandbox.sandbox_id and sandbox.sandbox_token
        with Sandbox.attach(local_url, sandbox.sandbox_id, sandbox.sandbox_token) as again:
            assert "exit_code" in again.extensions
            return again.read_text("kept.txt")

    assert in_thread(attach_and_read) == "kept"


def test_concurrent_sandboxes_from_many_threads(local_url: str) -> None:
    barrier = threading.Barrier(4)

    def one(i: int) -> str:
        with Sandbox.create(local_url) as sandbox:
            barrier.wait(timeout=30)  # all four open at once
            return sandbox.run("bash", f"echo {i}").stdout

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4), timeout=60)) == [f"{i}\n" for i in range(4)]
