from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from _support import ServerThread

PROTOCOLS = ["extended", "upstream"]

# Hypothesis profiles: the default keeps the suite fast; `--hypothesis-profile=long`
# (or SANDBOX_HYPOTHESIS_PROFILE=long) searches deeper. Registered here, at the root,
# so the option works whichever tests are selected.
settings.register_profile("ci", max_examples=500, deadline=None, print_blob=True)
settings.register_profile(
    "long",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
if _profile := os.environ.get("SANDBOX_HYPOTHESIS_PROFILE") or os.environ.get("SANDBOX_PROTO_HYPOTHESIS_PROFILE"):
    settings.load_profile(_profile)


@pytest.fixture(scope="session", params=PROTOCOLS)
def server(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """The local reference server, once per protocol mode for the whole session."""
    from _support import ServerThread  # imported late: the unit tests need no server

    with ServerThread(protocol=request.param) as running:
        running.protocol = request.param  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def url(server: ServerThread) -> str:
    return server.url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
