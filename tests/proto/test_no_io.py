"""``sandbox_proto`` is sans-IO: importing it pulls in no event loop, socket or WebSocket library."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import sandbox_proto

#: Must not even be loaded indirectly (stdlib ``logging`` does load ``threading``, which is fine).
FORBIDDEN = ("asyncio", "trio", "websockets", "aiohttp", "socket", "anyio", "ssl", "selectors", "trio_websocket")
#: Must not be imported by the package's own source.
FORBIDDEN_IN_SOURCE = (*FORBIDDEN, "threading", "time", "subprocess", "http", "urllib.request")

PACKAGE_DIR = Path(sandbox_proto.__file__).parent
#: The hypothesis strategies for other people's tests: imported only by tests, never by the core.
TEST_KIT = "testing"
MODULES = sorted(
    ["sandbox_proto"]
    + [f"sandbox_proto.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE_DIR)]) if m.name != TEST_KIT]
)
SOURCES = sorted(p for p in PACKAGE_DIR.glob("*.py") if p.stem != TEST_KIT)


def test_every_module_is_covered() -> None:
    expected = {"_client", "_errors", "_frames", "_server", "_status", "_url"}
    assert expected <= {m.rsplit(".", 1)[-1] for m in MODULES}
    assert {p.stem for p in SOURCES} >= expected | {"__init__"}


def test_importing_sandbox_proto_loads_no_io_module() -> None:
    script = f"""
import json, sys
before = set(sys.modules)
import importlib
for name in {MODULES!r}:
    importlib.import_module(name)
loaded = set(sys.modules) - before
forbidden = {FORBIDDEN!r}
bad = sorted(m for m in loaded if m.split(".")[0] in forbidden)
print(json.dumps({{"bad": bad, "loaded": sorted(loaded)}}))
"""
    # -I: isolated (no user site, no PYTHON* env vars); -S would also drop the editable install.
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "sandbox_proto._client" in report["loaded"]  # the check did import the package
    assert report["bad"] == []


def _imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
            "__import__",
            "import_module",
        ):
            names.update(arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str))
    return names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_source_has_no_io_imports(path: Path) -> None:
    imported = _imported_names(path)
    bad = sorted(name for name in imported if name in FORBIDDEN_IN_SOURCE or name.split(".")[0] in FORBIDDEN_IN_SOURCE)
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_source_does_no_io(path: Path) -> None:
    # No printing, sleeping or opening files either (style.md lesson 9: log, never print).
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not calls & {"print", "open", "input", "exec", "eval"}


def test_the_import_scanner_sees_imports() -> None:
    # Guard against a scanner that silently finds nothing.
    assert "json" in _imported_names(PACKAGE_DIR / "_frames.py")
    assert "urllib.parse" in _imported_names(PACKAGE_DIR / "_url.py")
