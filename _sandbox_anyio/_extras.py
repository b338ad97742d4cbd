"""Optional dependencies: a missing one is named with the ``pip install`` that adds it."""

from __future__ import annotations

#: The distribution whose extras install them (pyproject.toml's ``[project] name``).
DISTRIBUTION = "cloud-run-sandbox"

#: Each extra of pyproject.toml's ``[project.optional-dependencies]`` and the top-level
#: modules it installs: only their absence is the extra's to fix.
EXTRAS: dict[str, frozenset[str]] = {
    "aiohttp": frozenset({"aiohttp"}),
    "trio": frozenset({"trio", "trio_websocket"}),
    "google": frozenset({"google", "requests"}),
    "testing": frozenset({"hypothesis"}),
}


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def raise_for_missing_extra(error: ImportError, extra: str, needed_by: str) -> None:
    """Raise a ``ModuleNotFoundError`` naming the fix if ``error`` is a module of ``extra`` missing.

    Returns (for the caller to re-raise ``error``) when something else failed to import:
    a module missing inside an installed package is not fixed by installing the extra.
    """
    name = getattr(error, "name", None) or ""
    if name.partition(".")[0] not in EXTRAS[extra]:
        return
    raise ModuleNotFoundError(
        f"{needed_by} needs {name!r}, which is not installed: {install_hint(extra)}", name=name
    ) from error
