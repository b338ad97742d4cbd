"""Server behaviour beyond the vectors: processes, detached output, seq replay, HTTP, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from server._server_wire import Wire, attach_when_free, err, group_alive, pid_alive, st, wait_group_gone
from websockets.exceptions import InvalidStatus

from sandbox_server import LocalServer
from sandbox_server._output import OutputLog

pytestmark = pytest.mark.anyio


# -- processes --------------------------------------------------------------------


async def test_kill_process_kills_the_whole_group_quickly(plain_local: LocalServer) -> None:
    wire = await Wire.create(plain_local.url, "extended")
    await wire.send({"language": "bash", "code": "sleep 1000 & echo $$; sleep 1000"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    pgid = int((await wire.frame())["data"])
    assert group_alive(pgid)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await wire.send({"action": "kill_process"})
    result = await wire.collect()
    if st("SANDBOX_EXECUTION_FORCE_KILLED") not in result.statuses:  # either order (7.5)
        await wire.expect(st("SANDBOX_EXECUTION_FORCE_KILLED"))
    assert result.exit_code == -signal.SIGKILL
    assert loop.time() - started < 2
    await wait_group_gone(pgid)


async def test_exec_right_behind_a_kill_is_accepted(plain_local: LocalServer) -> None:
    # Upstream forgets a killed process at once; a client that kills and then execs (as ours does
    # for an exec whose start it never saw) must not be told an execution is still in progress.
    wire = await Wire.create(plain_local.url, "extended")
    await wire.send({"language": "bash", "code": "sleep 1000"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await wire.send({"action": "kill_process"})
    await wire.send({"language": "bash", "code": "echo ok"})
    texts = [await wire.text() for _ in range(3)]
    assert sorted(texts[:2]) == sorted([st("SANDBOX_EXECUTION_FORCE_KILLED"), st("SANDBOX_EXECUTION_DONE")])
    assert texts[2] == st("SANDBOX_EXECUTION_RUNNING")
    result = await wire.collect()
    assert result.stdout == "ok\n"


async def test_five_megabytes_of_output_intact(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    code = "import sys\nline = ''.join(chr(48 + i % 75) for i in range(99)) + '\\n'\nsys.stdout.write(line * 50000)"
    result = await wire.run("python", code)
    line = "".join(chr(48 + i % 75) for i in range(99)) + "\n"
    assert len(result.stdout) == 5_000_000
    assert result.stdout == line * 50000
    if any_local.protocol == "extended":
        assert result.seqs == list(range(1, len(result.seqs) + 1))


async def test_multibyte_characters_split_across_reads_survive(local: LocalServer) -> None:
    wire = await Wire.create(local.url, "extended")
    # 3-byte characters: 1024-byte reads split them (S2); invalid bytes become U+FFFD.
    result = await wire.run("python", "import sys\nsys.stdout.write('€' * 3000)\nsys.stderr.buffer.write(b'a\\xffb')")
    assert result.stdout == "€" * 3000
    assert result.stderr == "a\ufffdb"


async def test_files_persist_between_execs_in_the_sandbox_directory(plain_local: LocalServer) -> None:
    wire = await Wire.create(plain_local.url, "extended")
    await wire.run("bash", "printf 'v1\\n' > note.txt")
    result = await wire.run("python", "import os; print(open('note.txt').read(), end=''); print(os.getcwd())")
    sandbox = plain_local.manager.get(wire.sandbox_id)
    assert sandbox is not None
    assert result.stdout.splitlines() == ["v1", str(sandbox.directory)]
    other = await Wire.create(plain_local.url, "extended")
    assert (await other.run("bash", "ls")).stdout == ""  # each sandbox has its own directory
    env = await wire.run("python", "import os, sys; print(sorted(os.environ)); print(sys.flags.dont_write_bytecode)")
    assert "HOME" in env.stdout and "LANG" in env.stdout


async def test_close_stdin_ends_a_program_reading_to_eof(any_local: LocalServer) -> None:
    wire = await Wire.create(any_local.url, any_local.protocol)
    await wire.send({"language": "python", "code": "import sys; print(len(sys.stdin.read()))"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await wire.send({"event": "stdin", "data": "abc"})
    await wire.send({"action": "close_stdin"})
    if any_local.protocol == "upstream":
        # Not advertised: an unknown action is an exec request (3.1), refused as running.
        await wire.expect(
            st("SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR"),
            err("Unsupported language: 'None'. Supported languages are: python, bash"),
        )
        await wire.send({"action": "kill_process"})
        await wire.collect()
        return
    result = await wire.collect()
    assert result.stdout == "3\n"


async def test_stdin_to_a_process_that_closed_it_is_a_sandbox_error(plain_local: LocalServer) -> None:
    wire = await Wire.create(plain_local.url, "extended")
    code = "import os, sys, time; os.close(0); sys.stdout.write('closed\\n'); time.sleep(30)"
    await wire.send({"language": "python", "code": code})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"), '{"event":"stdout","data":"closed\\n"}')
    await wire.send({"event": "stdin", "data": "x" * 100000})
    assert await wire.text() == st("SANDBOX_ERROR")
    frame = await wire.frame()
    assert frame["event"] == "error" and "stdin" in frame["message"]
    await wire.send({"action": "kill_process"})
    await wire.collect()  # connection still open, exec still ours


async def test_malformed_frames_after_setup_leave_the_connection_open(local: LocalServer) -> None:
    wire = await Wire.create(local.url, "extended")
    for bad in (b"\x01\x02", "{not json", "[1]"):
        await wire.send(bad)
        assert await wire.text() == st("SANDBOX_ERROR")
        assert (await wire.frame())["event"] == "error"
    assert (await wire.run("bash", "echo fine")).stdout == "fine\n"


async def test_non_string_code_is_an_unexpected_error(local: LocalServer) -> None:
    wire = await Wire.create(local.url, "extended")
    await wire.send({"language": "python", "code": 5})
    assert await wire.text() == st("SANDBOX_ERROR")
    assert (await wire.frame())["event"] == "error"
    await wire.expect_close(4000)


async def test_message_over_16_mib_closes_with_1009(local: LocalServer) -> None:
    wire = await Wire.create(local.url, "extended")
    await wire.send({"language": "python", "code": "#" * (16 * 2**20 + 10)})
    await wire.expect_close(1009)


# -- detach, reattach, replay -----------------------------------------------------


async def test_process_outlives_its_connection_and_output_waits(local: LocalServer) -> None:
    first = await Wire.create(local.url, "extended")
    await first.send({"language": "bash", "code": "read line; echo got $line; echo done > flag"})
    await first.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await first.close()
    second = await attach_when_free(local.url, "extended", first)
    await second.expect(st("SANDBOX_RUNNING"))
    # The process is still running and still ours: stdin reaches it before any reconnect.
    await second.send({"event": "stdin", "data": "hello\n"})
    await second.send({"action": "reconnect"})
    await second.expect(st("SANDBOX_EXECUTION_RUNNING"))
    result = await second.collect()
    assert result.stdout == "got hello\n"
    assert result.exit_code == 0
    assert (await second.run("bash", "cat flag")).stdout == "done\n"


async def test_finished_exec_output_is_delivered_after_reattach(local: LocalServer) -> None:
    first = await Wire.create(local.url, "extended")
    await first.send({"language": "bash", "code": "read x; echo one; echo two >&2; exit 4"})
    await first.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await first.send({"event": "stdin", "data": "\n"})
    first.ws.transport.abort()
    sandbox = local.manager.get(first.sandbox_id)
    assert sandbox is not None and sandbox.execution is not None
    await sandbox.execution.finished.wait()
    second = await attach_when_free(local.url, "extended", first)
    await second.expect(st("SANDBOX_RUNNING"))
    await second.send({"action": "reconnect"})
    await second.expect(st("SANDBOX_EXECUTION_RUNNING"))
    result = await second.collect()
    assert (result.stdout, result.stderr, result.exit_code) == ("one\n", "two\n", 4)
    # Delivered now: a second reconnect is a single DONE.
    await second.send({"action": "reconnect"})
    await second.expect(st("SANDBOX_EXECUTION_DONE"))


async def test_reconnect_with_last_seq_replays_what_was_lost(local: LocalServer) -> None:
    first = await Wire.create(local.url, "extended")
    await first.send({"language": "bash", "code": "echo a; read x; echo b; read y; echo c"})
    await first.expect(st("SANDBOX_EXECUTION_RUNNING"))
    assert (await first.frame())["data"] == "a\n"
    await first.send({"event": "stdin", "data": "\n"})
    assert (await first.frame())["data"] == "b\n"
    assert first.last_raw["seq"] == 2
    first.ws.transport.abort()
    # The client pretends it only saw seq 1: "b" was written to a dying socket.
    second = await attach_when_free(local.url, "extended", first)
    await second.expect(st("SANDBOX_RUNNING"))
    await second.send({"action": "reconnect", "last_seq": 1})
    await second.expect(st("SANDBOX_EXECUTION_RUNNING"))
    await second.send({"event": "stdin", "data": "\n"})
    result = await second.collect()
    assert result.stdout == "b\nc\n"
    assert result.seqs == [2, 3]


async def test_output_gap_when_replay_was_evicted(tmp_path: Path) -> None:
    async with LocalServer(port=0, state_dir=tmp_path, output_limit=8192) as server:
        first = await Wire.create(server.url, "extended")
        await first.send({"language": "python", "code": "print('x' * 50000, flush=True); input(); print('end')"})
        await first.expect(st("SANDBOX_EXECUTION_RUNNING"))
        received = ""
        while len(received) < 50001:
            received += (await first.frame())["data"]
        first.ws.transport.abort()
        second = await attach_when_free(server.url, "extended", first)
        await second.expect(st("SANDBOX_RUNNING"))
        await second.send({"action": "reconnect", "last_seq": 0})
        await second.expect(st("SANDBOX_EXECUTION_RUNNING"))
        gap = await second.frame()
        assert gap["event"] == "output_gap" and gap["from_seq"] == 1 and gap["to_seq"] > 1
        await second.send({"event": "stdin", "data": "\n"})
        result = await second.collect()
        # Everything after the gap is there, up to the end.
        assert result.stdout.endswith("x\nend\n")
        assert result.seqs[0] == gap["to_seq"] + 1


async def test_detached_output_is_bounded_by_back_pressure_not_dropped(tmp_path: Path) -> None:
    limit = 64 * 1024
    async with LocalServer(port=0, state_dir=tmp_path, output_limit=limit) as server:
        first = await Wire.create(server.url, "extended")
        total = 2_000_000
        await first.send({"language": "python", "code": f"import sys\nsys.stdout.write('y' * {total})"})
        await first.expect(st("SANDBOX_EXECUTION_RUNNING"))
        first.ws.transport.abort()
        sandbox = server.manager.get(first.sandbox_id)
        assert sandbox is not None and sandbox.execution is not None
        # The writer blocks instead of filling memory: the exec cannot finish while detached.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await sandbox.execution.finished.wait()
        assert sandbox.log.undelivered_bytes < limit + 2 * 256 * 1024
        second = await attach_when_free(server.url, "extended", first)
        await second.expect(st("SANDBOX_RUNNING"))
        await second.send({"action": "reconnect"})
        await second.expect(st("SANDBOX_EXECUTION_RUNNING"))
        result = await second.collect()
        # The first connection may have consumed some before the drop; none is lost on the server.
        assert set(result.stdout) <= {"y"}
        assert sandbox.log.last_seq == result.seqs[-1]
        assert result.exit_code == 0


async def test_idle_timer_is_reset_by_frames_and_paused_by_execs(local: LocalServer) -> None:
    wire = await Wire.create(local.url, "extended", '{"idle_timeout": 1}')
    # An exec longer than the timeout does not expire the sandbox.
    result = await wire.run("bash", "sleep 1.6; echo survived")
    assert result.stdout == "survived\n"
    # A frame restarts the timer; expiry follows about a second after the last one.
    await wire.send({"action": "kill_process"})
    await wire.expect(st("SANDBOX_EXECUTION_FORCE_KILLED"))
    await wire.expect(st("SANDBOX_DELETING"), st("SANDBOX_DELETED"))
    await wire.send({"action": "reconnect"})
    await wire.expect(st("SANDBOX_EXECUTION_DONE"))
    await wire.send({"action": "checkpoint"})
    await wire.expect(
        st("SANDBOX_CHECKPOINTING"),
        st("SANDBOX_CHECKPOINT_ERROR"),
        err(f"Failed to checkpoint sandbox {wire.sandbox_id}: Sandbox not found: {wire.sandbox_id}"),
    )
    await wire.expect_close(4000)


async def test_idle_timeout_null_disables_expiry(local: LocalServer) -> None:
    wire = await Wire.create(local.url, "extended", '{"idle_timeout": null}')
    sandbox = local.manager.get(wire.sandbox_id)
    assert sandbox is not None
    sandbox.last_activity -= 10_000
    assert not sandbox.idle_expired(asyncio.get_running_loop().time())


# -- HTTP and handshake -------------------------------------------------------------


def _http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


async def test_http_routes(local: LocalServer) -> None:
    get = asyncio.to_thread
    assert await get(_http_get, local.url + "/") == (200, "application/json", '{"message":"Server is running"}')
    assert await get(_http_get, local.url + "/status") == (200, "application/json", '{"status":"ok"}')
    assert await get(_http_get, local.url + "/create") == (404, "application/json", '{"detail":"Not Found"}')
    assert (await get(_http_get, local.url + "/nope"))[0] == 404


@pytest.mark.parametrize(
    "path", ["/create/", "/attach/", "/attach/sandbox-x", "/nope", "/", "/attach/a/b?sandbox_token=x"]
)
async def test_websocket_refusals_are_http_403(local: LocalServer, path: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await Wire.open(local.url, path, "extended")
    assert refused.value.response.status_code == 403


async def test_tokens_never_logged(local: LocalServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wire = await Wire.create(local.url, "extended")
    await wire.close()
    second = await attach_when_free(local.url, "extended", wire)
    await second.expect(st("SANDBOX_RUNNING"))
    await second.close()
    # Only the server's records: the test's own client logs its URLs.
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("sandbox_server"))
    assert wire.token[-12:] not in logged and wire.token[:12] not in logged
    assert "sandbox_token=***" in logged
    assert "sandbox_id frame, redacted" in logged


async def test_two_servers_in_one_process_are_independent() -> None:
    async with LocalServer(port=0) as one, LocalServer(port=0, protocol="upstream") as two:
        assert one.url != two.url and one.state_dir != two.state_dir
        wire = await Wire.create(one.url, "extended")
        elsewhere = await Wire.attach(two.url, "upstream", wire.sandbox_id, wire.token)
        await elsewhere.expect(st("SANDBOX_RESTORING"), st("SANDBOX_NOT_FOUND"))
        assert (await Wire.create(two.url, "upstream")).sandbox_id != wire.sandbox_id
        state = one.state_dir
    assert not state.exists()  # the temporary state directory is removed at stop


async def test_stop_closes_with_1012_and_kills_processes(tmp_path: Path) -> None:
    server = LocalServer(port=0, state_dir=tmp_path)
    await server.start()
    wire = await Wire.create(server.url, "extended")
    await wire.send({"language": "bash", "code": "echo $$; sleep 1000"})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    pgid = int((await wire.frame())["data"])
    instance_dir = server.manager.instance_dir
    assert instance_dir.is_dir()
    await server.stop()
    await wire.expect_close(1012)
    assert not group_alive(pgid)
    assert not instance_dir.exists()  # this instance's live sandboxes are gone
    assert (tmp_path / "metadata").is_dir()  # a state directory given by the caller is kept


# -- the command line -----------------------------------------------------------------


async def test_cli_sigterm_closes_clients_with_1012_and_leaves_no_process(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandbox_server",
        "--port",
        "0",
        "--state-dir",
        str(tmp_path),
        "--protocol",
        "upstream",
        "--isolation",
        "none",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        async with asyncio.timeout(15):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        wire = await Wire.create(url, "upstream")
        await wire.send({"language": "bash", "code": "sleep 1000 & echo $$ $!; sleep 1000"})
        await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
        pgid, background = map(int, (await wire.frame())["data"].split())
        proc.send_signal(signal.SIGTERM)
        await wire.expect_close(1012)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
        stderr = (await proc.stderr.read()).decode()
        assert wire.token not in stderr
        assert not group_alive(pgid)
        assert not pid_alive(background)
        assert not any((tmp_path / "instances").iterdir())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_port_in_use_fails_cleanly() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "sandbox_server", "--port", str(port)], capture_output=True, timeout=30
        )
    assert run.returncode == 1
    assert b"cannot start the server" in run.stderr
    assert run.stdout == b""


def test_output_log_keeps_undelivered_frames_and_evicts_delivered_ones() -> None:
    async def scenario() -> None:
        log = OutputLog(limit=10)
        for i in range(5):
            log.append("stdout", str(i), 4)
        # Nothing delivered: all 20 bytes kept although the bound is 10.
        assert [c.seq for c in log.frames_after(0, log.last_seq, 100)] == [1, 2, 3, 4, 5]
        assert log.full and log.undelivered_bytes == 20
        log.mark_delivered(3)
        assert log.undelivered_bytes == 8 and not log.full
        # Delivered frames go first when over the bound; the undelivered stay.
        assert [c.seq for c in log.frames_after(0, log.last_seq, 100)] == [4, 5]
        assert [c.seq for c in log.frames_after(3, 4, 100)] == [4]
        assert [c.seq for c in log.frames_after(0, log.last_seq, 1)] == [4]
        log.append("stderr", "x", 4)
        assert [c.seq for c in log.frames_after(4, log.last_seq, 100)] == [5, 6]

    asyncio.run(scenario())
