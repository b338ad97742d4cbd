"""Run code in a sandbox and read its output (asyncio).

python examples/basic.py                # embedded local server
CLOUD_RUN_URL=https://... python examples/basic.py
"""

import asyncio

from sandbox_asyncio import Sandbox  # `from sandbox import Sandbox` works too (upstream's name)

from _local import service_url


async def main() -> None:
    # Leaving the block kills the sandbox.
    async with service_url() as url, Sandbox.create(url) as sandbox:
        process = await sandbox.exec("bash", "echo 'Hello from the sandbox!'")
        print(await process.stdout.read_all(), end="")
        # None when the server does not report exit codes (the upstream service).
        print("exit code:", await process.wait())

        # Output streams line by line as the program writes it.
        process = await sandbox.exec("python", "import sys\nfor i in range(3): print('line', i)\nsys.exit(2)")
        async for line in process.stdout:
            print("got:", line, end="")
        print("exit code:", await process.wait())


if __name__ == "__main__":
    asyncio.run(main())
