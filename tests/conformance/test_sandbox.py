"""End to end, on every transport: a client against the local server over a real loopback socket.

Written once; ``conftest.py`` runs it on websockets, aiohttp and trio, each
against the server in extended and in upstream protocol mode.
"""

from __future__ import annotations

import logging

import anyio
import pytest
from _support import Client, ServerThread, silent_server

from sandbox.exceptions import SandboxCreationError as UpstreamCreationError
from sandbox_proto import (
    SandboxConnectionError,
    SandboxCreationError,
    SandboxExecutionError,
    SandboxStateError,
    SandboxTimeoutError,
)

pytestmark = pytest.mark.anyio


async def test_python_and_bash_with_returncode(client: Client, server: ServerThread) -> None:
    async with client.create(server.url) as sandbox:
        process = await sandbox.exec("python", "print(6 * 7)")
        assert await process.stdout.read_all() == "42\n"
        code = await process.wait()
        process = await sandbox.exec("bash", "echo oops >&2; exit 3")
        assert await process.stderr.read_all() == "oops\n"
        failed = await process.wait()
    if server.protocol == "upstream":  # type: ignore[attr-defined]
        assert code is None and failed is None
    else:
        assert code == 0 and failed == 3
        assert process.returncode == 3


async def test_stderr_kept_apart_from_stdout(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        process = await sandbox.exec(
            "python", "import sys\nfor i in range(50):\n    print('out', i)\n    print('err', i, file=sys.stderr)"
        )
        results: dict[str, str] = {}

        async def read(name: str) -> None:
            results[name] = await getattr(process, name).read_all()

        async with anyio.create_task_group() as group:
            group.start_soon(read, "stdout")
            group.start_soon(read, "stderr")
        out, err = results["stdout"], results["stderr"]
        assert out == "".join(f"out {i}\n" for i in range(50))
        assert err == "".join(f"err {i}\n" for i in range(50))


async def test_input_fed_by_write_to_stdin(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        process = await sandbox.exec("python", "who = input(); print('hi ' + who)")
        await process.write_to_stdin("Ada\n")
        assert await process.stdout.read_all() == "hi Ada\n"
        await process.wait()


async def test_stdin_written_before_the_process_reads_is_kept(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        process = await sandbox.exec("python", "import time; time.sleep(0.3); print(input() + input())")
        await process.write_to_stdin("a\n")
        await process.write_to_stdin("b\n")
        assert await process.stdout.read_all() == "ab\n"


async def test_kill_sleep_returns_quickly_and_sandbox_runs_next_exec(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        process = await sandbox.exec("bash", "sleep 1000")
        started = anyio.current_time()
        await process.kill()
        await process.wait(timeout=5)
        assert anyio.current_time() - started < 5
        assert process.done
        process = await sandbox.exec("bash", "echo again")
        assert await process.stdout.read_all() == "again\n"


async def test_five_megabytes_of_output_intact(client: Client, url: str) -> None:
    size = 5 * 1024 * 1024
    async with client.create(url) as sandbox:
        process = await sandbox.exec(
            "python",
            f"import sys\nline = ''.join(chr(97 + i % 26) for i in range(1023)) + '\\n'\n"
            f"for _ in range({size // 1024}): sys.stdout.write(line)",
        )
        output = await process.stdout.read_all(timeout=120)
        await process.wait()
    line = "".join(chr(97 + i % 26) for i in range(1023)) + "\n"
    assert len(output) == size
    assert output == line * (size // 1024)


async def test_non_ascii_output_split_across_chunks(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        process = await sandbox.exec("python", "print('é' * 3000 + '☃' * 1000)")
        assert await process.stdout.read_all() == "é" * 3000 + "☃" * 1000 + "\n"


async def test_two_hundred_lines_through_async_for(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        process = await sandbox.exec("bash", "for i in $(seq 1 200); do echo line $i; done")
        lines = [line async for line in process.stdout]
        await process.wait()
    assert lines == [f"line {i}\n" for i in range(1, 201)]


async def test_file_written_by_one_exec_is_read_by_the_next(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        process = await sandbox.exec("python", "open('note.txt', 'w').write('kept between execs')")
        await process.wait()
        process = await sandbox.exec("bash", "cat note.txt")
        assert await process.stdout.read_all() == "kept between execs"


async def test_wrong_token_raises_upstream_error_with_server_message(client: Client, url: str) -> None:
    sandbox = await client.create(url)
    try:
        assert sandbox.sandbox_id is not None
        with pytest.raises(UpstreamCreationError) as caught:
            await client.attach(url, sandbox.sandbox_id, "not-the-token")
        assert caught.value.server_message == "Invalid sandbox token."
        assert "Invalid sandbox token." in str(caught.value)
    finally:
        await sandbox.kill()


async def test_unsupported_language_raises_with_server_message(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        with pytest.raises(SandboxExecutionError) as caught:
            await sandbox.exec("ruby", "puts 1")
        assert caught.value.server_message == "Unsupported language: 'ruby'. Supported languages are: python, bash"
        # The DONE that trails the refusal must not hit the next exec.
        process = await sandbox.exec("bash", "echo fine")
        assert await process.stdout.read_all() == "fine\n"


async def test_silent_server_makes_create_fail_within_its_timeout(client: Client) -> None:
    with silent_server() as hung_url:
        started = anyio.current_time()
        with pytest.raises((SandboxTimeoutError, SandboxConnectionError)):
            await client.create(hung_url, timeout=1.0)
        assert anyio.current_time() - started < 3


async def test_close_detaches_and_attach_resumes(client: Client, url: str) -> None:
    sandbox = await client.create(url)
    sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
    assert sandbox_id and token
    process = await sandbox.exec("bash", "echo kept > f.txt")
    await process.wait()
    await sandbox.close()
    with pytest.raises(SandboxStateError):
        await sandbox.exec("bash", "true")
    async with client.attach(url, sandbox_id, token) as again:
        process = await again.exec("bash", "cat f.txt")
        assert await process.stdout.read_all() == "kept\n"
    # Leaving `async with` killed it: the id is gone now.
    with pytest.raises(SandboxCreationError) as caught:
        await client.attach(url, sandbox_id, token)
    assert caught.value.status == "SANDBOX_NOT_FOUND"


async def test_second_attach_is_refused_as_in_use(client: Client, url: str) -> None:
    sandbox = await client.create(url)
    try:
        assert sandbox.sandbox_id and sandbox.sandbox_token
        await sandbox.close()
        first = await client.attach(url, sandbox.sandbox_id, sandbox.sandbox_token)
        with pytest.raises(SandboxCreationError) as caught:
            await client.attach(url, sandbox.sandbox_id, sandbox.sandbox_token)
        assert caught.value.status == "SANDBOX_IN_USE"
        process = await first.exec("bash", "echo still mine")
        assert await process.stdout.read_all() == "still mine\n"
        await first.kill()
    finally:
        await sandbox.kill()


async def test_token_never_in_repr_errors_or_debug_logs(
    client: Client, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sandbox = await client.create(url, enable_debug=True, debug_label="t")
    token = sandbox.sandbox_token
    assert token and sandbox.sandbox_id
    await sandbox.close()
    attached = await client.attach(url, sandbox.sandbox_id, token, enable_debug=True)
    try:
        process = await attached.exec("bash", "echo hi")
        await process.wait()
        texts = [repr(attached), repr(process), repr(attached._protocol)]
        with pytest.raises(SandboxCreationError) as caught:
            await client.attach(url, sandbox.sandbox_id, token)  # in use
        texts.append(str(caught.value))
    finally:
        await attached.kill()
    texts += [record.getMessage() for record in caplog.records]
    assert any("attach" in text for text in texts)  # the logs did cover the attach
    assert not [text for text in texts if token in text]


async def test_exec_while_a_process_runs_is_a_state_error(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        process = await sandbox.exec("bash", "sleep 30")
        with pytest.raises(SandboxStateError):
            await sandbox.exec("bash", "true")
        await process.kill()


async def test_http_and_trailing_slash_urls_are_accepted(client: Client, url: str) -> None:
    assert url.startswith("http://")
    async with client.create(url + "//") as sandbox:
        process = await sandbox.exec("python", "print('ok')")
        assert await process.stdout.read_all() == "ok\n"
