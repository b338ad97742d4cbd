"""Checkpoint a sandbox, then attach to it again: its files come back (on the real service, its memory too).

python examples/checkpoint.py
"""

import asyncio

from sandbox_asyncio import Sandbox

from _local import service_url


async def main() -> None:
    async with service_url() as url:
        sandbox = await Sandbox.create(url, enable_sandbox_checkpoint=True)
        sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
        assert sandbox_id is not None and token is not None
        print("created", sandbox_id)

        process = await sandbox.exec("bash", "echo 'state before the checkpoint' > note.txt")
        await process.wait()

        # The checkpoint ends this connection: the sandbox now lives only in storage.
        await sandbox.checkpoint()
        print("checkpointed; state:", sandbox.state)

        # Attach with the id and token (from anywhere, any time later): the server restores it.
        async with Sandbox.attach(url, sandbox_id, token) as restored:
            process = await restored.exec("bash", "cat note.txt")
            print("restored:", (await process.stdout.read_all()).strip())


if __name__ == "__main__":
    asyncio.run(main())
