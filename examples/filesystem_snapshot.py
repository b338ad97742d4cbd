"""Snapshot a sandbox's files, then start new sandboxes from the snapshot.

    python examples/filesystem_snapshot.py

A snapshot holds files only (no memory, no processes), and any number of
sandboxes can start from it: prepare an environment once, reuse it often.
"""

import asyncio
import uuid

from sandbox_asyncio import Sandbox

from _local import service_url


async def main() -> None:
    name = f"example-env-{uuid.uuid4().hex[:8]}"  # a shared service keeps every name
    async with service_url() as url:
        async with Sandbox.create(url) as builder:
            process = await builder.exec("bash", "mkdir -p env && echo 'prepared once' > env/README")
            await process.wait()
            await builder.snapshot_filesystem(name)
            print("snapshot", name, "saved")

        async with Sandbox.create(url, filesystem_snapshot_name=name) as user:
            process = await user.exec("bash", "cat env/README")
            print("new sandbox sees:", (await process.stdout.read_all()).strip())


if __name__ == "__main__":
    asyncio.run(main())
