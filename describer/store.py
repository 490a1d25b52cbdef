"""Writing results to Cloud Storage, and reading back what was already written.

:class:`Store` is what the rest of the package needs from storage;
:class:`ResultStore` is the Cloud Storage one. google-cloud-storage is
synchronous, so every call runs on the I/O thread pool, never on the event
loop. Every object written carries :data:`OUTPUT_MARKER` in its metadata, so
the function can tell its own output from an upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage
from google.cloud.storage.retry import (
    DEFAULT_RETRY,
    ConditionalRetryPolicy,
    is_generation_specified,
)

from .errors import StorageUnavailable

OUTPUT_MARKER_KEY = "describer-output"
OUTPUT_MARKER = {OUTPUT_MARKER_KEY: "true"}
# Metadata naming the generation of the upload or manifest a result came from.
SOURCE_GENERATION_KEY = "describer-source-generation"
# Metadata on a manifest's JSONL: "false" while sources remain after a deadline.
COMPLETE_KEY = "describer-complete"
# Metadata on a sidecar: which model, prompt and schema made it, so a backfill's
# listing tells what is already described without reading a single sidecar.
RESULT_KEY = "describer-result-key"
# Reads of checkpoints at once; they only happen when a manifest is redelivered.
READ_CONCURRENCY = 8
# Cloud Storage's largest page: fewest round trips when a backfill lists a bucket.
LIST_PAGE_SIZE = 1000
# Cloud Storage composes at most this many source objects in one call.
MAX_COMPOSE_SOURCES = 32
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: what a listing tells without reading the object."""

    name: str
    generation: int
    content_type: str
    metadata: Mapping[str, str]


# Objects of one listing page, and the token of the next page (None after the last).
Page = tuple[list[ObjectInfo], str | None]


def is_own_output(metadata: Mapping[str, Any] | None) -> bool:
    return bool(metadata) and str((metadata or {}).get(OUTPUT_MARKER_KEY, "")).lower() == "true"


class Store(Protocol):
    """Result objects: what the invocation reads back and writes."""

    async def read_json(
        self, bucket: str, name: str
    ) -> tuple[dict[str, Any] | None, int | None]: ...

    async def stat(self, bucket: str, name: str) -> tuple[dict[str, str], int] | None: ...

    async def read_json_meta(
        self, bucket: str, name: str
    ) -> tuple[dict[str, Any] | None, int | None, dict[str, str]]: ...

    async def read_all_json(self, bucket: str, prefix: str) -> dict[str, dict[str, Any]]: ...

    async def read_bytes(self, bucket: str, name: str) -> bytes | None: ...

    async def list(
        self, bucket: str, prefix: str, *, start: str | None = None, end: str | None = None
    ) -> list[ObjectInfo]: ...

    async def list_page(
        self, bucket: str, prefix: str, *, page_token: str | None, page_size: int
    ) -> Page: ...

    async def write(
        self,
        bucket: str,
        name: str,
        data: bytes,
        *,
        content_type: str,
        if_generation_match: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool: ...

    async def delete_all(self, bucket: str, prefix: str, *, any_writer: bool = False) -> int: ...

    async def compose(
        self,
        bucket: str,
        name: str,
        sources: Sequence[str],
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None: ...


class ResultStore:
    """Result objects in Cloud Storage, written create-only where it matters.

    Every request has ``timeout_s``, and the client's own retries stop after
    ``2 * timeout_s`` instead of its default 120 s: results are written in the
    deadline margin, which is seconds, not minutes.
    """

    def __init__(
        self, client: storage.Client, io_executor: Executor, *, timeout_s: float = 60.0
    ) -> None:
        self._client = client
        self._io = io_executor
        self._timeout = timeout_s
        self._retry: Retry = DEFAULT_RETRY.with_timeout(2 * timeout_s)
        # Writes are retried only when a precondition makes a retry safe.
        self._write_retry = ConditionalRetryPolicy(
            self._retry, is_generation_specified, ["query_params"]
        )

    async def _run(self, fn: Callable[[], _T], uri: str) -> _T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._io, fn)
        except gexc.PreconditionFailed:
            raise
        except (gexc.GoogleAPIError, GoogleAuthError, OSError) as exc:
            raise StorageUnavailable(uri, _plainly(exc), permanent=is_permanent(exc)) from exc

    async def read_json(self, bucket: str, name: str) -> tuple[dict[str, Any] | None, int | None]:
        """The JSON object stored at bucket/name and its generation, or (None, None)."""
        data, generation, _ = await self.read_json_meta(bucket, name)
        return data, generation

    async def read_json_meta(
        self, bucket: str, name: str
    ) -> tuple[dict[str, Any] | None, int | None, dict[str, str]]:
        """As :meth:`read_json`, with the object's custom metadata ({} when there is none).

        The data is None, with the generation, for an object that is not a JSON object.
        """

        def read() -> tuple[dict[str, Any] | None, int | None, dict[str, str]]:
            blob = self._client.bucket(bucket).get_blob(
                name, timeout=self._timeout, retry=self._retry
            )
            if blob is None:
                return None, None, {}
            # Keep the generation from the metadata read: a download may reset it.
            generation = blob.generation
            try:
                data = json.loads(
                    blob.download_as_bytes(
                        if_generation_match=generation, timeout=self._timeout, retry=self._retry
                    )
                )
            except (gexc.NotFound, gexc.PreconditionFailed):
                return None, None, {}  # deleted or replaced since: as if not there yet
            except ValueError:
                data = None
            metadata = dict(blob.metadata or {})
            return (data if isinstance(data, dict) else None), generation, metadata

        return await self._run(read, f"gs://{bucket}/{name}")

    async def stat(self, bucket: str, name: str) -> tuple[dict[str, str], int] | None:
        """The custom metadata and generation of an object, or None when it does not exist."""

        def read() -> tuple[dict[str, str], int] | None:
            blob = self._client.bucket(bucket).get_blob(
                name, timeout=self._timeout, retry=self._retry
            )
            return None if blob is None else (dict(blob.metadata or {}), int(blob.generation or 0))

        return await self._run(read, f"gs://{bucket}/{name}")

    async def read_all_json(self, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
        """Every JSON object under ``prefix``, by name; unreadable ones are left out."""

        def names() -> list[str]:
            blobs = self._client.list_blobs(
                bucket, prefix=prefix, timeout=self._timeout, retry=self._retry
            )
            return [blob.name for blob in blobs]

        found = await self._run(names, f"gs://{bucket}/{prefix}")
        read = await bounded_map(
            lambda name: self.read_json(bucket, name), found, limit=READ_CONCURRENCY
        )
        return {name: data for name, (data, _) in zip(found, read, strict=True) if data}

    async def read_bytes(self, bucket: str, name: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

        def read() -> bytes | None:
            try:
                data: bytes = (
                    self._client.bucket(bucket)
                    .blob(name)
                    .download_as_bytes(timeout=self._timeout, retry=self._retry)
                )
            except gexc.NotFound:
                return None
            return data

        return await self._run(read, f"gs://{bucket}/{name}")

    async def list(
        self, bucket: str, prefix: str, *, start: str | None = None, end: str | None = None
    ) -> list[ObjectInfo]:
        """Every object under ``prefix`` (from ``start``, before ``end``), page after page."""

        def listing() -> list[ObjectInfo]:
            blobs = self._client.list_blobs(
                bucket,
                prefix=prefix,
                start_offset=start,
                end_offset=end,
                page_size=LIST_PAGE_SIZE,
                timeout=self._timeout,
                retry=self._retry,
            )
            return [_info(blob) for blob in blobs]

        return await self._run(listing, f"gs://{bucket}/{prefix}")

    async def list_page(
        self, bucket: str, prefix: str, *, page_token: str | None, page_size: int
    ) -> Page:
        """One page of the objects under ``prefix``, and the token of the next (None: the last).

        A backfill lists a page at a time so that it can stop between any two and
        hand the token on: no invocation lists for longer than its time allows.
        """

        def page() -> Page:
            blobs = self._client.list_blobs(
                bucket,
                prefix=prefix,
                page_token=page_token,
                page_size=page_size,
                timeout=self._timeout,
                retry=self._retry,
            )
            items = [_info(blob) for blob in next(blobs.pages, [])]
            return items, blobs.next_page_token

        return await self._run(page, f"gs://{bucket}/{prefix}")

    async def delete_all(self, bucket: str, prefix: str, *, any_writer: bool = False) -> int:
        """Delete every object under ``prefix`` that this function wrote; return how many went.

        Only its own objects: anyone who may write beside them cannot make the
        function delete what it did not write. ``any_writer``: every object, for a prefix
        the function gave someone else to write (a Vertex AI job's answers).
        """

        def delete() -> int:
            blobs = [
                blob
                for blob in self._client.list_blobs(
                    bucket, prefix=prefix, timeout=self._timeout, retry=self._retry
                )
                if any_writer or is_own_output(blob.metadata)
            ]
            for blob in blobs:
                with contextlib.suppress(gexc.NotFound):  # a concurrent delivery got there first
                    blob.delete(timeout=self._timeout, retry=self._retry)
            return len(blobs)

        return await self._run(delete, f"gs://{bucket}/{prefix}")

    async def compose(
        self,
        bucket: str,
        name: str,
        sources: Sequence[str],
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """``name`` as the concatenation of ``sources`` (in order), by Cloud Storage itself.

        No byte passes through this process, so a merge of any size takes constant memory.
        One call takes at most 32 sources: the first writes the destination, each later
        one appends up to 31 more to it under its generation (a retried append that met
        412 fails the whole, which a redelivery composes again from the start).
        Raises StorageUnavailable, saying so, when a source (or the bucket) is missing.
        """

        def compose() -> None:
            where = self._client.bucket(bucket)

            def destination() -> storage.Blob:
                # A fresh resource each call: one carrying the last answer's checksums
                # would be refused as not matching the longer result.
                blob = where.blob(name)
                blob.content_type = content_type
                blob.metadata = {**(metadata or {}), **OUTPUT_MARKER}
                return blob

            first, rest = list(sources[:MAX_COMPOSE_SOURCES]), list(sources[MAX_COMPOSE_SOURCES:])
            composed = destination()
            try:
                composed.compose([where.blob(s) for s in first], timeout=self._timeout)
                while rest:
                    step, rest = rest[: MAX_COMPOSE_SOURCES - 1], rest[MAX_COMPOSE_SOURCES - 1 :]
                    generation = composed.generation
                    composed = destination()
                    composed.compose(
                        [where.blob(name), *(where.blob(s) for s in step)],
                        timeout=self._timeout,
                        if_generation_match=generation,
                        retry=self._retry,
                    )
            except gexc.NotFound as exc:
                # Not "no such bucket", as a 404 on a write means: a source is missing.
                raise StorageUnavailable(
                    f"gs://{bucket}/{name}", LookupError(f"a source object is missing ({exc})")
                ) from exc

        await self._run(compose, f"gs://{bucket}/{name}")

    async def write(
        self,
        bucket: str,
        name: str,
        data: bytes,
        *,
        content_type: str,
        if_generation_match: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Write one object; return False when a generation precondition says it is done.

        ``if_generation_match=0`` makes the write create-only: a concurrent
        delivery of the same event that got there first wins, and this one
        counts as already done instead of overwriting.
        """
        marked = {**(metadata or {}), **OUTPUT_MARKER}

        def write() -> None:
            blob = self._client.bucket(bucket).blob(name)
            blob.metadata = marked
            blob.upload_from_string(
                data,
                content_type=content_type,
                if_generation_match=if_generation_match,
                timeout=self._timeout,
                retry=self._write_retry,
            )

        try:
            await self._run(write, f"gs://{bucket}/{name}")
        except gexc.PreconditionFailed:
            return False
        return True


def bucket_missing(
    client: storage.Client, bucket: str, *, prefix: str = "", timeout_s: float = 10.0
) -> bool | None:
    """Whether ``bucket`` does not exist: True, False, or None when storage did not say.

    A one-object listing answers 404 only for a missing bucket, and needs no more than
    the object-list permission every role the function holds has (``buckets.get``,
    the direct question, is in none of them); a missing object lists as nothing.
    """
    try:
        # One attempt: the client's own retries would go on for two minutes.
        listing = client.list_blobs(
            bucket, prefix=prefix, max_results=1, timeout=timeout_s, retry=None
        )
        next(iter(listing), None)
    except gexc.NotFound:
        return True
    except (gexc.GoogleAPIError, GoogleAuthError, OSError, ValueError):
        return None
    return False


def _info(blob: storage.Blob) -> ObjectInfo:
    return ObjectInfo(
        name=str(blob.name),
        generation=int(blob.generation or 0),
        content_type=str(blob.content_type or ""),
        metadata=dict(blob.metadata or {}),
    )


def _plainly(exc: BaseException) -> BaseException:
    """The storage failure as a sentence fragment a person can act on."""
    if isinstance(exc, gexc.NotFound):
        return LookupError("the bucket does not exist (404)")
    if isinstance(exc, gexc.Forbidden | gexc.Unauthorized):
        return PermissionError(f"the function's service account may not do this ({exc.code})")
    return exc


def is_permanent(exc: BaseException) -> bool:
    """Whether a retry would fail the same way: a 4xx other than 408/429 (no bucket, no access)."""
    return isinstance(exc, gexc.ClientError) and exc.code not in (408, 429)


async def bounded_map(
    fn: Callable[[_T], Awaitable[_R]], items: Iterable[_T], *, limit: int
) -> list[_R]:
    """``[await fn(x) for x in items]`` with at most ``limit`` calls in flight, in order."""
    indexed = list(enumerate(items))
    results: list[_R | None] = [None] * len(indexed)
    pending = iter(indexed)

    async def worker() -> None:
        for index, item in pending:
            results[index] = await fn(item)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(limit, len(indexed))):
                group.create_task(worker())
    except ExceptionGroup as failed:
        # Callers handle one failure, as from a plain loop: the first stands for all.
        raise failed.exceptions[0] from None
    return results  # type: ignore[return-value]


def result_key(model: str, prompt: str, schema: str | None) -> str:
    """A short fingerprint of what a description depends on besides the image."""
    text = f"{model}\n{schema or 'text'}\n{prompt}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def generation_number(value: object) -> int:
    """Generations compare as integers; anything unreadable sorts first."""
    try:
        return int(str(value))
    except ValueError:
        return -1
