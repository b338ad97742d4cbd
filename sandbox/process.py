"""Upstream's ``sandbox.process`` module."""

from sandbox_asyncio import SandboxProcess, SandboxStream

__all__ = ["SandboxProcess", "SandboxStream"]
