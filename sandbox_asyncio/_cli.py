"""The ``sandbox`` command: run code in a sandbox, or serve a local sandbox server."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import logging
import os
import pwd
import shutil
import signal
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Literal

from _sandbox_anyio import SandboxProcess, SandboxStream
from sandbox_proto import SandboxException

from ._sandbox import Sandbox

EXIT_FAILURE = 1
#: Bad usage, or an --isolation that cannot be provided (argparse exits with 2 too).
EXIT_USAGE = 2
#: As timeout(1), so that scripts tell "gave up" from the program's own failure.
EXIT_TIMEOUT = 124
#: Signals that stop `sandbox exec` the way Ctrl-C does: the sandbox is killed and the
#: local server's folder (the user's code) removed. SIGHUP: a closed terminal.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Seconds the embedded server lets a sandbox's processes run with no client attached
#: (an exec outliving its client, e.g. while the CLI is stopping).
EMBEDDED_DETACHED_TIMEOUT = 60.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandbox", description="Run code in a Cloud Run Sandbox.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "exec",
        help="run code in a new sandbox and stream its output",
        description="Run CODE in a new sandbox. Without --url or CLOUD_RUN_URL, a local server is started for it.",
    )
    run.add_argument("language", choices=["python", "bash"], help="language of CODE")
    run.add_argument("code", help="the code to run; '-' reads it from standard input")
    run.add_argument("--url", default=os.environ.get("CLOUD_RUN_URL"), help="service URL (default: $CLOUD_RUN_URL)")
    run.add_argument("--idle-timeout", type=float, default=60, help="sandbox idle timeout in seconds (default 60)")
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"give up after this many seconds, exit status {EXIT_TIMEOUT} (default: none)",
    )
    run.add_argument(
        "--isolation",
        choices=["auto", "bwrap", "none"],
        default=None,
        help="local server only: bwrap (bubblewrap required), none (plain processes of your user), "
        "auto (bwrap if it works, else none with a warning; the default)",
    )
    run.add_argument("--debug", action="store_true", help="log the protocol to stderr")

    commands.add_parser("serve", help="run the local sandbox server (see 'sandbox serve --help')", add_help=False)
    commands.add_parser(
        "conformance",
        help="check a server against the protocol's conformance vectors (see 'sandbox conformance --help')",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        from sandbox_server._cli import main as serve_main

        return serve_main(args_list[1:])
    if args_list[:1] == ["conformance"]:
        # The runner tests servers, not this client: it lives in its own package.
        from sandbox_conformance import main as conformance_main

        return conformance_main(args_list[1:], prog="sandbox conformance")
    args = _parser().parse_args(args_list)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s")
    if not args.url and not args.debug:
        # The embedded server's startup notes are for `sandbox serve`, not for one exec.
        logging.getLogger("sandbox_server").setLevel(logging.ERROR)
    if args.url and args.isolation is not None:
        # A remote service confines code its own way: accepting the option would promise what we cannot check.
        sys.stderr.write("sandbox: error: --isolation applies to the local server only, not with --url\n")
        return EXIT_USAGE
    try:
        code = sys.stdin.read() if args.code == "-" else args.code
        return asyncio.run(_exec(args, code, forward_stdin=args.code != "-"))
    except KeyboardInterrupt:
        # Only before or after the event loop, where nothing is left to clean up.
        return 128 + signal.SIGINT


async def _exec(args: argparse.Namespace, code: str, *, forward_stdin: bool) -> int:
    """Run the exec; a stop signal cancels it, then the server's cleanup runs to the end."""
    loop = asyncio.get_running_loop()
    received: list[int] = []
    session: asyncio.Task[int] | None = None

    def on_signal(signum: int) -> None:
        received.append(signum)
        # Only the session is cancelled, never this task: stopping the local server (killing
        # the sandbox's processes, removing the folder with the code) must not be cut short.
        # A repeated signal cancels again, which abandons a slow kill of a remote sandbox.
        if session is not None:
            session.cancel()

    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        async with _service_url(args) as url:
            if received:  # arrived while the server was starting
                return 128 + received[0]
            session = asyncio.create_task(_session(url, args, code, forward_stdin=forward_stdin))
            try:
                status = await session
            except asyncio.CancelledError:
                if not received:
                    raise
            if received:
                sys.stdout.flush()
                return 128 + received[0]
            return status
    except _IsolationUnavailable as exc:
        sys.stderr.write(f"sandbox: error: {exc}\n")
        return EXIT_USAGE
    finally:
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)


async def _session(url: str, args: argparse.Namespace, code: str, *, forward_stdin: bool) -> int:
    try:
        async with asyncio.timeout(args.timeout):
            return await _run(url, args, code, forward_stdin=forward_stdin)
    except TimeoutError:
        sys.stderr.write(f"sandbox: gave up after {args.timeout:g}s\n")
        return EXIT_TIMEOUT
    except SandboxException as exc:
        sys.stderr.write(f"sandbox: {exc}\n")
        return EXIT_FAILURE


class _IsolationUnavailable(Exception):
    """``--isolation bwrap`` on a machine where bubblewrap is missing or does not work."""


@contextlib.asynccontextmanager
async def _service_url(args: argparse.Namespace) -> AsyncIterator[str]:
    if args.url:
        yield args.url
        return
    from sandbox_server import IsolationError, LocalServer

    requested: Literal["auto", "bwrap", "none"] = args.isolation or "auto"
    # Nobody reattaches to this short-lived server's sandboxes: bound what runs unattended.
    server = LocalServer(host="127.0.0.1", port=0, isolation=requested, detached_timeout=EMBEDDED_DETACHED_TIMEOUT)
    try:
        await server.start()
    except IsolationError as exc:
        raise _IsolationUnavailable(
            f"--isolation bwrap: {exc} (install bubblewrap, or use --isolation auto or none)"
        ) from exc
    try:
        if requested == "auto" and server.manager.isolation.name == "none":
            # The server's own warning is silenced above (it is meant for `sandbox serve`): say it here, once.
            _warn_unisolated()
        yield server.url
    finally:
        await server.stop()


def _warn_unisolated() -> None:
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = f"uid {os.geteuid()}"
    # Same lookup as the server's: a bwrap on PATH that fell back is one that does not work here.
    if shutil.which("bwrap") is None:
        reason, hint = "bubblewrap not found", "install bubblewrap"
    else:
        reason, hint = "bubblewrap does not work here", "--isolation bwrap shows why"
    sys.stderr.write(
        f"sandbox: warning: {reason}; code runs unisolated as {user} ({hint}, or --isolation none to silence)\n"
    )
    sys.stderr.flush()


async def _run(url: str, args: argparse.Namespace, code: str, *, forward_stdin: bool) -> int:
    async with Sandbox.create(url, idle_timeout=args.idle_timeout, enable_debug=args.debug) as sandbox:
        process = await sandbox.exec(args.language, code)
        pumps = [
            asyncio.create_task(_copy(process.stdout, sys.stdout)),
            asyncio.create_task(_copy(process.stderr, sys.stderr)),
        ]
        feeder = asyncio.create_task(_feed_stdin(process)) if forward_stdin else None
        try:
            returncode = await process.wait(timeout=None)
            await asyncio.gather(*pumps)
        finally:
            # The pumps too: after a timeout or a signal they would outlive the sandbox.
            helpers = [*pumps, feeder] if feeder is not None else pumps
            for helper in helpers:
                helper.cancel()
            # asyncio.wait, not suppress(CancelledError): a signal's cancel of this task must not be swallowed.
            await asyncio.wait(helpers)
            for helper in helpers:
                error = None if helper.cancelled() else helper.exception()
                # A closed sandbox's error is not news here; a bug is.
                if error is not None and not isinstance(error, SandboxException):
                    raise error
    if returncode is None:
        return 0
    return 128 - returncode if returncode < 0 else returncode


async def _copy(stream: SandboxStream, out: object) -> None:
    write = out.write  # type: ignore[attr-defined]
    flush = out.flush  # type: ignore[attr-defined]
    while chunk := await stream.read(timeout=None):
        write(chunk)
        flush()


async def _feed_stdin(process: SandboxProcess) -> None:
    """Forward our stdin to the process; at end of input, close its stdin if the server can."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    fd = sys.stdin.fileno() if sys.stdin is not None else -1

    def reader() -> None:
        # A thread, because a terminal's stdin cannot be read without blocking portably.
        while True:
            try:
                data = os.read(fd, 65536)
            except (OSError, ValueError):
                data = b""
            loop.call_soon_threadsafe(queue.put_nowait, data)
            if not data:
                return

    threading.Thread(target=reader, name="sandbox-stdin", daemon=True).start()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while data := await queue.get():
        text = decoder.decode(data)
        if text:
            await process.write_to_stdin(text)
    if tail := decoder.decode(b"", final=True):
        await process.write_to_stdin(tail)
    if "close_stdin" in process._sandbox.extensions:
        await process.close_stdin()


if __name__ == "__main__":
    sys.exit(main())
