"""The websockets transports pick a proxy from the environment as websockets does, read once per host."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from _sandbox_anyio._handoff import _proxy_for


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    _proxy_for.cache_clear()
    yield
    _proxy_for.cache_clear()


def test_the_environments_proxy_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://proxy.test:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert _proxy_for("sandbox.example", 443, True) == "http://proxy.test:3128"


def test_no_proxy_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://proxy.test:3128")
    monkeypatch.setenv("no_proxy", "sandbox.example")
    assert _proxy_for("sandbox.example", 443, True) is None


def test_without_a_proxy_there_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert _proxy_for("127.0.0.1", 8080, False) is None
