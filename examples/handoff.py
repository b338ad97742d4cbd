"""Handoff: a sandbox moves to the instance the next client reaches.

    python examples/handoff.py

Cloud Run may route a later connection to another instance of the service. A
sandbox created with ``enable_sandbox_handoff`` then moves: the instance that
has it checkpoints it, the new one restores it. Locally this example starts
two servers sharing one state directory, and attaches through the second.
"""

import asyncio

from sandbox_asyncio import Sandbox, SandboxDeletedError

from _local import two_instances


async def main() -> None:
    # A short poll for waiting instances keeps the local demo quick (the default is 1 s).
    async with two_instances(handoff_poll_interval=0.2) as (url_a, url_b):
        first = await Sandbox.create(url_a, enable_sandbox_checkpoint=True, enable_sandbox_handoff=True)
        sandbox_id, token = first.sandbox_id, first.sandbox_token
        assert sandbox_id is not None and token is not None
        process = await first.exec("bash", "echo 'written on instance A' > note.txt")
        await process.wait()
        print("created", sandbox_id, "on instance A")

        # Attaching through B asks A to give the sandbox up.
        async with Sandbox.attach(url_b, sandbox_id, token) as second:
            process = await second.exec("bash", "cat note.txt")
            print("instance B sees:", (await process.stdout.read_all()).strip())

            # The first client learns that its sandbox left; it must not reconnect.
            reason = await first.wait_closed(timeout=30)
            print("first client ended:", type(reason).__name__)
            assert isinstance(reason, SandboxDeletedError)
        await first.close()


if __name__ == "__main__":
    asyncio.run(main())
