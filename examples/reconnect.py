"""Auto-reconnect: a dropped connection is re-established and the exec's output keeps coming.

    python examples/reconnect.py

Locally, the example puts a proxy between client and server and cuts every
connection in the middle of an exec. Against ``CLOUD_RUN_URL`` it only runs
with auto-reconnect on (a real network cannot be cut on demand).
"""

import asyncio

from sandbox_asyncio import Sandbox

from _local import flaky_network, service_url

COUNT = "for i in 1 2 3 4 5; do echo $i; sleep 0.3; done"


async def main() -> None:
    async with (
        service_url() as direct_url,
        flaky_network(direct_url) as (url, proxy),
        Sandbox.create(url, enable_auto_reconnect=True) as sandbox,
    ):
        process = await sandbox.exec("bash", COUNT)
        print("read:", (await process.stdout.readline()).strip())
        if proxy is not None:
            proxy.cut()
            print("connection cut")
        rest = await process.stdout.read_all()
        print("read after the drop:", " ".join(rest.split()))
        print("reconnects:", sandbox.reconnects)
        # With the reference server (extension `seq`) nothing is lost or repeated;
        # against the upstream service output may be incomplete after a drop.
        print("output may be incomplete:", process.output_may_be_incomplete)


if __name__ == "__main__":
    asyncio.run(main())
