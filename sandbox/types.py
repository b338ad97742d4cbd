"""Upstream's ``sandbox.types`` module: the status enum (complete here)."""

from sandbox_proto import Status

#: Upstream's name for the status enum.
SandboxEvent = Status

__all__ = ["SandboxEvent", "Status"]
