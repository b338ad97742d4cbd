"""``run``, ``env=``/``cwd=`` and local argument errors, on every transport and both protocol modes."""

from __future__ import annotations

import json

import anyio
import pytest
from _support import Client, ServerThread

from sandbox_proto import RunResult, SandboxProcessError, SandboxTimeoutError

pytestmark = pytest.mark.anyio

#: Values that break naive quoting in bash or Python; each must arrive byte for byte.
HOSTILE = [
    "",
    "plain",
    "it's",
    'say "hi"',
    "$(touch /tmp/pwned)",
    "`touch /tmp/pwned`",
    "${HOME} $HOME $0 $$",
    "back\\slash\\n\\",
    "new\nline\n",
    "cr\r\nlf",
    "tab\there",
    "'; exit 7; '",
    '"); import os; os._exit(7); ("',
    "'''\"\"\"",
    "\x01\x1b[31mred\x7f",
    "$'\\x41'",
    " -n ",
    "é ✓ 𝄞",
    "a=b; c",
    "*",
    "%s %d {0}",
]
HOSTILE_ENV = {f"V{index}": value for index, value in enumerate(HOSTILE)}
#: A directory name no naive prologue survives.
HOSTILE_DIR = "/tmp/d ir'$(touch /tmp/pwned)\n`id`\\ é -x"


def _extended(server: ServerThread) -> bool:
    return server.protocol == "extended"  # type: ignore[attr-defined,no-any-return]


async def test_run_returns_both_streams_and_the_exit_code(client: Client, server: ServerThread) -> None:
    async with client.create(server.url) as sandbox:
        result = await sandbox.run("bash", "echo a; echo b >&2; exit 3")
        assert isinstance(result, RunResult)
        assert (result.stdout, result.stderr) == ("a\n", "b\n")
        # The protocol has no exit status: only the exit_code extension tells.
        assert result.exit_code == (3 if _extended(server) else None)
        ok = await sandbox.run("python", "print(6 * 7)")
        assert ok == RunResult("42\n", "", 0 if _extended(server) else None)


async def test_check_raises_on_a_known_non_zero_exit_only(client: Client, server: ServerThread) -> None:
    async with client.create(server.url) as sandbox:
        assert (await sandbox.run("bash", "true", check=True)).stdout == ""
        if not _extended(server):
            # Unknown exit code: check=True cannot tell a failure, so it does not raise.
            result = await sandbox.run("bash", "echo bad >&2; exit 3", check=True)
            assert result.exit_code is None and result.stderr == "bad\n"
            return
        with pytest.raises(SandboxProcessError, match="exited with code 3: bad") as caught:
            await sandbox.run("bash", "echo out; echo bad >&2; exit 3", check=True)
        assert caught.value.result == RunResult("out\n", "bad\n", 3)
        # The sandbox goes on.
        assert (await sandbox.run("bash", "echo next")).stdout == "next\n"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_20_mib_on_one_stream_only_does_not_stall(client: Client, url: str, stream: str) -> None:
    size = 20 * 2**20
    other_stream = "stderr" if stream == "stdout" else "stdout"
    code = (
        f"import sys\nfor _ in range(20):\n    sys.{stream}.write('x' * 2**20)\nprint('end', file=sys.{other_stream})"
    )
    async with client.create(url) as sandbox:
        with anyio.fail_after(120):
            result = await sandbox.run("python", code, timeout=None)
    flood, other = (result.stdout, result.stderr) if stream == "stdout" else (result.stderr, result.stdout)
    assert len(flood) == size and flood == "x" * size
    assert other == "end\n"


async def test_timeout_kills_the_process_and_the_sandbox_stays_usable(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        started = anyio.current_time()
        with pytest.raises(SandboxTimeoutError, match=r"running the bash code took longer than 0\.5s"):
            await sandbox.run("bash", "echo started; sleep 60", timeout=0.5)
        # Killed, not waited for: the next exec runs at once.
        result = await sandbox.run("bash", "echo next", timeout=30)
        assert result.stdout == "next\n"
        assert anyio.current_time() - started < 20
        # A timeout while stdin is being fed ends the same way.
        with pytest.raises(SandboxTimeoutError):
            await sandbox.run("python", "import time; input(); time.sleep(60)", stdin="x\n", timeout=0.5)
        assert (await sandbox.run("python", "print('again')", timeout=30)).stdout == "again\n"


async def test_stdin_feeds_line_readers_everywhere(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        result = await sandbox.run("python", "print(input()[::-1]); print(input())", stdin="abc\nsecond\n", timeout=30)
        assert result.stdout == "cba\nsecond\n"
        # More than one stdin frame's worth, read by exact size (works without end-of-file).
        data = "".join(f"{index:07d}\n" for index in range(2**16))
        code = f"import sys\ndata = sys.stdin.read({len(data)})\nprint(len(data), data.count(chr(10)))"
        result = await sandbox.run("python", code, stdin=data, timeout=60)
        assert result.stdout == f"{len(data)} {2**16}\n"
        # A process that reads nothing may exit before all its input is written: not an error.
        result = await sandbox.run("bash", "echo bye", stdin="z" * 2**20, timeout=60)
        assert result.stdout == "bye\n"


async def test_stdin_end_of_file_needs_close_stdin(client: Client, server: ServerThread) -> None:
    async with client.create(server.url) as sandbox:
        if _extended(server):
            # stdin is closed after the input (and without any): readers to end-of-file finish.
            assert (await sandbox.run("bash", "cat", stdin="to\nthe end", timeout=30)).stdout == "to\nthe end"
            assert (await sandbox.run("bash", "wc -c", timeout=30)).stdout.strip() == "0"
            return
        # Upstream cannot close stdin: cat waits until the timeout kills it, as documented.
        with pytest.raises(SandboxTimeoutError):
            await sandbox.run("bash", "cat", stdin="never ends", timeout=0.5)
        assert (await sandbox.run("bash", "echo usable", timeout=30)).stdout == "usable\n"


# -- env= and cwd=


async def test_hostile_env_values_arrive_verbatim_in_python(client: Client, url: str) -> None:
    code = f"import json, os\nprint(json.dumps([os.environ[name] for name in {list(HOSTILE_ENV)!r}]))"
    async with client.create(url) as sandbox:
        result = await sandbox.run("python", code, env=HOSTILE_ENV, timeout=30)
        assert result.stderr == ""
        assert json.loads(result.stdout) == HOSTILE
        process = await sandbox.exec("python", code, env=HOSTILE_ENV)
        assert json.loads(await process.stdout.read_all()) == HOSTILE
        # Nothing in a value ran as code.
        assert (await sandbox.run("bash", "test -e /tmp/pwned && echo pwned || echo clean")).stdout == "clean\n"


async def test_hostile_env_values_arrive_verbatim_in_bash(client: Client, url: str) -> None:
    # NUL-separated, so newlines in values survive the trip back.
    code = "printf '%s\\0' " + " ".join(f'"${name}"' for name in HOSTILE_ENV)
    async with client.create(url) as sandbox:
        result = await sandbox.run("bash", code, env=HOSTILE_ENV, timeout=30)
        assert result.stderr == ""
        assert result.stdout.split("\0")[:-1] == HOSTILE
        process = await sandbox.exec("bash", code, env=HOSTILE_ENV)
        assert (await process.stdout.read_all()).split("\0")[:-1] == HOSTILE
        # Exported: child processes see them too.
        child = await sandbox.run("bash", "python3 -c 'import os; print(os.environ[\"V2\"])'", env=HOSTILE_ENV)
        assert child.stdout == "it's\n"
        assert (await sandbox.run("bash", "test -e /tmp/pwned && echo pwned || echo clean")).stdout == "clean\n"


async def test_env_is_per_process(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        assert (await sandbox.run("bash", 'echo "$ONLY_ONCE"', env={"ONLY_ONCE": "1"})).stdout == "1\n"
        assert (await sandbox.run("bash", 'echo "${ONLY_ONCE-unset}"')).stdout == "unset\n"


@pytest.mark.parametrize(
    ("language", "code"),
    [("python", "import os\nprint(os.getcwd())"), ("bash", "pwd -P")],
)
async def test_hostile_cwd(client: Client, url: str, language: str, code: str) -> None:
    async with client.create(url) as sandbox:
        made = await sandbox.run(
            "python", "import os; os.makedirs(os.environ['D'], exist_ok=True)", env={"D": HOSTILE_DIR}
        )
        assert made.stderr == ""
        result = await sandbox.run(language, code, cwd=HOSTILE_DIR, env={"X": "1"}, timeout=30)
        assert (result.stdout, result.stderr) == (HOSTILE_DIR + "\n", "")
        # Relative to the exec's own working directory ("/" upstream), even one that starts with "-".
        await sandbox.run("bash", "mkdir -p -- '-rel dir'")
        relative = await sandbox.run(language, code, cwd="-rel dir")
        assert relative.stdout.endswith("/-rel dir\n") and relative.stderr == ""
        assert (await sandbox.run("bash", "test -e /tmp/pwned && echo pwned || echo clean")).stdout == "clean\n"


@pytest.mark.parametrize("language", ["python", "bash"])
async def test_missing_cwd_fails_the_process_not_the_sandbox(
    client: Client, server: ServerThread, language: str
) -> None:
    async with client.create(server.url) as sandbox:
        result = await sandbox.run(language, "print('ran')" if language == "python" else "echo ran", cwd="/no/such dir")
        assert result.stdout == ""
        assert "No such file or directory" in result.stderr and "/no/such dir" in result.stderr
        if _extended(server):
            assert result.exit_code not in (0, None)
        assert (await sandbox.run(language, "print('ok')" if language == "python" else "echo ok")).stdout == "ok\n"


async def test_line_numbers_stay_those_of_the_code(client: Client, url: str) -> None:
    options = {"env": {"A": "x\ny"}, "cwd": "/tmp"}
    async with client.create(url) as sandbox:
        result = await sandbox.run("python", "x = 1\n\nraise ValueError('boom')", **options)
        assert 'main.py", line 3' in result.stderr and "ValueError: boom" in result.stderr
        # A docstring and __future__ imports must stay first: the prologue follows them.
        code = '"""Doc."""\nfrom __future__ import annotations\nimport os\nprint(__doc__, os.getcwd())\n1 / 0'
        result = await sandbox.run("python", code, **options)
        assert result.stdout == "Doc. /tmp\n"
        assert 'main.py", line 5' in result.stderr and "ZeroDivisionError" in result.stderr
        result = await sandbox.run("bash", "true\nno_such_command_xyz", **options)
        assert "line 2: no_such_command_xyz" in result.stderr
        # A first line that opens a compound statement: the one documented shift, by one line.
        result = await sandbox.run("python", "def f():\n    1 / 0\nf()", **options)
        assert 'main.py", line 3, in f' in result.stderr


# -- mistakes: a local error, nothing sent, the sandbox usable


async def test_wrong_argument_types_raise_type_error_locally(client: Client, url: str) -> None:
    async with client.create(url) as sandbox:
        with pytest.raises(TypeError, match="code must be a str, not list"):
            await sandbox.exec("bash", ["echo", "hi"])
        with pytest.raises(TypeError, match="code must be a str, not bytes"):
            await sandbox.run("python", b"print(1)")
        with pytest.raises(TypeError, match="language must be a str"):
            await sandbox.exec(["bash"], "echo hi")
        with pytest.raises(TypeError, match="language must be a str"):
            await sandbox.run(None, "echo hi")
        with pytest.raises(TypeError, match="stdin must be a str"):
            await sandbox.run("bash", "cat", stdin=b"x")
        with pytest.raises(TypeError, match="env"):
            await sandbox.run("bash", "true", env={"A": 1})
        with pytest.raises(TypeError, match="cwd"):
            await sandbox.exec("bash", "true", cwd=3)
        for name in ["1A", "A-B", "A B", "", "A=B", "A\n", "É"]:
            with pytest.raises(ValueError, match="invalid environment variable name"):
                await sandbox.run("bash", "true", env={name: "x"})
        with pytest.raises(ValueError, match="NUL"):
            await sandbox.run("python", "pass", env={"A": "x\x00y"})
        with pytest.raises(ValueError, match="NUL"):
            await sandbox.exec("bash", "true", cwd="/tmp\x00/x")
        with pytest.raises(ValueError, match="work for bash and python"):
            await sandbox.exec("ruby", "puts 1", env={"A": "1"})
        # Nothing reached the server: the session is intact and the next exec runs.
        assert sandbox.state == "running"
        assert (await sandbox.run("bash", "echo still here")).stdout == "still here\n"


async def test_misspelt_option_names_the_nearest_one(client: Client, url: str) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'idle_timout'; did you mean 'idle_timeout'"):
        client.create(url, idle_timout=5)
    with pytest.raises(TypeError, match="did you mean 'enable_auto_reconnect'"):
        client.create(url, enable_autoreconnect=True)
    with pytest.raises(TypeError, match="did you mean 'transport'"):
        client.create(url, transprot="websockets")
    with pytest.raises(TypeError, match="'bogus'; the options are "):
        client.create(url, bogus=1)
    async with client.create(url) as sandbox:
        sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
        with pytest.raises(TypeError, match="did you mean 'enable_debug'"):
            client.attach(url, sandbox_id, token, enable_debgu=True)
        with pytest.raises(TypeError, match=r"idle_timeout is an option of Sandbox\.create"):
            client.attach(url, sandbox_id, token, idle_timeout=5)
        assert (await sandbox.run("bash", "echo fine")).stdout == "fine\n"
