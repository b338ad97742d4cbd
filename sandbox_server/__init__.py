"""Local reference server of the Cloud Run Sandbox protocol (asyncio, ``websockets``).

Run it with ``python -m sandbox_server``, or embed it::

    async with LocalServer(port=0) as server:
        print(server.url)
"""

from ._app import LocalServer
from ._cli import main
from ._isolation import IsolationError, Limits

__all__ = ["IsolationError", "Limits", "LocalServer", "main"]
