"""Common mistakes get an error that says what to write instead, where the mistake is.

A forgotten ``await``, a plain ``with`` on the async API, a missing optional
dependency. The import failures are made real in a fresh interpreter by
``sys.modules[name] = None``, which makes ``import name`` fail as if the
package were not installed.
"""

from __future__ import annotations

import gc
import importlib.metadata
import subprocess
import sys
import textwrap

import pytest

import sandbox_asyncio
import sandbox_trio
from _sandbox_anyio._extras import DISTRIBUTION, EXTRAS

URL = "http://127.0.0.1:9"  # never connected to: each mistake is caught before any I/O


# -- the async API used without await ---------------------------------------------------------


@pytest.mark.parametrize("call", ["create", "attach"])
def test_asyncio_unawaited_call_says_to_await_it(call: str) -> None:
    opening = sandbox_asyncio.Sandbox.create(URL) if call == "create" else sandbox_asyncio.Sandbox.attach(URL, "i", "t")
    with pytest.raises(TypeError) as raised:
        opening.exec  # type: ignore[attr-defined]  # noqa: B018  (mypy sees the mistake too)
    assert str(raised.value).startswith(
        f"Sandbox.{call}() must be awaited: `sb = await Sandbox.{call}(...)` or `async with Sandbox.{call}(...) as sb:`"
    )
    assert "`.exec`" in str(raised.value)


@pytest.mark.parametrize("call", ["create", "attach"])
def test_asyncio_plain_with_says_async_with_or_sandbox_sync(call: str) -> None:
    opening = sandbox_asyncio.Sandbox.create(URL) if call == "create" else sandbox_asyncio.Sandbox.attach(URL, "i", "t")
    expected = rf"`async with Sandbox\.{call}\(\.\.\.\) as sb:`.*sandbox_sync"
    with pytest.raises(TypeError, match=expected), opening:  # type: ignore[attr-defined]
        pass


@pytest.mark.parametrize("call", ["create", "attach"])
def test_trio_unopened_call_says_how_to_open_it(call: str) -> None:
    opening = sandbox_trio.Sandbox.create(URL) if call == "create" else sandbox_trio.Sandbox.attach(URL, "i", "t")
    with pytest.raises(TypeError, match=rf"`async with Sandbox\.{call}\(\.\.\.\) as sb:`.*nursery="):
        opening.kill  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(TypeError, match=r"sandbox_sync"), opening:  # type: ignore[attr-defined]
        pass


def test_lookups_that_are_not_a_users_mistake_stay_attribute_errors() -> None:
    opening = sandbox_asyncio.Sandbox.create(URL)
    # copy, pickle and inspect probe for optional dunders with getattr(..., default).
    assert getattr(opening, "__deepcopy__", None) is None
    assert not hasattr(opening, "_no_such_private_name")
    with pytest.warns(RuntimeWarning, match="never awaited"):  # such probes are not a use
        del opening
        gc.collect()


def test_a_call_dropped_unawaited_warns_like_a_coroutine() -> None:
    with pytest.warns(RuntimeWarning, match=r"Sandbox\.create\(\) was never awaited"):
        sandbox_asyncio.Sandbox.create(URL)
        gc.collect()


# -- optional dependencies ------------------------------------------------------------------------


def run_without(module: str, code: str) -> str:
    """Run ``code`` in a fresh interpreter where ``module`` cannot be imported; its stdout."""
    program = f"import sys\nsys.modules[{module!r}] = None\n" + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_extras_named_exist_in_the_distribution() -> None:
    metadata = importlib.metadata.metadata(DISTRIBUTION)
    assert set(EXTRAS) <= set(metadata.get_all("Provides-Extra") or [])


def test_missing_aiohttp_names_the_extra() -> None:
    message = run_without(
        "aiohttp",
        f"""
        import sandbox_asyncio
        try:
            sandbox_asyncio.Sandbox.create({URL!r}, transport="aiohttp")
        except ModuleNotFoundError as exc:
            print(exc)
        """,
    )
    fix = "pip install 'cloud-run-sandbox[aiohttp]'"
    assert message == f"transport='aiohttp' needs 'aiohttp', which is not installed: {fix}"


def test_missing_trio_names_the_extra() -> None:
    message = run_without(
        "trio",
        """
        try:
            import sandbox_trio
        except ModuleNotFoundError as exc:
            print(exc)
        """,
    )
    assert message == "sandbox_trio needs 'trio', which is not installed: pip install 'cloud-run-sandbox[trio]'"


def test_missing_trio_websocket_names_the_extra() -> None:
    message = run_without(
        "trio_websocket",
        f"""
        import sandbox_trio
        try:
            sandbox_trio.Sandbox.create({URL!r}, transport="trio-websocket")
        except ModuleNotFoundError as exc:
            print(exc)
        """,
    )
    assert message.endswith("pip install 'cloud-run-sandbox[trio]'"), message
    assert "'trio_websocket'" in message


def test_missing_google_auth_names_the_extra() -> None:
    message = run_without(
        "google",
        f"""
        import asyncio
        import sandbox_asyncio

        async def main():
            await sandbox_asyncio.Sandbox.create({URL!r}, use_google_auth=True, timeout=30)

        try:
            asyncio.run(main())
        except sandbox_asyncio.SandboxConnectionError as exc:
            print(exc)
        """,
    )
    assert message.endswith("pip install 'cloud-run-sandbox[google]'"), message


def test_missing_hypothesis_names_the_extra_and_spares_the_conformance_runner() -> None:
    message = run_without(
        "hypothesis",
        """
        import sandbox_conformance
        print(len(sandbox_conformance.VECTORS) > 0)
        try:
            sandbox_conformance.FuzzSession
        except ModuleNotFoundError as exc:
            print(exc)
        """,
    )
    fix = "pip install 'cloud-run-sandbox[testing]'"
    assert message == f"True\nsandbox fuzz needs 'hypothesis', which is not installed: {fix}"
    program = "import sys; sys.modules['hypothesis'] = None; from sandbox_cli import main; raise SystemExit(main())"
    done = subprocess.run(
        [sys.executable, "-c", program, "fuzz", URL],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"sandbox fuzz: sandbox fuzz needs 'hypothesis', which is not installed: {fix}\n"


def test_an_unrelated_missing_module_is_not_blamed_on_an_extra() -> None:
    message = run_without(
        "aiohttp.client_proto",
        f"""
        import sandbox_asyncio
        try:
            sandbox_asyncio.Sandbox.create({URL!r}, transport="aiohttp")
        except ModuleNotFoundError as exc:
            print(exc.name, "pip install" in str(exc))
        """,
    )
    # A part missing inside an installed aiohttp: reinstalling the extra is still the fix.
    assert message == "aiohttp.client_proto True"
