"""The basic example on trio: the same calls, plus the one difference, nurseries.

python examples/basic_trio.py
"""

import trio
from sandbox_trio import Sandbox

from _local import service_url_in_thread


async def main(url: str) -> None:
    # Exactly as on asyncio: the block owns the sandbox and kills it at the end.
    async with Sandbox.create(url) as sandbox:
        process = await sandbox.exec("bash", "echo 'Hello from the sandbox!'")
        print(await process.stdout.read_all(), end="")
        print("exit code:", await process.wait())

    # A sandbox that outlives one block runs its connection's tasks in a nursery you give it.
    async with trio.open_nursery() as nursery:
        sandbox = await Sandbox.create(url, nursery=nursery)
        process = await sandbox.exec("python", "print(6 * 7)")
        print("6 * 7 =", (await process.stdout.read_all()).strip())
        await sandbox.kill()  # the nursery can close once the sandbox is gone


if __name__ == "__main__":
    with service_url_in_thread() as url:
        trio.run(main, url)
