"""One adaptive limit on Gemini calls in flight per process, shared by every invocation.

Gemini's quotas (requests and tokens per minute, per model and project, shared
with every other program of the project) are unknown to the function and
change with the model, tier and region. A fixed number of calls in flight
either wastes most of the quota or storms it with 429s. So the limit is found
the way TCP finds a network's capacity, with the congestion window of TCP CUBIC
(RFC 9438) as the model, applied to calls in flight instead of packets:

- **Slow start.** The limit starts at :data:`INITIAL_LIMIT` and grows by half a
  call for each call that succeeds while the limit was full (x1.5 a round trip),
  until the first 429; that first burst may take it back to where it was a round
  trip before (:data:`SLOW_START_BETA`).
- **Multiplicative decrease, one 429 at a time.** Each 429 for a rate quota takes
  one off the limit, but one burst of 429s (the calls admitted before the first
  cut) takes it down by at most a factor :data:`BETA` (0.5, TCP Reno's halving;
  CUBIC and the AWS SDKs' adaptive mode use 0.7, which measured more 429s here
  when a quota is cut, for no gain elsewhere); calls admitted after a cut that
  meet 429 again start a new burst. A probe one call too far costs exactly one
  call off, and a quota cut by three quarters is followed within two bursts.
- **Memory of the last 429.** The limit then stays just below the level of the
  last 429 (CUBIC's W_max, taken after the cut: a burst's 429s say how far the
  quota is below where the burst began) and probes one above it only after
  :data:`PROBE_S` seconds without a 429; each probe that passes halves the wait
  for the next, down to :data:`MIN_PROBE_S` (CUBIC's convex growth: another user
  of the quota left), each 429 restores it. Processes sharing a quota each probe,
  so the 429s they cause together are about processes / PROBE_S a second: slow
  probes keep them a small share of the calls.
- **RetryInfo pauses the process.** A 429 that says when to come back stops every
  new call of every invocation of the process until then, not only the call
  that got it (the AWS SDKs' client-side rate limiter does the same).
- **Nothing learnt from idle time.** A success grows the limit only when the
  call had found the limit full, so a quiet process does not talk itself into a
  limit it never tried.

Per-day quotas never move the limit: no wait within a call outlasts them. Each
process adapts on its own, so instances sharing one quota each back off at their
own 429s and together settle under it, as TCP flows do on one link.

Each invocation runs its own event loop in its own thread: the state is guarded
by a :class:`threading.Lock`, a waiting caller waits on a future of its own
loop (never blocking it), and a waiter cancelled or timed out gives back the
slot it may have been granted meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum

log = logging.getLogger(__name__)

INITIAL_LIMIT = 4
BETA = 0.5
# Slow start grows by this for each call that found the limit full: x1.5 a round trip, so
# the first 429s come at most half a quota past it (TCP's x2 would allow a whole quota).
SLOW_START_STEP = 0.5
# The first burst ends slow start: the limit was at most this factor of it a round trip ago
# with no 429, so it may fall that far (TCP's halving), where later bursts fall by BETA at most.
SLOW_START_BETA = 1 / 1.5
PROBE_S = 10.0
MIN_PROBE_S = 2.5
# RetryInfo beyond this is capped: a quota that far off is a per-day one in disguise.
MAX_PAUSE_S = 60.0


class CallOutcome(Enum):
    OK = "ok"  # answered: the quota had room
    THROTTLED = "throttled"  # 429 for a rate quota: over the limit
    OTHER = "other"  # anything else (5xx, timeouts, per-day quota): says nothing of the limit


@dataclass(frozen=True)
class Ticket:
    """One admitted call: the cuts and the moments of a full limit before it was admitted."""

    epoch: int
    fulls: int


@dataclass(frozen=True)
class GateState:
    """What the gate is doing now, for logs, responses and the progress bar."""

    limit: int
    in_flight: int
    waiting: int
    throttled: int  # rate-limit 429s absorbed since the process started
    ceiling: int


class _Waiter:
    __slots__ = ("future", "loop", "ticket")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.ticket: Ticket | None = None  # set, under the lock, once a slot is granted


class Slot:
    """A call's place in the gate; :meth:`settle` says how the call went."""

    __slots__ = ("outcome", "retry_after_s", "ticket")

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.outcome = CallOutcome.OTHER
        self.retry_after_s: float | None = None

    def settle(self, outcome: CallOutcome, *, retry_after_s: float | None = None) -> None:
        self.outcome = outcome
        self.retry_after_s = retry_after_s


class CallGate:
    """The process's limit on Gemini calls in flight; at most ``ceiling`` (MODEL_CONCURRENCY)."""

    def __init__(
        self,
        ceiling: int,
        *,
        initial: int = INITIAL_LIMIT,
        adaptive: bool = True,
        probe_s: float = PROBE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ceiling = max(1, ceiling)
        # Not adaptive (ADAPTIVE_LIMIT=false): a fixed limit of ``ceiling``, as if the quota
        # were known, and each call rides out its own 429s (no pause for the others).
        self._adaptive = adaptive
        start = initial if adaptive else self._ceiling
        self._limit = float(min(self._ceiling, max(1, start)))
        self._probe_base = probe_s
        self._probe_s = probe_s
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._waiters: deque[_Waiter] = deque()
        self._w_max: float | None = None  # the limit where 429s last began; None: slow start
        self._epoch = 0  # cuts so far: a 429 of a call admitted since the last cut starts a burst
        self._fulls = 0  # times the limit was found full (a call admitted to the last place, or
        # one made to wait): a call in flight at such a time was limited by it
        self._floor = 1.0  # the lowest this burst may take the limit
        self._last_change = clock()
        self._pause_until = 0.0
        self._timer: threading.Timer | None = None
        self._throttled = 0
        self._logged = int(self._limit)

    @property
    def state(self) -> GateState:
        with self._lock:
            return GateState(
                limit=int(self._limit),
                in_flight=self._in_flight,
                waiting=len(self._waiters),
                throttled=self._throttled,
                ceiling=self._ceiling,
            )

    async def take(self) -> Slot:
        """A place held past one call: taken here, given back (:meth:`give_back`) by whichever
        task ends its use. With ``adaptive=False`` the gate is a semaphore that is safe across
        threads and event loops."""
        return Slot(await self._acquire())

    def give_back(self, slot: Slot) -> None:
        self._release(slot)

    @property
    def full(self) -> bool:
        """Whether a caller would wait now."""
        with self._lock:
            return bool(self._waiters) or not self._has_room()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """Hold a place for one call: wait (without blocking the loop) until there is one."""
        slot = Slot(await self._acquire())
        try:
            yield slot
        finally:
            self._release(slot)

    async def _acquire(self) -> Ticket:
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self._has_room():
                return self._admit()
            waiter = _Waiter(loop)
            self._waiters.append(waiter)
            if self._in_flight >= int(self._limit):  # waiting for room, not for a pause to end
                self._fulls += 1
            try:
                self._arm_timer()
            except RuntimeError:  # no thread for the timer: nobody would wake this waiter
                self._waiters.remove(waiter)
                raise
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                if waiter.ticket is not None:  # granted just as it was cancelled: give it back
                    self._in_flight -= 1
                    self._grant()
                else:
                    self._waiters.remove(waiter)
            raise
        assert waiter.ticket is not None
        return waiter.ticket

    def _has_room(self) -> bool:
        return self._in_flight < int(self._limit) and self._clock() >= self._pause_until

    def _admit(self) -> Ticket:
        ticket = Ticket(epoch=self._epoch, fulls=self._fulls)
        self._in_flight += 1
        if self._in_flight >= int(self._limit):
            self._fulls += 1
        return ticket

    def _grant(self) -> None:
        """Hand free slots to waiters, in order (under the lock)."""
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            waiter.ticket = self._admit()
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
            except RuntimeError:  # its loop is closed: nobody will take the slot
                self._in_flight -= 1
        self._arm_timer()

    def _arm_timer(self) -> None:
        """While paused with callers waiting, wake them when the pause ends (under the lock)."""
        remaining = self._pause_until - self._clock()
        if not self._waiters or remaining <= 0 or self._timer is not None:
            return
        self._timer = threading.Timer(remaining, self._pause_over)
        self._timer.daemon = True
        self._timer.start()

    def _pause_over(self) -> None:
        with self._lock:
            self._timer = None
            self._grant()

    def _release(self, slot: Slot) -> None:
        with self._lock:
            self._in_flight -= 1
            self._adapt(slot)
            moved = self._moved()
            self._grant()
        if moved is not None:
            log.info("model call limit moved", extra=moved)

    def _adapt(self, slot: Slot) -> None:
        now = self._clock()
        ticket = slot.ticket
        if slot.outcome is CallOutcome.THROTTLED:
            self._throttled += 1
            if not self._adaptive:
                return
            if ticket.epoch == self._epoch:  # admitted since the last cut: a new burst
                self._epoch += 1
                beta = SLOW_START_BETA if self._w_max is None else BETA
                self._floor = max(1.0, self._limit * beta)
            self._limit = max(self._floor, self._limit - 1)
            # Where the last 429 came: one above the limit now. The limit holds here and only
            # probes higher; climbing back to where a burst began would meet a cut quota again.
            self._w_max = self._limit + 1
            self._probe_s = self._probe_base
            self._last_change = now
            if slot.retry_after_s:
                pause = min(slot.retry_after_s, MAX_PAUSE_S)
                self._pause_until = max(self._pause_until, now + pause)
            return
        if slot.outcome is not CallOutcome.OK or self._fulls == ticket.fulls:
            return  # nothing learnt: the limit was never full while the call was in flight
        if self._w_max is None:
            self._limit = min(self._ceiling, self._limit + SLOW_START_STEP)
        elif now - self._last_change >= self._probe_s and self._limit < self._ceiling:
            self._limit = min(float(self._ceiling), math.floor(self._limit) + 1.0)
            self._last_change = now
            self._probe_s = max(MIN_PROBE_S, self._probe_s / 2)

    def _moved(self) -> dict[str, int] | None:
        """Fields for one log line when the limit moved a lot since the last (under the lock)."""
        limit = int(self._limit)
        if abs(limit - self._logged) < max(2, self._logged // 4):
            return None
        was, self._logged = self._logged, limit
        return {"limit": limit, "was": was, "throttled": self._throttled}


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
