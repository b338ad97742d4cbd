"""Upstream's ``sandbox.sandbox`` module."""

from sandbox_asyncio import Sandbox

__all__ = ["Sandbox"]
