"""The batch pipeline: download -> prepare -> describe -> write, each stage bounded.

A fixed pool of download workers (DOWNLOAD_CONCURRENCY) feeds a bounded queue
read by a fixed pool of model workers (MODEL_CONCURRENCY); preparation runs on
a thread pool, each decode holding its estimated bytes of the process's decode
budget; finished records go to a small pool of writers (the caller's
sink: sidecars, checkpoints). A source moves on as soon as it is ready, so the
model stage starts with the first download, and no stage ever holds more than
its bound. Every worker turns its own failures into records: a task group
cancels all siblings on the first exception, and one bad image must not stop
a batch.

At ``stop_at`` the download and model stages are cancelled; the writers are
not, so every record finished by then is still handed to the sink, and every
source without one gets a ``deadline_exceeded`` record.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from .batch import Source, parse_source
from .errors import Code, SourceError
from .fetch import Fetcher
from .gemini import Described, Spent
from .images import PreparedImage, prepare
from .logs import source_var
from .memory import DecodeBudget
from .quota import CallGate, Slot
from .records import OK, QUEUED, Record
from .settings import DEFAULT_MAX_DECODE_BYTES, Prices

log = logging.getLogger(__name__)

# Writes are small and fast; a few at once keep up with any model concurrency.
DEFAULT_WRITE_CONCURRENCY = 8
# Finished records waiting for a free writer. When the writers fall behind, the model
# workers wait for room here instead of answering more: a process that dies then loses
# at most its calls in flight plus this many and the writers' records (see HandOff).
DEFAULT_HANDOFF_SIZE = 8
RecordSink = Callable[[int, Record], Awaitable[None]]


class ModelBackend(Protocol):
    """The model stage's seam: Gemini's answer now (:class:`describer.gemini.Describer`), or
    the request queued for a Batch API job whose answers land later
    (:class:`describer.batchjobs.BatchRequests`). Preparation and records are the same."""

    async def answer(
        self, position: int, image: PreparedImage, prompt: str, *, schema: str | None, spent: Spent
    ) -> Described | None:
        """The answer for the run's source at ``position``, or None once it is queued."""
        ...

    def calls(self) -> dict[str, int]:
        """The limit on calls in flight and the 429s met (:meth:`Pipeline.model_calls`)."""
        ...


@dataclass(frozen=True)
class _Ready:
    index: int
    image: PreparedImage


@dataclass
class _Flight:
    """A source on its way: what its record says if the deadline cuts it short."""

    started: float
    known: dict[str, Any] = field(default_factory=dict)
    spent: Spent = field(default_factory=Spent)


@dataclass(frozen=True)
class StageLimits:
    download_concurrency: int
    model_concurrency: int
    image_max_side: int
    max_image_pixels: int
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    write_concurrency: int = DEFAULT_WRITE_CONCURRENCY
    handoff_size: int = DEFAULT_HANDOFF_SIZE
    # Side of the gallery thumbnails made during preparation; 0 makes none.
    thumbnail_side: int = 0


class Pipeline:
    """Describes a list of source URIs into one record each, in input order."""

    def __init__(
        self,
        *,
        fetcher: Fetcher,
        describer: ModelBackend,
        cpu_executor: Executor,
        limits: StageLimits,
        model: str,
        prompt: str,
        schema: str | None = None,
        parse: Callable[[str], Source] = parse_source,
        decode_budget: DecodeBudget | None = None,
        answer_room: CallGate,
        prices: Prices | None = None,
    ) -> None:
        self._fetcher = fetcher
        # The process's room for answers (Runtime.answer_room), shared with every other
        # invocation, so that what a crash can cost is bounded per process.
        self._answer_room = answer_room
        # The process's one budget, shared with every other invocation's decodes.
        self._decode_budget = decode_budget
        self._schema = schema
        # The CLI widens this to local paths; the function never does.
        self._parse = parse
        self._describer = describer
        # What a record's cost_usd is reckoned at; None: records carry no cost.
        self._prices = prices
        self._cpu = cpu_executor
        self._limits = limits
        self._model = model
        self._prompt = prompt
        # The last run's hand-off to the writers: how much it held at most.
        self.handoff: HandOff | None = None

    def model_calls(self) -> dict[str, int]:
        """The process's limit on Gemini calls in flight now, and the rate-limit 429s this
        invocation's calls met and rode out (retried, or ended as ``quota_exhausted``)."""
        return self._describer.calls()

    async def run(
        self,
        uris: Sequence[str],
        *,
        stop_at: float | None = None,
        on_record: RecordSink | None = None,
        interrupt: asyncio.Event | None = None,
    ) -> list[Record]:
        """One record per URI, in input order.

        ``stop_at`` is a deadline on the event loop's clock (``loop.time()``);
        ``on_record(index, record)`` is awaited for every record finished
        before it, by at most ``write_concurrency`` writers at once. Setting
        ``interrupt`` (the command line's Ctrl-C) stops the run as the deadline
        would, and the sources left get ``interrupted`` records.
        """
        if not uris:
            return []
        batch = _Batch(
            uris,
            on_record,
            writers=self._limits.write_concurrency if on_record else 0,
            handoff_size=self._limits.handoff_size,
            room=self._answer_room,
            prices=self._prices,
        )
        self.handoff = batch.handoff
        queue: asyncio.Queue[_Ready | None] = asyncio.Queue(maxsize=self._limits.model_concurrency)
        pending = iter(range(len(uris)))
        async with asyncio.TaskGroup() as writers:
            for _ in range(batch.writers):
                writers.create_task(batch.write_worker())
            watcher: asyncio.Task[None] | None = None
            try:
                async with asyncio.timeout_at(stop_at) as deadline, asyncio.TaskGroup() as group:
                    if interrupt is not None:
                        watcher = asyncio.create_task(_stop_on(interrupt, deadline))
                    describers = [
                        group.create_task(self._describe_worker(queue, batch))
                        for _ in range(min(self._limits.model_concurrency, len(uris)))
                    ]
                    async with asyncio.TaskGroup() as downloads:
                        for _ in range(min(self._limits.download_concurrency, len(uris))):
                            downloads.create_task(self._download_worker(pending, queue, batch))
                    for _ in describers:
                        await queue.put(None)
            except TimeoutError:
                log.warning(
                    "deadline reached; unfinished sources are recorded as deadline_exceeded",
                    extra={"finished": batch.finished, "count": len(uris)},
                )
            finally:
                if watcher is not None:
                    watcher.cancel()
            # When the work stopped: a record cut short is timed to here, not to after
            # the writers have drained.
            stopped = time.monotonic()
            await batch.close()
        interrupted = interrupt is not None and interrupt.is_set()
        return [
            record
            if record is not None
            else self._out_of_time(
                uri, batch.flights.get(index), interrupted=interrupted, stopped=stopped
            )
            for index, (uri, record) in enumerate(zip(uris, batch.records, strict=True))
        ]

    def _out_of_time(
        self, uri: str, flight: _Flight | None, *, interrupted: bool, stopped: float
    ) -> Record:
        what = "was stopped unfinished" if flight is not None else "was not started"
        error = (
            SourceError(Code.INTERRUPTED, f"The source {what}: the run was interrupted.")
            if interrupted
            else SourceError(
                Code.DEADLINE_EXCEEDED,
                f"The source {what}: the invocation reached its deadline "
                "(FUNCTION_TIMEOUT_S minus DEADLINE_MARGIN_S).",
                transient=True,
            )
        )
        known: dict[str, Any] = {}
        if flight is not None:
            # Calls already made may be billed: the record counts them, as any other does.
            known = {
                **flight.known,
                "attempts": flight.spent.attempts,
                "usage": flight.spent.usage,
                "latency_ms": int((stopped - flight.started) * 1000),
            }
        record = Record.failed(
            uri,
            error,
            model=self._model,
            prompt=self._prompt,
            schema=self._schema,
            **known,
        )
        return record.priced(self._prices) if self._prices else record

    async def _download_worker(
        self,
        pending: Iterator[int],
        queue: asyncio.Queue[_Ready | None],
        batch: _Batch,
    ) -> None:
        for index in pending:
            uri = batch.uris[index]
            started = time.monotonic()
            batch.flights[index] = _Flight(started)
            token = source_var.set(uri)
            try:
                ready = await self._download_one(index, uri)
            except SourceError as exc:
                await batch.finish(index, self._failed(uri, exc, started))
                continue
            except Exception as exc:
                log.exception("unexpected failure preparing a source")
                await batch.finish(
                    index,
                    self._failed(
                        uri, SourceError(Code.DOWNLOAD_FAILED, f"Internal error: {exc!r}."), started
                    ),
                )
                continue
            finally:
                source_var.reset(token)
            batch.flights[index].known = _known(ready.image)
            await queue.put(ready)

    async def _download_one(self, index: int, uri: str) -> _Ready:
        source = self._parse(uri)
        data = await self._fetcher.fetch(source)
        cancelled = threading.Event()
        job = partial(
            prepare,
            data,
            max_side=self._limits.image_max_side,
            max_pixels=self._limits.max_image_pixels,
            max_decode_bytes=self._limits.max_decode_bytes,
            budget=self._decode_budget,
            cancelled=cancelled,
            thumbnail_side=self._limits.thumbnail_side,
        )
        try:
            image = await asyncio.get_running_loop().run_in_executor(self._cpu, job)
        except asyncio.CancelledError:
            # The wait for the decode budget happens in the worker thread, which a
            # cancelled task cannot interrupt: told, a decode still waiting gives up
            # instead of decoding for nobody. One already decoding finishes and gives
            # its bytes back.
            cancelled.set()
            raise
        return _Ready(index, image)

    async def _describe_worker(
        self,
        queue: asyncio.Queue[_Ready | None],
        batch: _Batch,
    ) -> None:
        while (ready := await queue.get()) is not None:
            uri = batch.uris[ready.index]
            token = source_var.set(uri)
            flight = batch.flights[ready.index]
            known = flight.known
            # Room for the answer before asking for it: calls in flight plus answers
            # not yet kept never pass the bound, so a crash loses no more than that.
            await batch.reserve(ready.index)
            try:
                answer = await self._describer.answer(
                    ready.index, ready.image, self._prompt, schema=self._schema, spent=flight.spent
                )
            except Exception as exc:
                if isinstance(exc, SourceError):
                    error = exc
                else:
                    log.exception("unexpected failure describing a source")
                    error = SourceError(Code.MODEL_ERROR, f"Internal error: {exc!r}.")
                # The calls made and the answers billed, whatever the failure.
                spent = {"attempts": flight.spent.attempts, "usage": flight.spent.usage}
                record = self._failed(uri, error, flight.started, **known, **spent)
                await batch.finish(ready.index, record)
            else:
                if answer is None:
                    # Queued for a batch job: what preparation learnt is kept until it answers.
                    queued = Record(
                        source=uri,
                        status=QUEUED,
                        model=self._model,
                        prompt=self._prompt,
                        schema=self._schema,
                        latency_ms=_elapsed_ms(flight.started),
                        **known,
                    )
                    await batch.finish(ready.index, queued)
                    continue
                record = Record(
                    source=uri,
                    status=OK,
                    model=answer.model,
                    simulated=answer.simulated,
                    prompt=self._prompt,
                    description=answer.text,
                    data=answer.data,
                    schema=self._schema,
                    usage=answer.usage,
                    attempts=answer.attempts,
                    latency_ms=_elapsed_ms(flight.started),
                    **known,
                )
                await batch.finish(ready.index, record)
                log.info("described", extra={"status": OK, "attempts": answer.attempts})
            finally:
                if batch.records[ready.index] is None:
                    batch.release(ready.index)  # cut short: no answer to keep
                source_var.reset(token)

    def _failed(self, uri: str, exc: SourceError, started: float, **known: object) -> Record:
        log.warning(
            exc.message, extra={"status": "error", "error_code": str(exc.code), "source": uri}
        )
        return Record.failed(
            uri,
            exc,
            model=self._model,
            prompt=self._prompt,
            schema=self._schema,
            latency_ms=_elapsed_ms(started),
            **known,
        )


@dataclass
class HandOff:
    """What the hand-off to the writers held: the bound a test (or a crash) can see.

    ``unwritten_peak`` is the most records ever finished and not yet through the
    sink: never more than the workers that finish records (each holds one while
    it waits for room) plus the channel and the writers.
    ``answers_peak`` is the most model calls in flight plus answers not yet kept:
    a model worker takes room for its answer before it calls, so never more than
    ``room`` (MODEL_CONCURRENCY by default), which is all a crash can lose.
    """

    room: int  # model calls in flight plus answers not yet through the sink, at most
    unwritten: int = 0
    unwritten_peak: int = 0
    answers: int = 0  # model calls in flight and answers not yet through the sink, now
    answers_peak: int = 0
    room_waits: int = 0  # times a model worker waited for room before calling


class _Batch:
    """One run's shared state: its records, and the bounded channel that feeds the writers."""

    def __init__(
        self,
        uris: Sequence[str],
        sink: RecordSink | None,
        *,
        writers: int,
        handoff_size: int,
        room: CallGate,
        prices: Prices | None = None,
    ) -> None:
        self.uris = uris
        self._prices = prices
        self.records: list[Record | None] = [None] * len(uris)
        # The sources started and not yet finished.
        self.flights: dict[int, _Flight] = {}
        self.finished = 0
        self._sink = sink
        self._written: asyncio.Queue[int | None] = asyncio.Queue(maxsize=max(1, handoff_size))
        # Finished when the deadline cut their hand-off short: handed over at close.
        self._unsent: list[int] = []
        self.writers = writers
        self.handoff = HandOff(room=room.state.ceiling)
        # Room for answers, taken before a model call and given back once the answer
        # is through the sink; none is needed where nothing is kept.
        self._room = room if sink is not None else None
        self._holding: dict[int, Slot] = {}

    async def reserve(self, index: int) -> None:
        """Wait for room for one more answer (a model call and its keeping)."""
        if self._room is None:
            return
        if self._room.full:
            self.handoff.room_waits += 1
        self._holding[index] = await self._room.take()
        self.handoff.answers += 1
        self.handoff.answers_peak = max(self.handoff.answers_peak, self.handoff.answers)

    def release(self, index: int) -> None:
        """Give back the room an answer held (kept, or never to come)."""
        slot = self._holding.pop(index, None)
        if self._room is not None and slot is not None:
            self.handoff.answers -= 1
            self._room.give_back(slot)

    async def finish(self, index: int, record: Record) -> None:
        """Keep the record, then hand it to the writers, waiting while their channel is full."""
        if self._prices is not None:
            record = record.priced(self._prices)
        self.records[index] = record
        self.flights.pop(index, None)
        self.finished += 1
        if self._sink is None:
            return
        handoff = self.handoff
        handoff.unwritten += 1
        handoff.unwritten_peak = max(handoff.unwritten_peak, handoff.unwritten)
        try:
            await self._written.put(index)
        except asyncio.CancelledError:
            self._unsent.append(index)  # the deadline: still written, at close
            raise

    async def close(self) -> None:
        """Hand over what the deadline cut short, then let every writer drain and stop."""
        for index in self._unsent:
            await self._written.put(index)
        for _ in range(self.writers):
            await self._written.put(None)

    async def write_worker(self) -> None:
        assert self._sink is not None
        while (index := await self._written.get()) is not None:
            record = self.records[index]
            assert record is not None
            token = source_var.set(record.source)
            try:
                await self._sink(index, record)
            except Exception:
                # The record still reaches the batch results; only its early
                # checkpoint is lost, so a redelivery may describe it again.
                log.exception("could not write a finished record")
            finally:
                self.handoff.unwritten -= 1
                self.release(index)
                source_var.reset(token)


async def _stop_on(interrupt: asyncio.Event, deadline: asyncio.Timeout) -> None:
    """Bring the deadline forward to now once ``interrupt`` is set."""
    await interrupt.wait()
    deadline.reschedule(asyncio.get_running_loop().time())


def _known(image: PreparedImage) -> dict[str, Any]:
    """What preparation learnt of a source, for its record whatever becomes of it."""
    return {
        "mime_type": image.source_mime_type,
        "width": image.width,
        "height": image.height,
        "thumbnail": image.thumbnail,
    }


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
