"""The ``sandbox`` command: run code in a sandbox, or serve a local sandbox server."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import functools
import logging
import os
import pwd
import shutil
import signal
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Literal, TextIO
from urllib.parse import urlsplit

from _sandbox_anyio import HandshakeRefused, SandboxProcess, SandboxStream
from sandbox_asyncio import Sandbox
from sandbox_proto import SandboxConnectionError, SandboxException, redact

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
#: Seconds of silence from the program, after our end of input, before saying that a server
#: without close_stdin cannot pass that end on: long enough that a program which never reads
#: stdin has usually finished (no note then), short enough to explain a wait before Ctrl-C.
STDIN_NOTE_AFTER = 2.0
STDIN_NOTE = "sandbox: the server cannot signal end of input (no close_stdin); the program may wait for more\n"


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
    commands.add_parser(
        "fuzz",
        help="property-based fuzzing of a server against a reference model (see 'sandbox fuzz --help')",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        from sandbox_server._cli import main as serve_main

        return serve_main(args_list[1:], prog="sandbox serve")
    if args_list[:1] == ["conformance"]:
        # The runner tests servers, not this client: it lives in its own package.
        from sandbox_conformance import main as conformance_main

        return conformance_main(args_list[1:], prog="sandbox conformance")
    if args_list[:1] == ["fuzz"]:
        try:
            from sandbox_conformance import fuzz_main
        except ModuleNotFoundError as error:
            print(f"sandbox fuzz: {error}", file=sys.stderr)  # noqa: T201 - the command's own error line
            return 2
        return fuzz_main(args_list[1:], prog="sandbox fuzz")
    args = _parser().parse_args(args_list)
    # The one handler: the exec does not ask for the library's own (enable_debug), which would
    # print each protocol line a second time, through this one, as its records propagate here.
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

    def stop(signum: int) -> None:
        received.append(signum)
        # Only the session is cancelled, never this task: stopping the local server (killing
        # the sandbox's processes, removing the folder with the code) must not be cut short.
        # A repeated signal cancels again, which abandons a slow kill of a remote sandbox.
        if session is not None:
            session.cancel()

    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    try:
        async with _service_url(args) as url:
            if received:  # arrived while the server was starting
                return 128 + received[0]
            # Whoever reads our output went away (`sandbox exec ... | head -1`): stop as a
            # program killed by SIGPIPE would, the sandbox and the local server cleaned up.
            reader_gone = functools.partial(stop, signal.SIGPIPE)
            session = asyncio.create_task(
                _session(url, args, code, forward_stdin=forward_stdin, reader_gone=reader_gone)
            )
            try:
                status = await session
            except asyncio.CancelledError:
                if not received:
                    raise
            if received:
                _flush(sys.stdout)
                return 128 + received[0]
            return status
    except _IsolationUnavailable as exc:
        sys.stderr.write(f"sandbox: error: {exc}\n")
        return EXIT_USAGE
    finally:
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)


async def _session(
    url: str, args: argparse.Namespace, code: str, *, forward_stdin: bool, reader_gone: Callable[[], None]
) -> int:
    try:
        async with asyncio.timeout(args.timeout):
            return await _run(url, args, code, forward_stdin=forward_stdin, reader_gone=reader_gone)
    except TimeoutError:
        _say(f"sandbox: gave up after {args.timeout:g}s\n")
        return EXIT_TIMEOUT
    except SandboxConnectionError as exc:
        _say(f"sandbox: {_connection_failure(exc, url)}\n")
        return EXIT_FAILURE
    except SandboxException as exc:
        _say(f"sandbox: {exc}\n")
        return EXIT_FAILURE


def _connection_failure(exc: SandboxConnectionError, url: str) -> str:
    """The library's message, with the likely cause when it alone would mislead or say nothing."""
    parts = urlsplit(url)
    safe = redact(url)
    if isinstance(exc, HandshakeRefused) and exc.http_status in (403, 404) and parts.path.strip("/"):
        # A sandbox server refuses a WebSocket to a path it does not serve with 403 (as upstream
        # does): a wrong path, not the Cloud Run IAM refusal the library's message suggests.
        return (
            f"{safe}: the server refused the WebSocket with HTTP {exc.http_status}: it has no sandbox endpoint "
            f"under {parts.path!r}; give the service's root URL (the client adds /create to it)"
        )
    # The transports raise their own error "from None": what the socket said is the context.
    cause = exc.__context__
    if parts.scheme in ("https", "wss") and "cannot connect" in str(exc) and _tls_refused(cause):
        detail = str(cause) or type(cause).__name__
        plain = redact(parts._replace(scheme="http" if parts.scheme == "https" else "ws").geturl())
        return (
            f"{safe}: cannot connect: the TLS handshake failed ({detail}): does the server serve TLS? "
            f"For a plain server use {plain}"
        )
    return str(exc)


def _tls_refused(cause: BaseException | None) -> bool:
    """What a plain-HTTP server answers to a TLS ClientHello, as the TLS client sees it."""
    if isinstance(cause, ssl.SSLCertVerificationError | ConnectionRefusedError):
        return False  # a real TLS server with an untrusted certificate; nobody listening
    return isinstance(cause, ssl.SSLError | ConnectionError | EOFError)


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


async def _run(
    url: str, args: argparse.Namespace, code: str, *, forward_stdin: bool, reader_gone: Callable[[], None]
) -> int:
    # No enable_debug: --debug configures logging for the whole command (see main).
    async with Sandbox.create(url, idle_timeout=args.idle_timeout) as sandbox:
        process = await sandbox.exec(args.language, code)
        activity = _Activity()
        pumps = [
            asyncio.create_task(_copy(process.stdout, sys.stdout, activity, reader_gone)),
            asyncio.create_task(_copy(process.stderr, sys.stderr, activity, reader_gone)),
        ]
        can_close = "close_stdin" in sandbox.extensions
        feeder = asyncio.create_task(_end_stdin(process, activity, forward=forward_stdin, can_close=can_close))
        try:
            returncode = await process.wait(timeout=None)
            await asyncio.gather(*pumps)
        finally:
            # The pumps too: after a timeout or a signal they would outlive the sandbox.
            helpers = [*pumps, feeder]
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


class _Activity:
    """When the program last wrote anything; :meth:`quiet_for` waits for a silence."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._silence = 0.0
        self._timer: asyncio.Timeout | None = None

    def touch(self) -> None:
        self._last = self._loop.time()
        if self._timer is not None:
            self._timer.reschedule(self._last + self._silence)

    async def quiet_for(self, seconds: float) -> None:
        """Return once nothing has been written for ``seconds``: each write pushes the deadline."""
        self._silence = seconds
        try:
            async with asyncio.timeout_at(self._last + seconds) as self._timer:
                await self._loop.create_future()  # only the deadline ends this
        except TimeoutError:
            return
        finally:
            self._timer = None


async def _copy(stream: SandboxStream, out: TextIO, activity: _Activity, reader_gone: Callable[[], None]) -> None:
    while chunk := await stream.read(timeout=None):
        activity.touch()
        try:
            out.write(chunk)
            out.flush()
        except BrokenPipeError:
            _discard(out)
            reader_gone()
            return


def _discard(out: TextIO) -> None:
    """Point ``out`` at /dev/null: what is still buffered for a reader that left cannot raise again.

    Else the flush at interpreter exit prints "Exception ignored ... BrokenPipeError".
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, out.fileno())
    finally:
        os.close(devnull)


def _flush(out: TextIO) -> None:
    try:
        out.flush()
    except BrokenPipeError:
        _discard(out)


def _say(text: str) -> None:
    """A line of ours on stderr, which may be a pipe whose reader has left."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except BrokenPipeError:
        _discard(sys.stderr)


async def _end_stdin(process: SandboxProcess, activity: _Activity, *, forward: bool, can_close: bool) -> None:
    """Forward our stdin (unless it held the code), then pass its end on to the program.

    Without close_stdin the program's stdin stays open, and one that reads it to the end
    waits forever. The command waits too (killing a program that may just be computing
    quietly would lose its work on a guess) and says why, once, if the program goes quiet;
    --timeout and Ctrl-C end the wait.
    """
    if forward:
        await _forward_stdin(process)
    if can_close:
        await process.close_stdin()
        return
    activity.touch()
    await activity.quiet_for(STDIN_NOTE_AFTER)
    _say(STDIN_NOTE)


async def _forward_stdin(process: SandboxProcess) -> None:
    """Forward our stdin to the process until it ends."""
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
