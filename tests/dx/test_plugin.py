"""The pytest plugin, end to end: a user's own test files run in a fresh pytest process.

Nothing is configured in those runs: the fixtures come from the ``pytest11``
entry point of the installed package, as they would for a user.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TIMEOUT = 60

USER_TESTS = """
import pytest
import sandbox_asyncio
import sandbox_trio
import trio

pytestmark = pytest.mark.anyio
seen = {}


async def test_asyncio_sandbox(sandbox):
    assert isinstance(sandbox, sandbox_asyncio.Sandbox)
    process = await sandbox.exec("python", "print(6 * 7)")
    assert await process.stdout.read_all() == "42\\n"
    seen["asyncio"] = (sandbox.sandbox_id, sandbox.sandbox_token)


async def test_trio_sandbox(trio_sandbox):
    assert isinstance(trio_sandbox, sandbox_trio.Sandbox)
    trio.lowlevel.current_task()  # raises unless this test really runs on trio
    process = await trio_sandbox.exec("bash", "echo from trio")
    assert await process.stdout.read_all() == "from trio\\n"


async def test_the_sandbox_of_an_earlier_test_was_killed(sandbox_server_url, anyio_backend):
    if anyio_backend != "asyncio":
        pytest.skip("checked once")
    sandbox_id, token = seen["asyncio"]
    with pytest.raises(sandbox_asyncio.SandboxCreationError):
        await sandbox_asyncio.Sandbox.attach(sandbox_server_url, sandbox_id, token, timeout=10)


def test_one_server_per_session(sandbox_server_url):
    assert sandbox_server_url.startswith("http://127.0.0.1:")
"""


def test_user_tests_get_a_server_and_sandboxes_on_each_runtime(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", timeout=TIMEOUT)
    # Each sandbox test ran once, on its own runtime, although anyio offers both backends.
    result.stdout.fnmatch_lines(["*test_asyncio_sandbox?asyncio? PASSED*", "*test_trio_sandbox?trio? PASSED*"])
    result.assert_outcomes(passed=4, skipped=1)


def test_server_options_can_be_overridden_and_backend_clashes_are_explained(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
import pytest

@pytest.fixture(scope="session")
def sandbox_server_options():
    return {"protocol": "upstream"}
"""
    )
    pytester.makepyfile(
        test_user="""
import pytest

pytestmark = pytest.mark.anyio


async def test_upstream_server(sandbox):
    assert sandbox.extensions == frozenset()
    process = await sandbox.exec("bash", "exit 3")
    assert await process.wait() is None  # no exit codes in the upstream protocol


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_asyncio_sandbox_on_trio(sandbox):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=TIMEOUT)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*'sandbox' fixture needs anyio_backend 'asyncio'*use 'trio_sandbox'*"])


def test_sandbox_url_option_replaces_the_embedded_server(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
def test_url(sandbox_server_url):
    assert sandbox_server_url == "https://sandbox.example.test"
"""
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--sandbox-url", "https://sandbox.example.test", timeout=TIMEOUT
    )
    result.assert_outcomes(passed=1)
