"""The command line: ``python -m sandbox_conformance URL`` and ``sandbox conformance URL``.

Exit status: 0 if no vector failed, 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from sandbox_proto import LocalProtocolError, websocket_base

from ._run import Result, run_vectors
from ._wire import DEFAULT_IDLE_SWEEP, DEFAULT_TIMEOUT

__all__ = ["add_header_option", "main", "parsed_headers"]


def add_header_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra handshake header, e.g. 'Authorization: Bearer TOKEN' (repeatable)",
    )


def parsed_headers(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """The ``--header`` values as a dict; a usage error (exit 2) for one without a name."""
    headers: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            parser.error(f"--header {item!r}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    return headers


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Check a Cloud Run Sandbox server against the conformance vectors of the protocol "
        "(section 12) with a raw WebSocket client. Creates a few sandboxes on it (and deletes them) and "
        "one small filesystem snapshot if it has snapshot storage.",
    )
    parser.add_argument("url", help="service URL, e.g. http://127.0.0.1:8080 or https://my-service.run.app")
    parser.add_argument(
        "--protocol",
        choices=("auto", "upstream", "extended"),
        default="auto",
        help="what the vectors that check an extension (CV-02, CV-03) must be granted when they ask for "
        "every extension: 'upstream' none (the server ignores the request), 'extended' an 'extensions' list, "
        "'auto' whatever the server grants (default). Every other connection asks for none and must get "
        "exactly the upstream frames, in every mode",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for each frame, handshake or HTTP answer (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--idle-sweep",
        type=float,
        default=DEFAULT_IDLE_SWEEP,
        metavar="SECONDS",
        help="how late after its idle timeout the server may delete a sandbox (CV-29); "
        f"the upstream server sweeps every {DEFAULT_IDLE_SWEEP:g}s (default {DEFAULT_IDLE_SWEEP:g})",
    )
    add_header_option(parser)
    parser.add_argument(
        "--no-ref", action="store_true", help="skip vectors only the reference server passes (upstream fails them)"
    )
    parser.add_argument("--http", action="store_true", help="also check the stateless HTTP endpoint POST /execute")
    parser.add_argument(
        "--vector", action="append", default=[], metavar="NAME", help="run only this vector (repeatable)"
    )
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m sandbox_conformance") -> int:
    """Run the vectors named on the command line; print one line per vector and a summary; the exit status."""
    parser = _parser(prog)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    headers = parsed_headers(parser, args.header)
    if args.timeout <= 0 or args.idle_sweep < 0:
        parser.error("--timeout must be positive and --idle-sweep not negative")
    try:
        websocket_base(args.url)
    except LocalProtocolError as exc:
        parser.error(str(exc))
    out = sys.stdout

    def report(result: Result) -> None:
        # As each vector ends, so that a slow server shows progress.
        out.write(result.line() + "\n")
        out.flush()

    results = asyncio.run(
        run_vectors(
            args.url,
            protocol=args.protocol,
            timeout=args.timeout,
            idle_sweep=args.idle_sweep,
            headers=headers,
            include_ref=not args.no_ref,
            include_http=args.http,
            only=args.vector,
            on_result=report,
        )
    )
    counts = {verdict: sum(r.verdict == verdict for r in results) for verdict in ("PASS", "FAIL", "SKIP")}
    out.write(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped\n")
    out.flush()
    return 1 if counts["FAIL"] else 0
