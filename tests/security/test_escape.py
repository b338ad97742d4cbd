"""Sandboxed code trying to get out, end to end through the client, against a bwrap server.

Each attack must be contained and reported, and the server must stay up:
every test ends by running an exec in a fresh sandbox.
"""

from __future__ import annotations

import asyncio
import os
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest
from _support import ServerThread
from security._limits import LIMITS

from sandbox_asyncio import Sandbox
from sandbox_proto import SandboxExecutionError

pytestmark = pytest.mark.anyio


async def run(sandbox: Any, language: str, code: str, timeout: float = 20) -> tuple[str, str, int | None]:
    process = await sandbox.exec(language, textwrap.dedent(code))
    async with asyncio.timeout(timeout):
        out, err = await asyncio.gather(process.stdout.read_all(), process.stderr.read_all())
        return out, err, await process.wait()


async def assert_server_up(url: str) -> None:
    """Another sandbox still gets a prompt answer."""
    async with asyncio.timeout(10), Sandbox.create(url) as other:
        assert await run(other, "bash", "echo alive") == ("alive\n", "", 0)


def sandbox_dirs(state_dir: Path, sandbox_id: str) -> list[Path]:
    return list(state_dir.glob(f"instances/*/sandboxes/{sandbox_id}"))


async def test_writes_outside_the_sandboxs_own_files_fail(isolated: ServerThread, state_dir: Path) -> None:
    # The sandbox's root is its own (as on the real service), so /escape stays inside it.
    targets = ["/etc/escape", "/usr/escape", "/root/escape", "/work/escape", str(state_dir / "escape"), "/proc/escape"]
    code = f"""
        import sys
        for path in {targets!r}:
            try:
                open(path, "w").write("x")
            except OSError as exc:
                print("denied", path, type(exc).__name__)
            else:
                print("WROTE", path)
        open("inside.txt", "w").write("fine")
        open("/escape", "w").write("mine")
        print(open("/sandbox/inside.txt").read())
        """
    async with Sandbox.create(isolated.url) as sandbox:
        out, err, code_ = await run(sandbox, "python", code)
        assert code_ == 0, err
        assert "WROTE" not in out
        assert out.count("denied") == len(targets)
        assert out.endswith("fine\n")
        (directory,) = sandbox_dirs(state_dir, sandbox.sandbox_id)
        assert (directory / "sandbox" / "inside.txt").read_text() == "fine"
        assert (directory / "escape").read_text() == "mine"
    assert not any(map(os.path.exists, [*targets, "/escape"]))
    await assert_server_up(isolated.url)


async def test_the_host_is_hidden(isolated: ServerThread, state_dir: Path) -> None:
    code = """
        import os, socket
        print(socket.gethostname())
        print(os.path.exists("/etc/shadow"), os.path.exists("/work/main"), os.getcwd(), os.environ["HOME"])
        print(os.getuid() != 0, len([p for p in os.listdir("/proc") if p.isdigit()]) < 5)
        """
    async with Sandbox.create(isolated.url) as sandbox:
        out, err, _ = await run(sandbox, "python", code)
        assert out.splitlines() == [sandbox.sandbox_id, "False False /sandbox /sandbox", "True True"], err
        # Tracebacks name the bundle mount, not a server path.
        _, err, _ = await run(sandbox, "python", "raise ValueError('x')")
        assert 'File "/run/sandbox/main.py"' in err and str(state_dir) not in err
    await assert_server_up(isolated.url)


async def test_another_sandboxs_files_are_out_of_reach(isolated: ServerThread, state_dir: Path) -> None:
    async with Sandbox.create(isolated.url) as first, Sandbox.create(isolated.url) as second:
        await run(first, "bash", "echo secret > secret.txt")
        (directory,) = sandbox_dirs(state_dir, first.sandbox_id)
        target = directory / "sandbox" / "secret.txt"
        assert target.read_text() == "secret\n"
        code = f"""
            import os
            for path in [{str(target)!r}, {str(state_dir)!r}, "/proc/1/root/" + {str(target)!r}]:
                try:
                    print(open(path).read() if os.path.isfile(path) else os.listdir(path))
                except OSError as exc:
                    print("denied", type(exc).__name__)
            """
        out, _, _ = await run(second, "python", code)
        assert "secret" not in out
        assert out.count("denied") == 3
    await assert_server_up(isolated.url)


async def test_no_network_not_even_the_hosts_loopback(isolated: ServerThread) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0)
        port = listener.getsockname()[1]
        code = f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=3)
            except OSError as exc:
                print("refused", type(exc).__name__)
            else:
                print("CONNECTED")
            try:
                socket.create_connection(("1.1.1.1", 80), timeout=3)
            except OSError as exc:
                print("refused", type(exc).__name__)
            """
        async with Sandbox.create(isolated.url) as sandbox:
            out, err, _ = await run(sandbox, "python", code)
        assert out.splitlines() == ["refused ConnectionRefusedError", "refused OSError"], err
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the host's listener
    await assert_server_up(isolated.url)


async def test_fork_bomb_is_bounded_and_others_stay_responsive(isolated: ServerThread) -> None:
    counting = """
        import os, time
        children = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
        except OSError as exc:
            print("fork failed after", children, exc.strerror)
        """
    async with Sandbox.create(isolated.url) as sandbox:
        out, _, _ = await run(sandbox, "python", counting)
        assert out.startswith("fork failed after")
        assert int(out.split()[3]) < LIMITS.processes
        # The classic one, left running: it must not starve the server or other sandboxes.
        bomb = await sandbox.exec("bash", ":(){ :|:& };:\nwait")
        await asyncio.sleep(1.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await assert_server_up(isolated.url)
        assert loop.time() - started < 8
        await bomb.kill()
        async with asyncio.timeout(10):
            await bomb.wait()
        # The sandbox itself is usable again: nothing of the bomb survived the kill.
        out, _, _ = await run(sandbox, "bash", "ps -e --no-headers | wc -l")
        assert int(out) <= 4  # bwrap's init, bash, ps, wc
    await assert_server_up(isolated.url)


async def test_memory_hog_gets_a_memory_error(isolated: ServerThread) -> None:
    async with Sandbox.create(isolated.url) as sandbox:
        out, err, code = await run(sandbox, "python", "hog = bytearray(2 * 1024**3)\nprint('GOT IT')")
        assert "MemoryError" in err and out == "" and code == 1
        # The same sandbox goes on working.
        assert (await run(sandbox, "python", "print(len(bytearray(10**6)))"))[0] == "1000000\n"
    await assert_server_up(isolated.url)


async def test_infinite_loop_hits_the_cpu_limit(isolated: ServerThread) -> None:
    async with Sandbox.create(isolated.url) as sandbox:
        _, err, code = await run(sandbox, "python", "while True:\n    pass", timeout=LIMITS.cpu_seconds + 15)
        assert "CPU time limit exceeded" in err
        assert code == 128 + 24  # SIGXCPU, as bwrap reports a signal
    await assert_server_up(isolated.url)


async def test_infinite_loop_ended_by_kill_process(isolated: ServerThread) -> None:
    async with Sandbox.create(isolated.url) as sandbox:
        process = await sandbox.exec("bash", "while :; do :; done")
        await asyncio.sleep(0.3)
        await process.kill()
        async with asyncio.timeout(5):
            await process.wait()
    await assert_server_up(isolated.url)


async def test_closed_stdout_does_not_hang_the_exec(isolated: ServerThread) -> None:
    async with Sandbox.create(isolated.url) as sandbox:
        # Closes both output streams, lingers, exits: DONE follows the exit.
        out, _, code = await run(sandbox, "bash", "echo before; exec >&- 2>&-; sleep 0.5; exit 4")
        assert (out, code) == ("before\n", 4)
        # Closes them and runs on, with a child holding nothing: kill_process ends it.
        process = await sandbox.exec("python", "import os, time\nos.close(1)\nos.close(2)\nos.fork()\ntime.sleep(600)")
        await asyncio.sleep(0.3)
        await process.kill()
        async with asyncio.timeout(5):
            await process.wait()
    await assert_server_up(isolated.url)


async def test_output_flood_is_cut_at_the_output_limit(isolated: ServerThread) -> None:
    async with Sandbox.create(isolated.url) as sandbox:
        out, err, code = await run(sandbox, "bash", "yes flood")
        assert len(out.encode()) <= LIMITS.output
        assert len(out.encode()) > LIMITS.output // 2
        assert "output limit exceeded" in err
        assert code == -9
        assert (await run(sandbox, "bash", "echo next"))[0] == "next\n"
    await assert_server_up(isolated.url)


async def test_oversized_code_is_refused(isolated: ServerThread) -> None:
    async with Sandbox.create(isolated.url) as sandbox:
        with pytest.raises(SandboxExecutionError, match="Code too large"):
            process = await sandbox.exec("python", "#" * (LIMITS.code + 1))
            await process.wait()
        assert (await run(sandbox, "bash", "echo next"))[0] == "next\n"
    await assert_server_up(isolated.url)
