"""Refresh timing and the refresh rate limiter (pure; no I/O).

Timing follows both official connectors: with ``d`` = time left on the
client certificate, refresh at ``d/2`` when ``d >= 1h``, otherwise at
``d - 4min`` (immediately when less than 4 minutes remain). Refreshes pass
through a token bucket with a burst of 2 and one token per 30 seconds, so a
flapping instance cannot hammer the Admin API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

REFRESH_BUFFER = 4 * 60.0
RATE_INTERVAL = 30.0
RATE_BURST = 2


def seconds_until_refresh(expiry: float, now: float) -> float:
    """Delay before the next refresh; both arguments are UNIX timestamps."""
    left = expiry - now
    if left < 3600.0:
        return 0.0 if left < REFRESH_BUFFER else left - REFRESH_BUFFER
    return left / 2


def lazy_needs_refresh(expiry: float, now: float) -> bool:
    return now >= expiry - REFRESH_BUFFER


class RateLimiter:
    """Asynchronous token bucket."""

    def __init__(
        self,
        burst: int = RATE_BURST,
        interval: float = RATE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _fill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) / self._interval)
        self._stamp = now

    def wait_time(self) -> float:
        """Seconds until a token is available (0 if one is now)."""
        self._fill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) * self._interval

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                delay = self.wait_time()
                if delay <= 0:
                    self._tokens -= 1
                    return
                await asyncio.sleep(delay)
