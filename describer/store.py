"""Writing results to Cloud Storage, and reading back what was already written.

google-cloud-storage is synchronous, so every call runs on the I/O thread pool,
never on the event loop. Every object written carries :data:`OUTPUT_MARKER`
in its metadata, so the function can tell its own output from an upload.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.cloud import storage

from .errors import StorageUnavailable

OUTPUT_MARKER_KEY = "describer-output"
OUTPUT_MARKER = {OUTPUT_MARKER_KEY: "true"}
# Metadata naming the generation of the upload or manifest a result came from.
SOURCE_GENERATION_KEY = "describer-source-generation"
_T = TypeVar("_T")


def is_own_output(metadata: Mapping[str, Any] | None) -> bool:
    return bool(metadata) and str((metadata or {}).get(OUTPUT_MARKER_KEY, "")).lower() == "true"


class ResultStore:
    """Result objects in Cloud Storage, written create-only where it matters."""

    def __init__(
        self, client: storage.Client, io_executor: Executor, *, timeout_s: float = 60.0
    ) -> None:
        self._client = client
        self._io = io_executor
        self._timeout = timeout_s

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn)

    async def read_json(self, bucket: str, name: str) -> tuple[dict[str, Any] | None, int | None]:
        """The JSON object stored at bucket/name and its generation, or (None, None)."""

        def read() -> tuple[dict[str, Any] | None, int | None]:
            blob = self._client.bucket(bucket).get_blob(name, timeout=self._timeout)
            if blob is None:
                return None, None
            # Keep the generation from the metadata read: a download may reset it.
            generation = blob.generation
            try:
                data = json.loads(blob.download_as_bytes(timeout=self._timeout))
            except gexc.NotFound:
                return None, None
            except ValueError:
                data = None
            return (data if isinstance(data, dict) else None), generation

        try:
            return await self._run(read)
        except gexc.GoogleAPICallError as exc:
            raise StorageUnavailable(f"gs://{bucket}/{name}", exc) from exc

    async def metadata(self, bucket: str, name: str) -> dict[str, str] | None:
        """The custom metadata of an object, or None when it does not exist."""

        def read() -> dict[str, str] | None:
            blob = self._client.bucket(bucket).get_blob(name, timeout=self._timeout)
            return None if blob is None else dict(blob.metadata or {})

        try:
            return await self._run(read)
        except gexc.GoogleAPICallError as exc:
            raise StorageUnavailable(f"gs://{bucket}/{name}", exc) from exc

    async def write(
        self,
        bucket: str,
        name: str,
        data: bytes,
        *,
        content_type: str,
        if_generation_match: int | None = None,
        source_generation: str | None = None,
    ) -> bool:
        """Write one object; return False when a generation precondition says it is done.

        ``if_generation_match=0`` makes the write create-only: a concurrent
        delivery of the same event that got there first wins, and this one
        counts as already done instead of overwriting.
        """
        metadata = dict(OUTPUT_MARKER)
        if source_generation is not None:
            metadata[SOURCE_GENERATION_KEY] = source_generation

        def write() -> None:
            blob = self._client.bucket(bucket).blob(name)
            blob.metadata = metadata
            blob.upload_from_string(
                data,
                content_type=content_type,
                if_generation_match=if_generation_match,
                timeout=self._timeout,
            )

        try:
            await self._run(write)
        except gexc.PreconditionFailed:
            return False
        except (gexc.GoogleAPICallError, OSError) as exc:
            raise StorageUnavailable(f"gs://{bucket}/{name}", exc) from exc
        return True
