"""The batch pipeline: download -> prepare -> describe, each stage bounded.

A fixed pool of download workers (DOWNLOAD_CONCURRENCY) feeds a bounded queue
read by a fixed pool of model workers (MODEL_CONCURRENCY); preparation runs on
a thread pool. A source moves on as soon as it is ready, so the model stage
starts with the first download, and no stage ever holds more than its bound.
Every worker turns its own failures into records: a task group cancels all
siblings on the first exception, and one bad image must not stop a batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial

from .batch import parse_source
from .errors import Code, SourceError
from .fetch import Fetcher
from .gemini import Describer
from .images import PreparedImage, prepare
from .logs import source_var
from .records import OK, Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Ready:
    index: int
    image: PreparedImage
    started: float


@dataclass(frozen=True)
class StageLimits:
    download_concurrency: int
    model_concurrency: int
    image_max_side: int
    max_image_pixels: int


class Pipeline:
    """Describes a list of source URIs into one record each, in input order."""

    def __init__(
        self,
        *,
        fetcher: Fetcher,
        describer: Describer,
        cpu_executor: Executor,
        limits: StageLimits,
        model: str,
        prompt: str,
    ) -> None:
        self._fetcher = fetcher
        self._describer = describer
        self._cpu = cpu_executor
        self._limits = limits
        self._model = model
        self._prompt = prompt

    async def run(self, uris: Sequence[str]) -> list[Record]:
        records: list[Record | None] = [None] * len(uris)
        if not uris:
            return []
        queue: asyncio.Queue[_Ready | None] = asyncio.Queue(maxsize=self._limits.model_concurrency)
        pending = iter(range(len(uris)))
        async with asyncio.TaskGroup() as group:
            describers = [
                group.create_task(self._describe_worker(queue, uris, records))
                for _ in range(min(self._limits.model_concurrency, len(uris)))
            ]
            async with asyncio.TaskGroup() as downloads:
                for _ in range(min(self._limits.download_concurrency, len(uris))):
                    downloads.create_task(self._download_worker(pending, queue, uris, records))
            for _ in describers:
                await queue.put(None)
        return [r for r in records if r is not None]

    async def _download_worker(
        self,
        pending: Iterator[int],
        queue: asyncio.Queue[_Ready | None],
        uris: Sequence[str],
        records: list[Record | None],
    ) -> None:
        for index in pending:
            uri = uris[index]
            started = time.monotonic()
            token = source_var.set(uri)
            try:
                ready = await self._download_one(index, uri, started)
            except SourceError as exc:
                records[index] = self._failed(uri, exc, started)
                continue
            except Exception as exc:
                log.exception("unexpected failure preparing a source")
                records[index] = self._failed(
                    uri, SourceError(Code.DOWNLOAD_FAILED, f"Internal error: {exc!r}."), started
                )
                continue
            finally:
                source_var.reset(token)
            await queue.put(ready)

    async def _download_one(self, index: int, uri: str, started: float) -> _Ready:
        source = parse_source(uri)
        data = await self._fetcher.fetch(source)
        job = partial(
            prepare,
            data,
            max_side=self._limits.image_max_side,
            max_pixels=self._limits.max_image_pixels,
        )
        image = await asyncio.get_running_loop().run_in_executor(self._cpu, job)
        return _Ready(index, image, started)

    async def _describe_worker(
        self,
        queue: asyncio.Queue[_Ready | None],
        uris: Sequence[str],
        records: list[Record | None],
    ) -> None:
        while (ready := await queue.get()) is not None:
            uri = uris[ready.index]
            token = source_var.set(uri)
            image = ready.image
            known = {
                "mime_type": image.source_mime_type,
                "width": image.width,
                "height": image.height,
            }
            try:
                answer = await self._describer.describe(image, self._prompt)
            except SourceError as exc:
                records[ready.index] = self._failed(uri, exc, ready.started, **known)
            except Exception as exc:
                log.exception("unexpected failure describing a source")
                records[ready.index] = self._failed(
                    uri,
                    SourceError(Code.MODEL_ERROR, f"Internal error: {exc!r}."),
                    ready.started,
                    **known,
                )
            else:
                records[ready.index] = Record(
                    source=uri,
                    status=OK,
                    model=self._model,
                    prompt=self._prompt,
                    description=answer.text,
                    usage=answer.usage,
                    attempts=answer.attempts,
                    latency_ms=_elapsed_ms(ready.started),
                    **known,  # type: ignore[arg-type]
                )
                log.info("described", extra={"status": OK, "attempts": answer.attempts})
            finally:
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
            latency_ms=_elapsed_ms(started),
            **known,
        )


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
