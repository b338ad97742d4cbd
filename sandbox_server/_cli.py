"""``python -m sandbox_server`` (also ``sandbox serve``): run the local server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from ._app import LocalServer

__all__ = ["add_arguments", "main"]

logger = logging.getLogger("sandbox_server")


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
        help="'upstream' switches every protocol extension off (default: extended)",
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
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default: INFO)",
    )


async def _serve(args: argparse.Namespace) -> None:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox_server", description="Local Cloud Run Sandbox server.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 < args.lease_renewal_interval < args.lease_duration:
        parser.error("--lease-renewal-interval must be positive and shorter than --lease-duration")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        # websockets' per-connection chatter is noise at INFO.
        logging.getLogger("sandbox_server.websockets").setLevel(logging.WARNING)
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        logger.error("cannot start the server: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
