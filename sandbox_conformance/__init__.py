"""Conformance vectors of the Cloud Run Sandbox protocol (protocol.md section 12), played against a server.

This tests *servers* over the wire: it speaks raw WebSocket frames and never
uses the client library. Each vector is defined once here, as a transcript
turned into check code, and is used both by the command line

    python -m sandbox_conformance URL      (also: sandbox conformance URL)

and by the reference server's own test suite::

    results = await run_vectors(url, protocol="upstream", only=["CV-20"])
"""

from ._cli import main
from ._run import Result, Verdict, run_vectors
from ._vectors import VECTORS, Need, Vector
from ._wire import DEFAULT_IDLE_SWEEP, DEFAULT_TIMEOUT, ProtocolChoice

__all__ = [
    "DEFAULT_IDLE_SWEEP",
    "DEFAULT_TIMEOUT",
    "VECTORS",
    "Need",
    "ProtocolChoice",
    "Result",
    "Vector",
    "Verdict",
    "main",
    "run_vectors",
]
