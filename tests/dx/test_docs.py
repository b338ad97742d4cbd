"""The README and docs/: every API name the README uses is in the API reference, and no link leaves the repository.

The reference pages (docs/reference/*.md) are mkdocstrings directives (``::: module.Name``)
plus prose. A name the README uses is covered when the reference mentions it, or
when it is a public member of a class a directive renders (mkdocs.yml renders
members without a docstring too, and instance attributes set in methods).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "reference"
DOCS = sorted([README, *(ROOT / "docs").rglob("*.md")])

_FENCE = re.compile(r"^(```|~~~)[^\n]*\n.*?^\1[ \t]*$", re.M | re.S)
_PYTHON_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_DIRECTIVE = re.compile(r"^::: ([\w.]+)[ \t]*\n((?:[ \t]+\S[^\n]*\n?)*)", re.M)

#: What the README calls its objects -> the class they are. A name not listed here
#: (``result``, ``nursery``, ...) is not checked.
RECEIVERS = {
    "Sandbox": "Sandbox",
    "sandbox": "Sandbox",
    "sb": "Sandbox",
    "process": "SandboxProcess",
    "proc": "SandboxProcess",
    "p": "SandboxProcess",
    "stdout": "SandboxStream",
    "stderr": "SandboxStream",
    "stream": "SandboxStream",
}
_ACCESS = re.compile(r"(?<![\w.])(" + "|".join(RECEIVERS) + r")((?:\.\w+)+)")
# Names separated by ", " only: the side-by-side asyncio/trio listing has a second column.
_IMPORT = re.compile(r"^\s*from (sandbox\w*(?:\.\w+)*) import (\w+(?:, \w+)*)", re.M)
_EXCEPTION = re.compile(r"\bSandbox\w*(?:Error|Exception)\b")


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def readme_code() -> list[str]:
    """The README's Python blocks and its inline code spans (``process.wait``, ...).

    A span that names a module (``sandbox.exceptions``) is no attribute access.
    """
    text = README.read_text()
    spans = [span for span in _INLINE_CODE.findall(_FENCE.sub("", text)) if not is_module(span)]
    return _PYTHON_BLOCK.findall(text) + spans


def used_members() -> set[tuple[str, str]]:
    """(class, member) for every ``receiver.member`` in the README's code."""
    used: set[tuple[str, str]] = set()
    for code in readme_code():
        for receiver, chain in _ACCESS.findall(code):
            owner = RECEIVERS[receiver]
            for name in chain.split(".")[1:]:
                used.add((owner, name))
                # process.stdout.read_all: the next name is a member of the stream.
                owner = RECEIVERS.get(name, "")
                if not owner:
                    break
    return used


def used_names() -> set[str]:
    """Names the README imports from our packages, and the exceptions it names."""
    names: set[str] = set()
    for code in readme_code():
        for _module, imported in _IMPORT.findall(code):
            names.update(name.strip() for name in imported.split(",") if name.strip())
    names.update(_EXCEPTION.findall(README.read_text()))
    return names


def directives() -> dict[str, list[str]]:
    """Every ``::: path`` of the reference pages -> its member filters."""
    found: dict[str, list[str]] = {}
    for page in REFERENCE.glob("*.md"):
        for path, options in _DIRECTIVE.findall(page.read_text()):
            match = re.search(r"^\s*filters:\s*(\[.*\])\s*$", options, re.M)
            found[path] = json.loads(match.group(1)) if match else ["!^_"]
    return found


def resolve(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return importlib.import_module(path)
    except ImportError:
        return getattr(importlib.import_module(module), name)


def instance_attributes(cls: type) -> set[str]:
    """Names assigned as ``self.name`` in the methods of ``cls`` and its bases (what griffe documents)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__ == "builtins":
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
    return names


def rendered(name: str, filters: list[str]) -> bool:
    """Whether mkdocstrings keeps member ``name`` under these filters (``!regex`` excludes)."""
    for pattern in filters:
        excluded = pattern.startswith("!")
        if bool(re.search(pattern.lstrip("!"), name)) == excluded:
            return False
    return True


def test_members_without_docstring_are_rendered() -> None:
    # The member check below relies on it: an undocumented public member still appears.
    assert re.search(r"^\s*show_if_no_docstring:\s*true\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)


def test_readme_code_is_found() -> None:
    # Guards the extraction itself: if the README's shape changes, this says so.
    members = used_members()
    assert ("Sandbox", "create") in members
    assert ("SandboxProcess", "wait") in members
    assert ("SandboxStream", "read_all") in members
    assert "Sandbox" in used_names()


def test_every_member_the_readme_uses_is_in_the_reference() -> None:
    documented = directives()
    missing = []
    for owner, name in sorted(used_members()):
        classes = [
            (path, filters, resolve(path)) for path, filters in documented.items() if path.rsplit(".", 1)[-1] == owner
        ]
        assert classes, f"no directive documents {owner} in docs/reference/"
        if not any(
            rendered(name, filters) and (hasattr(cls, name) or name in instance_attributes(cls))
            for _path, filters, cls in classes
        ):
            missing.append(f"{owner}.{name}")
    assert not missing, f"the README uses names the API reference does not document: {missing}"


def test_every_name_the_readme_imports_is_in_the_reference() -> None:
    documented = {path.rsplit(".", 1)[-1] for path in directives()}
    reference_text = "\n".join(page.read_text() for page in REFERENCE.glob("*.md"))
    missing = sorted(
        name for name in used_names() if name not in documented and not re.search(rf"\b{name}\b", reference_text)
    )
    assert not missing, f"the README uses names the API reference does not document: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_machine_paths_or_links_out_of_the_repository(doc: Path) -> None:
    text = doc.read_text()
    for forbidden in ("/work/", "../shared"):
        assert forbidden not in text, f"{doc.name} mentions {forbidden!r}"
    prose = _FENCE.sub("", text)
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)", prose) + re.findall(r"""href=["']([^"']+)""", prose)
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # https:, mailto:, an anchor on the same page
        assert not target.startswith("/"), f"{doc.name} links to the absolute path {target}"
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name} links out of the repository: {target}"
        assert path.exists(), f"{doc.name} links to a missing file: {target}"
