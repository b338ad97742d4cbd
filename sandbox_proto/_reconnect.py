"""When to reconnect, and where: the backoff policy and the next handshake."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Jitter needs no per-session generator; a Random costs 2.5 KB, a lot for idle sandboxes.
SHARED_RNG = random.Random()

# Handshake refusals that a retry cannot fix (protocol.md 2.4).
NON_RETRYABLE_HTTP_STATUSES = frozenset({400, 401, 403, 404})


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """Capped exponential backoff with full jitter and a total deadline (7.12)."""

    initial_delay: float = 0.1
    max_delay: float = 8.0
    multiplier: float = 2.0
    #: Give up when this many seconds have passed since the connection was lost.
    deadline: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Delay before ``attempt`` (1-based); the first retry is immediate-ish."""
        if attempt <= 1:
            return 0.0
        ceiling = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 2))
        return rng.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True, slots=True)
class Handshake:
    """Where and how the adapter must open the next WebSocket."""

    # Carries the token in its query (2.3): never in a repr; log ``safe_url``.
    url: str = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    #: The URL with the token hidden, for logs and error messages.
    safe_url: str = ""
