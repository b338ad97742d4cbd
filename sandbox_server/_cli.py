"""``python -m sandbox_server`` (also ``sandbox serve``): run the local server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import ssl
import sys

from ._app import DEFAULT_SEND_TIMEOUT, LocalServer
from ._isolation import IsolationError, Limits

__all__ = ["add_arguments", "main"]

logger = logging.getLogger("sandbox_server")


_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G (binary) suffix: ``64M``."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 512K, 64M, 1G)")
    return int(match[1]) * _UNITS[match[2]]


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a non-negative integer: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options, for this CLI and for the client CLI's ``serve`` command."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port; 0 picks a free one (default: 8080)")
    parser.add_argument(
        "--state-dir",
        default=None,
        help="directory for sandboxes, checkpoints, snapshots and handoff locks; servers sharing one act as "
        "instances of one service (default: a temporary directory removed at exit)",
    )
    parser.add_argument(
        "--protocol",
        choices=("upstream", "extended"),
        default="extended",
        help="'extended' grants the protocol extensions a client asks for (clients that ask for none get the "
        "upstream protocol exactly); 'upstream' grants none, even when asked (default: extended)",
    )
    parser.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="run without checkpoint storage: checkpoints, restores and handoff are refused",
    )
    parser.add_argument(
        "--no-snapshots",
        action="store_true",
        help="run without filesystem snapshot storage",
    )
    parser.add_argument(
        "--lease-duration",
        type=float,
        default=60.0,
        help="seconds a handoff lock outlives its instance if that one dies (default: 60)",
    )
    parser.add_argument(
        "--lease-renewal-interval",
        type=float,
        default=20.0,
        help="seconds between renewals of a held handoff lock (default: 20)",
    )
    parser.add_argument(
        "--lock-wait-timeout",
        type=float,
        default=30.0,
        help="seconds an attach waits for another instance to hand a sandbox over (default: 30)",
    )
    parser.add_argument(
        "--detached-timeout",
        type=float,
        default=None,
        metavar="S",
        help="kill the processes of a sandbox that has had no client attached for S seconds (a running exec "
        "otherwise blocks idle expiry forever, as upstream) (default: no limit)",
    )
    parser.add_argument(
        "--send-timeout",
        type=float,
        default=DEFAULT_SEND_TIMEOUT,
        metavar="S",
        help="drop a client that has read nothing of what is waiting for it for S seconds; its output is kept "
        f"for a reconnect (default: {DEFAULT_SEND_TIMEOUT:g})",
    )
    parser.add_argument(
        "--isolation",
        choices=("auto", "bwrap", "none"),
        default="auto",
        help="how execs are confined: 'bwrap' (bubblewrap; fail if it is missing), 'none' (plain processes), "
        "'auto' (bwrap if it works here, else none with a warning) (default: auto)",
    )
    defaults = Limits()
    parser.add_argument(
        "--memory-limit",
        type=_size,
        default=defaults.memory,
        help="address space of each sandbox process (RLIMIT_AS), 0 for none (default: 1G)",
    )
    parser.add_argument(
        "--cpu-limit",
        type=_count,
        default=defaults.cpu_seconds,
        help="CPU seconds of each sandbox process (RLIMIT_CPU), 0 for none (default: 60)",
    )
    parser.add_argument(
        "--process-limit",
        type=_count,
        default=defaults.processes,
        help="processes per sandbox (RLIMIT_NPROC; enforced under bwrap when the server runs as root), "
        "0 for none (default: 256)",
    )
    parser.add_argument(
        "--output-limit",
        type=_size,
        default=defaults.output,
        help="stdout+stderr bytes per exec; beyond it the exec is killed, 0 for none (default: 64M)",
    )
    parser.add_argument(
        "--code-limit",
        type=_size,
        default=defaults.code,
        help="largest code of one exec request, 0 for none (default: 4M)",
    )
    parser.add_argument(
        "--stdin-rate",
        type=_size,
        default=defaults.stdin_rate,
        help="stdin bytes per second per exec; faster writes are throttled, a backlog past 8 s of it is "
        "refused with an error frame, 0 for none (default: 4M)",
    )
    parser.add_argument("--certfile", default=None, help="PEM certificate chain: serve wss:// (needs --keyfile)")
    parser.add_argument("--keyfile", default=None, help="PEM private key of --certfile")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default: INFO)",
    )


def _tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


async def _serve(args: argparse.Namespace, tls: ssl.SSLContext | None) -> None:
    limits = Limits(
        memory=args.memory_limit,
        cpu_seconds=args.cpu_limit,
        processes=args.process_limit,
        output=args.output_limit,
        code=args.code_limit,
        stdin_rate=args.stdin_rate,
    )
    server = LocalServer(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        protocol=args.protocol,
        checkpoints=not args.no_checkpoint,
        snapshots=not args.no_snapshots,
        lease_duration=args.lease_duration,
        lease_renewal_interval=args.lease_renewal_interval,
        lock_wait_timeout=args.lock_wait_timeout,
        isolation=args.isolation,
        limits=limits,
        ssl=tls,
        detached_timeout=args.detached_timeout,
        send_timeout=args.send_timeout,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
        # The one line on stdout: tools (and tests) parse the URL from it.
        sys.stdout.write(f"listening on {server.url}\n")
        sys.stdout.flush()
        await stop.wait()
        logger.info("shutting down")
    finally:
        await server.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None, *, prog: str = "python -m sandbox_server") -> int:
    """Run the server; ``prog`` is the command's name in help and errors (``sandbox serve`` there)."""
    parser = argparse.ArgumentParser(prog=prog, description="Local Cloud Run Sandbox server.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 < args.lease_renewal_interval < args.lease_duration:
        parser.error("--lease-renewal-interval must be positive and shorter than --lease-duration")
    if args.detached_timeout is not None and not args.detached_timeout > 0:
        parser.error("--detached-timeout must be positive")
    if not args.send_timeout > 0:
        parser.error("--send-timeout must be positive")
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        # websockets' per-connection chatter is noise at INFO.
        logging.getLogger("sandbox_server.websockets").setLevel(logging.WARNING)
    try:
        tls = _tls_context(args.certfile, args.keyfile)
    except (OSError, ssl.SSLError) as exc:
        logger.error("cannot load the TLS certificate or key: %s", exc)
        return 1
    try:
        asyncio.run(_serve(args, tls))
    except IsolationError as exc:
        logger.error("cannot start the server: %s", exc)
        return 1
    except OSError as exc:
        logger.error("cannot start the server: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
