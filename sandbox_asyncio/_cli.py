"""The ``sandbox`` command: run code in a sandbox, or serve a local sandbox server."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Sequence

from _sandbox_anyio import SandboxProcess, SandboxStream
from sandbox_proto import SandboxException

from ._sandbox import Sandbox

EXIT_FAILURE = 1


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
    run.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: none)")
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
        from sandbox_conformance import main as conformance_main

        return conformance_main(args_list[1:], prog="sandbox conformance")
    args = _parser().parse_args(args_list)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s")
    if not args.url and not args.debug:
        # The embedded server's startup notes are for `sandbox serve`, not for one exec.
        logging.getLogger("sandbox_server").setLevel(logging.ERROR)
    code = sys.stdin.read() if args.code == "-" else args.code
    try:
        return asyncio.run(_exec(args, code, forward_stdin=args.code != "-"))
    except KeyboardInterrupt:
        return 130


async def _exec(args: argparse.Namespace, code: str, *, forward_stdin: bool) -> int:
    async with _service_url(args.url) as url:
        try:
            async with asyncio.timeout(args.timeout):
                return await _run(url, args, code, forward_stdin=forward_stdin)
        except TimeoutError:
            sys.stderr.write(f"sandbox: gave up after {args.timeout:g}s\n")
            return EXIT_FAILURE
        except SandboxException as exc:
            sys.stderr.write(f"sandbox: {exc}\n")
            return EXIT_FAILURE


@contextlib.asynccontextmanager
async def _service_url(url: str | None) -> AsyncIterator[str]:
    if url:
        yield url
        return
    from sandbox_server import LocalServer

    async with LocalServer(host="127.0.0.1", port=0) as server:
        yield server.url


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
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError, SandboxException):
                    await feeder
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
