"""The life of a sandbox: create, detach with close(), attach again, kill a process, kill the sandbox.

python examples/lifecycle.py
"""

import asyncio

from sandbox_asyncio import Sandbox, SandboxCreationError

from _local import service_url


async def main() -> None:
    async with service_url() as url:
        # Not `async with`: this sandbox outlives the connection that made it.
        sandbox = await Sandbox.create(url, idle_timeout=600)
        sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
        assert sandbox_id is not None and token is not None
        process = await sandbox.exec("bash", "echo kept > state.txt")
        await process.wait()
        # close() detaches and leaves the sandbox running; keep the token secret.
        await sandbox.close()
        print("detached from", sandbox_id)

        sandbox = await Sandbox.attach(url, sandbox_id, token)
        process = await sandbox.exec("bash", "cat state.txt")
        print("attached again, file says:", (await process.stdout.read_all()).strip())

        # Kill one process: the sandbox stays usable.
        process = await sandbox.exec("python", "import time\nprint('working', flush=True)\ntime.sleep(600)")
        print("process says:", (await process.stdout.readline()).strip())
        await process.kill()
        print("process killed; exit code:", process.returncode)

        # Kill the sandbox: it is deleted on the server, and nobody can attach any more.
        await sandbox.kill()
        try:
            await Sandbox.attach(url, sandbox_id, token)
        except SandboxCreationError as exc:
            print("attach after kill refused:", exc.status)


if __name__ == "__main__":
    asyncio.run(main())
