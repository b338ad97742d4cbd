"""An interactive shell in a sandbox: your stdin goes to the process, its output comes back.

    python examples/shell.py
    printf 'cd /tmp\\npwd\\n' | python examples/shell.py

Each line you type runs in one long-lived bash process, so `cd` and variables
persist. End with Ctrl-D.
"""

import asyncio
import sys

from sandbox_asyncio import Sandbox, SandboxStream

from _local import service_url

# Every line read is one command; bash's own stdin stays the pipe from this program.
SHELL = 'while IFS= read -r line; do eval "$line"; echo "[exit $?]"; done'


async def copy(stream: SandboxStream, out: object) -> None:
    while chunk := await stream.read(timeout=None):
        out.write(chunk)  # type: ignore[attr-defined]
        out.flush()  # type: ignore[attr-defined]


async def main() -> None:
    async with service_url() as url, Sandbox.create(url) as sandbox:
        process = await sandbox.exec("bash", SHELL)
        pumps = [
            asyncio.create_task(copy(process.stdout, sys.stdout)),
            asyncio.create_task(copy(process.stderr, sys.stderr)),
        ]
        # A thread reads the terminal, which asyncio cannot do portably without blocking.
        while line := await asyncio.to_thread(sys.stdin.readline):
            await process.write_to_stdin(line)
        # End of our input: end the shell's too, if the server can signal EOF; else kill it.
        if "close_stdin" in sandbox.extensions:
            await process.close_stdin()
            await process.wait()
        else:
            await process.kill()
        await asyncio.gather(*pumps)


if __name__ == "__main__":
    asyncio.run(main())
