"""The process's adaptive limit on Gemini calls, on its own: threads, loops, cancellation.

Real event loops in real threads, as functions-framework runs invocations; the
clock is passed in where a test needs time to move at its command.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from describer.quota import BETA, INITIAL_LIMIT, CallGate, CallOutcome


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def call(gate: CallGate, outcome: CallOutcome, retry_after_s: float | None = None) -> None:
    """One call through the gate, settled with ``outcome``, on a loop of its own."""

    async def one() -> None:
        async with gate.slot() as slot:
            slot.settle(outcome, retry_after_s=retry_after_s)

    asyncio.run(one())


def fill(gate: CallGate, outcome: CallOutcome) -> None:
    """As many calls at once as the limit lets in, all settled with ``outcome``."""

    async def burst() -> None:
        entered = asyncio.Event()
        count = gate.state.limit
        inside = 0

        async def one() -> None:
            nonlocal inside
            async with gate.slot() as slot:
                inside += 1
                if inside == count:
                    entered.set()
                await entered.wait()
                slot.settle(outcome)

        await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(burst())


def test_the_limit_starts_modestly_and_grows_by_half_while_full_calls_succeed() -> None:
    gate = CallGate(64, clock=Clock())
    assert gate.state.limit == INITIAL_LIMIT == 4
    fill(gate, CallOutcome.OK)
    assert gate.state.limit == 6
    fill(gate, CallOutcome.OK)
    assert gate.state.limit == 9
    # AND a call that did not find the limit full teaches nothing (an idle process)
    call(gate, CallOutcome.OK)
    assert gate.state.limit == 9


def test_429s_cut_the_limit_by_one_each_but_a_burst_by_at_most_beta() -> None:
    clock = Clock()
    gate = CallGate(64, initial=20, clock=clock)
    # WHEN three calls admitted before any cut meet 429 THEN each takes one off
    tickets = []

    async def three() -> None:
        async with gate.slot() as a, gate.slot() as b, gate.slot() as c:
            tickets.extend([a, b, c])
            for slot in (a, b, c):
                slot.settle(CallOutcome.THROTTLED)

    asyncio.run(three())
    assert gate.state.limit == 17 and gate.state.throttled == 3
    # WHEN the first burst (the end of slow start) is 30 calls THEN the limit falls to where
    # slow start was a round trip before, no lower
    gate2 = CallGate(64, initial=30, clock=clock)
    fill(gate2, CallOutcome.THROTTLED)
    assert gate2.state.limit == 20
    # WHEN a later burst of all 20 meets 429 THEN it falls by BETA at most
    fill(gate2, CallOutcome.THROTTLED)
    assert gate2.state.limit == int(20 * BETA)
    # AND per-day quotas, 5xx and timeouts say nothing about the limit
    before = gate2.state.limit
    call(gate2, CallOutcome.OTHER)
    assert gate2.state.limit == before


def test_after_429s_the_limit_holds_below_them_and_probes_one_above_only_after_a_while() -> None:
    clock = Clock()
    gate = CallGate(64, initial=9, clock=clock, probe_s=5.0)
    call(gate, CallOutcome.THROTTLED)  # one too many: 9 -> 8
    assert gate.state.limit == 8
    # WHEN full calls succeed right away THEN the limit stays where 429s did not happen
    for _ in range(5):
        fill(gate, CallOutcome.OK)
    assert gate.state.limit == 8
    # WHEN 5 s pass without a 429 THEN one probe goes one above
    clock.now += 5.0
    fill(gate, CallOutcome.OK)
    assert gate.state.limit == 9
    # AND a probe that passes halves the wait for the next
    clock.now += 2.5
    fill(gate, CallOutcome.OK)
    assert gate.state.limit == 10
    # AND it never goes past the ceiling
    capped = CallGate(3, initial=10, clock=clock)
    assert capped.state.limit == 3


def test_calls_from_many_threads_and_loops_never_exceed_the_limit() -> None:
    """Eight invocations, each its own thread and loop, 40 calls each through one gate."""
    gate = CallGate(5, initial=5, clock=Clock())
    lock = threading.Lock()
    inside = peak = 0

    async def invocation() -> None:
        async def one() -> None:
            nonlocal inside, peak
            async with gate.slot() as slot:
                with lock:
                    inside += 1
                    peak = max(peak, inside)
                await asyncio.sleep(0.001)
                with lock:
                    inside -= 1
                slot.settle(CallOutcome.OTHER)

        await asyncio.gather(*(one() for _ in range(40)))

    threads = [threading.Thread(target=asyncio.run, args=(invocation(),)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == 5
    assert gate.state.in_flight == 0 and gate.state.waiting == 0


def test_a_cancelled_or_timed_out_waiter_gives_its_slot_back() -> None:
    gate = CallGate(1, initial=1, clock=Clock())

    async def scenario() -> None:
        holder_in, release = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with gate.slot():
                holder_in.set()
                await release.wait()

        task = asyncio.create_task(holder())
        await holder_in.wait()
        # WHEN a caller times out waiting THEN it leaves the queue
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01), gate.slot():
                pass
        assert gate.state.waiting == 0
        # WHEN a waiter is cancelled just as the slot is handed to it THEN the slot comes back
        waiter = asyncio.create_task(_enter(gate))
        await asyncio.sleep(0)
        assert gate.state.waiting == 1
        release.set()
        await task  # frees the slot: granted to the waiter, whose wake-up is still queued
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.state.in_flight == 0
        # AND the next caller gets in at once
        async with asyncio.timeout(1), gate.slot():
            assert gate.state.in_flight == 1

    asyncio.run(scenario())


async def _enter(gate: CallGate) -> None:
    async with gate.slot():
        pass


def test_retry_info_pauses_every_new_call_of_the_process_until_it_has_passed() -> None:
    gate = CallGate(8, initial=8)
    # WHEN one call meets a 429 that says to come back in 0.3 s
    call(gate, CallOutcome.THROTTLED, retry_after_s=0.3)
    # THEN a call from another thread, on its own loop, waits until then
    waited: list[float] = []

    async def later() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with gate.slot() as slot:
            waited.append(loop.time() - start)
            slot.settle(CallOutcome.OK)

    thread = threading.Thread(target=asyncio.run, args=(later(),))
    thread.start()
    thread.join(5)
    assert waited and waited[0] >= 0.25


@pytest.mark.parametrize("drop_to", [4, 2])
def test_a_quota_cut_by_three_quarters_is_followed_within_a_few_bursts(drop_to: int) -> None:
    """16 calls fit, then only ``drop_to``: each burst admitted after a cut sheds the excess."""
    gate = CallGate(64, initial=16, clock=Clock())
    quota = drop_to
    bursts = 0
    while gate.state.limit > quota:
        _burst_against(gate, quota)
        bursts += 1
    assert bursts <= 5
    assert gate.state.limit >= max(1, int(quota * BETA))


def _burst_against(gate: CallGate, quota: int) -> None:
    """As many calls as the limit allows at once; those past ``quota`` meet 429."""
    count = gate.state.limit

    async def burst() -> None:
        entered = asyncio.Event()
        admitted = 0

        async def one() -> None:
            nonlocal admitted
            async with gate.slot() as slot:
                place = admitted
                admitted += 1
                if admitted == count:
                    entered.set()
                await entered.wait()
                slot.settle(CallOutcome.THROTTLED if place >= quota else CallOutcome.OK)

        await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(burst())
