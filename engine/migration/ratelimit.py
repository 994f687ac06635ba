"""``max-bandwidth`` as a byte budget per window (QEMU's migration/rate-limit.c).

QEMU counts the bytes written in each BUFFER_DELAY (100 ms) window and, once
a window's share is used up, sleeps until the window ends
(migration_rate_limit).  The limiter is owned by the migration thread; only
``limit`` is written from elsewhere (migrate-set-parameters, under the GIL:
one attribute store), and the next window reads it.
"""
from __future__ import annotations

import threading
import time

from engine.migration.ramsave import BATCH_PAGES
from engine.trace import trace

__all__ = ["RateLimiter", "WINDOW_SECONDS"]

#: QEMU's BUFFER_DELAY: the rate limiter's and the bandwidth meter's window.
WINDOW_SECONDS = 0.1


class RateLimiter:
    """``max-bandwidth`` as a byte budget per 100 ms window (0 = unlimited)."""

    def __init__(self, bytes_per_second: int, clock=time.monotonic, sleep=time.sleep):
        self.limit = bytes_per_second
        self.clock, self.sleep = clock, sleep
        self.window_start = clock()
        self.used = 0

    def account(self, nbytes: int) -> None:
        self.used += nbytes

    def exceeded(self) -> bool:
        if not self.limit:
            return False
        now = self.clock()
        if now - self.window_start >= WINDOW_SECONDS:
            self.window_start, self.used = now, 0
            return False
        return self.used >= self.limit * WINDOW_SECONDS

    def wait(self, cancelled: threading.Event) -> None:
        """Sleep until the current window ends (or cancel)."""
        remaining = self.window_start + WINDOW_SECONDS - self.clock()
        trace("migration_rate_limit_pre", ms=int(max(0.0, remaining) * 1000))
        if remaining > 0:
            cancelled.wait(remaining)
        trace("migration_rate_limit_post", urgent=cancelled.is_set())
        self.window_start, self.used = self.clock(), 0

    def wait_or(self, event: threading.Event) -> None:
        """Sleep until the current window ends, or less if ``event`` is set (a
        postcopy page request must not wait for the background's budget)."""
        remaining = self.window_start + WINDOW_SECONDS - self.clock()
        if remaining > 0 and event.wait(remaining):
            return
        self.window_start, self.used = self.clock(), 0

    def room(self) -> int | None:
        """Bytes the current window still allows; None when unlimited."""
        if not self.limit:
            return None
        return max(0, int(self.limit * WINDOW_SECONDS) - self.used)

    def batch_pages(self, bytes_per_page: int, most: int = BATCH_PAGES) -> int:
        """Pages for the next batch: at most ``most``, and no more than what is
        left of the window's budget at ``bytes_per_page``.

        What is left, not the whole budget: a batch sized by the budget and
        sent just under it would let a window carry nearly twice its bytes.
        At least one page, so a migration always moves.
        """
        room = self.room()
        if room is None:
            return most
        return max(1, min(most, room // bytes_per_page))

    def disable(self) -> None:
        self.limit = 0
