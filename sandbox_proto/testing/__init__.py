"""Hypothesis strategies for every frame of the protocol, for fuzzing clients and servers.

Use them to test your own client, server, proxy or recorder against well-formed
(and deliberately malformed) traffic::

    from hypothesis import given
    from sandbox_proto import decode_server_frame
    from sandbox_proto.testing import server_texts

    @given(server_texts())
    def test_my_parser_accepts_every_server_frame(text: str) -> None:
        my_parser(text)

Typed strategies (``status_frames()``, ``exec_requests()``, ...) produce the frame
classes of :mod:`sandbox_proto`; the ``*_texts()`` strategies produce the JSON
text of one WebSocket message, encoded the way the protocol's own codec does.
``extended=False`` leaves out everything of the negotiated extensions
(protocol.md section 15), for peers that speak only the upstream protocol.

This module needs ``hypothesis`` (the ``testing`` extra), not a runtime
dependency of ``sandbox_proto``: nothing else in the package imports it, so
``import sandbox_proto`` keeps working without it.

The same module holds a reference model of a conforming server and a
hypothesis state machine built on it, for property-based fuzzing of whole
sequences (what ``sandbox fuzz URL`` runs against a live server):
:class:`ProtocolMachine` draws client actions, :class:`ReferenceModel` says
what a conforming server answers, up to the latitude the protocol allows
(:class:`Expectation`), and a :class:`Driver` carries the frames to the
system under test. Subclass the machine with your own driver to fuzz your
own server or proxy; :class:`ReferenceDriver` is a conforming server in
memory to put behind a proxy. The model is pure (no I/O, stdlib only).
"""

from ._driver import ReferenceDriver
from ._machine import ProtocolMachine
from ._model import ANY, ECHO_EXIT, STATE_FILE, Closed, Expectation, Matcher, Mismatch, Output, Program, ReferenceModel
from ._session import Action, Driver, DriverError, Finding, ProtocolSession
from ._strategies import (
    client_frames,
    client_texts,
    error_frames,
    exec_requests,
    init_requests,
    malformed_texts,
    output_frames,
    output_gap_frames,
    reconnect_requests,
    sandbox_id_frames,
    sandbox_ids,
    sandbox_tokens,
    server_frames,
    server_texts,
    snapshot_names,
    snapshot_requests,
    status_frames,
    statuses,
    stdin_ack_frames,
    stdin_requests,
    unknown_frames,
)

__all__ = [
    "Action",
    "ANY",
    "Closed",
    "Driver",
    "DriverError",
    "ECHO_EXIT",
    "Expectation",
    "Finding",
    "Matcher",
    "Mismatch",
    "Output",
    "Program",
    "ProtocolMachine",
    "ProtocolSession",
    "ReferenceDriver",
    "ReferenceModel",
    "STATE_FILE",
    "client_frames",
    "client_texts",
    "error_frames",
    "exec_requests",
    "init_requests",
    "malformed_texts",
    "output_frames",
    "output_gap_frames",
    "reconnect_requests",
    "sandbox_id_frames",
    "sandbox_ids",
    "sandbox_tokens",
    "server_frames",
    "server_texts",
    "snapshot_names",
    "snapshot_requests",
    "status_frames",
    "statuses",
    "stdin_ack_frames",
    "stdin_requests",
    "unknown_frames",
]
