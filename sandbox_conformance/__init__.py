"""Conformance vectors of the Cloud Run Sandbox protocol (protocol.md section 12), played against a server.

This tests *servers* over the wire: it speaks raw WebSocket frames and never
uses the client library. Each vector is defined once here, as a transcript
turned into check code, and is used both by the command line

    python -m sandbox_conformance URL      (also: sandbox conformance URL)

and by the reference server's own test suite::

    results = await run_vectors(url, protocol="upstream", only=["CV-20"])

It also holds the property-based fuzzer of ``sandbox fuzz URL`` (:func:`fuzz_main`),
and :class:`FuzzSession`, with which its reproduction scripts replay a finding.
"""

from typing import TYPE_CHECKING, Any

from ._cli import main
from ._run import Result, Verdict, run_vectors
from ._vectors import VECTORS, Need, Vector
from ._wire import DEFAULT_IDLE_SWEEP, DEFAULT_TIMEOUT, ProtocolChoice

if TYPE_CHECKING:
    from ._fuzz import FuzzSession, fuzz_main, run_fuzz

_FUZZ_NAMES = frozenset({"FuzzSession", "fuzz_main", "run_fuzz"})


def __getattr__(name: str) -> Any:
    # The fuzzer needs hypothesis (the "testing" extra); the conformance runner needs nothing more.
    if name not in _FUZZ_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from . import _fuzz
    except ImportError as error:
        from _sandbox_anyio._extras import raise_for_missing_extra

        raise_for_missing_extra(error, "testing", "sandbox fuzz")
        raise
    return getattr(_fuzz, name)


__all__ = [
    "DEFAULT_IDLE_SWEEP",
    "DEFAULT_TIMEOUT",
    "FuzzSession",
    "VECTORS",
    "Need",
    "ProtocolChoice",
    "Result",
    "Vector",
    "Verdict",
    "fuzz_main",
    "main",
    "run_fuzz",
    "run_vectors",
]
