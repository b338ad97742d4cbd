"""``sandbox_sync`` has the API of ``sandbox_asyncio``: names, parameters, defaults, exceptions."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import pytest

import sandbox_asyncio
import sandbox_proto
import sandbox_sync
from sandbox_sync._loop import loop

PAIRS = [
    (sandbox_sync.Sandbox, sandbox_asyncio.Sandbox),
    (sandbox_sync.SandboxProcess, sandbox_asyncio.SandboxProcess),
    (sandbox_sync.SandboxStream, sandbox_asyncio.SandboxStream),
]
#: Public names of the asyncio classes that are not user API (the transport's Receiver side).
NOT_API = {"message_received", "connection_lost"}
#: Keyword arguments of asyncio's create/attach that belong to a caller's own event loop.
LOOP_BOUND = {"session"}


def _public(obj: object) -> set[str]:
    names = set(dir(obj)) | set(getattr(obj, "__dict__", {}))
    return {name for name in names if not name.startswith("_")} - NOT_API


@pytest.mark.parametrize(("sync", "async_"), PAIRS, ids=lambda cls: cls.__name__)
def test_every_method_and_property_is_there(sync: type, async_: type) -> None:
    assert _public(async_) <= _public(sync)


def test_the_same_attributes_on_live_objects(local_url: str) -> None:
    # Instance attributes (reconnects, process.stdout, stream.name, ...) only exist on objects.
    with sandbox_sync.Sandbox.create(local_url) as sandbox:
        process = sandbox.exec("bash", "echo hi")
        process.wait()
        pairs = [(sandbox, sandbox._sandbox), (process, process._process), (process.stdout, process.stdout._stream)]
        for mine, theirs in pairs:
            assert _public(mine) == _public(theirs), type(mine)
            for name in _public(theirs) - {"exec", "iter_file"}:
                value = getattr(theirs, name)
                if not callable(value) and not isinstance(value, sandbox_asyncio.SandboxStream):
                    assert getattr(mine, name) == value, name


@pytest.mark.parametrize(("sync", "async_"), PAIRS, ids=lambda cls: cls.__name__)
def test_the_same_parameters_and_defaults(sync: type, async_: type) -> None:
    for name, member in inspect.getmembers(async_):
        if name.startswith("_") or name in NOT_API or not callable(member):
            continue
        mine, theirs = inspect.signature(getattr(sync, name)), inspect.signature(member)
        expected = [p for p in theirs.parameters.values() if p.name not in LOOP_BOUND]
        assert [(p.name, p.kind, p.default) for p in mine.parameters.values()] == [
            (p.name, p.kind, p.default) for p in expected
        ], name


def test_the_same_exceptions_and_result_types() -> None:
    for name in sandbox_asyncio.__all__:
        if name.startswith("Sandbox") and name.endswith(("Error", "Exception")):
            assert getattr(sandbox_sync, name) is getattr(sandbox_asyncio, name)
    assert sandbox_sync.RunResult is sandbox_proto.RunResult
    assert sandbox_sync.SandboxProcessError is sandbox_proto.SandboxProcessError


def test_a_misspelt_option_raises_at_the_call_before_connecting() -> None:
    # Port 9 (discard) would only refuse; the error must come before any connection is tried.
    with pytest.raises(TypeError, match="did you mean 'idle_timeout'"):
        sandbox_sync.Sandbox.create("http://127.0.0.1:9", idle_timout=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="no session="):
        sandbox_sync.Sandbox.create("http://127.0.0.1:9", session=object())  # type: ignore[call-arg]


def test_calling_from_the_loop_thread_says_why_instead_of_deadlocking() -> None:
    async def from_inside() -> None:
        loop.call(_nothing)

    with pytest.raises(RuntimeError, match="its own event loop"):
        loop.call(from_inside)


async def _nothing() -> None:
    return None


def test_token_never_in_reprs_or_logs(local_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with sandbox_sync.Sandbox.create(local_url, enable_debug=True) as sandbox:
        token = sandbox.sandbox_token
        assert token
        process = sandbox.exec("bash", "echo hi")
        process.wait()
        texts: list[Any] = [repr(sandbox), repr(process), repr(process.stdout), str(sandbox.run("bash", "true"))]
    assert sandbox.sandbox_id in texts[0]
    texts += [record.getMessage() for record in caplog.records]
    assert not [text for text in texts if token in text]
