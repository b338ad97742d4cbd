"""What each package loads: the asyncio client stays free of trio and of the server.

Checked in a fresh interpreter, since this test session has imported everything.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

#: Packages that importing a client must not load: the other runtime, the server, the
#: command and its plugin (which may depend on everything), optional transports.
HEAVY = {"sandbox_trio", "sandbox_server", "sandbox_cli", "sandbox_conformance", "trio", "trio_websocket", "aiohttp"}


def loaded_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return {name.partition(".")[0] for name in json.loads(done.stdout)}


@pytest.mark.parametrize("statement", ["import sandbox_asyncio", "from sandbox import Sandbox"])
def test_the_asyncio_client_loads_neither_trio_nor_the_server(statement: str) -> None:
    assert loaded_after(statement) & HEAVY == set()


def test_the_trio_client_loads_neither_asyncio_client_extras_nor_the_server() -> None:
    assert loaded_after("import sandbox_trio") & HEAVY == {"sandbox_trio", "trio"}


def test_the_command_and_the_plugin_are_registered_from_sandbox_cli() -> None:
    scripts = importlib.metadata.entry_points(group="console_scripts", name="sandbox")
    plugins = importlib.metadata.entry_points(group="pytest11", name="sandbox")
    assert [entry.value for entry in scripts] == ["sandbox_cli:main"]
    assert [entry.value for entry in plugins] == ["sandbox_cli.pytest_plugin"]
