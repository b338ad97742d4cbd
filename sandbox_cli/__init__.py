"""The ``sandbox`` command and the pytest plugin: the parts that use every package.

They live here, not in ``sandbox_asyncio``, so that importing the asyncio
client loads neither the trio client nor the local server.
"""

from ._cli import main

__all__ = ["main"]
