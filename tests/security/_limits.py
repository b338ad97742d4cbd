"""The limits of the security tests' server: small enough that attacks hit them in a second or two."""

from sandbox_server import Limits

MiB = 2**20

LIMITS = Limits(memory=512 * MiB, cpu_seconds=2, processes=64, output=1 * MiB, code=64 * 1024, stdin_rate=64 * 1024)
